"""Grouped weight gradient for Hopper in Gluon: ``out[e] = a_e^T b_e`` over each expert's rows, warp-specialised.

The weight gradients of a fine-grained MoE layer are short-K GEMMs: at 4 K tokens an expert of Qwen3-30B-A3B has
~256 rows, so every ``[128, 128]`` output tile runs 4 MMA steps and then writes 32 KB. A kernel that computes a
tile and then stores it (Triton's pipeliner, and CUTLASS's grouped GEMM as ``torch._grouped_mm`` runs it at
370-390 TF/s) leaves the tensor cores idle during every epilogue. Here the epilogue runs under the next tile's
MMAs (the "ping-pong" schedule of CUTLASS's Hopper kernels):

- one producer warp streams the operand tiles of every tile this program owns through a ring of shared-memory
  stages with TMA, tile after tile, as fast as the stages are released;
- two consumer warpgroups own alternate tiles. Each runs its tile's MMAs (``wgmma``, accumulator in registers),
  then converts the accumulator and hands it to a TMA store, while the other warpgroup's MMAs run.

Operands are the rows already in sorted order (``a [S, M]``, ``b [S, N]``), so TMA reads them as they are; a tile
row range that crosses the expert's end is masked on the ``a`` side in registers (the rows past the end belong to
the next expert and are finite, or lie past ``S`` and read as zeros). The output is ``[E, M, N]``.

Gluon (Triton's explicit dialect: layouts, shared memory, mbarriers, warp specialisation) has no interpreter, so
this kernel runs on CUDA only; ``available()`` says whether it can run here. See benchmarks/NOTES.md, v2.11.
"""

from __future__ import annotations

import functools

import torch

from .launch import fast
from .tuning import num_sms

try:  # Gluon ships with Triton >= 3.4; the API used here is the one of Triton 3.6.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.7+ renamed the TMA copies (the old names raise there); 3.6 has only the old ones.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    _GLUON = False

# Tiles: a [BLOCK_M, BLOCK_N] fp32 accumulator is 128 registers per thread of a 4-warp consumer; four stages of
# [BLOCK_K, BLOCK_M] + [BLOCK_K, BLOCK_N] bf16 operands (128 KB) and one [BLOCK_M, BLOCK_N] output buffer per
# consumer (64 KB) fit the 227 KB of an SM's shared memory.
# Rows per slice of an expert's last, partial K step: wgmma's K for 16-bit types, so only the slices holding rows are
# loaded and multiplied (at 256 +- 16 rows per expert, four full steps of 64 waste ~12% of the MMAs; slices ~3%).
SLICE = 16
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=4, CONSUMER_REGS=232, MAXNREG=168)
# What the tuner weighs (against CUTLASS), default first. On an H200 (v2.11): five stages (224 KB of shared memory)
# won half the shapes by 1-4%; 64x256 tiles lost to 128x128 on every shape with M a multiple of 128.
CONFIGS: list[dict] = [
    DEFAULT_CONFIG,
    dict(DEFAULT_CONFIG, STAGES=5),
    dict(DEFAULT_CONFIG, BLOCK_M=64, BLOCK_N=256),
]


@functools.cache
def smem_layout(block: tuple[int, ...], dtype: torch.dtype):
    """The NVMMA shared-memory layout of a TMA box of ``block`` elements of ``dtype`` (bf16 / fp16), made once:
    ``get_default_for`` costs ~12 us of host time per call, and a launch needs two to five of them."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def available(a: torch.Tensor) -> bool:
    """Whether the Gluon kernel runs ``a``: Gluon importable, a CUDA tensor of an sm_90 GPU (wgmma, TMA)."""
    return _GLUON and a.is_cuda and torch.cuda.get_device_capability(a.device)[0] == 9


def supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``grouped_wgrad(a, b, ...)`` takes these operands: bf16 or fp16 of the same dtype, row-major
    contiguous with 16-byte aligned rows and bases (TMA)."""
    if not available(a) or a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return False
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        return False
    m, n = a.shape[1], b.shape[1]
    return (
        a.is_contiguous()
        and b.is_contiguous()
        and all(t.data_ptr() % 16 == 0 for t in (a, b))
        and m % 8 == 0
        and n % 8 == 0
    )


def candidates(a: torch.Tensor, b: torch.Tensor) -> list[dict]:
    """The ``CONFIGS`` that take these operands (none off sm_90 or without Gluon)."""
    return list(CONFIGS) if supported(a, b) else []


if _GLUON:

    @gluon.jit
    def ring_barriers(STAGES: gl.constexpr):
        """The mbarriers of the ping-pong schedule (also ``gluon_gemm``'s): ``ready`` / ``empty`` per ring stage
        (the producer's TMA bytes landed / the consumer's MMAs are done with it) and one ``turn`` per consumer
        warpgroup (its tile's MMAs are done, the other may start)."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        return ready, empty, turn

    @gluon.jit
    def _tile_rows(t, offsets_ptr, tiles_n, tiles_per_expert):
        """Tile ``t``'s expert, row/column tile indices, first sorted row and row count."""
        e = t // tiles_per_expert
        r = t % tiles_per_expert
        start = gl.load(offsets_ptr + e)
        rows = gl.load(offsets_ptr + e + 1) - start
        return e, r // tiles_n, r % tiles_n, start, rows

    @gluon.jit
    def _producer(
        a_desc,
        b_desc,
        a_slice_desc,
        b_slice_desc,
        c_desc,
        a_bufs,
        b_bufs,
        c_bufs,
        ready,
        empty,
        turn,
        offsets_ptr,
        num_tiles,
        tiles_n,
        tiles_per_expert,
    ):
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        SLICE: gl.constexpr = a_slice_desc.block_type.shape[0]
        slice_nbytes: gl.constexpr = a_slice_desc.block_type.nbytes + b_slice_desc.block_type.nbytes
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        step = 0
        for j in range(gl.cdiv(num_tiles - pid, programs)):
            e, tm, tn, start, rows = _tile_rows(pid + j * programs, offsets_ptr, tiles_n, tiles_per_expert)
            full = rows // BLOCK_K
            for kk in range(full):
                s = step % STAGES
                # Stages start free: the first pass waits on the phase before the barrier's initial one.
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                row = start + kk * BLOCK_K
                _tma_load(a_desc, [row, tm * BLOCK_M], ready.index(s), a_bufs.index(s))
                _tma_load(b_desc, [row, tn * BLOCK_N], ready.index(s), b_bufs.index(s))
                step += 1
            rem = rows - full * BLOCK_K
            if rem > 0:
                # The last, partial step: only the SLICE-row slices that hold the expert's rows.
                s = step % STAGES
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
                slices = gl.cdiv(rem, SLICE)
                for q in gl.static_range(BLOCK_K // SLICE):  # the byte count must be a constant
                    if slices == q + 1:
                        mbarrier.expect(ready.index(s), (q + 1) * slice_nbytes)
                row = start + full * BLOCK_K
                for q in gl.static_range(BLOCK_K // SLICE):
                    if q < slices:
                        a_dst = a_bufs.index(s).slice(q * SLICE, SLICE)
                        b_dst = b_bufs.index(s).slice(q * SLICE, SLICE)
                        _tma_load(a_slice_desc, [row + q * SLICE, tm * BLOCK_M], ready.index(s), a_dst)
                        _tma_load(b_slice_desc, [row + q * SLICE, tn * BLOCK_N], ready.index(s), b_dst)
                step += 1

    @gluon.jit
    def _consume(
        a_desc,
        b_desc,
        a_slice_desc,
        b_slice_desc,
        c_desc,
        a_bufs,
        b_bufs,
        c_bufs,
        ready,
        empty,
        turn,
        offsets_ptr,
        num_tiles,
        tiles_n,
        tiles_per_expert,
        which,
        accumulate,
        ACCUMULATE: gl.constexpr,
    ):
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        dtype: gl.constexpr = a_desc.dtype
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        a_regs_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
        SLICE: gl.constexpr = a_slice_desc.block_type.shape[0]
        c_tile = c_bufs.index(which)  # [1, BLOCK_M, BLOCK_N]: one expert's tile of the [E, M, N] output
        c_buf = c_tile.reshape([BLOCK_M, BLOCK_N])
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        step = 0
        for j in range(gl.cdiv(num_tiles - pid, programs)):
            e, tm, tn, start, rows = _tile_rows(pid + j * programs, offsets_ptr, tiles_n, tiles_per_expert)
            if j % 2 == which:
                # Take turns: this tile's MMAs start once the other warpgroup's tile j - 1 has finished its MMAs
                # (its epilogue then runs under ours). Without the turns a warpgroup could run ahead by more than
                # the ring's depth and wait on a stage's barrier phase of the previous round.
                if j > 0:
                    mbarrier.wait(turn.index(1 - which), ((j - 1) // 2) & 1)
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
                full = rows // BLOCK_K
                for kk in range(full):
                    s = (step + kk) % STAGES
                    mbarrier.wait(ready.index(s), ((step + kk) // STAGES) & 1)
                    acc = warpgroup_mma(a_bufs.index(s).permute((1, 0)), b_bufs.index(s), acc, is_async=True)
                    # One MMA in flight: the previous step's is done, so its stage goes back to the producer.
                    acc = warpgroup_mma_wait(1, deps=(acc,))
                    mbarrier.arrive(empty.index((step + kk + STAGES - 1) % STAGES), pred=kk > 0)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(empty.index((step + full + STAGES - 1) % STAGES), pred=full > 0)
                rem = rows - full * BLOCK_K
                if rem > 0:
                    # The expert's last, partial step: the producer loaded only the SLICE-row slices that hold its
                    # rows, and only those are multiplied. Rows past the expert's end in the last slice belong to the
                    # next expert: zero them in a's registers.
                    s = (step + full) % STAGES
                    mbarrier.wait(ready.index(s), ((step + full) // STAGES) & 1)
                    for q in gl.static_range(BLOCK_K // SLICE):
                        if q * SLICE < rem:
                            a_regs = a_bufs.index(s).slice(q * SLICE, SLICE).permute((1, 0)).load(a_regs_layout)
                            k_idx = q * SLICE + gl.arange(0, SLICE, layout=gl.SliceLayout(0, a_regs_layout))
                            a_regs = gl.where(gl.expand_dims(k_idx, 0) < rem, a_regs, gl.zeros_like(a_regs))
                            acc = warpgroup_mma(a_regs, b_bufs.index(s).slice(q * SLICE, SLICE), acc)
                    mbarrier.arrive(empty.index(s))
                mbarrier.arrive(turn.index(which))
                store = True
                if ACCUMULATE:
                    # One chunk of the sorted rows (see ``grouped_wgrad``): an expert whose run began in an earlier
                    # chunk adds what that chunk stored (under the other warpgroup's MMAs); the chunk where it begins
                    # stores; any other chunk leaves it alone.
                    c_ptr, stride_ce, stride_cm, m_size, n_size, whole_ptr, chunk_start, chunk_end, total = accumulate
                    begins = gl.load(whole_ptr + e)
                    adds = (begins < chunk_start) & (rows > 0)
                    store = adds | ((begins >= chunk_start) & ((begins < chunk_end) | (chunk_end >= total)))
                    if adds:
                        offs_m = tm * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
                        offs_n = tn * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
                        rows_m = gl.expand_dims(offs_m, 1)
                        cols_n = gl.expand_dims(offs_n, 0)
                        ptrs = c_ptr + e.to(gl.int64) * stride_ce + rows_m * stride_cm + cols_n
                        acc += gl.load(ptrs, mask=(rows_m < m_size) & (cols_n < n_size), other=0.0).to(gl.float32)
                if store:
                    # The previous tile's store has left c_buf by now (a whole tile of MMAs ago).
                    tma.store_wait(0)
                    c_buf.store(acc.to(dtype))
                    fence_async_shared()
                    _tma_store(c_desc, [e, tm * BLOCK_M, tn * BLOCK_N], c_tile)
            step += gl.cdiv(rows, BLOCK_K)
        tma.store_wait(0)

    # The consumers as partitions: a partition's arguments are runtime values (a constexpr would arrive as one, and
    # Triton 3.6 cannot lower an i1 among them), so each variant is a partition of its own.
    @gluon.jit
    def _consume_store(
        a_desc, b_desc, a_slice_desc, b_slice_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, offsets_ptr,
        num_tiles, tiles_n, tiles_per_expert, which,
    ):  # fmt: skip
        _consume(
            a_desc, b_desc, a_slice_desc, b_slice_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn,
            offsets_ptr, num_tiles, tiles_n, tiles_per_expert, which, (), False,
        )  # fmt: skip

    @gluon.jit
    def _consume_accumulate(
        a_desc, b_desc, a_slice_desc, b_slice_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, offsets_ptr,
        num_tiles, tiles_n, tiles_per_expert, which, c_ptr, stride_ce, stride_cm, m_size, n_size, whole_offsets_ptr,
        chunk_start, chunk_end, total_rows,
    ):  # fmt: skip
        accumulate = (
            c_ptr, stride_ce, stride_cm, m_size, n_size, whole_offsets_ptr, chunk_start, chunk_end, total_rows,
        )  # fmt: skip
        _consume(
            a_desc, b_desc, a_slice_desc, b_slice_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn,
            offsets_ptr, num_tiles, tiles_n, tiles_per_expert, which, accumulate, True,
        )  # fmt: skip

    @gluon.jit
    def _grouped_wgrad_kernel(
        a_desc,
        b_desc,
        a_slice_desc,
        b_slice_desc,
        c_desc,
        offsets_ptr,
        num_tiles,
        tiles_n,
        tiles_per_expert,
        c_ptr,
        stride_ce,
        stride_cm,
        m_size,
        n_size,
        whole_offsets_ptr,
        chunk_start,
        chunk_end,
        total_rows,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        ACCUMULATE: gl.constexpr = False,
    ):
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
        ready, empty, turn = ring_barriers(STAGES)
        args = (
            a_desc,
            b_desc,
            a_slice_desc,
            b_slice_desc,
            c_desc,
            a_bufs,
            b_bufs,
            c_bufs,
            ready,
            empty,
            turn,
            offsets_ptr,
            num_tiles,
            tiles_n,
            tiles_per_expert,
        )
        # The default partition (this program's 4 warps) and a 4-warp worker are the two consumers; ``which`` (0 / 1)
        # arrives as a runtime value, as every argument of a partition does.
        if ACCUMULATE:
            extra = (
                c_ptr, stride_ce, stride_cm, m_size, n_size, whole_offsets_ptr, chunk_start, chunk_end, total_rows,
            )  # fmt: skip
            gl.warp_specialize(
                [
                    (_consume_accumulate, args + (gl.to_tensor(0),) + extra),
                    (_consume_accumulate, args + (gl.to_tensor(1),) + extra),
                    (_producer, args),
                ],
                [4, 1],
                [CONSUMER_REGS, 24],
            )
        else:
            gl.warp_specialize(
                [
                    (_consume_store, args + (gl.to_tensor(0),)),
                    (_consume_store, args + (gl.to_tensor(1),)),
                    (_producer, args),
                ],
                [4, 1],
                [CONSUMER_REGS, 24],
            )


def _descriptors(a, b, out, cfg):
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_layout = smem_layout((bk, bm), a.dtype)
    b_layout = smem_layout((bk, bn), a.dtype)
    a_desc = TensorDescriptor.from_tensor(a, [bk, bm], a_layout)
    b_desc = TensorDescriptor.from_tensor(b, [bk, bn], b_layout)
    # An expert's last, partial step loads only the slices of SLICE rows that hold its rows, into the same stages.
    a_slice_desc = TensorDescriptor.from_tensor(a, [SLICE, bm], a_layout)
    b_slice_desc = TensorDescriptor.from_tensor(b, [SLICE, bn], b_layout)
    # Three dimensions: TMA clips each tile at its expert's last row, so M need not be a multiple of BLOCK_M.
    c_desc = TensorDescriptor.from_tensor(out, [1, bm, bn], smem_layout((1, bm, bn), a.dtype))
    return a_desc, b_desc, a_slice_desc, b_slice_desc, c_desc


def grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    *,
    config: dict | None = None,
    num_programs: int = 0,
    check: bool = True,
    out: torch.Tensor | None = None,
    accumulate: tuple[torch.Tensor, int, int, int] | None = None,
) -> torch.Tensor:
    """``out[e] = a[offsets[e]:offsets[e+1]]^T @ b[offsets[e]:offsets[e+1]]``, ``[E, M, N]`` in ``a``'s dtype
    (fp32 accumulation). ``a [S, M]`` and ``b [S, N]`` hold rows in sorted order; ``offsets [E + 1]`` int32 on the
    device (never read on the host). Experts with no rows get zeros. Check ``supported(a, b)`` first; ``check=False``
    skips checking it again (a caller that already did, for operands of the same shapes, strides and alignment).

    ``out``: a contiguous ``[E, M, N]`` tensor to write (default: a new one). ``accumulate=(whole_offsets, start,
    end, total)``: the rows are the chunk ``[start, end)`` of ``total`` sorted rows and ``offsets`` the chunk's runs
    (``routing.chunk_routing``), ``out`` holds what earlier chunks stored: an expert whose run began in an earlier
    chunk gets this chunk's part added, the chunk where it begins stores, and the others leave it alone (as
    ``triton_ops.wgrad(accumulate=...)``)."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if check and not supported(a, b):
        raise ValueError(
            "grouped_wgrad takes bf16/fp16 CUDA operands of an sm_90 GPU, row-major with 16-byte aligned rows (widths "
            f"multiples of 8); got a {tuple(a.shape)} {a.dtype}, b {tuple(b.shape)} {b.dtype} on {a.device}. Use "
            "the CUTLASS or Triton weight gradient instead."
        )
    num_experts = offsets.numel() - 1
    m, n = a.shape[1], b.shape[1]
    if out is None:
        if accumulate is not None:
            raise ValueError("grouped_wgrad(accumulate=...) adds to an existing output: pass it as out=")
        out = a.new_empty(num_experts, m, n)
    elif out.shape != (num_experts, m, n) or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(num_experts, m, n)} {a.dtype} tensor, got {tuple(out.shape)}")
    whole, start, end, total = accumulate if accumulate is not None else (offsets, 0, 0, 0)
    tiles_n = -(-n // cfg["BLOCK_N"])
    tiles_per_expert = -(-m // cfg["BLOCK_M"]) * tiles_n
    num_tiles = num_experts * tiles_per_expert
    if num_tiles == 0:
        return out
    grid = (min(num_programs or num_sms(a.device), num_tiles),)
    a_desc, b_desc, a_slice_desc, b_slice_desc, c_desc = _descriptors(a, b, out, cfg)
    fast(_grouped_wgrad_kernel)[grid](
        a_desc,
        b_desc,
        a_slice_desc,
        b_slice_desc,
        c_desc,
        offsets,
        num_tiles,
        tiles_n,
        tiles_per_expert,
        out,
        out.stride(0),
        out.stride(1),
        m,
        n,
        whole,
        start,
        end,
        total,
        STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"],
        ACCUMULATE=accumulate is not None,
        num_warps=4,
        maxnreg=cfg["MAXNREG"],
    )
    return out
