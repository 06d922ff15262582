"""Expert operators of hf-hetermoe, installed as ``hf_hetermoe.kernels`` (see README.md in this folder).

Layers: ``triton_kernels`` (jit code) -> ``triton_ops`` (launchers) -> ``ops`` (custom ops, autograd,
backend choice); ``reference`` is the plain-PyTorch twin of every op; ``routing`` builds the device-side
metadata (``triton_routing`` on CUDA); ``layout`` describes weight layouts. Nothing here knows about transformers.
"""

if __name__ == "kernels":
    # The repository root is on sys.path (`python -c`/`python -m` run in a checkout), so Python offered this
    # folder as the top-level package `kernels`: a name that belongs to Hugging Face's kernels package, which
    # transformers probes for at import. Hand the name to the real package when one is installed; otherwise
    # look absent (transformers reads a package with neither __file__ nor __version__ as not installed).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
    else:
        __file__ = None
        __path__ = []
else:
    from .layout import ACTIVATIONS, ExpertLayout, split_gate_up, w1_logical, w2_logical
    from .ops import BACKENDS, MoEExpertsFunction, moe_experts, resolve_backend, triton_available
    from .routing import Routing, build_routing

    __all__ = [
        "ACTIVATIONS",
        "BACKENDS",
        "ExpertLayout",
        "MoEExpertsFunction",
        "Routing",
        "build_routing",
        "moe_experts",
        "resolve_backend",
        "split_gate_up",
        "triton_available",
        "w1_logical",
        "w2_logical",
    ]
