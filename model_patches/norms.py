"""Swap a model's RMSNorm modules onto the fused kernel (``kernels/rmsnorm.py``), one instance at a time.

A module qualifies structurally (a leaf whose only parameter is a 1-D ``weight``, no buffers, a number attribute
named like ``*eps*``, a one-argument ``forward``) and then numerically: its class's own ``forward`` must agree
with one ``VARIANTS`` entry on fresh random inputs with a random weight, on CPU, in fp32 (to 1e-6, rows scaled
so that eps matters) and in bf16 with bf16 and fp32 weights (same output dtype, same rounding). That tells the
two cast orders apart and rejects look-alikes (``nn.LayerNorm(bias=False)``, Switch Transformers' norm, which
casts to the weight's dtype). Decisions are cached per class (and its ``forward``).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..kernels.rmsnorm import rms_norm, rms_norm_reference
from .common import rebind_forward


class RMSNormVariant(NamedTuple):
    """One operation order of transformers' RMSNorms (arguments of ``kernels.rmsnorm.rms_norm``)."""

    name: str
    offset: float
    cast_before_weight: bool


VARIANTS = (
    RMSNormVariant("cast_before_weight", 0.0, True),  # Llama: weight * xhat.to(x.dtype)
    RMSNormVariant("fp32_weight", 0.0, False),  # GPT-OSS: (weight * xhat).to(x.dtype)
    RMSNormVariant("fp32_one_plus_weight", 1.0, False),  # Qwen3-Next: (xhat * (1 + weight.float())).to(x.dtype)
)
# (x dtype, weight dtype) pairs of the check: fp32 pins the math and eps; bf16 the roundings and output dtype.
_CHECK_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))
_CHECK_ROWS = 8
_CHECK_RTOL = 1e-6

_DECISIONS: dict[tuple[type, Callable], tuple[RMSNormVariant, str] | None] = {}


def _eps_attributes(module: nn.Module) -> list[str]:
    return [
        name
        for name, value in vars(module).items()
        if "eps" in name.lower() and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def _logical_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also where DeepSpeed ZeRO-3 has partitioned it away (``ds_shape``; ``shape`` is then
    ``[0]``)."""
    return getattr(param, "ds_shape", param.shape)


def _qualifies(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    shape = _logical_shape(params["weight"]) if list(params) == ["weight"] else None
    if shape is None or len(shape) != 1 or shape[0] == 0:
        return False
    if next(module.children(), None) is not None or next(module.buffers(recurse=False), None) is not None:
        return False
    try:
        inputs = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    if len(inputs) != 1 or inputs[0].kind not in (inputs[0].POSITIONAL_ONLY, inputs[0].POSITIONAL_OR_KEYWORD):
        return False
    return bool(_eps_attributes(module))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _matches(module: nn.Module, variant: RMSNormVariant, eps_attr: str, gen: torch.Generator) -> bool:
    """Whether ``type(module).forward`` computes ``variant`` with ``eps = module.<eps_attr>`` (CPU, no hooks)."""
    H = _logical_shape(module.weight)[0]
    eps = float(getattr(module, eps_attr))
    # Rows of mean square from 0.1 to 1000 times eps: eps moves the output well above the tolerance.
    scale = (eps if eps > 0 else 1.0) ** 0.5 * torch.logspace(-0.5, 1.5, _CHECK_ROWS)[:, None]
    probe = copy.copy(module)  # shares nothing we set: its own __dict__, a new parameter dict below
    for x_dtype, w_dtype in _CHECK_DTYPES:
        x = (torch.randn(_CHECK_ROWS, H, generator=gen) * scale).to(x_dtype)
        weight = torch.randn(H, generator=gen).to(w_dtype)
        probe.__dict__["_parameters"] = {"weight": nn.Parameter(weight, requires_grad=False)}
        try:
            got = type(module).forward(probe, x)
        except Exception:  # a forward that cannot run on a plain CPU tensor is not one we can stand in for
            return False
        want = rms_norm_reference(x, weight, eps, offset=variant.offset, cast_before_weight=variant.cast_before_weight)
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
            return False
        if not _relative_error(got, want) <= _CHECK_RTOL:
            return False
    return True


def _decide(module: nn.Module) -> tuple[RMSNormVariant, str] | None:
    cls = type(module)
    key = (cls, cls.forward)
    if key not in _DECISIONS:
        gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
        with torch.no_grad():
            _DECISIONS[key] = next(
                (
                    (variant, eps_attr)
                    for eps_attr in _eps_attributes(module)
                    for variant in VARIANTS
                    if _matches(module, variant, eps_attr, gen)
                ),
                None,
            )
    decision = _DECISIONS[key]
    if decision is not None and decision[1] not in _eps_attributes(module):
        return None
    return decision


def _fused_forward(
    variant: RMSNormVariant, eps_attr: str, backend: str, self: nn.Module, hidden_states: torch.Tensor
) -> torch.Tensor:
    """A patched module's forward (bound through ``functools.partial``: picklable, deep-copyable)."""
    return rms_norm(
        hidden_states,
        self.weight,
        getattr(self, eps_attr),
        offset=variant.offset,
        cast_before_weight=variant.cast_before_weight,
        backend=backend,
    )


def _undo_all(undos: list[Callable[[], None]]) -> None:
    for restore in reversed(undos):
        restore()


def rms_norm_variant(module: nn.Module) -> RMSNormVariant | None:
    """The ``VARIANTS`` entry ``module``'s class computes, or ``None`` when it is no RMSNorm we can fuse."""
    decision = _decide(module) if _qualifies(module) else None
    return decision[0] if decision is not None else None


def patch_rms_norms(model: nn.Module, *, backend: str = "auto") -> tuple[int, Callable[[], None]]:
    """Rebind ``forward`` of every RMSNorm module of ``model`` whose class matches a variant to the fused kernel.

    Modules that already carry an instance ``forward`` (patched before, by us or another library) are left
    alone, so a second call patches nothing. Parameters, buffers, hooks and the state dict are untouched.

    Args:
        backend: passed to ``kernels.rmsnorm.rms_norm`` ('auto', 'triton' or 'reference').

    Returns:
        ``(number of modules patched, undo)``; ``undo()`` removes every instance ``forward`` set here.
    """
    undos = []
    for module in model.modules():
        if "forward" in module.__dict__ or not _qualifies(module):
            continue
        decision = _decide(module)
        if decision is not None:
            undos.append(rebind_forward(module, functools.partial(_fused_forward, *decision, backend)))
    return len(undos), functools.partial(_undo_all, undos)
