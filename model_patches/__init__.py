"""Model families hf-hetermoe supports (installed as ``hf_hetermoe.model_patches``).

One file per family; importing this package registers them all. To add a family: write
``model_patches/<family>.py`` calling ``register_model_patch`` and add its import below.
"""

from . import mixtral, olmoe, qwen3_moe  # noqa: F401  (registration on import)
from .common import activation_name, default_layout
from .registry import MODEL_PATCHES, ModelPatch, get_model_patch, register_model_patch, supported_model_types

__all__ = [
    "MODEL_PATCHES",
    "ModelPatch",
    "activation_name",
    "default_layout",
    "get_model_patch",
    "register_model_patch",
    "supported_model_types",
]
