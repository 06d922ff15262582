import pytest
import torch

from hf_hetermoe.kernels import build_routing
from hf_hetermoe.kernels.reference import routing_reference
from hf_hetermoe.kernels.routing import max_row_tiles


@pytest.mark.parametrize(
    "T,E,k,block_m", [(1, 1, 1, 16), (7, 3, 2, 16), (50, 13, 4, 16), (33, 8, 8, 64), (100, 5, 1, 32)]
)
def test_routing_invariants(T, E, k, block_m):
    index = torch.rand(T, E).topk(k, dim=-1).indices
    r = build_routing(index, E, block_m)
    S = T * k
    order, inverse = r.order.long(), r.inverse.long()
    # every (token, slot) appears exactly once, and inverse undoes order
    assert torch.equal(order.sort().values, torch.arange(S))
    assert torch.equal(inverse[order], torch.arange(S))
    # offsets: start at 0, sum to T*k, match per-expert counts, and bracket each expert's run
    assert r.offsets[0] == 0 and r.offsets[-1] == S
    counts = torch.bincount(index.reshape(-1), minlength=E)
    assert torch.equal(r.offsets.diff().long(), counts)
    flat = index.reshape(-1)
    assert torch.equal(flat[order], r.expert.long())
    # same answer as the naive host implementation (stable: ties keep token order)
    ref_order, ref_inverse, ref_offsets = routing_reference(index, E)
    assert torch.equal(order, ref_order) and torch.equal(inverse, ref_inverse)
    assert torch.equal(r.offsets.long(), ref_offsets)


@pytest.mark.parametrize("routing", ["skewed", "empty_experts"])
def test_row_tiles_cover_each_expert_once(routing):
    E, block_m = 6, 4
    if routing == "skewed":
        index = torch.full((21, 1), 2)
    else:
        index = torch.tensor([[0, 5], [5, 0], [0, 5]])
    r = build_routing(index, E, block_m)
    S = index.numel()
    assert r.tile_expert.numel() == max_row_tiles(S, E, block_m)
    covered = torch.zeros(S, dtype=torch.long)
    for e, start in zip(r.tile_expert.tolist(), r.tile_start.tolist()):
        if e == E:  # unused tile
            continue
        end = min(start + block_m, r.offsets[e + 1].item())
        assert r.offsets[e] <= start < end
        covered[start:end] += 1
    assert torch.equal(covered, torch.ones(S, dtype=torch.long))
