"""transformers' Hub kernels (``use_kernels``) and hf-hetermoe's instance patches.

From transformers 5.25 (where the ``kernels`` package is installed, which it then requires) ``from_pretrained`` turns
``use_kernels`` on by default, and every ``model.train()`` / ``model.eval()`` that changes the mode kernelizes the
model again: each module whose class is a Hub-kernel layer (the RMSNorms, for one) gets the Hub's forward or, where
none is loaded, has its instance ``forward`` removed. That silently undoes an instance-level forward such as the fused
RMSNorm ``prepare`` binds, and it fails on a model whose parameters are on the ``meta`` device (an expert rank of the
zebra runtime, which holds no embedding). So where hf-hetermoe takes those layers over, it turns transformers' Hub
kernelization off first, through transformers' own switch (``set_use_kernels(False)``), and can turn it back on.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

from torch import nn

from .common import ModuleRef

logger = logging.getLogger("hf_hetermoe.hub_kernels")


def hub_kernels_on(model: nn.Module) -> bool:
    """Whether transformers kernelizes ``model`` with Hub kernels (``PreTrainedModel.use_kernels``)."""
    return bool(getattr(model, "use_kernels", False)) and hasattr(model, "set_use_kernels")


def hub_kernel_layers(model: nn.Module) -> list[str]:
    """Names of the modules running a kernel loaded from the Hub (not the torch fallback) right now."""
    return [name for name, module in model.named_modules() if "_kernel_repo" in module.__dict__]


def turn_off_hub_kernels(model: nn.Module, reason: str) -> Callable[[], None] | None:
    """Turn transformers' Hub kernelization off for ``model``: every Hub-kernel layer back on its class's forward, and
    no re-kernelization at ``train()`` / ``eval()``. Call it before binding instance forwards (turning it off resets
    them). ``reason`` ends the message. Returns the undo (turns it back on, in the mode it had), or ``None`` where
    it was off already. The model's parameters must not be on the ``meta`` device yet (kernelization reads it)."""
    if not hub_kernels_on(model):
        return None
    mode = getattr(model, "kernels_mode", None)
    loaded = hub_kernel_layers(model)
    model.set_use_kernels(False)
    message = f"transformers' Hub kernels (use_kernels) turned off on this {type(model).__name__}: {reason}"
    if loaded:  # a Hub kernel was really running there: the user loses something they may have chosen
        shown = ", ".join(loaded[:3]) + (f" and {len(loaded) - 3} more" if len(loaded) > 3 else "")
        warnings.warn(f"{message} (it ran Hub kernels in {shown})", stacklevel=3)
    else:
        logger.info(message)
    return functools.partial(_turn_on, ModuleRef(model), mode)


def _turn_on(ref: ModuleRef, mode) -> None:
    """Undo of ``turn_off_hub_kernels`` (a module-level function of a weak reference: picklable, no cycle)."""
    ref().set_use_kernels(True, mode=mode)
