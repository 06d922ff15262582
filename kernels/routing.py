"""Routing metadata, built on the device with no host synchronisation.

A routed *pair* is one (token, slot) of ``top_k_index [T, k]``; its flat index is ``token * k + slot``.
Pairs are sorted by expert (stable, so ties keep token order), which makes every expert's pairs one
contiguous run of the sorted order. Nothing is permuted or padded: kernels read token rows in place
through ``order`` and write results back through ``inverse``.

Two implementations give bit-identical tensors: a stable counting sort in three Triton kernels
(``triton_routing.py``, the default for CUDA tensors) and plain torch ops (~40 launches; the CPU path and the
reference).
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch

from .. import env

# Read once at import, as in ops.py: torch.compile cannot trace importlib or the environment in a compiled region.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRET = env.triton_interpret()
ROUTING_BACKENDS = ("auto", "torch", "triton")


class Routing(NamedTuple):
    """Device tensors describing one routing decision. ``S = T * k`` pairs, ``E`` experts.

    order:        [S] int32, flat pair index at each sorted position (token = order // k).
    inverse:      [S] int32, sorted position of each flat pair index (``inverse[order] = arange(S)``).
    expert:       [S] int32, expert id at each sorted position (non-decreasing).
    offsets:      [E + 1] int32, sorted positions where each expert's run starts; ``offsets[E] = S``.
    tile_expert:  [max_tiles] int32, expert of each row tile of ``block_m`` sorted rows; ``E`` marks an unused tile.
    tile_start:   [max_tiles] int32, first sorted row of each tile (unused tiles continue expert E - 1's
                  tiles past ``S``; kernels skip them without reading it, but both backends agree on it anyway).
    """

    order: torch.Tensor
    inverse: torch.Tensor
    expert: torch.Tensor
    offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_start: torch.Tensor


def block_m_for(device: torch.device) -> int:
    """Rows per tile of the Triton grouped matmuls on ``device``; fixes the routing tile arrays."""
    # 32 under the interpreter: small enough for fast CPU tests, large enough that the half-height tail tiles
    # (16 rows, tl.dot's minimum) are exercised there too.
    return 128 if device.type == "cuda" else 32


def max_row_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on row tiles: each expert adds at most one partial tile."""
    return -(-num_pairs // block_m) + min(num_experts, num_pairs)


def build_routing(top_k_index: torch.Tensor, num_experts: int, block_m: int, *, backend: str = "auto") -> Routing:
    """Sort (token, slot) pairs by expert and tile each expert's run into blocks of ``block_m`` rows.

    Args:
        top_k_index: [T, k] integer expert ids in ``[0, num_experts)``.
        num_experts: E.
        block_m: rows per tile of the grouped matmuls (fixes the tile arrays).
        backend: 'triton' (three kernels; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``), 'torch', or
            'auto': Triton for CUDA tensors when it is installed, torch otherwise.
    """
    if backend not in ROUTING_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {ROUTING_BACKENDS}")
    if backend == "triton" or (backend == "auto" and _TRITON_INSTALLED and top_k_index.is_cuda and num_experts > 0):
        if not _TRITON_INSTALLED or not (top_k_index.is_cuda or _INTERPRET):
            state = "installed" if _TRITON_INSTALLED else "missing"
            raise RuntimeError(
                f"build_routing(backend='triton') needs the triton package and CUDA tensors (got "
                f"{top_k_index.device.type} tensors, triton {state}); on CPU set TRITON_INTERPRET=1 before importing "
                "hf_hetermoe, or use backend='auto'"
            )
        from . import triton_routing  # lazy: Triton reads TRITON_INTERPRET when its jit decorators run

        return triton_routing.build_routing(top_k_index, num_experts, block_m)
    return build_routing_torch(top_k_index, num_experts, block_m)


def build_routing_torch(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """``build_routing`` with torch ops (~40 launches on CUDA): the reference of the Triton kernels."""
    device = top_k_index.device
    flat = top_k_index.reshape(-1)
    num_pairs = flat.numel()
    expert_sorted, order = torch.sort(flat, stable=True)
    # scatter_add_ rather than bincount: bincount sizes its output from the data (a host sync on CUDA).
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    inverse = torch.empty(num_pairs, dtype=torch.int32, device=device)
    inverse[order] = torch.arange(num_pairs, dtype=torch.int32, device=device)

    tile_expert, tile_start = _row_tiles(offsets, counts, num_pairs, block_m)
    return Routing(
        order=order.to(torch.int32),
        inverse=inverse,
        expert=expert_sorted.to(torch.int32),
        offsets=offsets,
        tile_expert=tile_expert,
        tile_start=tile_start,
    )


def _row_tiles(
    offsets: torch.Tensor, counts: torch.Tensor, num_pairs: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_expert, tile_start)`` of ``Routing`` from each expert's run (``offsets [E + 1]``, ``counts [E]``)."""
    num_experts = counts.numel()
    tiles_per_expert = (counts + (block_m - 1)) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0)
    tiles = torch.arange(max_row_tiles(num_pairs, num_experts, block_m), device=counts.device, dtype=tile_end.dtype)
    tile_expert = torch.searchsorted(tile_end, tiles, right=True, out_int32=True)
    clamped = tile_expert.clamp(max=num_experts - 1).long()
    local_tile = tiles - (tile_end[clamped] - tiles_per_expert[clamped])
    tile_start = (offsets[clamped] + local_tile * block_m).to(torch.int32)
    return tile_expert, tile_start


def chunk_routing(routing: Routing, start: int, end: int, block_m: int) -> Routing:
    """The sorted rows ``[start, end)`` of ``routing`` as a routing of their own, row ``start`` becoming row 0: each
    expert's run clipped to the chunk (experts of the chunk's edges keep the part inside it, the others none),
    tiles rebuilt over the clipped runs. Device ops only, no host synchronisation (the chunk's bounds are fixed row
    numbers, not expert boundaries, which are device data).

    The chunk has no ``inverse`` (an empty tensor): a token's pairs may lie in several chunks, so kernels that go
    from tokens to sorted rows (``combine``, ``sorted_rows``) must run on the whole routing."""
    num_pairs = routing.order.numel()
    if not 0 <= start <= end <= num_pairs:
        raise ValueError(f"chunk [{start}, {end}) is not inside the {num_pairs} sorted rows")
    offsets = (routing.offsets.clamp(start, end) - start).to(torch.int32)
    counts = offsets[1:] - offsets[:-1]
    tile_expert, tile_start = _row_tiles(offsets, counts, end - start, block_m)
    return Routing(
        order=routing.order[start:end],
        inverse=routing.inverse.new_empty(0),
        expert=routing.expert[start:end],
        offsets=offsets,
        tile_expert=tile_expert,
        tile_start=tile_start,
    )
