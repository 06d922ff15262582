"""Cross-entropy over rows of logits in one Triton kernel: per-row loss, and the gradient written over the logits.

Imported lazily by ``linear_ce.py`` (Triton reads ``TRITON_INTERPRET`` when the jit decorators run). One program
per row: a first pass over the vocabulary keeps a running max and sum of exponentials (fp32) for the row's
log-sum-exp; a second pass overwrites the row with ``(softmax - onehot(label)) * scale * grad_scale`` in the
logits' dtype. Only the logits' own bytes move (read twice, written once), where ``F.cross_entropy`` on upcast
logits moves a float copy of them through several kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import env
from .launch import fast
from .triton_kernels import _tanh  # saturates to +-1 for large |x|, never NaN

# Columns per step: 16-byte loads for 16-bit logits over 8 warps; small under the interpreter.
_BLOCK = 64 if env.triton_interpret() else 4096


@triton.jit
def _cap(z, softcap):
    """Final-logit soft-capping: ``softcap * tanh(z / softcap)``."""
    return softcap * _tanh(z / softcap)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    loss_ptr,
    grad_scale_ptr,
    n_cols,
    ignore_index,
    logit_scale,
    softcap,
    BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)

    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * logit_scale
        if SOFTCAP:
            z = tl.where(mask, _cap(z, softcap), float("-inf"))  # capped, a masked column would be -softcap
        new_max = tl.maximum(running_max, tl.max(z, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    ignored = label == ignore_index
    valid = (label >= 0) & (label < n_cols)
    z_label = tl.load(row_ptr + label, mask=valid & ~ignored, other=0.0).to(tl.float32) * logit_scale
    if SOFTCAP:
        z_label = _cap(z_label, softcap)
    # A label outside the vocabulary (and not ignore_index) gives a NaN loss: visible, with no host check.
    loss = tl.where(ignored, 0.0, tl.where(valid, lse - z_label, float("nan")))
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        # d loss / d logit = logit_scale * grad_scale * (softmax - onehot); ignored rows get zeros.
        g = tl.where(ignored, 0.0, tl.load(grad_scale_ptr).to(tl.float32) * logit_scale)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * logit_scale
            if SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            p = tl.exp(z - lse)
            p = tl.where(offs == label, p - 1.0, p)
            if SOFTCAP:
                p = p * (1.0 - t * t)  # d (c tanh(z / c)) / dz
            tl.store(row_ptr + offs, (p * g).to(logits_ptr.dtype.element_ty), mask=mask)


def _launch(wrap, logits, labels, loss, grad_scale, ignore_index, logit_scale, softcap, write_grad):
    rows, n_cols = logits.shape
    if rows == 0:
        return
    wrap(_cross_entropy_kernel)[(rows,)](
        logits,
        logits.stride(0),
        labels,
        loss,
        grad_scale if grad_scale is not None else loss,
        n_cols,
        ignore_index,
        logit_scale,
        softcap if softcap else 1.0,
        BLOCK=_BLOCK,
        WRITE_GRAD=write_grad,
        SOFTCAP=bool(softcap),
        num_warps=8,
    )


@torch.library.triton_op("hetermoe::cross_entropy_rows", mutates_args=("logits", "loss"))
def cross_entropy_rows_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    grad_scale: torch.Tensor | None,
    ignore_index: int,
    logit_scale: float,
    softcap: float,
) -> None:
    """``cross_entropy_rows`` as a custom op whose kernel ``torch.compile`` sees (``wrap_triton``)."""
    _launch(
        torch.library.wrap_triton, logits, labels, loss, grad_scale, ignore_index, logit_scale, softcap,
        grad_scale is not None,
    )


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    grad_scale: torch.Tensor | None,
    ignore_index: int,
    logit_scale: float,
    softcap: float = 0.0,
) -> None:
    """Write ``loss[r] = lse(z[r]) - z[r, labels[r]]`` (0 where ``labels[r] == ignore_index``) and, when
    ``grad_scale`` (a one-element fp32 tensor) is given, overwrite ``logits`` with the gradient of
    ``grad_scale * sum(loss)`` with respect to them. ``logits [R, V]`` with unit column stride;
    ``z = s * logits`` (``s = logit_scale``), then ``softcap * tanh(z / softcap)`` when ``softcap`` is not 0.

    Eager calls launch directly; compiled regions go through the ``hetermoe::cross_entropy_rows`` triton_op.
    """
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows needs logits with contiguous rows (stride(1) == 1)")
    if torch.compiler.is_compiling():
        cross_entropy_rows_op(logits, labels, loss, grad_scale, ignore_index, logit_scale, softcap)
    else:
        _launch(fast, logits, labels, loss, grad_scale, ignore_index, logit_scale, softcap, grad_scale is not None)
