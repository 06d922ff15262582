"""Routing metadata with three Triton kernels: a stable counting sort of the (token, slot) pairs by expert.

Imported lazily by ``routing.py`` (Triton reads ``TRITON_INTERPRET`` when the jit decorators run). The pairs are
cut into ``nb`` blocks of ``BLOCK`` consecutive flat indices. Two ``[nb, E]`` int32 scratch matrices carry the
per-block counts between the kernels; every kernel has many programs (no single-program scan):

1. ``_count_kernel`` (one program per block): ``counts[b, e]``, the histogram of block ``b``, and
   ``before[b, e] = sum_{e' < e} counts[b, e']`` (pairs of lower experts in the block).
2. ``_scan_kernel`` (one program per chunk of experts): ``offsets[e] = sum_b before[b, e]`` (no scan across
   experts needed) and, in place of ``counts``, ``base[b, e] = sum_{b' < b} counts[b', e] - before[b, e]``.
3. ``_scatter_kernel`` (one program per block): sorts the block by ``(expert, flat index)``; the pair at sorted
   position ``j`` of block ``b`` lands at ``offsets[e] + base[b, e] + j``. Writes ``order``, ``expert``,
   ``inverse``, and a share of the row tiles (``tile_expert``, ``tile_start``) from ``offsets``.

Ties keep flat order (blocks are laid out in order, pairs within a block sorted by index): the result equals
``torch.sort(stable=True)`` bit for bit. No host synchronisation: every size comes from ``S``, ``E``, ``block_m``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import fast
from .routing import Routing, build_routing_torch, max_row_tiles

# Pairs per block of kernels 1 and 3: about _TARGET_BLOCKS blocks (enough programs to spread over the SMs, few
# enough that the [nb, E] matrices stay small), within [_MIN_BLOCK, _MAX_BLOCK].
_TARGET_BLOCKS = 128
_MIN_BLOCK = 256
_MAX_BLOCK = 2048
# Experts per program of kernel 2, and elements of one [rows, experts] tile of kernels 2 and 3. The tile shapes
# depend on E only, not on S: a new number of tokens must not compile new kernel variants.
_SCAN_EXPERTS = 32
_TILE_ELEMS = 4096


def block_for(num_pairs: int) -> int:
    """Pairs per block (a power of two) for ``num_pairs`` routed pairs. Comparisons only, so a symbolic
    ``num_pairs`` (torch.compile with dynamic shapes) specialises into a few ranges instead of failing."""
    block = _MIN_BLOCK
    while block < _MAX_BLOCK and block * _TARGET_BLOCKS < num_pairs:
        block *= 2
    return block


@triton.jit
def _count_kernel(index_ptr, counts_ptr, num_pairs, num_experts, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    b = tl.program_id(0)
    before_ptr = counts_ptr + tl.num_programs(0) * num_experts
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    experts = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int32)
    counts = tl.histogram(experts, E_POW2, mask=mask)
    e = tl.arange(0, E_POW2)
    e_mask = e < num_experts
    tl.store(counts_ptr + b * num_experts + e, counts, mask=e_mask)
    tl.store(before_ptr + b * num_experts + e, tl.cumsum(counts, axis=0) - counts, mask=e_mask)


@triton.jit
def _scan_kernel(
    counts_ptr,  # [2, nb, E]: counts (in; bases out, each tile read before it is overwritten), then before
    offsets_ptr,  # [E + 1]
    num_blocks, num_experts, num_pairs,
    EXPERTS: tl.constexpr, ROWS: tl.constexpr,
):
    before_ptr = counts_ptr + num_blocks * num_experts
    e = tl.program_id(0) * EXPERTS + tl.arange(0, EXPERTS)
    e_mask = e < num_experts
    rows = tl.arange(0, ROWS)
    carry = tl.zeros([EXPERTS], dtype=tl.int32)  # pairs of each expert in the blocks before this tile
    offsets = tl.zeros([EXPERTS], dtype=tl.int32)
    for r0 in range(0, num_blocks, ROWS):
        r = r0 + rows
        mask = (r < num_blocks)[:, None] & e_mask[None, :]
        at = r[:, None] * num_experts + e[None, :]
        c = tl.load(counts_ptr + at, mask=mask, other=0)
        before = tl.load(before_ptr + at, mask=mask, other=0)
        tl.store(counts_ptr + at, carry[None, :] + tl.cumsum(c, axis=0) - c - before, mask=mask)
        carry += tl.sum(c, axis=0)
        offsets += tl.sum(before, axis=0)
    tl.store(offsets_ptr + e, offsets, mask=e_mask)
    tl.store(offsets_ptr + num_experts, num_pairs, mask=tl.program_id(0) == 0)


@triton.jit
def _scatter_kernel(
    index_ptr, base_ptr, offsets_ptr,
    order_ptr, inverse_ptr, expert_ptr, tile_expert_ptr, tile_start_ptr,
    num_pairs, num_experts, block_m, num_tiles, tiles_per_program,
    BLOCK: tl.constexpr, E_POW2: tl.constexpr, TILES: tl.constexpr,
):
    b = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offs = b * BLOCK + local
    # Pairs past the end get expert E: they sort last and are masked out below.
    experts = tl.load(index_ptr + offs, mask=offs < num_pairs, other=num_experts).to(tl.int32)
    # Unique keys (expert, index in block): sorting them is the stable sort of the block.
    key = tl.sort(experts * BLOCK + local)
    e = key // BLOCK
    src = b * BLOCK + key % BLOCK
    valid = e < num_experts
    # Sorted position j of block b is the (j - before[b, e])-th pair of expert e in the block, after the pairs of
    # e in earlier blocks; kernel 2 folded both into base.
    dest = tl.load(offsets_ptr + e, mask=valid, other=0) + tl.load(base_ptr + b * num_experts + e, mask=valid, other=0)
    dest += local
    tl.store(order_ptr + dest, src, mask=valid)
    tl.store(expert_ptr + dest, e, mask=valid)
    tl.store(inverse_ptr + src, dest, mask=valid)

    # This program's share of the row tiles, as the torch path computes them: tile_expert[t] = #{e : tile_end[e] <=
    # t} (E for unused tiles), tile_start from the clamped expert c (E - 1 for unused tiles).
    x = tl.arange(0, E_POW2)
    x_mask = x < num_experts
    runs = tl.load(offsets_ptr + x + 1, mask=x_mask, other=0) - tl.load(offsets_ptr + x, mask=x_mask, other=0)
    tiles = (runs + block_m - 1) // block_m
    tile_end = tl.cumsum(tiles, axis=0)
    first = b * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_tiles)
    for t0 in range(first, last, TILES):
        t = t0 + tl.arange(0, TILES)
        t_mask = t < last
        found = tl.sum(((tile_end[None, :] <= t[:, None]) & x_mask[None, :]).to(tl.int32), axis=1)
        c = tl.minimum(found, num_experts - 1)
        first_tile = tl.sum(tl.where(x[None, :] < c[:, None], tiles[None, :], 0), axis=1)
        row0 = tl.load(offsets_ptr + c, mask=t_mask, other=0)
        tl.store(tile_expert_ptr + t, found, mask=t_mask)
        tl.store(tile_start_ptr + t, row0 + (t - first_tile) * block_m, mask=t_mask)


def routing_tensors(
    top_k_index: torch.Tensor, num_experts: int, block_m: int, *, block: int | None = None, wrap=fast
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The six ``Routing`` tensors of ``top_k_index [T, k]`` (see ``routing.build_routing``), three launches.

    ``block`` (a power of two) overrides the pairs per block (tests use small ones to get many blocks);
    ``wrap`` is ``torch.library.wrap_triton`` when traced by ``torch.compile``.
    """
    device = top_k_index.device
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_pairs = flat.numel()
    num_tiles = max_row_tiles(num_pairs, num_experts, block_m)
    block = block_for(num_pairs) if block is None else block
    if block & (block - 1) or (num_experts + 1) * block >= 2**31 or num_pairs >= 2**31:
        raise ValueError(
            f"triton routing needs a power-of-two block and (E + 1) * block and S below 2**31; got block={block}, "
            f"E={num_experts}, S={num_pairs}"
        )
    num_blocks = -(-num_pairs // block)
    e_pow2 = 1 << (num_experts - 1).bit_length()
    i32 = dict(dtype=torch.int32, device=device)
    order = torch.empty(num_pairs, **i32)
    inverse = torch.empty(num_pairs, **i32)
    expert = torch.empty(num_pairs, **i32)
    offsets = torch.empty(num_experts + 1, **i32)
    tile_expert = torch.empty(num_tiles, **i32)
    tile_start = torch.empty(num_tiles, **i32)
    if num_pairs == 0:
        return order, inverse, expert, offsets.zero_(), tile_expert, tile_start
    scratch = torch.empty(2, num_blocks, num_experts, **i32)  # counts (then bases) and before, see the module doc
    warps = 4 if block <= 1024 else 8

    wrap(_count_kernel)[(num_blocks,)](
        flat, scratch, num_pairs, num_experts, BLOCK=block, E_POW2=e_pow2, num_warps=warps
    )
    scan_experts = min(e_pow2, _SCAN_EXPERTS)
    wrap(_scan_kernel)[(-(-num_experts // scan_experts),)](
        scratch,
        offsets,
        num_blocks,
        num_experts,
        num_pairs,
        EXPERTS=scan_experts,
        ROWS=_TILE_ELEMS // scan_experts,
        num_warps=4,
    )
    tiles_per_program = -(-num_tiles // num_blocks)
    wrap(_scatter_kernel)[(num_blocks,)](
        flat,
        scratch,
        offsets,
        order,
        inverse,
        expert,
        tile_expert,
        tile_start,
        num_pairs,
        num_experts,
        block_m,
        num_tiles,
        tiles_per_program,
        BLOCK=block,
        E_POW2=e_pow2,
        TILES=max(1, _TILE_ELEMS // e_pow2),
        num_warps=warps,
    )
    return order, inverse, expert, offsets, tile_expert, tile_start


@torch.library.triton_op("hetermoe::build_routing", mutates_args=())
def build_routing_op(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``routing_tensors`` as a custom op whose kernels ``torch.compile`` sees (``wrap_triton``)."""
    return routing_tensors(top_k_index, num_experts, block_m, wrap=torch.library.wrap_triton)


def build_routing(top_k_index: torch.Tensor, num_experts: int, block_m: int, *, block: int | None = None) -> Routing:
    """``Routing`` of ``top_k_index [T, k]`` from the Triton kernels (CUDA tensors, or CPU ones under the
    interpreter).

    Eager calls launch directly (a custom op's dispatch would cost host time, the thing this saves); compiled
    regions go through the ``hetermoe::build_routing`` triton_op. Under the interpreter ``wrap_triton`` hands back
    the plain Python kernel, which cannot run on fake tensors, so compiled CPU regions use the torch ops instead.
    """
    if torch.compiler.is_compiling():
        if top_k_index.is_cuda:
            return Routing(*build_routing_op(top_k_index, num_experts, block_m))
        return build_routing_torch(top_k_index, num_experts, block_m)
    return Routing(*routing_tensors(top_k_index, num_experts, block_m, block=block))
