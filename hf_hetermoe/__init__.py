"""hf-hetermoe: fast Mixture-of-Experts fine-tuning for Hugging Face transformers.

    import hf_hetermoe as hetermoe
    model = AutoModelForCausalLM.from_pretrained(...)
    model = hetermoe.prepare(model)          # kernel-backed expert layers, same state dict
"""

from .config import HeterMoEConfig
from .errors import (
    ConfigError,
    DeviceMismatchError,
    HeterMoEError,
    UnsupportedLayoutError,
    UnsupportedModelError,
)
from .prepare import is_prepared, prepare, unprepare


def distribute(model, plan=None, optimizer=None, **kwargs):
    """Split ``model`` over a torch.distributed job as ``plan`` says; see :func:`hf_hetermoe.runtime.distribute`."""
    from .runtime import distribute as _distribute

    return _distribute(model, plan, optimizer, **kwargs)

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigError",
    "DeviceMismatchError",
    "HeterMoEConfig",
    "HeterMoEError",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "__version__",
    "distribute",
    "is_prepared",
    "prepare",
    "unprepare",
]

# Make experts_implementation="hetermoe" selectable in from_pretrained without calling prepare.
from .experts import register as _register  # noqa: E402

_register()
