"""Triton jit code of the expert operators (no launch logic here; see ``triton_ops.py``).

Kernels, in Hexa-MoE's terms:

- ``_gather_gemm_kernel``  ESMM: ``C[r] = A[row(r)] @ B[e(r)]^T`` over row tiles of one expert each, reading A
  rows in place (``row(r) = order[r] // k`` or ``r``); optionally two B operands (gate and up) with the gated
  activation fused into the epilogue. ``_gather_gemm_persistent_kernel``: the same tiles from one program per SM.
- ``_combine_kernel``      ESS: ``out[t] = sum_j w[t, j] * (Y[inverse[t*k + j]] (+ bias[e]))``, fp32, deterministic (no
                           atomics).
- ``_sorted_rows_kernel``  ``dst[inverse[t*k + j]] = src[t]``: token rows in sorted order (operands of the vendor
  weight gradients), each source row read once.
- ``_wgrad_kernel``        ESTMM: ``dW[e] = A_e^T B_e`` per expert, optional row gathers.
- ``_expert_colsum_kernel`` bias gradients: ``db[e] = sum_{r in e} scale(r) * A[row(r)]``.
- ``_glu_backward_kernel`` the gated activation's backward, the routing-weight gradient and ``w * h`` (the B
  operand of dW2, so the weight-gradient kernel needs no per-row scaling), one sorted row each.

Row indices are widened to int64 before they multiply a stride: ``T * H`` passes 2**31 at long context.
"""

import triton
import triton.language as tl

# Codes of hf_hetermoe.kernels.layout.ACTIVATIONS.
SILU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
RELU = tl.constexpr(3)
RELU2 = tl.constexpr(4)
SWIGLU_OAI = tl.constexpr(5)
SILU_SOFTCAPPED = tl.constexpr(6)  # alpha * tanh(gate / alpha) * sigmoid(gate) * limit * tanh(up / limit)
CLAMPED = tl.constexpr(8)  # plus a plain code: act(min(gate, limit)) * clamp(up, -limit, limit)
CLAMPED_AFTER = tl.constexpr(16)  # plus a plain code: min(act(gate), limit) * clamp(up, -limit, limit)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == SILU:
        y = x * tl.sigmoid(x)
    elif ACT == GELU:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == GELU_TANH:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == RELU:
        y = tl.maximum(x, 0.0)
    else:  # RELU2
        r = tl.maximum(x, 0.0)
        y = r * r
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == SILU:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == GELU:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == GELU_TANH:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == RELU:
        d = tl.where(x > 0.0, 1.0, 0.0)
    else:  # RELU2
        d = 2.0 * tl.maximum(x, 0.0)
    return d


@triton.jit
def _glu(gate, up, ACT: tl.constexpr, alpha, limit):
    if ACT == SWIGLU_OAI:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        h = (u + 1.0) * g * tl.sigmoid(g * alpha)
    elif ACT == SILU_SOFTCAPPED:
        h = alpha * _tanh(gate / alpha) * tl.sigmoid(gate) * (limit * _tanh(up / limit))
    elif ACT >= CLAMPED_AFTER:
        h = tl.minimum(_act(gate, ACT - CLAMPED_AFTER), limit) * tl.minimum(tl.maximum(up, -limit), limit)
    elif ACT >= CLAMPED:
        h = _act(tl.minimum(gate, limit), ACT - CLAMPED) * tl.minimum(tl.maximum(up, -limit), limit)
    else:
        h = _act(gate, ACT) * up
    return h


@triton.jit
def _grouped(pid, num_m, num_n, GROUP: tl.constexpr):
    """Program id -> (m, n) tile with GROUP consecutive m tiles sharing each n tile (L2 reuse)."""
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    size = tl.minimum(num_m - first_m, GROUP)
    local = pid % per_group
    return first_m + local % size, local // size


@triton.jit
def _gather_gemm_kernel(
    a_ptr, stride_am, stride_ak,  # A [*, K]
    order_ptr, top_k,  # row(r) = order[r] // top_k when GATHER_A
    b_ptr, b2_ptr, stride_be, stride_bn, stride_bk,  # B[e] logical [N, K]; b2 = up half when GATED
    b_up_offset,  # elements from b to b2 (the same storage) when ONE_DOT
    bias_ptr, bias2_ptr, stride_biase, stride_biasn,
    c_ptr, c2_ptr, stride_cm, stride_cn,  # pre-activation output [S, N] (gate, up halves when GATED)
    h_ptr, stride_hm, stride_hn,  # activation output [S, N] when ACT >= 0
    tile_expert_ptr, tile_start_ptr, offsets_ptr,
    num_tiles_m, N, K, num_experts, alpha, limit,
    GATHER_A: tl.constexpr, GATED: tl.constexpr, PAIRED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_TAIL: tl.constexpr = False, ONE_DOT: tl.constexpr = False, STORE_PRE: tl.constexpr = True,
):
    # PAIRED: B is an interleaved [g0, u0, g1, u1, ...] gate/up matrix read as one operand (contiguous loads);
    # the activation pairs adjacent output columns in the epilogue and h has N // 2 columns.
    # One program per (row tile, N tile), numbered so that GROUP_M consecutive row tiles sweep all N tiles
    # together: their A rows and the expert's B columns stay in L2 instead of being re-read from DRAM.
    # ONE_DOT (GATED): the gate and up columns of a tile are loaded as one interleaved [BLOCK_K, 2 * BLOCK_N] B tile
    # and multiplied in one 2 * BLOCK_N wide dot (one 128x256 MMA reads A from shared memory once where two
    # 128x128 ones read it twice); the accumulator is split back into gate and up before the epilogue.
    # SPLIT_TAIL: a tile holding at most BLOCK_M // 2 rows (an expert's last, partial tile) runs the loop with
    # half-height operands: half the MMA work and A traffic for the same result (the rows past the expert's end
    # are masked either way).
    pid_m, pid_n = _grouped(tl.program_id(0), num_tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    _gather_gemm_row_tile(
        a_ptr, stride_am, stride_ak, order_ptr, top_k, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk, b_up_offset,
        bias_ptr, bias2_ptr, stride_biase, stride_biasn, c_ptr, c2_ptr, stride_cm, stride_cn, h_ptr, stride_hm,
        stride_hn, tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_m, pid_n, N, K, num_experts, alpha, limit,
        GATHER_A, GATED, PAIRED, HAS_BIAS, ACT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_TAIL, ONE_DOT,
        STORE_PRE,
    )


@triton.jit
def _gather_gemm_row_tile(
    a_ptr, stride_am, stride_ak, order_ptr, top_k, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk, b_up_offset,
    bias_ptr, bias2_ptr, stride_biase, stride_biasn, c_ptr, c2_ptr, stride_cm, stride_cn, h_ptr, stride_hm, stride_hn,
    tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_m, pid_n, N, K, num_experts, alpha, limit,
    GATHER_A: tl.constexpr, GATED: tl.constexpr, PAIRED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_TAIL: tl.constexpr, ONE_DOT: tl.constexpr, STORE_PRE: tl.constexpr,
):
    """Routing row tile ``pid_m`` times N tile ``pid_n`` (nothing for an unused slot of the tile arrays), at half
    height when ``SPLIT_TAIL`` and the tile holds at most ``BLOCK_M // 2`` rows."""
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < num_experts:
        row_start = tl.load(tile_start_ptr + pid_m)
        row_end = tl.load(offsets_ptr + expert + 1)
        if SPLIT_TAIL and row_end - row_start <= BLOCK_M // 2:
            _gather_gemm_tile(
                a_ptr, stride_am, stride_ak, order_ptr, top_k, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk,
                b_up_offset, bias_ptr, bias2_ptr, stride_biase, stride_biasn, c_ptr, c2_ptr, stride_cm, stride_cn,
                h_ptr, stride_hm, stride_hn, expert, row_start, row_end, pid_n, N, K, alpha, limit,
                GATHER_A, GATED, PAIRED, HAS_BIAS, ACT, DOT_PRECISION, BLOCK_M // 2, BLOCK_N, BLOCK_K, ONE_DOT,
                STORE_PRE,
            )
        else:
            _gather_gemm_tile(
                a_ptr, stride_am, stride_ak, order_ptr, top_k, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk,
                b_up_offset, bias_ptr, bias2_ptr, stride_biase, stride_biasn, c_ptr, c2_ptr, stride_cm, stride_cn,
                h_ptr, stride_hm, stride_hn, expert, row_start, row_end, pid_n, N, K, alpha, limit,
                GATHER_A, GATED, PAIRED, HAS_BIAS, ACT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, ONE_DOT,
                STORE_PRE,
            )


@triton.jit
def _used_row_tiles(offsets_ptr, num_experts, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row tiles the routing filled (``sum_e ceil(count_e / BLOCK_M)``): the used prefix of the tile arrays."""
    e = tl.arange(0, E_POW2)
    mask = e < num_experts
    start = tl.load(offsets_ptr + e, mask=mask, other=0)
    end = tl.load(offsets_ptr + e + 1, mask=mask, other=0)
    return tl.sum((end - start + BLOCK_M - 1) // BLOCK_M, axis=0)


@triton.jit
def _gather_gemm_persistent_kernel(
    a_ptr, stride_am, stride_ak, order_ptr, top_k, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk, b_up_offset,
    bias_ptr, bias2_ptr, stride_biase, stride_biasn, c_ptr, c2_ptr, stride_cm, stride_cn, h_ptr, stride_hm, stride_hn,
    tile_expert_ptr, tile_start_ptr, offsets_ptr,
    num_tiles_m, N, K, num_experts, alpha, limit,
    GATHER_A: tl.constexpr, GATED: tl.constexpr, PAIRED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr, SPLIT_TAIL: tl.constexpr = False, ONE_DOT: tl.constexpr = False,
    STORE_PRE: tl.constexpr = True,
):
    # ``_gather_gemm_kernel`` as a persistent kernel: one program per SM walks the used (row tile, N tile) pairs in
    # the same grouped order (unused tile slots cost nothing), so the grid is launched once instead of one program
    # per tile; at 16 K tokens that saved 4-13% per matmul on an H200 (benchmarks/NOTES.md, v2.9). The tile loop is
    # not flattened into the k loop (``tl.range(..., flatten=True)``): in Triton 3.6 that spilled 370-640 registers
    # and ran 50x slower. Same arguments as ``_gather_gemm_kernel``.
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = _used_row_tiles(offsets_ptr, num_experts, BLOCK_M, E_POW2)
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped(tile, num_m, num_n, GROUP_M)
        _gather_gemm_row_tile(
            a_ptr, stride_am, stride_ak, order_ptr, top_k, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk,
            b_up_offset, bias_ptr, bias2_ptr, stride_biase, stride_biasn, c_ptr, c2_ptr, stride_cm, stride_cn, h_ptr,
            stride_hm, stride_hn, tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_m, pid_n, N, K, num_experts,
            alpha, limit, GATHER_A, GATED, PAIRED, HAS_BIAS, ACT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            SPLIT_TAIL, ONE_DOT, STORE_PRE,
        )


@triton.jit
def _gathered_mainloop(
    a_ptr, stride_am, stride_ak, a_rows, mask_m, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk, e64, offs_n,
    mask_n, K,
    GATED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``A[a_rows] @ B[e]^T`` (and ``@ B2[e]^T`` when GATED) for one tile, fp32 accumulators."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_off = e64 * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + b_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b2 = tl.load(b2_ptr + b_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_off += BLOCK_K * stride_bk
    return acc, acc2


@triton.jit
def _gate_up_one_dot_mainloop(
    a_ptr, stride_am, stride_ak, a_rows, mask_m, b_ptr, b_up_offset, stride_be, stride_bn, stride_bk, e64, pid_n,
    N, K,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gate and up products of one tile from one dot: B columns interleaved [g0, u0, g1, u1, ...] over the tile's
    BLOCK_N gate columns and the same up columns (``b_up_offset`` elements further), then split apart."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, 2 * BLOCK_N)
    cols = pid_n * BLOCK_N + offs_j // 2
    mask_j = cols < N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_off = (e64 * stride_be + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
             + (offs_j % 2)[None, :].to(tl.int64) * b_up_offset)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + b_off, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_off += BLOCK_K * stride_bk
    return tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))


@triton.jit
def _gather_gemm_tile(
    a_ptr, stride_am, stride_ak, order_ptr, top_k, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk,
    b_up_offset, bias_ptr, bias2_ptr, stride_biase, stride_biasn, c_ptr, c2_ptr, stride_cm, stride_cn,
    h_ptr, stride_hm, stride_hn, expert, row_start, row_end, pid_n, N, K, alpha, limit,
    GATHER_A: tl.constexpr, GATED: tl.constexpr, PAIRED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_DOT: tl.constexpr, STORE_PRE: tl.constexpr,
):
    """One (row tile, N tile) of ``_gather_gemm_kernel``: BLOCK_M sorted rows from ``row_start`` (masked at
    ``row_end``) times expert ``expert``'s B columns, then the epilogue (bias, stores, activation). Without
    ``STORE_PRE`` only the activation is stored (a forward that saves nothing for a backward)."""
    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    if GATHER_A:
        a_rows = (tl.load(order_ptr + offs_m, mask=mask_m, other=0) // top_k).to(tl.int64)
    else:
        a_rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    e64 = expert.to(tl.int64)

    if GATED and ONE_DOT:
        acc, acc2 = _gate_up_one_dot_mainloop(
            a_ptr, stride_am, stride_ak, a_rows, mask_m, b_ptr, b_up_offset, stride_be, stride_bn, stride_bk, e64,
            pid_n, N, K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    else:
        acc, acc2 = _gathered_mainloop(
            a_ptr, stride_am, stride_ak, a_rows, mask_m, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk, e64, offs_n,
            mask_n, K, GATED, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )

    if HAS_BIAS:
        bias_off = e64 * stride_biase + offs_n * stride_biasn
        acc += tl.load(bias_ptr + bias_off, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += tl.load(bias2_ptr + bias_off, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    out_dtype = c_ptr.dtype.element_ty
    mask = mask_m[:, None] & mask_n[None, :]
    c_off = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    pre = acc.to(out_dtype)
    if STORE_PRE:
        tl.store(c_ptr + c_off, pre, mask=mask)
    if GATED:
        pre2 = acc2.to(out_dtype)
        if STORE_PRE:
            tl.store(c2_ptr + c_off, pre2, mask=mask)
    if ACT >= 0:
        # The activation reads the rounded pre-activations, exactly what the backward pass re-reads.
        if PAIRED:
            gate, up = tl.split(tl.reshape(pre.to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))
            h = _glu(gate, up, ACT, alpha, limit)
            offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            h_off = offs_m.to(tl.int64)[:, None] * stride_hm + offs_h[None, :] * stride_hn
            tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_h < N // 2)[None, :])
        else:
            if GATED:
                h = _glu(pre.to(tl.float32), pre2.to(tl.float32), ACT, alpha, limit)
            else:
                h = _act(pre.to(tl.float32), ACT)
            h_off = offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
            tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr, stride_ym, stride_yn,  # Y [S, N] in sorted order
    inverse_ptr, w_ptr,  # inverse [T*k], w [T*k] routing weights
    out_ptr, stride_om, stride_on,  # out [T, N]
    N,
    bias_ptr, stride_be, stride_bn, expert_ptr,  # HAS_BIAS: Y[r] + bias[expert[r]], bias [E, N]
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr = False,
):
    # The slot loop is unrolled (TOP_K is a compile-time constant): the k index loads, then the k row loads, are
    # all in flight at once instead of k dependent round trips per program.
    # HAS_BIAS: the down projection's per-expert bias is added here, in fp32, instead of in the matmul's epilogue, so
    # that matmul can be any of the sorted-row implementations (none of which takes a bias).
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(inverse_ptr + token * TOP_K + j).to(tl.int64)
        y = tl.load(y_ptr + row * stride_ym + offs_n * stride_yn, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            expert = tl.load(expert_ptr + row).to(tl.int64)
            y += tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            y = y * tl.load(w_ptr + token * TOP_K + j).to(tl.float32)
        acc += y
    tl.store(out_ptr + token * stride_om + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _sorted_rows_kernel(
    src_ptr, stride_sm, stride_sn,  # src [T, N]
    inverse_ptr,  # inverse [T*k]
    dst_ptr, stride_dm, stride_dn,  # dst [S, N]: dst[inverse[t*k + j]] = src[t]
    N,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The gather ``src[order // k]`` written as a scatter in token order: each source row is read from memory once
    # and stored to its k sorted positions. Gathering in sorted order instead re-reads every token row once per
    # expert pass (k times from DRAM when src outgrows L2).
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    row = tl.load(src_ptr + token * stride_sm + offs_n * stride_sn, mask=mask)
    for j in tl.static_range(TOP_K):
        dst_row = tl.load(inverse_ptr + token * TOP_K + j).to(tl.int64)
        tl.store(dst_ptr + dst_row * stride_dm + offs_n * stride_dn, row, mask=mask)


@triton.jit
def _wgrad_kernel(
    a_ptr, stride_am, stride_an,  # A [*, N]: dW[e][n, k] = sum_r A[ra(r), n] * B[rb(r), k]
    b_ptr, stride_bm, stride_bk,  # B [*, K]
    order_ptr, top_k,  # gathers use row = order[r] // top_k
    c_ptr, stride_ce, stride_cn, stride_ck,  # dW logical [E, N, K]
    offsets_ptr, N, K,
    whole_offsets_ptr, chunk_start, chunk_end, total_rows,  # ACCUMULATE: the chunk's place among all sorted rows
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, A_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    PREFETCH: tl.constexpr = False, ACCUMULATE: tl.constexpr = False,
):
    # Grid (N tiles * K tiles, E): one expert's tiles run together, grouped so that concurrent programs share
    # A and B row slabs in L2. Both operands go straight from global to shared memory (no register-side
    # scaling: the routing weight is folded into B by the caller), so the loop pipelines like a plain GEMM.
    # The row gather is an indirect load: Triton's pipeliner gives the index load a stage of its own, which leaves
    # num_stages - 2 operand buffers (one step of prefetch at num_stages=3). PREFETCH instead carries the next
    # step's indices through the loop (a plain load, one step ahead), so the operands get num_stages buffers.
    expert = tl.program_id(1)
    pid_n, pid_k = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH and (GATHER_A or GATHER_B):
        offs_first = row_start + tl.arange(0, BLOCK_M)
        flat_next = tl.load(order_ptr + offs_first, mask=offs_first < row_end, other=0)
    for r0 in range(row_start, row_end, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        mask_r = offs_r < row_end
        if PREFETCH and (GATHER_A or GATHER_B):
            flat = flat_next
            flat_next = tl.load(order_ptr + offs_r + BLOCK_M, mask=offs_r + BLOCK_M < row_end, other=0)
        elif GATHER_A or GATHER_B:
            flat = tl.load(order_ptr + offs_r, mask=mask_r, other=0)
        if GATHER_A:
            a_rows = (flat // top_k).to(tl.int64)
        else:
            a_rows = offs_r.to(tl.int64)
        if GATHER_B:
            b_rows = (flat // top_k).to(tl.int64)
        else:
            b_rows = offs_r.to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if A_T:
            a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + offs_n[:, None] * stride_an,
                          mask=mask_r[None, :] & mask_n[:, None], other=0.0)
        else:
            a_t = tl.trans(tl.load(a_ptr + a_rows[:, None] * stride_am + offs_n[None, :] * stride_an,
                                   mask=mask_r[:, None] & mask_n[None, :], other=0.0))
        acc = tl.dot(a_t, b, acc, input_precision=DOT_PRECISION)
    c_off = expert.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck
    mask_c = mask_n[:, None] & mask_k[None, :]
    if ACCUMULATE:
        # One chunk of the sorted rows (``offsets`` are the chunk's runs): an expert whose run began in an earlier
        # chunk adds to what that chunk stored; the chunk where it begins stores (zeros for an empty run, which the
        # last chunk owns when it begins at the very end); any other chunk leaves it alone.
        # Every operand of the masks is splat to the tile (the interpreter cannot broadcast a scalar mask).
        splat = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        begins = splat + tl.load(whole_offsets_ptr + expert)
        adds = begins < chunk_start
        owns = (begins >= chunk_start) & ((begins < chunk_end) | (splat + chunk_end >= total_rows))
        mask_c = mask_c & (owns | (adds & (splat + row_end > row_start)))
        acc += tl.load(c_ptr + c_off, mask=mask_c & adds, other=0.0).to(tl.float32)
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _expert_colsum_kernel(
    a_ptr, stride_am, stride_an,  # A [*, N]: out[e][n] = sum_r scale(r) * A[ra(r), n]   (bias gradients)
    order_ptr, w_ptr, top_k,  # ra(r) = order[r] // top_k when GATHER_A; scale(r) = w[order[r]] when SCALE
    out_ptr, stride_oe, stride_on,  # [E, N]
    offsets_ptr, N,
    GATHER_A: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    # Element-wise sums in a [BLOCK_M, BLOCK_N] accumulator, reduced over rows once at the end: a reduction across
    # warps per step (shared memory and a barrier each time) held these passes at ~1.2 TB/s (benchmarks/NOTES.md,
    # v2.24). The order of the additions is fixed by the tile shape: deterministic.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        mask_r = offs_r < row_end
        if GATHER_A or SCALE:
            flat = tl.load(order_ptr + offs_r, mask=mask_r, other=0)
        if GATHER_A:
            rows = (flat // top_k).to(tl.int64)
        else:
            rows = offs_r.to(tl.int64)
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if SCALE:
            a = a * tl.load(w_ptr + flat, mask=mask_r, other=0.0).to(tl.float32)[:, None]
        acc += a
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + offs_n * stride_on,
             tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _act_forward_kernel(
    gate_ptr, up_ptr, stride_pm, stride_pn,  # pre-activations [S, I] (gate, up halves; gate unused without GATED)
    h_ptr, stride_hm, stride_hn,  # activation [S, I]
    I, alpha, limit,
    GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The activation as a pass of its own, after a gate/up matmul that does not fuse it (the vendor grouped GEMM).
    # It reads the rounded pre-activations, as the fused epilogue does, so both give the same h.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    for n0 in range(0, I, BLOCK_N):
        cols = n0 + offs
        mask = cols < I
        up = tl.load(up_ptr + row * stride_pm + cols * stride_pn, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            gate = tl.load(gate_ptr + row * stride_pm + cols * stride_pn, mask=mask, other=0.0).to(tl.float32)
            h = _glu(gate, up, ACT, alpha, limit)
        else:
            h = _act(up, ACT)
        tl.store(h_ptr + row * stride_hm + cols * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(
    g_ptr, stride_gm, stride_gn,  # g = dout[tok] @ w2[e]: [S, I] unweighted
    gate_ptr, up_ptr, stride_pm, stride_pn,  # saved pre-activations (gate, up halves) [S, I]
    dgate_ptr, dup_ptr, stride_dm, stride_dn,  # their gradients, same layout
    hw_ptr, stride_hm, stride_hn,  # recomputed activation times the routing weight [S, I]: B of dW2
    order_ptr, w_ptr, dw_ptr,  # w routing weights by flat pair; dw their gradient [T * k], also by flat pair
    dout_ptr, stride_om, stride_on, bias2_ptr, stride_b2e, stride_b2n, expert_ptr, top_k,  # bias term of dw
    I, H, alpha, limit,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    PAIRED: tl.constexpr = False,
):
    # PAIRED (GATED): gate and up interleaved in one [S, 2I] tensor ([g0, u0, g1, u1, ...]); ``gate_ptr`` and
    # ``dgate_ptr`` are its base, with its own strides, and ``up_ptr`` / ``dup_ptr`` are unused. Each step reads and
    # writes 2 * BLOCK_N contiguous elements and splits / joins them in registers: two stride-2 streams ran GPT-OSS's
    # glu pass at ~1.9 TB/s (benchmarks/NOTES.md, v2.24).
    row = tl.program_id(0).to(tl.int64)
    flat = tl.load(order_ptr + row)
    w = tl.load(w_ptr + flat).to(tl.float32)
    offs = tl.arange(0, BLOCK_N)
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, I, BLOCK_N):
        cols = n0 + offs
        mask = cols < I
        g = tl.load(g_ptr + row * stride_gm + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
        if PAIRED:
            cols2 = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
            mask2 = cols2 < 2 * I
            pre = tl.load(gate_ptr + row * stride_pm + cols2 * stride_pn, mask=mask2, other=0.0).to(tl.float32)
            gate, up = tl.split(tl.reshape(pre, (BLOCK_N, 2)))
        else:
            up = tl.load(up_ptr + row * stride_pm + cols * stride_pn, mask=mask, other=0.0).to(tl.float32)
        dh = w * g
        if GATED:
            if not PAIRED:
                gate = tl.load(gate_ptr + row * stride_pm + cols * stride_pn, mask=mask, other=0.0).to(tl.float32)
            if ACT == SWIGLU_OAI:
                gc = tl.minimum(gate, limit)
                uc = tl.minimum(tl.maximum(up, -limit), limit)
                s = tl.sigmoid(gc * alpha)
                glu = gc * s
                h = (uc + 1.0) * glu
                dgate = tl.where(gate <= limit, dh * (uc + 1.0) * (s + alpha * gc * s * (1.0 - s)), 0.0)
                dup = tl.where((up >= -limit) & (up <= limit), dh * glu, 0.0)
            elif ACT == SILU_SOFTCAPPED:
                tg = _tanh(gate / alpha)
                tu = _tanh(up / limit)
                s = tl.sigmoid(gate)
                a = alpha * tg * s
                uc = limit * tu
                h = a * uc
                dgate = dh * uc * s * ((1.0 - tg * tg) + alpha * tg * (1.0 - s))
                dup = dh * a * (1.0 - tu * tu)
            elif ACT >= CLAMPED_AFTER:
                uc = tl.minimum(tl.maximum(up, -limit), limit)
                a = _act(gate, ACT - CLAMPED_AFTER)
                h = tl.minimum(a, limit) * uc
                dgate = tl.where(a <= limit, dh * uc * _act_grad(gate, ACT - CLAMPED_AFTER), 0.0)
                dup = tl.where((up >= -limit) & (up <= limit), dh * tl.minimum(a, limit), 0.0)
            elif ACT >= CLAMPED:
                gc = tl.minimum(gate, limit)
                uc = tl.minimum(tl.maximum(up, -limit), limit)
                a = _act(gc, ACT - CLAMPED)
                h = a * uc
                dgate = tl.where(gate <= limit, dh * uc * _act_grad(gc, ACT - CLAMPED), 0.0)
                dup = tl.where((up >= -limit) & (up <= limit), dh * a, 0.0)
            else:
                a = _act(gate, ACT)
                h = a * up
                dgate = dh * up * _act_grad(gate, ACT)
                dup = dh * a
            if PAIRED:
                both = tl.reshape(tl.join(dgate, dup), (2 * BLOCK_N,))
                tl.store(dgate_ptr + row * stride_dm + cols2 * stride_dn, both.to(dgate_ptr.dtype.element_ty),
                         mask=mask2)
            else:
                tl.store(dgate_ptr + row * stride_dm + cols * stride_dn, dgate.to(dgate_ptr.dtype.element_ty),
                         mask=mask)
        else:
            h = _act(up, ACT)
            dup = dh * _act_grad(up, ACT)
        if not PAIRED:
            tl.store(dup_ptr + row * stride_dm + cols * stride_dn, dup.to(dup_ptr.dtype.element_ty), mask=mask)
        h_low = h.to(hw_ptr.dtype.element_ty).to(tl.float32)
        tl.store(hw_ptr + row * stride_hm + cols * stride_hn, (w * h_low).to(hw_ptr.dtype.element_ty), mask=mask)
        dot += g * h_low
    if HAS_BIAS:
        token = (flat // top_k).to(tl.int64)
        expert = tl.load(expert_ptr + row).to(tl.int64)
        for c0 in range(0, H, BLOCK_N):
            cols = c0 + offs
            mask = cols < H
            d = tl.load(dout_ptr + token * stride_om + cols * stride_on, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(bias2_ptr + expert * stride_b2e + cols * stride_b2n, mask=mask, other=0.0).to(tl.float32)
            dot += d * b
    # Straight to the pair's slot in the routing weights' dtype: ``order`` is a permutation, so each is written once.
    tl.store(dw_ptr + flat, tl.sum(dot, axis=0).to(dw_ptr.dtype.element_ty))
