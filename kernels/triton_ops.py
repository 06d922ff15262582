"""Launchers of the Triton expert kernels: forward and backward of one experts layer.

Imported lazily by ``ops.py`` (Triton reads ``TRITON_INTERPRET`` when the jit decorators run).
Tensor shapes: ``T`` tokens, ``H`` hidden, ``I`` expert intermediate, ``E`` experts, ``k`` top-k,
``S = T * k`` routed pairs, ``N1 = 2I`` (gated) or ``I``.
"""

from __future__ import annotations

import torch
import triton

from .. import env
from . import gluon_gemm, gluon_wgrad, tuning
from . import triton_kernels as tk
from .launch import fast
from .layout import ExpertLayout, split_gate_up, w1_logical, w2_logical
from .routing import Routing, block_m_for, chunk_routing  # noqa: F401  (block_m_for: re-exported for callers)


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _layout_key(t: torch.Tensor) -> str:
    """Which dimension of a 2-D (or last-two-dims) operand view is contiguous: 'r' rows, 'c' columns, 's' neither."""
    return "c" if t.stride(-1) == 1 else "r" if t.stride(-2) == 1 else "s"


def _sig(t: torch.Tensor | None) -> tuple | None:
    """What a launch decision may read of an operand: shape, strides, dtype, device and 16-byte alignment of its
    base (part of ``tuning.remembered`` keys)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


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
    out: torch.Tensor | None,
    out_up: torch.Tensor | None = None,
    act_out: torch.Tensor | None = None,
    layout: ExpertLayout | None = None,
    block_m: int,
    paired: bool = False,
    config: dict | None = None,
    toggles: env.Toggles | None = None,
) -> None:
    """ESMM: ``out[r] = a[row(r)] @ b[e(r)]^T (+ bias)``, with ``b`` a logical ``[E, N, K]`` view.

    With ``b_up`` the gate (``b``) and up (``b_up``) products are computed together and ``act_out`` receives
    the gated activation; without it and with ``act_out``, ``act_out = act(out)``, or with ``paired`` (``b`` the
    interleaved gate/up matrix, ``[E, 2I, K]``) the gated activation of adjacent column pairs. ``out=None`` (and
    ``out_up=None``) with ``act_out``: only the activation is stored. ``config`` pins the tiles (a
    ``tuning.GEMM_CANDIDATES`` entry); by default ``tuning.choose`` picks them. ``toggles``: ``env.toggles()`` as
    the caller read them (read here when not given).
    """
    num_experts, n, k = b.shape
    gated = b_up is not None
    act = layout.act_code if act_out is not None else -1
    num_tiles = routing.tile_expert.numel()
    store_pre = out is not None
    if not store_pre:
        if act_out is None or out_up is not None:
            raise ValueError("gather_gemm: out=None stores the activation only; give act_out and no out_up")
        out = act_out  # the pre-activation pointer is not written; it gives the kernel the output dtype
    act_t = act_out if act_out is not None else out

    def launch(cfg: dict, split_tail: bool, one_dot: bool, up_offset: int) -> None:
        cfg = dict(cfg)
        tiles = num_tiles * triton.cdiv(n, cfg["BLOCK_N"])
        if cfg.pop("PERSISTENT", False):
            # One program per SM (3 under the interpreter, so that each walks several tiles).
            programs = 3 if _interpreting(a) else tuning.num_sms(a.device)
            kernel, grid = tk._gather_gemm_persistent_kernel, (max(1, min(programs, tiles)),)
            extra = dict(E_POW2=triton.next_power_of_2(max(num_experts, 1)))
        else:
            kernel, grid, extra = tk._gather_gemm_kernel, (tiles,), {}
        fast(kernel)[grid](
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
            up_offset,
            bias if bias is not None else b,
            bias_up if bias_up is not None else b,
            bias.stride(0) if bias is not None else 0,
            bias.stride(1) if bias is not None else 0,
            out,
            out_up if out_up is not None else out,
            out.stride(0),
            out.stride(1),
            act_t,
            act_t.stride(0),
            act_t.stride(1),
            routing.tile_expert,
            routing.tile_start,
            routing.offsets,
            num_tiles,
            n,
            k,
            num_experts,
            layout.alpha if layout is not None else 0.0,
            layout.limit if layout is not None else 0.0,
            GATHER_A=gather_a,
            GATED=gated,
            PAIRED=paired,
            HAS_BIAS=bias is not None,
            ACT=act,
            DOT_PRECISION=_dot_precision(a.dtype),
            BLOCK_M=block_m,
            SPLIT_TAIL=split_tail,
            ONE_DOT=one_dot,
            STORE_PRE=store_pre,
            **extra,
            **cfg,
        )

    toggles = toggles or env.toggles()
    # One interleaved dot for gate and up: they must be views of one storage with identical strides (split_gate_up).
    same_storage = gated and b_up.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    up_delta = b_up.data_ptr() - b.data_ptr() if same_storage else 0

    def decide() -> tuple[dict, bool, bool, int]:
        split_tail = _split_tail(block_m, routing.order.numel(), num_experts, toggles)
        up_offset = 0
        one_dot = same_storage and toggles.one_dot_gate_up
        if one_dot:
            up_offset, rem = divmod(up_delta, b.element_size())
            one_dot = rem == 0 and b_up.stride() == b.stride()
        cfg = config
        if cfg is None and _interpreting(a) and toggles.persistent:
            cfg = {**tuning.INTERPRETER["gemm"], "PERSISTENT": True}
        if cfg is None:
            key = (
                str(a.dtype).replace("torch.", ""),
                f"gather{int(gather_a)}-gated{int(gated)}{'p' if paired else '1' if one_dot else ''}-act{act}"
                f"-bias{int(bias is not None)}"
                + ("" if toggles.persistent is None else f"-persistent{int(toggles.persistent)}")
                + ("" if store_pre else "-nopre"),
                f"a{_layout_key(a)}-b{_layout_key(b)}",
                f"N{n}-K{k}-E{num_experts}-S{tuning.bucket(routing.order.numel())}",
            )
            cfg = tuning.choose(
                "gemm",
                key,
                tuning.with_persistence(
                    tuning.GATED_CANDIDATES if gated else tuning.GEMM_CANDIDATES, toggles.persistent
                ),
                lambda c: launch(c, split_tail, one_dot, up_offset),
                device=a.device,
                block_m=block_m,
                num_b=2 if gated else 1,
                elem=a.element_size(),
            )
        return cfg, split_tail, one_dot, up_offset

    if config is not None:
        decision = decide()
    else:
        signature = (
            "gather_gemm", _sig(a), _sig(b), _sig(b_up), up_delta, bias is None, bias_up is None, act, gather_a,
            paired, block_m, routing.order.numel(), num_tiles, store_pre, toggles,
        )
        decision = tuning.remembered(signature, decide, a.device)
    launch(*decision)


def combine(
    y: torch.Tensor,
    routing: Routing,
    weights: torch.Tensor | None,
    num_tokens: int,
    top_k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """ESS: ``out[t] = sum_j w[t, j] * (y[r] + bias[e(r)])``, ``r = inverse[t*k + j]``, in fp32, deterministic.
    ``y [S, N] -> out [T, N]``; ``bias [E, N]`` (the down projection's) is optional."""
    n = y.shape[1]
    out = y.new_empty(num_tokens, n)
    if num_tokens == 0:
        return out
    block_n = row_block_n(y, n)
    w = weights.reshape(-1) if weights is not None else y
    fast(tk._combine_kernel)[(num_tokens, triton.cdiv(n, block_n))](
        y,
        y.stride(0),
        y.stride(1),
        routing.inverse,
        w,
        out,
        out.stride(0),
        out.stride(1),
        n,
        bias if bias is not None else y,
        bias.stride(0) if bias is not None else 0,
        bias.stride(1) if bias is not None else 0,
        routing.expert,
        TOP_K=top_k,
        HAS_WEIGHTS=weights is not None,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        num_warps=4,
    )
    return out


def sorted_rows(src: torch.Tensor, routing: Routing, top_k: int) -> torch.Tensor:
    """``src[order // k]``: the token rows ``[T, N]`` in sorted pair order, ``[S, N]``, written in token order (each
    source row read once, stored k times; ``index_select`` in sorted order re-reads them once per expert)."""
    num_tokens, n = src.shape
    out = src.new_empty(num_tokens * top_k, n)
    if num_tokens == 0:
        return out
    block_n = row_block_n(src, n)
    fast(tk._sorted_rows_kernel)[(num_tokens, triton.cdiv(n, block_n))](
        src,
        src.stride(0),
        src.stride(1),
        routing.inverse,
        out,
        out.stride(0),
        out.stride(1),
        n,
        TOP_K=top_k,
        BLOCK_N=block_n,
        num_warps=4,
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
    config: dict | None = None,
    toggles: env.Toggles | None = None,
    accumulate: tuple[torch.Tensor, int, int, int] | None = None,
) -> dict:
    """ESTMM: ``out[e] = sum_{r in e} a[ra(r)]^T b[rb(r)]`` into a logical ``[E, N, K]`` view; returns the tiles used.

    ``config`` pins the tiles (a ``tuning.WGRAD_CANDIDATES`` entry); by default ``tuning.choose`` picks them.

    ``accumulate=(whole_offsets, start, end, total)``: ``routing`` is the chunk ``[start, end)`` of ``total`` sorted
    rows (``routing.chunk_routing``) and ``whole_offsets`` the whole routing's. Chunks run in order, and an expert
    whose run spans several of them gets the sum of their parts: the chunk where its run begins stores, the later ones
    load and add. Tuning times its candidates as plain launches, which store each expert's part of the chunk (and
    zeros for experts absent from it): harmless in the first chunk only, so later chunks must pass the ``config`` the
    first one returned.
    """
    num_experts, n, k = out.shape
    whole_offsets, start, end, total = accumulate if accumulate is not None else (routing.offsets, 0, 0, 0)
    if accumulate is not None and config is None and start != 0:
        raise ValueError("wgrad(accumulate=...): a chunk after the first needs the config the first chunk returned")

    def launch(cfg: dict, accumulating: bool = False) -> None:
        cfg = dict(cfg)
        a_t = cfg.pop("A_T")
        grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"]), num_experts)
        fast(tk._wgrad_kernel)[grid](
            a,
            a.stride(0),
            a.stride(1),
            b,
            b.stride(0),
            b.stride(1),
            routing.order,
            top_k,
            out,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            routing.offsets,
            n,
            k,
            whole_offsets,
            start,
            end,
            total,
            GATHER_A=gather_a,
            GATHER_B=gather_b,
            A_T=a_t,
            DOT_PRECISION=_dot_precision(a.dtype),
            ACCUMULATE=accumulating,
            **cfg,
        )

    if num_experts == 0:
        return config or {}
    if config is None:

        def decide() -> dict:
            key = (
                str(a.dtype).replace("torch.", ""),
                f"gather{int(gather_a)}{int(gather_b)}",
                f"a{_layout_key(a)}-b{_layout_key(b)}-c{_layout_key(out)}",
                f"N{n}-K{k}-R{tuning.rows_bucket(routing.order.numel(), num_experts)}",
            )
            return tuning.choose(
                "wgrad", key, tuning.WGRAD_CANDIDATES, launch, device=a.device, elem=a.element_size()
            )

        toggles = toggles or env.toggles()
        signature = ("wgrad", _sig(a), _sig(b), _sig(out), gather_a, gather_b, routing.order.numel(), toggles)
        config = tuning.remembered(signature, decide, a.device)
    launch(config, accumulating=accumulate is not None)
    return config


def _vendor_takes(t: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` exists and runs ``t``: a bf16 CUDA tensor on sm_90 / sm_100 (CUTLASS kernels)."""
    return (
        hasattr(torch, "_grouped_mm")
        and t.is_cuda
        and t.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(t.device)[0] in (9, 10)
    )


def vendor_wgrad_ok(x: torch.Tensor, *operands: torch.Tensor, toggles: env.Toggles | None = None) -> bool:
    """Whether the weight gradients go to ``torch._grouped_mm`` (CUTLASS grouped GEMM with TMA and warp
    specialisation) on row-gathered operands instead of the Triton ``wgrad``: on an H100 it ran 1.4-1.7x faster at
    every measured shape (benchmarks/NOTES.md, v2.3), for one ``[S, H]`` gather per gradient. It takes bf16 on
    sm_90 / sm_100 with 16-byte aligned rows; everything else stays in Triton. ``HETERMOE_VENDOR_WGRAD=0`` turns
    it off (``toggles``: ``env.toggles()`` as the caller read them)."""
    if not (_vendor_takes(x) and (toggles or env.toggles()).vendor_wgrad):
        return False
    return x.shape[1] % 8 == 0 and all(t.shape[-1] % 8 == 0 and t.dtype == x.dtype for t in operands)


def vendor_matmul_ok(a: torch.Tensor, b: torch.Tensor, toggles: env.Toggles | None = None) -> bool:
    """Whether ``a [S, K] @ b[e]^T`` (``b`` a logical ``[E, N, K]`` view) may go to ``torch._grouped_mm``: bf16 on
    sm_90 / sm_100, ``a`` row-major, ``b`` row- or column-major per expert, 16-byte aligned rows and bases.
    ``HETERMOE_VENDOR_MATMUL=0`` turns it off (``toggles``: ``env.toggles()`` as the caller read them)."""
    if not (_vendor_takes(a) and b.dtype == a.dtype and (toggles or env.toggles()).vendor_matmul):
        return False
    _, n, k = b.shape
    aligned = all(t.data_ptr() % 16 == 0 for t in (a, b)) and n % 8 == 0 and k % 8 == 0
    a_ok = a.stride(1) == 1 and a.stride(0) % 8 == 0
    b_ok = b.stride(0) % 8 == 0 and (
        (b.stride(2) == 1 and b.stride(1) % 8 == 0) or (b.stride(1) == 1 and b.stride(2) % 8 == 0)
    )
    return aligned and a_ok and b_ok


def sorted_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: Routing,
    top_k: int,
    *,
    block_m: int,
    toggles: env.Toggles | None = None,
) -> torch.Tensor:
    """``out[r] = a[r] @ b[e(r)]^T`` for rows ``a [S, K]`` already in sorted order (no gather, bias or activation),
    ``b`` a logical ``[E, N, K]`` view. Three implementations, the tuner picks per shape bucket:

    - on sm_90, the warp-specialised Gluon kernel (``gluon_gemm``: TMA loads, the epilogue under the other consumer's
      MMAs). On an H200 it ran the down projection 15-23% and dx 11-14% faster than our Triton kernel at
      Qwen3-30B-A3B T=4096 / 16384, and lost on Mixtral's 4096 rows per expert (benchmarks/NOTES.md, v2.12);
    - our Triton kernel;
    - the vendor grouped GEMM (``torch._grouped_mm``: CUTLASS), which won by 3-8% at 16 K tokens on the Mixtral and
      DeepSeek shapes before the Gluon kernel existed (v2.10)."""
    n = b.shape[1]
    toggles = toggles or env.toggles()

    def triton_run() -> torch.Tensor:
        out = a.new_empty(a.shape[0], n)
        gather_gemm(a, b, routing, top_k, gather_a=False, out=out, block_m=block_m, toggles=toggles)
        return out

    def run(cfg: dict) -> torch.Tensor:
        if cfg["IMPL"] == "triton":
            return triton_run()
        if cfg["IMPL"] == "cutlass":
            return torch._grouped_mm(a, b.transpose(1, 2), offs=routing.offsets[1:])
        out = a.new_empty(a.shape[0], n)
        tiles = {k: v for k, v in cfg.items() if k != "IMPL"}
        gluon_gemm.sorted_matmul(
            a, b, routing.offsets, routing.tile_expert, routing.tile_start, out=out, config=tiles, check=False
        )
        return out

    def decide() -> dict:
        gluon = toggles.gluon_gemm and block_m == gluon_gemm.BLOCK_M and gluon_gemm.supported(a, b)
        candidates = [dict(IMPL="gluon", **c) for c in (gluon_gemm.CONFIGS if gluon else [])] + [dict(IMPL="triton")]
        if vendor_matmul_ok(a, b, toggles=toggles):
            candidates.append(dict(IMPL="cutlass"))
        if len(candidates) == 1:
            return candidates[0]
        key = (
            str(a.dtype).replace("torch.", ""),
            "+".join(dict.fromkeys(c["IMPL"] for c in candidates)),  # a toggle changes the question, not the answer
            f"a{_layout_key(a)}-b{_layout_key(b)}",
            f"N{n}-K{b.shape[2]}-E{b.shape[0]}-S{tuning.bucket(a.shape[0])}",
        )
        # ``warm``: the Triton kernel tunes its own tiles first (``select`` is not re-entrant).
        rows = tuning.rows_bucket(a.shape[0], b.shape[0])
        default = candidates[0] if rows <= GLUON_GEMM_MAX_ROWS else dict(IMPL="triton")
        return tuning.choose_impl(
            "sorted_matmul", key, candidates, run, device=a.device, default=default, warm=triton_run
        )

    if a.shape[0] == 0:
        return triton_run()
    signature = ("sorted_matmul", _sig(a), _sig(b), block_m, toggles)
    return run(tuning.remembered(signature, decide, a.device))


# Without autotuning, the Gluon kernel takes experts of up to this many rows (bucketed) and Triton the longer ones:
# on an H200 Gluon won every measured down projection and dx up to 2048 rows per expert (-1% to +23%) and lost
# Mixtral's at 4096 (benchmarks/NOTES.md, v2.12).
GLUON_GEMM_MAX_ROWS = 2048


def _vendor_wgrad(
    a: torch.Tensor, b: torch.Tensor, routing: Routing, transposed: bool, toggles: env.Toggles | None = None
) -> torch.Tensor:
    """``out[e] = a_e^T b_e`` over each expert's sorted rows (``a [S, N]``, ``b [S, K]``, both in sorted order),
    returned in the weight's storage layout: ``[E, N, K]``, or ``[E, K, N]`` for weights stored ``[E, in, out]``."""
    if transposed:
        return grouped_wgrad(b, a, routing, toggles=toggles)
    return grouped_wgrad(a, b, routing, toggles=toggles)


# The Gluon kernel is offered for experts of up to this many rows (bucketed) and CUTLASS takes the longer ones: on
# an H200 Gluon won every measured weight gradient up to 1024 rows per expert (+3% to +40%) and lost the two at 4096
# (benchmarks/NOTES.md, v2.11). At 4096 the tuner's short timings could still pick it, and sustained it ran Mixtral's
# dW1 in 13.5 ms against CUTLASS's 11.4-11.8 (v2.17), so longer experts are not offered to it at all.
GLUON_WGRAD_MAX_ROWS = 2048


def grouped_wgrad(
    a: torch.Tensor, b: torch.Tensor, routing: Routing, *, toggles: env.Toggles | None = None
) -> torch.Tensor:
    """``out[e] = a_e^T b_e`` (``a [S, M]``, ``b [S, N]`` in sorted order, bf16 on sm_90 / sm_100), ``[E, M, N]``:
    CUTLASS's grouped GEMM (``torch._grouped_mm``), or on sm_90 the warp-specialised Gluon kernel
    (``gluon_wgrad``), whichever the tuner measured faster for this shape bucket (``HETERMOE_GLUON=0``: CUTLASS)."""
    num_experts = routing.offsets.numel() - 1
    toggles = toggles or env.toggles()

    def cutlass() -> torch.Tensor:
        return torch._grouped_mm(a.t(), b, offs=routing.offsets[1:])

    def run(cfg: dict) -> torch.Tensor:
        if cfg["IMPL"] == "cutlass":
            return cutlass()
        tiles = {k: v for k, v in cfg.items() if k != "IMPL"}
        return gluon_wgrad.grouped_wgrad(a, b, routing.offsets, config=tiles, check=False)

    def decide() -> dict:
        rows = tuning.rows_bucket(a.shape[0], num_experts)
        configs = gluon_wgrad.candidates(a, b) if toggles.gluon and rows <= GLUON_WGRAD_MAX_ROWS else []
        if not configs or num_experts == 0:
            return dict(IMPL="cutlass")
        candidates = [dict(IMPL="gluon", **c) for c in configs] + [dict(IMPL="cutlass")]
        key = (str(a.dtype).replace("torch.", ""), f"M{a.shape[1]}-N{b.shape[1]}-E{num_experts}-R{rows}")
        return tuning.choose_impl("wgrad_impl", key, candidates, run, device=a.device, default=candidates[0])

    signature = ("grouped_wgrad", _sig(a), _sig(b), num_experts, toggles)
    return run(tuning.remembered(signature, decide, a.device))


def _dw2(
    dout, hw, routing: Routing, top_k: int, w2, layout: ExpertLayout, vendor: bool, toggles: env.Toggles | None = None,
    dout_sorted: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW2[e] = sum_r dout[tok_r]^T hw_r`` in ``w2``'s layout: the vendor grouped GEMM on ``dout``'s rows in
    sorted order (``dout_sorted`` when the caller already has them), else the Triton kernel gathering them itself."""
    if vendor:
        rows = dout_sorted if dout_sorted is not None else sorted_rows(dout, routing, top_k)
        return _vendor_wgrad(rows, hw, routing, layout.is_transposed, toggles)
    dw2 = torch.empty_like(w2)
    wgrad(dout, hw, routing, top_k, w2_logical(dw2, layout), gather_a=True, gather_b=False, toggles=toggles)
    return dw2


def backward_g(
    dout: torch.Tensor,
    w2l: torch.Tensor,
    routing: Routing,
    top_k: int,
    *,
    block_m: int,
    vendor: bool,
    toggles: env.Toggles | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward's first matmul, ``g[r] = dout[tok_r] @ w2[e(r)]`` over sorted pairs (``w2l`` the logical
    ``[E, H, I]`` view), and ``dout``'s rows in sorted order when they were made for it (else ``None``). Two
    implementations, the tuner picks per shape bucket:

    - our Triton kernel gathering ``dout``'s rows itself (the default);
    - ``dout``'s rows copied to sorted order, then ``sorted_matmul`` (Gluon, Triton or CUTLASS, its own choice). The
      copy is the one the vendor weight gradients make for dW2 anyway, so it is offered only with them (``vendor``),
      from ``SORTED_G_MIN_ROWS`` rows per expert (on an H200, CUTLASS beat the gathered kernel on this matmul
      by 6-7% at Mixtral's and DeepSeek-V3's 4096 rows per expert, and lost by 6-11% at 1024 and below:
      benchmarks/NOTES.md, v2.10 item 2), and only where ``E * H <= S``. The copy then lives until dW2, which moves
      first; dW2 (``E * H * I``) being no larger than the ``w * h`` rows it replaces (``S * I``), the backward's
      peak cannot rise. ``HETERMOE_SORTED_G=0`` keeps the gathered kernel."""
    num_pairs = routing.order.numel()
    w2t = w2l.transpose(1, 2)  # logical [E, I, H]
    num_experts, inter, hidden = w2t.shape
    toggles = toggles or env.toggles()

    def gathered() -> tuple[torch.Tensor, None]:
        g = dout.new_empty(num_pairs, inter)
        gather_gemm(dout, w2t, routing, top_k, gather_a=True, out=g, block_m=block_m, toggles=toggles)
        return g, None

    def on_sorted_rows(rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sorted_rows(dout, routing, top_k) if rows is None else rows
        return sorted_matmul(rows, w2t, routing, top_k, block_m=block_m, toggles=toggles), rows

    def decide() -> dict:
        default = dict(IMPL="gathered")
        if not (vendor and toggles.sorted_g) or num_pairs == 0 or num_experts * hidden > num_pairs:
            return default
        if tuning.rows_bucket(num_pairs, num_experts) < SORTED_G_MIN_ROWS:
            return default
        key = (
            str(dout.dtype).replace("torch.", ""),
            f"a{_layout_key(dout)}-b{_layout_key(w2t)}",
            f"N{inter}-K{hidden}-E{num_experts}-S{tuning.bucket(num_pairs)}",
        )
        timed_rows = []  # one copy for the timing: the copy is dW2's, not this matmul's cost

        def run(cfg: dict) -> torch.Tensor:
            if cfg["IMPL"] == "gathered":
                return gathered()[0]
            if not timed_rows:
                timed_rows.append(sorted_rows(dout, routing, top_k))
            return on_sorted_rows(timed_rows[0])[0]

        def warm() -> None:  # both tune their own tiles or implementations first (``select`` is not re-entrant)
            gathered()
            on_sorted_rows()

        candidates = [default, dict(IMPL="sorted_rows")]
        return tuning.choose_impl("backward_g", key, candidates, run, device=dout.device, default=default, warm=warm)

    signature = ("backward_g", _sig(dout), _sig(w2l), num_pairs, block_m, vendor, toggles)
    cfg = tuning.remembered(signature, decide, dout.device)
    return on_sorted_rows() if cfg["IMPL"] == "sorted_rows" else gathered()


SORTED_G_MIN_ROWS = 2048


def expert_colsum(
    a: torch.Tensor, routing: Routing, top_k: int, out: torch.Tensor, *, gather_a: bool, scale: torch.Tensor | None
) -> None:
    """Bias gradients: ``out[e] = sum_{r in e} scale(r) * a[ra(r)]`` (fp32 sums), ``out [E, N]``."""
    num_experts, n = out.shape
    block_n = 32 if _interpreting(a) else 128
    fast(tk._expert_colsum_kernel)[(num_experts, triton.cdiv(n, block_n))](
        a,
        a.stride(0),
        a.stride(1),
        routing.order,
        scale if scale is not None else a,
        top_k,
        out,
        out.stride(0),
        out.stride(1),
        routing.offsets,
        n,
        GATHER_A=gather_a,
        SCALE=scale is not None,
        BLOCK_M=16 if _interpreting(a) else 32,
        BLOCK_N=block_n,
    )


def _split_tail(block_m: int, num_pairs: int, num_experts: int, toggles: env.Toggles) -> bool:
    """Half-height tail tiles (``SPLIT_TAIL``) where experts average at most 4 row tiles, so that a partial last tile
    is a sizeable share of the work. Measured on an H200 (benchmarks/NOTES.md, v2.8): forward +3.5% at Qwen3-30B-A3B
    T=4096; at 16 or more tiles per expert the two-branch kernel ran 1-3% slower. tl.dot needs 16 rows."""
    return block_m >= 32 and num_pairs <= 4 * block_m * max(num_experts, 1) and toggles.split_tail


def row_block_n(t: torch.Tensor, n: int) -> int:
    """Columns per program (or step) of the row kernels (combine, sorted rows, glu backward) over rows of ``n``
    columns of ``t``: up to 1024 over 4 warps, i.e. 16-byte accesses for 16-bit types (256 gave 4-byte ones); 64
    under the interpreter."""
    return 64 if _interpreting(t) else min(1024, triton.next_power_of_2(n))


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
    keep_gu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out [T, H]`` and the saved pre-activations ``gu [S, N1]``; same contract as ``reference.experts_forward``.
    ``keep_gu=False`` (nothing will run the backward): ``gu`` is ``None``, and the gated kernel stores only the
    activation, ``S * N1`` elements less written and held."""
    num_tokens = x.shape[0]
    top_k = top_k_weights.shape[-1]
    toggles = env.toggles()  # once per call: the launchers' cached decisions are keyed on them
    gu, h = gate_up(x, w1_logical(w1, layout), b1, routing, top_k, layout, block_m, toggles, keep_pre=keep_gu)
    # The down projection's bias, if any, is added by the combine (in fp32), so the matmul is a plain sorted-row one
    # (Gluon, CUTLASS or Triton, as the tuner measures): on GPT-OSS-20B at T=4096 the Triton kernel with the bias in
    # its epilogue took 500 us where cuBLAS takes 425 (benchmarks/NOTES.md, v2.24).
    y = sorted_matmul(h, w2_logical(w2, layout), routing, top_k, block_m=block_m, toggles=toggles)
    del h  # free before combine allocates `out`
    return combine(y, routing, top_k_weights, num_tokens, top_k, bias=b2), gu


def gate_up(
    x: torch.Tensor,
    w1l: torch.Tensor,
    b1: torch.Tensor | None,
    routing: Routing,
    top_k: int,
    layout: ExpertLayout,
    block_m: int,
    toggles: env.Toggles | None = None,
    keep_pre: bool = True,
    keep_act: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The forward's first matmul and its activation: pre-activations ``gu [S, N1]`` and ``h [S, I]`` for the rows of
    ``x [T, H]`` in sorted pair order, ``w1l`` the logical ``[E, N1, H]`` view. Without ``keep_pre`` ``gu`` is
    ``None`` (the Triton kernel stores ``h`` only); without ``keep_act`` ``h`` is (no activation at all: the
    backward recomputing ``gu``). Two implementations, the tuner picks per shape bucket:

    - our Triton kernel: gathers ``x``'s rows itself, the activation in its epilogue (the default);
    - CUTLASS's grouped GEMM (``torch._grouped_mm``, bf16 on sm_90 / sm_100, no bias) on ``x``'s rows copied to sorted
      order, then the activation as a pass of its own. On Mixtral's shape at T=16384 the gated Triton kernel took
      13.1 ms where cuBLAS takes 11.4 for the same FLOPs (benchmarks/NOTES.md, v2.16). ``HETERMOE_VENDOR_GATE_UP=0``
      keeps it out."""
    num_pairs = routing.order.numel()
    n1 = w1l.shape[1]
    inter = n1 // 2 if layout.has_gate else n1
    toggles = toggles or env.toggles()

    if not (keep_pre or keep_act):
        raise ValueError("gate_up: keep_pre=False and keep_act=False leave nothing to compute")

    def triton_run() -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gu = x.new_empty(num_pairs, n1) if keep_pre else None
        h = x.new_empty(num_pairs, inter) if keep_act else None
        if layout.has_gate and not layout.is_concatenated:
            # Interleaved gate/up: one contiguous operand, the activation pairs adjacent columns in the epilogue
            # (two stride-2 operands waste half of every loaded sector: GPT-OSS ran its forward at ~50 TF/s).
            gather_gemm(
                x, w1l, routing, top_k, gather_a=True, bias=b1, out=gu, act_out=h, layout=layout, block_m=block_m,
                paired=True, toggles=toggles,
            )
        else:
            _gate_up_two_operands(x, w1l, b1, routing, top_k, gu, h, layout, block_m, toggles)
        return gu, h

    def vendor_run() -> tuple[torch.Tensor, torch.Tensor | None]:
        gu = torch._grouped_mm(sorted_rows(x, routing, top_k), w1l.transpose(1, 2), offs=routing.offsets[1:])
        if not keep_act:
            return gu, None
        h = x.new_empty(num_pairs, inter)
        activation(gu, h, layout)
        return gu, h

    def run(cfg: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if cfg["IMPL"] == "cutlass":
            gu, h = vendor_run()
            return (gu if keep_pre else None), h
        return triton_run()

    def decide() -> dict:
        triton_only = dict(IMPL="triton")
        if b1 is not None or num_pairs == 0 or not toggles.vendor_gate_up:
            return triton_only
        if not vendor_matmul_ok(x, w1l, toggles=toggles):
            return triton_only
        # Offered from 2048 rows per expert (bucketed): measured to help at Mixtral's 4096 (v2.16 item 6); at 256-1024
        # rows our gathered kernel beat CUTLASS by 7-37% even without the copy and the activation pass (v2.10 item 2).
        if tuning.rows_bucket(num_pairs, w1l.shape[0]) < VENDOR_GATE_UP_MIN_ROWS:
            return triton_only
        key = (
            str(x.dtype).replace("torch.", ""),
            f"act{layout.act_code}-gated{int(layout.has_gate)}{'p' if not layout.is_concatenated else ''}"
            + ("" if keep_pre else "-nopre")
            + ("" if keep_act else "-noact"),
            f"a{_layout_key(x)}-b{_layout_key(w1l)}",
            f"N{n1}-K{w1l.shape[2]}-E{w1l.shape[0]}-S{tuning.bucket(num_pairs)}",
        )
        candidates = [triton_only, dict(IMPL="cutlass")]
        # ``warm``: the Triton kernel tunes its own tiles first (``select`` is not re-entrant).
        return tuning.choose_impl(
            "gate_up", key, candidates, run, device=x.device, default=triton_only, warm=triton_run
        )

    # Decided apart with and without ``keep_pre`` and ``keep_act``: without the pre-activations the Triton kernel
    # writes a third of the bytes (CUTLASS writes them either way); without the activation CUTLASS needs no pass.
    signature = ("gate_up", _sig(x), _sig(w1l), b1 is None, layout, block_m, num_pairs, keep_pre, keep_act, toggles)
    return run(tuning.remembered(signature, decide, x.device))


VENDOR_GATE_UP_MIN_ROWS = 2048


def pre_activations(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    routing: Routing,
    top_k: int,
    layout: ExpertLayout,
    block_m: int,
) -> torch.Tensor:
    """``gu [S, N1]`` as ``experts_forward`` saves it, without the activation: the backward's recomputation when the
    forward saved none (``moe_experts(recompute=True)``). Bit-identical to the forward's (the same kernel and tiles'
    arithmetic; only the stores differ)."""
    gu, _ = gate_up(x, w1_logical(w1, layout), b1, routing, top_k, layout, block_m, keep_act=False)
    return gu


def activation(gu: torch.Tensor, h: torch.Tensor, layout: ExpertLayout) -> None:
    """``h = act(gate) * up`` (or ``act(gu)`` without a gate) from the pre-activations ``gu [S, N1]``, in ``layout``'s
    column order (gate/up halves, or interleaved pairs)."""
    num_pairs, inter = h.shape
    if num_pairs == 0:
        return
    gate, up = _halves(gu, 1, layout)
    fast(tk._act_forward_kernel)[(num_pairs,)](
        gate,
        up,
        up.stride(0),
        up.stride(1),
        h,
        h.stride(0),
        h.stride(1),
        inter,
        layout.alpha,
        layout.limit,
        GATED=layout.has_gate,
        ACT=layout.act_code,
        BLOCK_N=row_block_n(h, inter),
        num_warps=4,
    )


def _gate_up_two_operands(x, w1l, b1, routing, top_k, gu, h, layout, block_m, toggles) -> None:
    w_gate, w_up = _halves(w1l, 1, layout)
    gu_gate, gu_up = _halves(gu, 1, layout) if gu is not None else (None, None)
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
        toggles=toggles,
    )


def _glu_backward(g, gu, dgu, hw, routing: Routing, weights_flat, dweights, dout, b2, top_k: int, layout) -> None:
    """The activation's backward over ``routing``'s rows, one program per row: ``dgu`` from ``g`` and ``gu``, ``hw``
    (the routing weight times the recomputed activation, dW2's operand), and each pair's routing-weight gradient
    written into its slot of ``dweights``. Works in place (``dgu`` may be ``gu``, ``hw`` may be ``g``): a program reads
    its row's values before it writes the same positions."""
    num_pairs, inter = g.shape
    if num_pairs == 0:
        return
    # Interleaved gate/up: the kernel reads and writes the pairs as one contiguous stream.
    paired = layout.has_gate and not layout.is_concatenated
    gu_gate, gu_up = (gu, gu) if paired else _halves(gu, 1, layout)
    dgu_gate, dgu_up = (dgu, dgu) if paired else _halves(dgu, 1, layout)
    fast(tk._glu_backward_kernel)[(num_pairs,)](
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
        hw,
        hw.stride(0),
        hw.stride(1),
        routing.order,
        weights_flat,
        dweights,
        dout,
        dout.stride(0),
        dout.stride(1),
        b2 if b2 is not None else dout,
        b2.stride(0) if b2 is not None else 0,
        b2.stride(1) if b2 is not None else 0,
        routing.expert,
        top_k,
        inter,
        dout.shape[1],
        layout.alpha,
        layout.limit,
        GATED=layout.has_gate,
        ACT=layout.act_code,
        HAS_BIAS=b2 is not None,
        BLOCK_N=row_block_n(g, inter),
        PAIRED=paired,
        num_warps=4,
    )


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
    release_gu: bool = False,
    weight_grads: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, d top_k_weights, dw1, dw2, db1, db2)``; same contract as ``reference.experts_backward``, except that
    ``gu`` is consumed: its storage receives ``dgu`` (one ``[S, N1]`` buffer fewer at the backward's peak).
    Without ``weight_grads`` (frozen experts) neither weight gradient nor its row copy is made: ``g``, the glu pass,
    dx and its combine remain, 6 of the backward's 12 ``S*H*I`` matmul FLOPs.

    ``release_gu``: free ``gu``'s storage once its last reader is queued (the caller must hold no other use of it:
    the eager autograd path, whose saved tensor is never read again). With the vendor weight gradients this lets
    dW2's gathered rows take its place, a lower peak (Qwen3-30B-A3B at T=16384: 2.13 -> 1.94 GiB)."""
    dout = dout.contiguous()
    num_tokens = x.shape[0]
    top_k = top_k_weights.shape[-1]
    num_pairs = routing.order.numel()
    weights_flat = top_k_weights.reshape(-1)
    toggles = env.toggles()  # once per call: the launchers' cached decisions are keyed on them
    w1l, w2l = w1_logical(w1, layout), w2_logical(w2, layout)

    # Whether the weight gradients go to the vendor's grouped GEMM on rows copied to sorted order.
    vendor = weight_grads and num_pairs > 0 and vendor_wgrad_ok(x, w1, w2, gu, w2l, toggles=toggles)
    # g = dout[tok] @ w2[e]; dout_sorted: dout's rows in sorted order when g was computed from them (dW2's operand)
    g, dout_sorted = backward_g(dout, w2l, routing, top_k, block_m=block_m, vendor=vendor, toggles=toggles)

    # The glu kernel works in place, element by element: each program reads a row's g, gate and up before it
    # writes the same positions, so dgu overwrites gu (nothing reads gu after it) and hw (routing weight times
    # the recomputed activation, the B operand of dW2) overwrites g.
    dgu, hw = gu, g
    # The routing weights' gradient, written by the glu kernel straight into each pair's slot.
    dweights = torch.empty(top_k_weights.shape, dtype=top_k_weights.dtype, device=x.device)
    _glu_backward(g, gu, dgu, hw, routing, weights_flat, dweights, dout, b2, top_k, layout)

    # Transients are dropped as soon as their last reader is queued (the caching allocator reuses them at once).
    # dW2[e] = sum_r (w_r dout[tok_r])^T h_r = sum_r dout[tok_r]^T (w_r h_r): the glu kernel already wrote w * h.
    # Order: dW2 first, so that `hw` (and dout's sorted rows, if g made them) is gone before `dx_sorted [S, H]` and
    # dW1's working set exist; except when the vendor path may free `gu` and has no sorted rows yet: then dx and
    # dW1 first, `gu` freed, and dW2's gathered rows take its place.
    del g
    dw2_last = vendor and release_gu and dout_sorted is None  # vendor implies weight_grads
    dw1 = dw2 = db1 = db2 = None
    if weight_grads and b2 is not None:
        db2 = torch.empty_like(b2)
        expert_colsum(dout, routing, top_k, db2, gather_a=True, scale=weights_flat)
    if not dw2_last:
        if weight_grads:
            dw2 = _dw2(dout, hw, routing, top_k, w2, layout, vendor, toggles, dout_sorted=dout_sorted)
        del hw, dout_sorted

    # dx = sum over slots of dgu @ w1[e]   (w1 logical [E, N1, H] read as [E, H, N1]^T)
    dx_sorted = sorted_matmul(dgu, w1l.transpose(1, 2), routing, top_k, block_m=block_m, toggles=toggles)
    dx = combine(dx_sorted, routing, None, num_tokens, top_k)
    del dx_sorted

    if vendor:  # x's rows in sorted order take dx_sorted's freed block
        dw1 = _vendor_wgrad(dgu, sorted_rows(x, routing, top_k), routing, layout.is_transposed, toggles)
    elif weight_grads:
        dw1 = torch.empty_like(w1)
        wgrad(dgu, x, routing, top_k, w1_logical(dw1, layout), gather_a=False, gather_b=True, toggles=toggles)
    if weight_grads and b1 is not None:
        db1 = torch.empty_like(b1)
        expert_colsum(dgu, routing, top_k, db1, gather_a=False, scale=None)
    if vendor and release_gu:
        gu.untyped_storage().resize_(0)  # dgu (the same storage) has had its last reader queued
    if dw2_last:
        dw2 = _dw2(dout, hw, routing, top_k, w2, layout, vendor, toggles)
    return dx, dweights, dw1, dw2, db1, db2


def recompute_chunk_rows(
    num_pairs: int, w1: torch.Tensor, w2: torch.Tensor, layout: ExpertLayout, chunks: int | None = 1
) -> int:
    """Sorted rows per chunk of ``experts_backward_recompute``; ``num_pairs`` (or more) means one chunk.

    ``chunks`` asks for that many (``HETERMOE_RECOMPUTE_CHUNKS``). ``None`` (``auto``) chunks only where the whole
    routing's pre-activations ``[S, N1]`` reach half the two weight gradients (which exist whatever the backward does),
    and then holds a chunk's transients (its pre-activations, ``g [rows, I]`` and dx's rows ``[rows, H]``) to a
    quarter of them. On an H100 (benchmarks/NOTES.md, v2.22) that takes Mixtral-8x7B at 16 K tokens in 5 chunks, from
    4.88 to 3.58 GiB of peak (0.55x ``grouped_mm``'s); below that ratio chunks did not lower the peak (Qwen3-30B-A3B
    at 16 K tokens: 1.94 -> 1.91 GiB, where dx's sorted rows ``[S, H]`` dominate) and only cost time."""
    w1l, w2l = w1_logical(w1, layout), w2_logical(w2, layout)
    num_experts, n1, hidden = w1l.shape
    inter = w2l.shape[2]
    if chunks is None:
        elem = w1.element_size()
        weight_grads = num_experts * (n1 + inter) * hidden * elem
        if 2 * num_pairs * n1 * elem < weight_grads:
            return num_pairs
        chunks = -(-num_pairs * (n1 + inter + hidden) * elem // max(weight_grads // 4, 1))
    rows = -(-num_pairs // max(chunks, 1))
    return -(-rows // 16) * 16  # 16-row multiples: 64-byte aligned slices of the int32 routing arrays


def _gluon_wgrad_chunk(a, b, chunk: Routing, out, transposed: bool, places) -> None:
    """One chunk's part of ``out[e] += a_e^T b_e`` (rows in the chunk's sorted order) through the Gluon kernel, in the
    weight's storage layout: ``[E, N, K]``, or ``[E, K, N]`` for weights stored ``[E, in, out]`` (as
    ``_vendor_wgrad``)."""
    if transposed:
        a, b = b, a
    gluon_wgrad.grouped_wgrad(a, b, chunk.offsets, out=out, accumulate=places)


def experts_backward_recompute(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k_weights: torch.Tensor,
    routing: Routing,
    layout: ExpertLayout,
    block_m: int,
    chunk_rows: int,
    weight_grads: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """``experts_backward`` for a forward that saved no pre-activations (``recompute=True``), run over fixed chunks of
    ``chunk_rows`` sorted rows: each chunk recomputes its own ``gu``, then its ``g``, ``dgu``, dx rows and its part of
    the weight gradients, so no ``[S, N1]`` or ``[S, I]`` tensor ever exists; the peak is the weight gradients, dx's
    sorted rows ``[S, H]`` and one chunk's transients.

    The chunks' bounds are fixed row numbers (experts' run lengths are device data, never read on the host), so an
    expert's run may span chunks: its weight gradient is then the sum of the chunks' parts, added in chunk order. On
    sm_90 in bf16 / fp16 the Gluon weight gradient adds them (``gluon_wgrad.grouped_wgrad(accumulate=...)``, on the
    chunk's token rows copied to sorted order, ``[rows, H]``); elsewhere our Triton one (``wgrad(accumulate=...)``,
    gathering the rows itself). CUTLASS's grouped GEMM cannot add to an output."""
    dout = dout.contiguous()
    num_tokens, hidden = x.shape
    top_k = top_k_weights.shape[-1]
    num_pairs = routing.order.numel()
    weights_flat = top_k_weights.reshape(-1)
    # A chunk has no ``inverse``: the paths that copy token rows to sorted order (CUTLASS's gate/up, ``g`` on sorted
    # rows) are not taken.
    toggles = env.toggles()._replace(vendor_gate_up=False, sorted_g=False)
    w1l, w2l = w1_logical(w1, layout), w2_logical(w2, layout)
    w1t = w1l.transpose(1, 2)

    dweights = torch.empty(top_k_weights.shape, dtype=top_k_weights.dtype, device=x.device)
    dx_sorted = x.new_empty(num_pairs, hidden)
    dw1 = dw2 = db1 = db2 = None
    if weight_grads:
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        if b2 is not None:
            db2 = torch.empty_like(b2)
            expert_colsum(dout, routing, top_k, db2, gather_a=True, scale=weights_flat)
        if b1 is not None:
            db1_sum = torch.zeros(b1.shape, dtype=torch.float32, device=b1.device)
            db1_part = torch.empty_like(db1_sum)
        if num_pairs == 0:  # no chunk runs: every expert's gradient is zero
            dw1.zero_()
            dw2.zero_()
    # The weight gradients: on sm_90 in bf16 / fp16 the Gluon kernel (token rows gathered per chunk, TMA-read), which
    # can add to its output; else our Triton kernel, gathering rows itself. CUTLASS's cannot add.
    gluon = (
        weight_grads
        and num_pairs > 0
        and toggles.gluon
        and gluon_wgrad.available(x)
        and x.dtype in (torch.bfloat16, torch.float16)
        and w1.dtype == w2.dtype == x.dtype
        and hidden % 8 == 0
        and w1l.shape[1] % 8 == 0
        and w2l.shape[2] % 8 == 0  # TMA: 16-byte rows of every operand
    )
    dw1_cfg = dw2_cfg = None
    for start in range(0, num_pairs, chunk_rows):
        end = min(num_pairs, start + chunk_rows)
        chunk = chunk_routing(routing, start, end, block_m)
        gu, _ = gate_up(x, w1l, b1, chunk, top_k, layout, block_m, toggles, keep_act=False)
        g, _ = backward_g(dout, w2l, chunk, top_k, block_m=block_m, vendor=False, toggles=toggles)
        dgu, hw = gu, g  # in place, as in experts_backward
        _glu_backward(g, gu, dgu, hw, chunk, weights_flat, dweights, dout, b2, top_k, layout)
        del g, gu
        places = (routing.offsets, start, end, num_pairs)
        tokens = (chunk.order // top_k).long() if gluon else None
        if gluon:
            _gluon_wgrad_chunk(dout.index_select(0, tokens), hw, chunk, dw2, layout.is_transposed, places)
        elif weight_grads:
            dw2_cfg = wgrad(
                dout, hw, chunk, top_k, w2_logical(dw2, layout), gather_a=True, gather_b=False, config=dw2_cfg,
                toggles=toggles, accumulate=places,
            )
        del hw
        dx_sorted[start:end] = sorted_matmul(dgu, w1t, chunk, top_k, block_m=block_m, toggles=toggles)
        if gluon:
            _gluon_wgrad_chunk(dgu, x.index_select(0, tokens), chunk, dw1, layout.is_transposed, places)
        elif weight_grads:
            dw1_cfg = wgrad(
                dgu, x, chunk, top_k, w1_logical(dw1, layout), gather_a=False, gather_b=True, config=dw1_cfg,
                toggles=toggles, accumulate=places,
            )
        if weight_grads and b1 is not None:
            expert_colsum(dgu, chunk, top_k, db1_part, gather_a=False, scale=None)
            db1_sum += db1_part
        del dgu
    if weight_grads and b1 is not None:
        db1 = db1_sum.to(b1.dtype)
    dx = combine(dx_sorted, routing, None, num_tokens, top_k)
    return dx, dweights, dw1, dw2, db1, db2
