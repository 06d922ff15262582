"""RMSNorm, fused in Triton (``triton_rmsnorm.py``) or in plain PyTorch (``rms_norm_reference``).

Transformers' MoE families normalise in fp32 and differ only in where the weight meets the dtype cast:

- ``cast_before_weight=True`` (Llama's order; Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...):
  ``weight * xhat.to(x.dtype)``;
- ``cast_before_weight=False`` (GPT-OSS, FlexOlmo, AFMoE, Nemotron-H): ``(xhat * weight_f32).to(x.dtype)``; with
  ``offset=1.0`` (Qwen3-Next, Qwen3.5-MoE, whose weights start at zero): ``(xhat * (1 + weight_f32)).to(x.dtype)``.

``xhat = x_f32 * rsqrt(mean(x_f32 ** 2) + eps)``. Under mixed precision (an fp32 weight with bf16 activations)
the first returns ``promote_types(weight, x)``, the second ``x.dtype``, as transformers does.
"""

from __future__ import annotations

import torch

from .ops import resolve_backend

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest row the kernels keep in registers (Liger's cap): wider rows would spill.
TRITON_MAX_H = 65536


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, cast_before_weight: bool = True
) -> torch.Tensor:
    """Transformers' RMSNorm, operation for operation (the truth in tests; the CPU path)."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    if cast_before_weight:
        return weight * hidden.to(input_dtype)
    return (hidden * (weight.float() + offset)).to(input_dtype)


def _triton_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype in TRITON_DTYPES and weight.dtype in TRITON_DTYPES and x.shape[-1] <= TRITON_MAX_H


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm of ``x [..., H]`` (fp32, bf16 or fp16) with ``weight [H]`` (any of those dtypes).

    Args:
        eps: added to the mean square before the reciprocal square root.
        offset: added to the weight in fp32 (1.0 for Qwen3-Next style ``(1 + weight)``); needs
            ``cast_before_weight=False``, the only order transformers uses it with.
        cast_before_weight: cast the normalised ``x`` to its dtype before the weight multiplies it (Llama), or
            multiply in fp32 and cast the product (GPT-OSS). See the module docstring.
        backend: 'triton' (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``), 'reference', or 'auto':
            Triton for CUDA tensors of the dtypes and widths it takes, the reference otherwise.
            ``HETERMOE_BACKEND`` overrides it, as for the experts.

    Returns:
        ``[..., H]`` in ``promote_types(weight, x)`` when ``cast_before_weight``, else in ``x.dtype``.
    """
    if cast_before_weight and offset != 0.0:
        raise ValueError(
            f"offset={offset} needs cast_before_weight=False (transformers adds an offset to the weight only "
            "in fp32 before the cast)"
        )
    if x.dim() == 0 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm needs x [..., H] and weight [H]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    chosen = resolve_backend(backend, x.device)
    if chosen == "triton" and backend == "auto" and not _triton_supports(x, weight):
        chosen = "reference"
    # Compiled CPU regions trace the reference: the interpreter's kernels cannot run on fake tensors.
    if chosen == "triton" and torch.compiler.is_compiling() and not x.is_cuda:
        chosen = "reference"
    if chosen == "reference":
        return rms_norm_reference(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight)
    from . import triton_rmsnorm  # lazy: Triton reads TRITON_INTERPRET when its jit decorators run

    return triton_rmsnorm.rms_norm(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight)
