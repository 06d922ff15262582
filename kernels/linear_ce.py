"""Fused linear cross-entropy: the language-model head and its loss without materialising the logits.

``linear_cross_entropy(hidden [N, H], weight [V, H], labels [N])`` equals
``F.cross_entropy((s * F.linear(hidden, weight, bias)).float(), labels)`` (with ``softcap=c``, of
``c * tanh(s * logits / c)``, Gemma's final-logit soft-capping, computed in fp32) (summed and divided by
``num_items_in_batch`` when it is given, as transformers' ``ForCausalLMLoss`` does) but works through the rows in
chunks: each chunk's logits ``[rows, V]`` are computed, turned in place into their gradient by one kernel
(``triton_ce.py`` on CUDA, torch ops elsewhere), and multiplied straight into the gradients of ``hidden``,
``weight`` and ``bias``. The loss is the last op of a step, so the gradients are computed in the forward and only
scaled by the incoming gradient in the backward. Peak memory is one chunk of logits instead of the full logits,
their float copy and its gradients.

Gradient precision: ``d weight`` sums the chunks' products in the weight's dtype (one rounding per chunk, fp32
accumulation inside each matmul); with the default chunk budget a batch of 16K tokens over a 152K vocabulary is
4 chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import env
from .routing import _INTERPRET, _TRITON_INSTALLED

CE_BACKENDS = ("auto", "triton", "torch")


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch, as transformers computes it: logits in the model's dtype, the loss in float."""
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / (
            num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        )
    return loss


def chunk_rows(num_rows: int, vocab: int, element_size: int, budget_mb: int | None = None) -> int:
    """Rows per chunk: the largest power of two whose ``[rows, vocab]`` logits fit ``HETERMOE_CE_CHUNK_MB``
    (at least 16 rows, at most every row)."""
    budget = (budget_mb if budget_mb is not None else env.ce_chunk_mb()) * 2**20
    rows = max(16, 1 << max(0, (budget // max(1, vocab * element_size)).bit_length() - 1))
    return max(1, min(num_rows, rows))


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in CE_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {CE_BACKENDS}")
    if backend == "torch":
        return False
    if backend == "auto":
        return _TRITON_INSTALLED and device.type == "cuda"
    if not _TRITON_INSTALLED or not (device.type == "cuda" or (_INTERPRET and not torch.compiler.is_compiling())):
        raise RuntimeError(
            "linear_cross_entropy(backend='triton') needs the triton package and CUDA tensors (on CPU: "
            "TRITON_INTERPRET=1 set before importing hf_hetermoe, outside torch.compile); use backend='auto'"
        )
    return True


def _rows_torch(logits, labels, loss, grad_scale, ignore_index: int, logit_scale: float, softcap: float = 0.0) -> None:
    """``triton_ce.cross_entropy_rows`` in torch ops (float copies of one chunk)."""
    z = logits.float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    lse = torch.logsumexp(z, dim=-1)
    ignored = labels == ignore_index
    valid = (labels >= 0) & (labels < z.shape[-1])
    safe = torch.where(valid, labels, 0)
    picked = z.gather(1, safe.unsqueeze(1)).squeeze(1)
    nan = torch.full_like(lse, float("nan"))
    loss.copy_(torch.where(ignored, torch.zeros_like(lse), torch.where(valid, lse - picked, nan)))
    if grad_scale is not None:
        grad = torch.exp(z - lse.unsqueeze(1))
        grad.scatter_add_(1, safe.unsqueeze(1), torch.where(valid, -1.0, 0.0).unsqueeze(1).to(grad.dtype))
        scale = torch.where(ignored, 0.0, grad_scale.float() * logit_scale)
        if softcap:
            grad = grad * (1 - t * t)
        logits.copy_(grad * scale.unsqueeze(1))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss forward with every gradient; the backward scales them by the loss's incoming gradient (in place,
    so a graph can be backpropagated once: a second backward raises)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, grad_scale, ignore_index, logit_scale, softcap, rows_per_chunk, triton
    ):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        compute_grads = need_h or need_w or need_b
        num_rows = hidden.shape[0]
        losses = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        if triton:
            from .triton_ce import cross_entropy_rows as rows_fn  # lazy: Triton reads TRITON_INTERPRET at jit time
        else:
            rows_fn = _rows_torch
        for index, start in enumerate(range(0, num_rows, rows_per_chunk)):
            end = min(start + rows_per_chunk, num_rows)
            h = hidden[start:end]
            logits = F.linear(h, weight, bias)
            rows_fn(
                logits,
                labels[start:end],
                losses[start:end],
                grad_scale if compute_grads else None,
                ignore_index,
                logit_scale,
                softcap,
            )
            if not compute_grads:
                continue
            # `logits` now holds d loss / d logits of this chunk.
            # hidden, weight and logits share one dtype (F.linear needs it; autocast was resolved by the caller).
            if need_h:
                torch.mm(logits, weight, out=dh[start:end])
            if need_w:
                if index == 0:
                    torch.mm(logits.t(), h, out=dw)
                else:
                    dw.addmm_(logits.t(), h)
            if need_b:
                db += logits.sum(0, dtype=torch.float32)
            del logits
        loss = losses.sum() * grad_scale.reshape(())
        ctx.save_for_backward(dh, dw, db.to(bias.dtype) if need_b else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        try:
            dh, dw, db = ctx.saved_tensors
        except RuntimeError as err:
            if "inplace" not in str(err):
                raise
            raise RuntimeError(
                "hetermoe linear_cross_entropy: this graph was already backpropagated once (its stored gradients "
                "are scaled in place); run the forward again instead of using retain_graph=True"
            ) from err
        # In place: the version bump makes a second backward fail above instead of scaling twice.
        grads = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in (dh, dw, db)]
        return (*grads, None, None, None, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    rows_per_chunk: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean (or ``sum / num_items_in_batch``) cross-entropy of ``logit_scale * (hidden @ weight.T + bias)``
    (soft-capped to ``softcap * tanh(logits / softcap)`` when given) against ``labels``, without the ``[N, V]``
    logits. Same contract as ``linear_cross_entropy_reference``.

    Args:
        hidden: [N, H] final hidden states (any leading shape is flattened).
        weight: [V, H] output embedding; bias: optional [V].
        labels: [N] class ids; ``ignore_index`` rows add nothing. An id outside ``[0, V)`` gives a NaN loss.
        num_items_in_batch: divide the summed loss by this (gradient accumulation) instead of taking the mean.
        rows_per_chunk: rows per chunk of logits (default: ``chunk_rows``, from ``HETERMOE_CE_CHUNK_MB``).
        backend: 'triton' (CUDA, or CPU under the interpreter), 'torch', or 'auto' (Triton on CUDA).
    """
    triton = _use_triton(backend, hidden.device)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap={softcap!r} must be a positive number (or None: no cap)")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} hidden rows but {labels.shape[0]} labels")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} does not map width {hidden.shape[1]}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the matmuls in autocast's dtype, as nn.Linear would run them
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum()
    else:
        denominator = num_items_in_batch
    grad_scale = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device).reshape(1).reciprocal()
    rows = rows_per_chunk or chunk_rows(hidden.shape[0], weight.shape[0], hidden.element_size())
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(
            hidden.contiguous(),
            weight,
            bias,
            labels,
            grad_scale,
            ignore_index,
            float(logit_scale),
            float(softcap or 0.0),
            rows,
            triton,
        )
