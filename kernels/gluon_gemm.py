"""Grouped row GEMM for Hopper in Gluon: ``out[r] = a[row(r)] @ b[e(r)]^T`` over routing row tiles, warp-specialised.

The four row matmuls of an experts layer (gate/up and down in the forward, ``g = dout @ w2`` and ``dx = dgu @ w1``
in the backward) run here on sm_90. At 4 K tokens an expert of Qwen3-30B-A3B has ~256 rows, so every program
computes a few short tiles and writes each; a kernel that computes a tile and then stores it (Triton's pipeliner,
``triton_kernels._gather_gemm_kernel``) leaves the tensor cores idle during every epilogue. The schedule is the one
of ``gluon_wgrad``:

- a producer partition streams each tile's operands through a ring of shared-memory stages: ``a``'s rows with
  ``cp.async`` (Hopper's TMA cannot gather rows, and the gate/up and ``g`` matmuls read them through the routing
  order), ``b``'s tile with TMA. Its 4 warps arrive on the stage's barrier when their copies land; TMA adds the
  byte count;
- two consumer warpgroups own alternate tiles and take turns: one runs its tile's MMAs (``wgmma``) while the other
  converts and stores its finished tile. Gated tiles hold the gate and up columns of the same intermediate units in
  two accumulators, and the epilogue writes both pre-activations and the activation (the saved ``gu`` and ``h``).

Rows past an expert's end are zero-filled by the masked copies and never stored. ``b`` is a logical ``[E, N, K]``
view of the weight, read in its storage order: K-contiguous (``[E, N, K]`` storage, the gate/up and down weights of
most checkpoints) or N-contiguous (the same weights read transposed in the backward). Gluon has no interpreter, so
this kernel runs on CUDA only; ``supported()`` says whether it takes an operand set. See benchmarks/NOTES.md, v2.12.
"""

import torch  # no "from __future__ import annotations": Gluon aggregates read their annotations as types

from .tuning import num_sms

try:  # Gluon ships with Triton >= 3.4; the API used here is the one of Triton 3.6.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.language.core import _aggregate as aggregate

    # Triton 3.7+ renamed the copies (the old names raise there); 3.6 has only the old ones.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed in 3.7+
    _GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    _GLUON = False

# Codes of ``layout.ACTIVATIONS`` the gated epilogue computes (SwiGLU-OAI's clamps and biases stay in Triton).
ACTIVATIONS = (0, 1, 2, 3, 4)  # silu, gelu, gelu_tanh, relu, relu2

# Tiles: a consumer's accumulators are [BLOCK_M, BLOCK_N] fp32 (two [BLOCK_M, BLOCK_N / 2] when gated), 128
# registers per thread. A stage holds [BLOCK_M, BLOCK_K] of a and [BLOCK_N, BLOCK_K] of b, 32 KB in bf16.
# Registers: 2 x 128 consumer threads at 224 and 128 producer threads at 56 fill the 64 K (232 / 40 spilled 32
# bytes in ptxas, 224 / 56 8-12).
DEFAULT_CONFIG = dict(
    BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=4, GROUP_M=8, CONSUMER_REGS=224, PRODUCER_REGS=56, MAXNREG=168
)
CONFIGS: list[dict] = [
    DEFAULT_CONFIG,
    dict(DEFAULT_CONFIG, STAGES=5),
]


def available(a: torch.Tensor) -> bool:
    """Whether the Gluon kernels run ``a``: Gluon importable, a CUDA tensor of an sm_90 GPU (wgmma, TMA)."""
    return _GLUON and a.is_cuda and torch.cuda.get_device_capability(a.device)[0] == 9


def _b_major(b: torch.Tensor) -> str | None:
    """'k' or 'n': which dimension of the logical ``[E, N, K]`` view is contiguous, if TMA can read it so."""
    if b.dim() != 3 or b.data_ptr() % 16:
        return None
    e_stride, n_stride, k_stride = b.stride()
    if k_stride == 1 and n_stride % 8 == 0 and e_stride % 8 == 0:
        return "k"
    if n_stride == 1 and k_stride % 8 == 0 and e_stride % 8 == 0:
        return "n"
    return None


def supported(a: torch.Tensor, b: torch.Tensor, *, gated: bool = False, act: int = -1, bias: bool = False) -> bool:
    """Whether ``gather_gemm`` takes these operands: bf16 / fp16 on sm_90, ``a`` with contiguous 16-byte aligned
    rows, ``b`` readable by TMA (one contiguous dimension, 16-byte strides), no bias, and for gated tiles a
    K-contiguous ``b`` and one of ``ACTIVATIONS``."""
    if bias or not available(a) or a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return False
    if a.dim() != 2 or a.stride(1) != 1 or a.stride(0) % 8 or a.data_ptr() % 16 or a.shape[1] != b.shape[2]:
        return False
    major = _b_major(b)
    if major is None or (gated and (major != "k" or act not in ACTIVATIONS)):
        return False
    # K a multiple of 16: the launcher then passes it specialised as such, so that a's masked copies stay 16 bytes.
    return b.shape[1] % 8 == 0 and b.shape[2] % 16 == 0


if _GLUON:

    @aggregate
    class _Options:
        """The kernel's compile-time choices, as one argument of the partitions: a plain constexpr argument would
        reach a partition as a runtime int32."""

        GATHER: gl.constexpr
        TMA_A: gl.constexpr
        FENCE: gl.constexpr
        LAG: gl.constexpr
        GATED: gl.constexpr
        B_KMAJOR: gl.constexpr
        ACT: gl.constexpr
        GROUP_M: gl.constexpr
        E_POW2: gl.constexpr
        BLOCK_N: gl.constexpr

        @gluon.constexpr_function
        def __init__(self, GATHER, TMA_A, FENCE, LAG, GATED, B_KMAJOR, ACT, GROUP_M, E_POW2, BLOCK_N):
            self.LAG = gl.constexpr(LAG)
            self.GATHER = gl.constexpr(GATHER)
            self.TMA_A = gl.constexpr(TMA_A)
            self.FENCE = gl.constexpr(FENCE)
            self.GATED = gl.constexpr(GATED)
            self.B_KMAJOR = gl.constexpr(B_KMAJOR)
            self.ACT = gl.constexpr(ACT)
            self.GROUP_M = gl.constexpr(GROUP_M)
            self.E_POW2 = gl.constexpr(E_POW2)
            self.BLOCK_N = gl.constexpr(BLOCK_N)

    @gluon.jit
    def _tanh(x):
        return 2.0 / (1.0 + gl.exp(-2.0 * x)) - 1.0

    @gluon.jit
    def _gated_act(gate, up, ACT: gl.constexpr):
        """``act(gate) * up`` for the codes in ``ACTIVATIONS`` (same formulas as ``triton_kernels._act``)."""
        if ACT == 0:  # silu
            y = gate / (1.0 + gl.exp(-gate))
        elif ACT == 1:  # gelu
            y = 0.5 * gate * (1.0 + gl.erf(gate * 0.7071067811865476))
        elif ACT == 2:  # gelu_tanh
            y = 0.5 * gate * (1.0 + _tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
        elif ACT == 3:  # relu
            y = gl.maximum(gate, 0.0)
        else:  # relu2
            r = gl.maximum(gate, 0.0)
            y = r * r
        return y * up

    @gluon.jit
    def _used_row_tiles(offsets_ptr, num_experts, BLOCK_M: gl.constexpr, E_POW2: gl.constexpr):
        """Row tiles the routing filled (``sum_e ceil(count_e / BLOCK_M)``): the used prefix of the tile arrays."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        e = gl.arange(0, E_POW2, layout=layout)
        mask = e < num_experts
        start = gl.load(offsets_ptr + e, mask=mask, other=0)
        end = gl.load(offsets_ptr + e + 1, mask=mask, other=0)
        return gl.sum((end - start + BLOCK_M - 1) // BLOCK_M, axis=0)

    @gluon.jit
    def _tile(t, num_m, num_n, tile_expert_ptr, tile_start_ptr, offsets_ptr, GROUP_M: gl.constexpr):
        """Tile ``t`` of the grouped order (GROUP_M row tiles sweep the N tiles together, for L2 reuse of their
        rows and the expert's columns): its expert, first and end row, and N tile."""
        per_group = GROUP_M * num_n
        first_m = (t // per_group) * GROUP_M
        size = gl.minimum(num_m - first_m, GROUP_M)
        local = t % per_group
        pid_m = first_m + local % size
        expert = gl.load(tile_expert_ptr + pid_m)
        start = gl.load(tile_start_ptr + pid_m)
        end = gl.load(offsets_ptr + expert + 1)
        return expert, start, end, local // size

    @gluon.jit
    def _producer(
        a_ptr,
        a_desc,
        stride_am,
        order_ptr,
        top_k,
        b_desc,
        c_ptr,
        c2_ptr,
        stride_cm,
        h_ptr,
        stride_hm,
        a_bufs,
        b_bufs,
        b2_bufs,
        ready,
        empty,
        turn,
        tile_expert_ptr,
        tile_start_ptr,
        offsets_ptr,
        num_experts,
        N,
        K,
        up_offset,
        o,
    ):
        GATHER: gl.constexpr = o.GATHER
        TMA_A: gl.constexpr = o.TMA_A
        LAG: gl.constexpr = o.LAG
        GATED: gl.constexpr = o.GATED
        B_KMAJOR: gl.constexpr = o.B_KMAJOR
        GROUP_M: gl.constexpr = o.GROUP_M
        E_POW2: gl.constexpr = o.E_POW2
        BLOCK_N: gl.constexpr = o.BLOCK_N
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        nbytes: gl.constexpr = b_desc.block_type.nbytes * (1 + GATED)
        # 16-byte copies: 8 threads cover a 64-wide row of bf16, the 4 warps 16 rows per pass.
        VEC: gl.constexpr = 8  # 16-bit types
        TK: gl.constexpr = BLOCK_K // VEC
        TM: gl.constexpr = 32 // TK
        a_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [TM, TK], [4, 1], [1, 0])
        cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
        num_m = _used_row_tiles(offsets_ptr, num_experts, BLOCK_M, E_POW2)
        num_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        step = 0
        for j in range(gl.cdiv(num_m * num_n - pid, programs)):
            expert, start, end, tn = _tile(
                pid + j * programs, num_m, num_n, tile_expert_ptr, tile_start_ptr, offsets_ptr, GROUP_M
            )
            rows = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))
            row_ok = rows < end
            if GATHER:
                src = gl.load(order_ptr + rows, mask=row_ok, other=0) // top_k
            else:
                src = rows
            if not TMA_A:
                a_rows = gl.expand_dims(a_ptr + src.to(gl.int64) * stride_am, 1)
            for kk in range(k_steps):
                s = step % STAGES
                # Stages start free: the first pass waits on the phase before the barrier's initial one.
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
                if TMA_A:
                    # Sorted rows: one TMA box (rows past the expert's end are the next expert's; never stored).
                    mbarrier.expect(ready.index(s), nbytes + a_desc.block_type.nbytes)
                    _tma_load(a_desc, [start, kk * BLOCK_K], ready.index(s), a_bufs.index(s))
                else:
                    k_idx = kk * BLOCK_K + cols
                    mask = gl.expand_dims(row_ok, 1) & gl.expand_dims(k_idx < K, 0)
                    _cp_async(a_bufs.index(s), a_rows + gl.expand_dims(k_idx, 0), mask)
                    if LAG == 0:
                        # Each thread's arrival counts once its own copies have landed (no increment: the barrier
                        # expects all 128 producer threads and the TMA transaction).
                        async_copy.mbarrier_arrive(ready.index(s), increment_count=False)
                    else:
                        async_copy.commit_group()
                    mbarrier.expect(ready.index(s), nbytes)
                if B_KMAJOR:
                    _tma_load(b_desc, [expert, tn * BLOCK_N, kk * BLOCK_K], ready.index(s), b_bufs.index(s))
                    if GATED:
                        _tma_load(
                            b_desc, [expert, up_offset + tn * BLOCK_N, kk * BLOCK_K], ready.index(s), b2_bufs.index(s)
                        )
                else:
                    _tma_load(b_desc, [expert, kk * BLOCK_K, tn * BLOCK_N], ready.index(s), b_bufs.index(s))
                if not TMA_A and LAG > 0 and step >= LAG:
                    # a's copies of LAG steps ago have landed in every thread: fence them for wgmma (the async
                    # proxy), then one arrival for the stage.
                    async_copy.wait_group(LAG)
                    fence_async_shared()
                    _barrier()
                    mbarrier.arrive(ready.index((step - LAG) % STAGES))
                step += 1
        if not TMA_A and LAG > 0:
            async_copy.wait_group(0)
            fence_async_shared()
            _barrier()
            for i in range(gl.maximum(step - LAG, 0), step):
                mbarrier.arrive(ready.index(i % STAGES))

    @gluon.jit
    def _store_rows(ptr, stride_m, rows, row_ok, cols, col_ok, val):
        gl.store(
            ptr + gl.expand_dims(rows.to(gl.int64) * stride_m, 1) + gl.expand_dims(cols, 0),
            val,
            mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(col_ok, 0),
        )

    @gluon.jit
    def _consume(
        a_ptr,
        a_desc,
        stride_am,
        order_ptr,
        top_k,
        b_desc,
        c_ptr,
        c2_ptr,
        stride_cm,
        h_ptr,
        stride_hm,
        a_bufs,
        b_bufs,
        b2_bufs,
        ready,
        empty,
        turn,
        tile_expert_ptr,
        tile_start_ptr,
        offsets_ptr,
        num_experts,
        N,
        K,
        up_offset,
        o,
        which,
    ):
        FENCE: gl.constexpr = o.FENCE and not o.TMA_A and o.LAG == 0
        GATED: gl.constexpr = o.GATED
        B_KMAJOR: gl.constexpr = o.B_KMAJOR
        ACT: gl.constexpr = o.ACT
        GROUP_M: gl.constexpr = o.GROUP_M
        E_POW2: gl.constexpr = o.E_POW2
        BLOCK_N: gl.constexpr = o.BLOCK_N
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        dtype: gl.constexpr = a_bufs.dtype
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        # Stores in 16-byte pieces: the accumulator is moved to rows of 8 consecutive values per thread first.
        VEC: gl.constexpr = 8  # 16-bit types
        TN: gl.constexpr = BLOCK_N // VEC
        TM: gl.constexpr = 32 // TN
        out_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [TM, TN], [4, 1], [1, 0])
        row_range = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        col_range = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        num_m = _used_row_tiles(offsets_ptr, num_experts, BLOCK_M, E_POW2)
        num_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        step = 0
        for j in range(gl.cdiv(num_m * num_n - pid, programs)):
            if j % 2 == which:
                expert, start, end, tn = _tile(
                    pid + j * programs, num_m, num_n, tile_expert_ptr, tile_start_ptr, offsets_ptr, GROUP_M
                )
                # Take turns: this tile's MMAs start once the other warpgroup's tile j - 1 has finished its MMAs
                # (its epilogue then runs under ours), so neither runs a ring round ahead of the other.
                if j > 0:
                    mbarrier.wait(turn.index(1 - which), ((j - 1) // 2) & 1)
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
                if GATED:
                    acc2 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
                for kk in range(k_steps):
                    s = (step + kk) % STAGES
                    mbarrier.wait(ready.index(s), ((step + kk) // STAGES) & 1)
                    if FENCE:
                        # a's stage was written by cp.async (the generic proxy); wgmma reads through the async proxy.
                        fence_async_shared()
                    a_tile = a_bufs.index(s)
                    if B_KMAJOR:
                        b_tile = b_bufs.index(s).reshape([BLOCK_N, BLOCK_K]).permute((1, 0))
                    else:
                        b_tile = b_bufs.index(s).reshape([BLOCK_K, BLOCK_N])
                    acc = warpgroup_mma(a_tile, b_tile, acc, is_async=True)
                    if GATED:
                        b2_tile = b2_bufs.index(s).reshape([BLOCK_N, BLOCK_K]).permute((1, 0))
                        acc2 = warpgroup_mma(a_tile, b2_tile, acc2, is_async=True)
                        # This step's two MMAs in flight: the previous step's are done, its stage is free.
                        acc, acc2 = warpgroup_mma_wait(2, deps=(acc, acc2))
                    else:
                        acc = warpgroup_mma_wait(1, deps=(acc,))
                    mbarrier.arrive(empty.index((step + kk + STAGES - 1) % STAGES), pred=kk > 0)
                if GATED:
                    acc, acc2 = warpgroup_mma_wait(0, deps=(acc, acc2))
                else:
                    acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(empty.index((step + k_steps + STAGES - 1) % STAGES))
                mbarrier.arrive(turn.index(which))
                rows = start + row_range
                row_ok = rows < end
                cols = tn * BLOCK_N + col_range
                col_ok = cols < N
                if GATED:
                    gate = gl.convert_layout(acc, out_layout)
                    up = gl.convert_layout(acc2, out_layout)
                    _store_rows(c_ptr, stride_cm, rows, row_ok, cols, col_ok, gate.to(dtype))
                    _store_rows(c2_ptr, stride_cm, rows, row_ok, cols, col_ok, up.to(dtype))
                    _store_rows(h_ptr, stride_hm, rows, row_ok, cols, col_ok, _gated_act(gate, up, ACT).to(dtype))
                else:
                    out = gl.convert_layout(acc.to(dtype), out_layout)
                    _store_rows(c_ptr, stride_cm, rows, row_ok, cols, col_ok, out)
            step += k_steps

    @gluon.jit
    def _gather_gemm_kernel(
        a_ptr,
        a_desc,
        stride_am,
        order_ptr,
        top_k,
        b_desc,
        c_ptr,
        c2_ptr,
        stride_cm,
        h_ptr,
        stride_hm,
        tile_expert_ptr,
        tile_start_ptr,
        offsets_ptr,
        num_experts,
        N,
        K,
        up_offset,
        GATHER: gl.constexpr,
        TMA_A: gl.constexpr,
        FENCE: gl.constexpr,
        LAG: gl.constexpr,
        GATED: gl.constexpr,
        B_KMAJOR: gl.constexpr,
        ACT: gl.constexpr,
        GROUP_M: gl.constexpr,
        E_POW2: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
    ):
        dtype: gl.constexpr = b_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        if GATED:
            b2_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        else:
            b2_bufs = b_bufs
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            # cp.async: 128 producer threads' arrivals and the one that posts the TMA byte count.
            # (LAG > 0: one arrival after the copies of LAG steps later have been waited for, and the byte count.)
            mbarrier.init(ready.index(i), count=1 if TMA_A else 2 if LAG > 0 else 129)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        args = (
            a_ptr,
            a_desc,
            stride_am,
            order_ptr,
            top_k,
            b_desc,
            c_ptr,
            c2_ptr,
            stride_cm,
            h_ptr,
            stride_hm,
            a_bufs,
            b_bufs,
            b2_bufs,
            ready,
            empty,
            turn,
            tile_expert_ptr,
            tile_start_ptr,
            offsets_ptr,
            num_experts,
            N,
            K,
            up_offset,
            _Options(GATHER, TMA_A, FENCE, LAG, GATED, B_KMAJOR, ACT, GROUP_M, E_POW2, BLOCK_N),
        )
        # The default partition (this program's 4 warps) and a 4-warp worker are the two consumers; ``which`` (0 / 1)
        # arrives as a runtime value, as every argument of a partition does.
        gl.warp_specialize(
            [(_consume, args + (gl.to_tensor(0),)), (_consume, args + (gl.to_tensor(1),)), (_producer, args)],
            [4, 4],
            [CONSUMER_REGS, PRODUCER_REGS],
        )


def _b_descriptor(b: torch.Tensor, cfg: dict, gated: bool, up_offset: int):
    """TMA descriptor over ``b``'s storage: ``[E, N, K]`` boxes ``[1, BLOCK_N, BLOCK_K]`` when K-contiguous (gated:
    the view is widened to cover the up rows, ``up_offset`` rows after the gate rows), else ``[E, K, N]`` boxes
    ``[1, BLOCK_K, BLOCK_N]``."""
    bn, bk = cfg["BLOCK_N"] // (2 if gated else 1), cfg["BLOCK_K"]
    dt = gl.bfloat16 if b.dtype == torch.bfloat16 else gl.float16
    if _b_major(b) == "k":
        if gated:
            b = b.as_strided((b.shape[0], up_offset + b.shape[1], b.shape[2]), b.stride())
        block = [1, bn, bk]
    else:
        b = b.transpose(1, 2)
        block = [1, bk, bn]
    return TensorDescriptor.from_tensor(b, block, gl.NVMMASharedLayout.get_default_for(block, dt))


def gather_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    *,
    order: torch.Tensor | None = None,
    top_k: int = 1,
    b_up: torch.Tensor | None = None,
    out: torch.Tensor,
    out_up: torch.Tensor | None = None,
    act_out: torch.Tensor | None = None,
    act: int = -1,
    config: dict | None = None,
    num_programs: int = 0,
) -> None:
    """``out[r] = a[row(r)] @ b[e(r)]^T`` with ``row(r) = order[r] // top_k`` (or ``r`` without ``order``), over
    the routing's row tiles of 128 rows (``tile_expert``, ``tile_start``, ``offsets``: int32 on the device, never
    read on the host). ``b`` is a logical ``[E, N, K]`` view. With ``b_up`` (the up rows of the same storage as
    ``b``, same strides) ``out`` / ``out_up`` receive the gate / up products and ``act_out`` the gated activation
    ``act(gate) * up``. Check ``supported`` first."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    gated = b_up is not None
    if not supported(a, b, gated=gated, act=act) or cfg["BLOCK_M"] != 128:
        raise ValueError(
            "gluon_gemm.gather_gemm takes bf16/fp16 CUDA operands of an sm_90 GPU with contiguous 16-byte aligned "
            f"rows, a TMA-readable b and 128-row routing tiles; got a {tuple(a.shape)} {a.dtype}, b "
            f"{tuple(b.shape)} strides {b.stride()} {b.dtype} on {a.device}. Use triton_ops.gather_gemm instead."
        )
    num_experts, n, k = b.shape
    up_offset = 0
    if gated:
        up_offset, rem = divmod(b_up.data_ptr() - b.data_ptr(), b.element_size() * b.stride(1))
        if rem or up_offset < n or b_up.stride() != b.stride() or b_up.shape != b.shape:
            raise ValueError("b_up must be the up rows of b's storage: same shape and strides, after the gate rows")
        if act_out is None or out_up is None:
            raise ValueError("gated tiles write gate, up and the activation: pass out_up and act_out")
    if gated and out_up.stride(0) != out.stride(0):
        raise ValueError("out and out_up must share their row stride (the gate and up halves of one buffer)")
    for t in (out, out_up, act_out):
        if t is not None and (t.stride(1) != 1 or t.dtype != a.dtype):
            raise ValueError(f"outputs must have a's dtype and contiguous rows; got {t.dtype}, strides {t.stride()}")
    max_tiles = tile_expert.numel()
    if max_tiles == 0 or a.shape[0] == 0:
        return
    tiles_n = -(-n // (cfg["BLOCK_N"] // (2 if gated else 1)))
    grid = (min(num_programs or num_sms(a.device), max_tiles * tiles_n),)
    c2 = out_up if gated else out
    h = act_out if gated else out
    dt = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    a_block = [cfg["BLOCK_M"], cfg["BLOCK_K"]]
    a_desc = TensorDescriptor.from_tensor(a, a_block, gl.NVMMASharedLayout.get_default_for(a_block, dt))
    tma_a = order is None and cfg.get("TMA_A", True)
    _gather_gemm_kernel[grid](
        a,
        a_desc,
        a.stride(0),
        order if order is not None else offsets,
        top_k,
        _b_descriptor(b, cfg, gated, up_offset),
        out,
        c2,
        out.stride(0),
        h,
        h.stride(0),
        tile_expert,
        tile_start,
        offsets,
        num_experts,
        n,
        k,
        up_offset,
        GATHER=order is not None,
        TMA_A=tma_a,
        FENCE=cfg.get("FENCE", True),
        LAG=cfg.get("LAG", 0),
        GATED=gated,
        B_KMAJOR=_b_major(b) == "k",
        ACT=act if gated else -1,
        GROUP_M=cfg["GROUP_M"],
        E_POW2=max(1, 1 << (num_experts - 1).bit_length()),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"] // (2 if gated else 1),
        BLOCK_K=cfg["BLOCK_K"],
        STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"],
        num_warps=4,
        maxnreg=cfg["MAXNREG"],
    )
