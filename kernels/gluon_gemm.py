"""Grouped matmul of sorted rows for Hopper in Gluon: ``out[r] = a[r] @ b[e(r)]^T`` over routing row tiles.

Two of an experts layer's four row matmuls read their rows in sorted order: the down projection (``y = h @ w2^T``)
and ``dx_sorted = dgu @ w1``. At 4 K tokens an expert of Qwen3-30B-A3B has ~256 rows, so each program computes a
few short tiles and writes each; a kernel that computes a tile and then stores it (our Triton kernel, CUTLASS's
grouped GEMM) leaves the tensor cores idle during every epilogue. This one is persistent and warp-specialised, in
the schedule of ``gluon_wgrad``:

- one producer warp streams each tile's operands with TMA through a ring of shared-memory stages: ``a``'s 128 rows
  from the tile's first sorted row (rows past the expert's end belong to the next expert; they are computed and
  never stored), and ``b``'s ``[BLOCK_N, BLOCK_K]`` tile from a three-dimensional descriptor of the weight;
- two consumer warpgroups own alternate tiles and take turns: one runs its tile's MMAs (``wgmma``) while the other
  moves its finished accumulator to 16-byte rows and stores it, masked at the expert's end.

``b`` is a logical ``[E, N, K]`` view read in its storage order: K-contiguous (the down projection of most
checkpoints) or N-contiguous (the gate/up weight read transposed for ``dx``). Gluon has no interpreter, so this
kernel runs on CUDA only; ``supported()`` says whether it takes an operand set.

The gathered matmuls (gate/up and ``g = dout @ w2``, whose rows come through the routing order) stay in Triton:
a version of this kernel whose producer gathered them with ``cp.async`` (4 warps, one mbarrier arrival per thread,
or one per stage after ``wait_group``) ran 20-35% slower than the Triton kernel on an H200; see
benchmarks/NOTES.md, v2.12 (and git history for the code).
"""

import torch

from . import gluon_wgrad
from .launch import fast
from .tuning import num_sms

try:  # Gluon ships with Triton >= 3.4; the API used here is the one of Triton 3.6.
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.language.core import _aggregate as aggregate

    from .gluon_wgrad import ring_barriers, smem_layout  # defined when Gluon imports

    # Triton 3.7+ renamed the TMA copies (the old names raise there); 3.6 has only the old ones.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    _GLUON = False

# Rows per tile: the routing's tile arrays must be built for it (``routing.block_m_for`` on CUDA).
BLOCK_M = 128
# Tiles: a consumer's [BLOCK_M, BLOCK_N] fp32 accumulator is 128 registers per thread; a stage holds [BLOCK_M,
# BLOCK_K] of a and [BLOCK_N, BLOCK_K] of b (32 KB in bf16). Registers: 2 x 128 consumer threads at 232 and the
# producer warp at 40 fit the 64 K. On an H200 five stages beat four by 0-7% (v2.12).
DEFAULT_CONFIG = dict(BLOCK_N=128, BLOCK_K=64, STAGES=5, GROUP_M=8, CONSUMER_REGS=232, PRODUCER_REGS=40, MAXNREG=168)
# What the tuner weighs (against Triton and CUTLASS), default first.
CONFIGS: list[dict] = [DEFAULT_CONFIG, dict(DEFAULT_CONFIG, STAGES=4)]


def available(a: torch.Tensor) -> bool:
    """Whether this kernel runs ``a``: as ``gluon_wgrad.available`` (a CUDA tensor of an sm_90 GPU), with the
    aggregates this module needs importable too."""
    return _GLUON and gluon_wgrad.available(a)


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


def supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``sorted_matmul`` takes these operands: bf16 / fp16 of one dtype on sm_90, ``a [S, K]`` with contiguous
    16-byte aligned rows, ``b`` a logical ``[E, N, K]`` view that TMA can read (one contiguous dimension, 16-byte
    strides), N and K multiples of 8."""
    if not available(a) or a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return False
    if a.dim() != 2 or a.stride(1) != 1 or a.stride(0) % 8 or a.data_ptr() % 16 or a.shape[1] != b.shape[2]:
        return False
    return _b_major(b) is not None and b.shape[1] % 8 == 0 and b.shape[2] % 8 == 0


if _GLUON:

    @aggregate
    class _Options:
        """The kernel's compile-time choices, as one argument of the partitions."""

        B_KMAJOR: gl.constexpr
        BLOCK_N: gl.constexpr
        GROUP_M: gl.constexpr
        E_POW2: gl.constexpr

        @gluon.constexpr_function
        def __init__(self, B_KMAJOR, BLOCK_N, GROUP_M, E_POW2):
            self.B_KMAJOR = gl.constexpr(B_KMAJOR)
            self.BLOCK_N = gl.constexpr(BLOCK_N)
            self.GROUP_M = gl.constexpr(GROUP_M)
            self.E_POW2 = gl.constexpr(E_POW2)

    @gluon.jit
    def _used_row_tiles(offsets_ptr, num_experts, BLOCK: gl.constexpr, E_POW2: gl.constexpr):
        """Row tiles the routing filled (``sum_e ceil(count_e / BLOCK)``): the used prefix of the tile arrays."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        e = gl.arange(0, E_POW2, layout=layout)
        mask = e < num_experts
        start = gl.load(offsets_ptr + e, mask=mask, other=0)
        end = gl.load(offsets_ptr + e + 1, mask=mask, other=0)
        return gl.sum((end - start + BLOCK - 1) // BLOCK, axis=0)

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
        a_desc,
        b_desc,
        c_ptr,
        stride_cm,
        a_bufs,
        b_bufs,
        ready,
        empty,
        turn,
        tile_expert_ptr,
        tile_start_ptr,
        offsets_ptr,
        num_experts,
        N,
        K,
        o,
    ):
        B_KMAJOR: gl.constexpr = o.B_KMAJOR
        BLOCK_N: gl.constexpr = o.BLOCK_N
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        num_m = _used_row_tiles(offsets_ptr, num_experts, a_bufs.type.shape[1], o.E_POW2)
        num_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        step = 0
        for j in range(gl.cdiv(num_m * num_n - pid, programs)):
            expert, start, end, tn = _tile(
                pid + j * programs, num_m, num_n, tile_expert_ptr, tile_start_ptr, offsets_ptr, o.GROUP_M
            )
            for kk in range(k_steps):
                s = step % STAGES
                # Stages start free: the first pass waits on the phase before the barrier's initial one.
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                # Rows past the expert's end are the next expert's (finite, never stored); past S, zeros.
                _tma_load(a_desc, [start, kk * BLOCK_K], ready.index(s), a_bufs.index(s))
                if B_KMAJOR:
                    _tma_load(b_desc, [expert, tn * BLOCK_N, kk * BLOCK_K], ready.index(s), b_bufs.index(s))
                else:
                    _tma_load(b_desc, [expert, kk * BLOCK_K, tn * BLOCK_N], ready.index(s), b_bufs.index(s))
                step += 1

    @gluon.jit
    def _consume(
        a_desc,
        b_desc,
        c_ptr,
        stride_cm,
        a_bufs,
        b_bufs,
        ready,
        empty,
        turn,
        tile_expert_ptr,
        tile_start_ptr,
        offsets_ptr,
        num_experts,
        N,
        K,
        o,
        which,
    ):
        B_KMAJOR: gl.constexpr = o.B_KMAJOR
        BLOCK_N: gl.constexpr = o.BLOCK_N
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        dtype: gl.constexpr = a_bufs.dtype
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        # Stores in 16-byte pieces (16-bit types): the accumulator moves to rows of 8 consecutive values per thread.
        TN: gl.constexpr = BLOCK_N // 8
        TM: gl.constexpr = 32 // TN
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [TM, TN], [4, 1], [1, 0])
        row_range = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        col_range = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        num_m = _used_row_tiles(offsets_ptr, num_experts, BLOCK_M, o.E_POW2)
        num_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        step = 0
        for j in range(gl.cdiv(num_m * num_n - pid, programs)):
            if j % 2 == which:
                expert, start, end, tn = _tile(
                    pid + j * programs, num_m, num_n, tile_expert_ptr, tile_start_ptr, offsets_ptr, o.GROUP_M
                )
                # Take turns: this tile's MMAs start once the other warpgroup's tile j - 1 has finished its MMAs
                # (its epilogue then runs under ours), so neither runs a ring round ahead of the other.
                if j > 0:
                    mbarrier.wait(turn.index(1 - which), ((j - 1) // 2) & 1)
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
                for kk in range(k_steps):
                    s = (step + kk) % STAGES
                    mbarrier.wait(ready.index(s), ((step + kk) // STAGES) & 1)
                    if B_KMAJOR:
                        b_tile = b_bufs.index(s).reshape([BLOCK_N, BLOCK_K]).permute((1, 0))
                    else:
                        b_tile = b_bufs.index(s).reshape([BLOCK_K, BLOCK_N])
                    acc = warpgroup_mma(a_bufs.index(s), b_tile, acc, is_async=True)
                    # One MMA in flight: the previous step's is done, so its stage goes back to the producer.
                    acc = warpgroup_mma_wait(1, deps=(acc,))
                    mbarrier.arrive(empty.index((step + kk + STAGES - 1) % STAGES), pred=kk > 0)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(empty.index((step + k_steps + STAGES - 1) % STAGES))
                mbarrier.arrive(turn.index(which))
                rows = start + row_range
                cols = tn * BLOCK_N + col_range
                out = gl.convert_layout(acc.to(dtype), out_layout)
                gl.store(
                    c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0),
                    out,
                    mask=gl.expand_dims(rows < end, 1) & gl.expand_dims(cols < N, 0),
                )
            step += k_steps

    @gluon.jit
    def _sorted_matmul_kernel(
        a_desc,
        b_desc,
        c_ptr,
        stride_cm,
        tile_expert_ptr,
        tile_start_ptr,
        offsets_ptr,
        num_experts,
        N,
        K,
        B_KMAJOR: gl.constexpr,
        BLOCK_N: gl.constexpr,
        GROUP_M: gl.constexpr,
        E_POW2: gl.constexpr,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
    ):
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        ready, empty, turn = ring_barriers(STAGES)
        args = (
            a_desc,
            b_desc,
            c_ptr,
            stride_cm,
            a_bufs,
            b_bufs,
            ready,
            empty,
            turn,
            tile_expert_ptr,
            tile_start_ptr,
            offsets_ptr,
            num_experts,
            N,
            K,
            # Compile-time choices travel as one aggregate: a plain constexpr argument of a partition arrives
            # there as a runtime int32.
            _Options(B_KMAJOR, BLOCK_N, GROUP_M, E_POW2),
        )
        # The default partition (this program's 4 warps) and a 4-warp worker are the two consumers; ``which`` (0 / 1)
        # arrives as a runtime value, as every argument of a partition does.
        gl.warp_specialize(
            [(_consume, args + (gl.to_tensor(0),)), (_consume, args + (gl.to_tensor(1),)), (_producer, args)],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )


def _descriptors(a: torch.Tensor, b: torch.Tensor, cfg: dict):
    """TMA descriptors: ``a [S, K]`` in ``[BLOCK_M, BLOCK_K]`` boxes; ``b`` over its storage, ``[E, N, K]`` in
    ``[1, BLOCK_N, BLOCK_K]`` boxes when K-contiguous, else ``[E, K, N]`` in ``[1, BLOCK_K, BLOCK_N]`` boxes."""
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, bk], smem_layout((BLOCK_M, bk), a.dtype))
    if _b_major(b) == "k":
        block = (1, bn, bk)
    else:
        b, block = b.transpose(1, 2), (1, bk, bn)
    return a_desc, TensorDescriptor.from_tensor(b, list(block), smem_layout(block, a.dtype))


def sorted_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    *,
    out: torch.Tensor,
    config: dict | None = None,
    num_programs: int = 0,
    check: bool = True,
) -> None:
    """``out[r] = a[r] @ b[e(r)]^T`` for rows ``a [S, K]`` in sorted order, over the routing's row tiles of
    ``BLOCK_M`` rows (``tile_expert``, ``tile_start``, ``offsets``: int32 on the device, never read on the host).
    ``b`` is a logical ``[E, N, K]`` view; ``out [S, N]`` has ``a``'s dtype and contiguous rows. Check
    ``supported`` first; ``check=False`` skips checking it again (a caller that already did, for operands of the same
    shapes, strides and alignment)."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if check and not supported(a, b):
        raise ValueError(
            "gluon_gemm.sorted_matmul takes bf16/fp16 CUDA operands of an sm_90 GPU: a [S, K] with contiguous 16-byte "
            f"aligned rows, b a TMA-readable [E, N, K] view; got a {tuple(a.shape)} {a.dtype}, b {tuple(b.shape)} "
            f"strides {b.stride()} {b.dtype} on {a.device}. Use triton_ops.sorted_matmul instead."
        )
    if out.shape != (a.shape[0], b.shape[1]) or out.stride(1) != 1 or out.dtype != a.dtype:
        raise ValueError(f"out must be [{a.shape[0]}, {b.shape[1]}] {a.dtype} with contiguous rows; got {out.shape}")
    num_experts, n, k = b.shape
    max_tiles = tile_expert.numel()
    if max_tiles == 0 or a.shape[0] == 0:
        return
    grid = (min(num_programs or num_sms(a.device), max_tiles * -(-n // cfg["BLOCK_N"])),)
    a_desc, b_desc = _descriptors(a, b, cfg)
    fast(_sorted_matmul_kernel)[grid](
        a_desc,
        b_desc,
        out,
        out.stride(0),
        tile_expert,
        tile_start,
        offsets,
        num_experts,
        n,
        k,
        B_KMAJOR=_b_major(b) == "k",
        BLOCK_N=cfg["BLOCK_N"],
        GROUP_M=cfg["GROUP_M"],
        E_POW2=triton.next_power_of_2(max(num_experts, 1)),
        STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"],
        num_warps=4,
        maxnreg=cfg["MAXNREG"],
    )
