"""Launchers of the Triton expert kernels: forward and backward of one experts layer.

Imported lazily by ``ops.py`` (Triton reads ``TRITON_INTERPRET`` when the jit decorators run).
Tensor shapes: ``T`` tokens, ``H`` hidden, ``I`` expert intermediate, ``E`` experts, ``k`` top-k,
``S = T * k`` routed pairs, ``N1 = 2I`` (gated) or ``I``.
"""

from __future__ import annotations

import torch
import triton

from . import triton_kernels as tk
from .layout import ExpertLayout, split_gate_up, w1_logical, w2_logical
from .routing import Routing, block_m_for  # noqa: F401  (re-exported for callers)


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _gemm_blocks(t: torch.Tensor, block_m: int, num_b: int) -> dict:
    """Tile sizes of the gathered grouped matmul (``block_m`` comes with the routing; ``num_b`` B operands).

    128x128x64 tiles, 8 warps, 4 stages measured best on an H100 (benchmarks/results/sweep_tiles_*.csv);
    stages, then BLOCK_N, shrink until the pipeline fits the device's shared memory (fp32, smaller GPUs).
    """
    if _interpreting(t):
        return dict(BLOCK_N=32, BLOCK_K=32, num_warps=4)
    block_n, block_k, stages = 128, 64, 4
    limit = _shared_memory_per_block(t.device)
    while stages * (block_m * block_k + num_b * block_k * block_n) * t.element_size() > limit:
        if stages > 2:
            stages -= 1
        elif block_n > 32:
            block_n //= 2
        else:
            break
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_m * block_n >= 128 * 128 else 4,
                num_stages=stages)


_SMEM: dict[int, int] = {}


def _shared_memory_per_block(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMEM:
        props = torch.cuda.get_device_properties(index)
        # Leave room for Triton's own scratch (layout conversions, reductions) beyond the operand pipeline.
        _SMEM[index] = int(getattr(props, "shared_memory_per_block_optin", 99 * 1024)) - 16 * 1024
    return _SMEM[index]


def _wgrad_blocks(t: torch.Tensor) -> dict:
    """Tile sizes of the per-expert weight-gradient kernel (BLOCK_M = rows per step). Untuned."""
    if _interpreting(t):
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays exact unless the user opted into TF32 for matmuls, as torch itself does.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _halves(t: torch.Tensor, dim: int, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
    return split_gate_up(t, dim, layout) if layout.has_gate else (t, t)


def gather_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: Routing,
    top_k: int,
    *,
    gather_a: bool,
    b_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    out: torch.Tensor,
    out_up: torch.Tensor | None = None,
    act_out: torch.Tensor | None = None,
    layout: ExpertLayout | None = None,
    block_m: int,
) -> None:
    """ESMM: ``out[r] = a[row(r)] @ b[e(r)]^T (+ bias)``, with ``b`` a logical ``[E, N, K]`` view.

    With ``b_up`` the gate (``b``) and up (``b_up``) products are computed together and ``act_out`` receives
    the gated activation; without it and with ``act_out``, ``act_out = act(out)``.
    """
    num_experts, n, k = b.shape
    gated = b_up is not None
    act = layout.act_code if act_out is not None else -1
    blocks = _gemm_blocks(a, block_m, 2 if gated else 1)
    grid = (routing.tile_expert.numel(), triton.cdiv(n, blocks["BLOCK_N"]))
    act_t = act_out if act_out is not None else out
    tk._gather_gemm_kernel[grid](
        a,
        a.stride(0),
        a.stride(1),
        routing.order,
        top_k,
        b,
        b_up if gated else b,
        b.stride(0),
        b.stride(1),
        b.stride(2),
        bias if bias is not None else b,
        bias_up if bias_up is not None else b,
        bias.stride(0) if bias is not None else 0,
        bias.stride(1) if bias is not None else 0,
        out,
        out_up if gated else out,
        out.stride(0),
        out.stride(1),
        act_t,
        act_t.stride(0),
        act_t.stride(1),
        routing.tile_expert,
        routing.tile_start,
        routing.offsets,
        n,
        k,
        num_experts,
        layout.alpha if layout is not None else 0.0,
        layout.limit if layout is not None else 0.0,
        GATHER_A=gather_a,
        GATED=gated,
        HAS_BIAS=bias is not None,
        ACT=act,
        DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=block_m,
        **blocks,
    )


def combine(
    y: torch.Tensor, routing: Routing, weights: torch.Tensor | None, num_tokens: int, top_k: int
) -> torch.Tensor:
    """ESS: ``out[t] = sum_j w[t, j] * y[inverse[t*k + j]]`` in fp32, deterministic. ``y [S, N] -> out [T, N]``."""
    n = y.shape[1]
    out = y.new_empty(num_tokens, n)
    if num_tokens == 0:
        return out
    block_n = 64 if _interpreting(y) else 256
    w = weights.reshape(-1) if weights is not None else y
    tk._combine_kernel[(num_tokens, triton.cdiv(n, block_n))](
        y,
        y.stride(0),
        y.stride(1),
        routing.inverse,
        w,
        top_k,
        out,
        out.stride(0),
        out.stride(1),
        n,
        HAS_WEIGHTS=weights is not None,
        BLOCK_N=block_n,
    )
    return out


def wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: Routing,
    top_k: int,
    out: torch.Tensor,
    *,
    gather_a: bool,
    gather_b: bool,
    scale: torch.Tensor | None = None,
    bias_grad: torch.Tensor | None = None,
) -> None:
    """ESTMM: ``out[e] = sum_{r in e} (scale(r) * a[ra(r)])^T b[rb(r)]`` into a logical ``[E, N, K]`` view."""
    num_experts, n, k = out.shape
    blocks = _wgrad_blocks(a)
    grid = (num_experts, triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(k, blocks["BLOCK_K"]))
    db = bias_grad if bias_grad is not None else out
    tk._wgrad_kernel[grid](
        a,
        a.stride(0),
        a.stride(1),
        b,
        b.stride(0),
        b.stride(1),
        routing.order,
        scale if scale is not None else a,
        top_k,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        db,
        db.stride(0),
        db.stride(1) if bias_grad is not None else 0,
        routing.offsets,
        n,
        k,
        GATHER_A=gather_a,
        SCALE_A=scale is not None,
        GATHER_B=gather_b,
        BIAS_GRAD=bias_grad is not None,
        DOT_PRECISION=_dot_precision(a.dtype),
        **blocks,
    )


def experts_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k_weights: torch.Tensor,
    routing: Routing,
    layout: ExpertLayout,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [T, H]`` and the saved pre-activations ``gu [S, N1]``; same contract as ``reference.experts_forward``."""
    num_tokens, hidden = x.shape
    top_k = top_k_weights.shape[-1]
    num_pairs = routing.order.numel()
    w1l = w1_logical(w1, layout)
    inter = w1l.shape[1] // 2 if layout.has_gate else w1l.shape[1]
    gu = x.new_empty(num_pairs, w1l.shape[1])
    h = x.new_empty(num_pairs, inter)
    w_gate, w_up = _halves(w1l, 1, layout)
    gu_gate, gu_up = _halves(gu, 1, layout)
    b_gate, b_up = _halves(b1, 1, layout) if b1 is not None else (None, None)
    gather_gemm(
        x,
        w_gate,
        routing,
        top_k,
        gather_a=True,
        b_up=w_up if layout.has_gate else None,
        bias=b_gate,
        bias_up=b_up if layout.has_gate else None,
        out=gu_gate,
        out_up=gu_up if layout.has_gate else None,
        act_out=h,
        layout=layout,
        block_m=block_m,
    )
    y = x.new_empty(num_pairs, hidden)
    gather_gemm(h, w2_logical(w2, layout), routing, top_k, gather_a=False, bias=b2, out=y, block_m=block_m)
    return combine(y, routing, top_k_weights, num_tokens, top_k), gu


def experts_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k_weights: torch.Tensor,
    routing: Routing,
    gu: torch.Tensor,
    layout: ExpertLayout,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, d top_k_weights, dw1, dw2, db1, db2)``; same contract as ``reference.experts_backward``."""
    dout = dout.contiguous()
    num_tokens, hidden = x.shape
    top_k = top_k_weights.shape[-1]
    num_pairs = routing.order.numel()
    weights_flat = top_k_weights.reshape(-1)
    w1l, w2l = w1_logical(w1, layout), w2_logical(w2, layout)
    inter = w2l.shape[2]

    # g = dout[tok] @ w2[e]   (w2 logical [E, H, I] read as [E, I, H]^T)
    g = x.new_empty(num_pairs, inter)
    gather_gemm(dout, w2l.transpose(1, 2), routing, top_k, gather_a=True, out=g, block_m=block_m)

    dgu = torch.empty_like(gu)
    h = x.new_empty(num_pairs, inter)
    dw_sorted = torch.empty(num_pairs, dtype=torch.float32, device=x.device)
    gu_gate, gu_up = _halves(gu, 1, layout)
    dgu_gate, dgu_up = _halves(dgu, 1, layout)
    if num_pairs:
        tk._glu_backward_kernel[(num_pairs,)](
            g,
            g.stride(0),
            g.stride(1),
            gu_gate,
            gu_up,
            gu_up.stride(0),
            gu_up.stride(1),
            dgu_gate,
            dgu_up,
            dgu_up.stride(0),
            dgu_up.stride(1),
            h,
            h.stride(0),
            h.stride(1),
            routing.order,
            weights_flat,
            dw_sorted,
            dout,
            dout.stride(0),
            dout.stride(1),
            b2 if b2 is not None else dout,
            b2.stride(0) if b2 is not None else 0,
            b2.stride(1) if b2 is not None else 0,
            routing.expert,
            top_k,
            inter,
            hidden,
            layout.alpha,
            layout.limit,
            GATED=layout.has_gate,
            ACT=layout.act_code,
            HAS_BIAS=b2 is not None,
            BLOCK_N=64 if _interpreting(x) else 256,
        )

    # dx = sum over slots of dgu @ w1[e]   (w1 logical [E, N1, H] read as [E, H, N1]^T)
    dx_sorted = x.new_empty(num_pairs, hidden)
    gather_gemm(dgu, w1l.transpose(1, 2), routing, top_k, gather_a=False, out=dx_sorted, block_m=block_m)
    dx = combine(dx_sorted, routing, None, num_tokens, top_k)

    dw1 = torch.empty_like(w1)
    db1 = torch.empty_like(b1) if b1 is not None else None
    wgrad(dgu, x, routing, top_k, w1_logical(dw1, layout), gather_a=False, gather_b=True, bias_grad=db1)
    dw2 = torch.empty_like(w2)
    db2 = torch.empty_like(b2) if b2 is not None else None
    wgrad(
        dout,
        h,
        routing,
        top_k,
        w2_logical(dw2, layout),
        gather_a=True,
        gather_b=False,
        scale=weights_flat,
        bias_grad=db2,
    )
    dweights = dw_sorted[routing.inverse.long()].view_as(top_k_weights).to(top_k_weights.dtype)
    return dx, dweights, dw1, dw2, db1, db2
