"""Fused RMSNorm: one Triton kernel forward, one backward, reproducing transformers' two operation orders.

Imported lazily by ``rmsnorm.py`` (Triton reads ``TRITON_INTERPRET`` when the jit decorators run). Rows are
``x.reshape(-1, H)``; each program takes tiles of ``ROWS`` rows x ``BLOCK_H`` columns, reduces in fp32 and saves
``rstd [rows]`` fp32 for the backward. With ``xhat = x_f32 * rstd``:

- ``cast_before_weight`` (Llama): ``y = weight * xhat.to(x.dtype)``, in ``promote_types(weight, x)``;
- otherwise (GPT-OSS, Qwen3-Next): ``y = (xhat * (weight_f32 + offset)).to(x.dtype)``.

Every product is taken in fp32 and rounded once to the dtype PyTorch rounds it to, so the forward differs from
transformers only by the order of the fp32 sum of squares. The backward keeps the same roundings (``g``, the
gradient of ``xhat``, passes through ``x.dtype`` where the forward cast there) and writes ``dweight`` as
``[programs, H]`` fp32 partial sums, added by torch: deterministic, no atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import fast
from .rmsnorm import TRITON_DTYPES, TRITON_MAX_H

# Elements of one [ROWS, BLOCK_H] tile: narrow rows (per-head q/k norms) are batched into one program.
_TILE_ELEMS = 2048
_MAX_ROWS = 64
# Backward programs per SM on CUDA; on CPU (the interpreter) a few, so that tests see several partial sums.
_PROGRAMS_PER_SM = 4
_CPU_PROGRAMS = 3


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    rows,
    H,
    x_stride,
    eps,
    offset,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_H)
    row_mask = row < rows
    col_mask = col < H
    mask = row_mask[:, None] & col_mask[None, :]
    row64 = row.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row64 * x_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    xhat = x * rstd[:, None]
    if CAST_BEFORE_WEIGHT:
        y = w[None, :] * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        y = xhat * (w + offset)[None, :]
    tl.store(y_ptr + row64 * H + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    rows,
    H,
    dy_stride,
    x_stride,
    offset,
    tiles_per_program,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    NEED_DW: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    col = tl.arange(0, BLOCK_H)
    col_mask = col < H
    w = tl.load(w_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    if not CAST_BEFORE_WEIGHT:
        w = w + offset
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid * tiles_per_program
    last = tl.minimum(first + tiles_per_program, tl.cdiv(rows, ROWS))
    for tile in range(first, last):
        row = tile * ROWS + tl.arange(0, ROWS)
        row_mask = row < rows
        mask = row_mask[:, None] & col_mask[None, :]
        row64 = row.to(tl.int64)[:, None]
        x = tl.load(x_ptr + row64 * x_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row64 * dy_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        if CAST_BEFORE_WEIGHT:
            # The forward multiplied the weight with xhat rounded to x.dtype; autograd rounds g to x.dtype too.
            if NEED_DW:
                dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
            g = (dy * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            if NEED_DW:
                dw += tl.sum(dy * xhat, axis=0)
            g = dy * w[None, :]
        dx = (g - xhat * (tl.sum(g * xhat, axis=1) / H)[:, None]) * rstd[:, None]
        tl.store(dx_ptr + row64 * H + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(dw_ptr + pid * H + col, dw, mask=col_mask)


def _tiling(H: int) -> tuple[int, int, int]:
    """(BLOCK_H, ROWS, num_warps) for rows of H elements."""
    block_h = max(16, triton.next_power_of_2(H))
    rows = max(1, min(_MAX_ROWS, _TILE_ELEMS // block_h))
    elems = rows * block_h
    warps = 32 if elems >= 32768 else 16 if elems >= 8192 else 8 if elems >= 2048 else 4
    return block_h, rows, warps


@functools.lru_cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _backward_programs(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        return min(tiles, _PROGRAMS_PER_SM * _sm_count(device.index))
    return min(tiles, _CPU_PROGRAMS)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the kernels take ``x [..., H]`` and ``weight [H]`` (shapes checked by the
    caller)."""
    if x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES:
        raise ValueError(f"triton rms_norm supports dtypes {TRITON_DTYPES}; got x {x.dtype}, weight {weight.dtype}")
    if x.shape[-1] > TRITON_MAX_H:
        raise ValueError(f"triton rms_norm supports H <= {TRITON_MAX_H}; got H={x.shape[-1]}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm inputs are on different devices: x on {x.device}, weight on {weight.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, H]`` with unit column stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before_weight: bool, *, wrap=fast
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, H]`` (unit column stride) -> ``y [rows, H]``, ``rstd [rows]`` fp32. ``y`` is in
    ``promote_types(weight, x)`` when ``cast_before_weight``, else in ``x.dtype``. ``wrap`` is
    ``torch.library.wrap_triton`` when traced by ``torch.compile``."""
    rows, H = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype) if cast_before_weight else x.dtype
    y = torch.empty(rows, H, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    block_h, block_rows, warps = _tiling(H)
    wrap(_rms_norm_fwd_kernel)[(triton.cdiv(rows, block_rows),)](
        x,
        weight,
        y,
        rstd,
        rows,
        H,
        x.stride(0),
        eps,
        offset,
        CAST_BEFORE_WEIGHT=cast_before_weight,
        ROWS=block_rows,
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    cast_before_weight: bool,
    need_dw: bool,
    *,
    wrap=fast,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dx [rows, H]`` in ``x.dtype`` and ``dweight [H]`` in ``weight.dtype`` (empty unless ``need_dw``), from
    ``dy [rows, H]`` and ``x [rows, H]`` (unit column strides) and the forward's ``rstd [rows]``."""
    rows, H = x.shape
    dx = torch.empty(rows, H, dtype=x.dtype, device=x.device)
    block_h, block_rows, warps = _tiling(H)
    tiles = triton.cdiv(rows, block_rows)
    programs = _backward_programs(x.device, tiles)
    partial = torch.empty(programs if need_dw else 0, H, dtype=torch.float32, device=x.device)
    if programs > 0:
        # Without dweight the kernel never touches its pointer: pass dx rather than an empty tensor's null pointer.
        wrap(_rms_norm_bwd_kernel)[(programs,)](
            dy,
            x,
            weight,
            rstd,
            dx,
            partial if need_dw else dx,
            rows,
            H,
            dy.stride(0),
            x.stride(0),
            offset,
            triton.cdiv(tiles, programs),
            CAST_BEFORE_WEIGHT=cast_before_weight,
            NEED_DW=need_dw,
            ROWS=block_rows,
            BLOCK_H=block_h,
            num_warps=warps,
        )
    dw = partial.sum(0).to(weight.dtype) if need_dw else weight.new_empty(0)
    return dx, dw


@torch.library.triton_op("hetermoe::rms_norm_fwd", mutates_args=())
def rms_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before_weight: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_forward`` as a custom op whose kernel ``torch.compile`` sees (``triton_op`` registers this body,
    run on fake tensors, as its fake implementation)."""
    return rms_norm_forward(x, weight, eps, offset, cast_before_weight, wrap=torch.library.wrap_triton)


@torch.library.triton_op("hetermoe::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    cast_before_weight: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_backward`` as a custom op whose kernel ``torch.compile`` sees."""
    return rms_norm_backward(dy, x, weight, rstd, offset, cast_before_weight, need_dw, wrap=torch.library.wrap_triton)


class RMSNormFunction(torch.autograd.Function):
    """Autograd over the two kernels; saves ``x`` (as rows), ``weight`` and ``rstd``.

    Eager calls launch directly (a custom op's dispatch costs host time); compiled regions go through the
    ``hetermoe::rms_norm_fwd`` / ``hetermoe::rms_norm_bwd`` triton_ops (CUDA tensors only: under the
    interpreter ``wrap_triton`` hands back a plain Python kernel, which cannot run on fake tensors).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight):
        rows = _rows(x)
        if torch.compiler.is_compiling():
            y, rstd = rms_norm_fwd_op(rows, weight, eps, offset, cast_before_weight)
        else:
            y, rstd = rms_norm_forward(rows, weight, eps, offset, cast_before_weight)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.x_shape = x.shape
        ctx.flags = (offset, cast_before_weight)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        if torch.compiler.is_compiling():
            dx, dw = rms_norm_bwd_op(_rows(dy), rows, weight, rstd, *ctx.flags, need_dw)
        else:
            dx, dw = rms_norm_backward(_rows(dy), rows, weight, rstd, *ctx.flags, need_dw)
        return dx.view(ctx.x_shape), dw if need_dw else None, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, cast_before_weight: bool = True
) -> torch.Tensor:
    """Fused RMSNorm of ``x [..., H]`` with ``weight [H]`` (see the module docstring for the two orders)."""
    _check_inputs(x, weight)
    return RMSNormFunction.apply(x, weight, eps, offset, cast_before_weight)
