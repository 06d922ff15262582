"""Simulator invariants: no stream runs two things at once, utilisation in [0, 1], baselines, traces."""

import json
from collections import defaultdict
from dataclasses import replace

import pytest

from hf_hetermoe.planner import ClusterConfig, CostModel, ZPLayout, base_placement, preset_profiles
from hf_hetermoe.planner.model_dims import ModelDims
from hf_hetermoe.planner.planner import ep_layout
from hf_hetermoe.planner.simulator import simulate_data_parallel, simulate_layout
from hf_hetermoe.planner.trace import chrome_trace, write_chrome_trace, write_timeline_png

DIMS = ModelDims(hidden_size=512, num_layers=4, num_experts=8, top_k=2, expert_intermediate_size=1024,
                 num_attention_heads=8, vocab_size=1000)


def _cost(seq=1024, batch=8, emulate=None):
    c = ClusterConfig.from_dict({
        "nodes": [{"name": "a", "gpus": [{"device": "NVIDIA A40", "count": 2}]},
                  {"name": "b", "gpus": [{"device": "NVIDIA A40" if emulate else "Tesla V100", "count": 2,
                                          "emulate": emulate}]}],
        "training": {"seq_len": seq, "global_batch_sequences": batch},
    })
    return CostModel(DIMS, c, preset_profiles(c.kinds(), DIMS, seq))


def _zebra(cost, r, groups=None):
    groups = groups or [[0, 1, 2, 3]]
    m = 2 // len(groups)
    lay = ZPLayout(groups, list(range(m)), [{} for _ in range(DIMS.num_layers)], r, 8 // (m * len(groups)))
    placement, _ = base_placement(cost, lay, list(range(m, len(groups[0]))))
    return replace(lay, placement=placement)


def _check_invariants(res):
    per_stream = defaultdict(list)
    for e in res.events:
        assert e.end >= e.start >= 0
        per_stream[(e.rank, e.stream)].append((e.start, e.end))
    for spans in per_stream.values():
        spans.sort()
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            assert s1 >= e0 - 1e-9, "a GPU stream is busy twice at once"
    util = res.utilisation()
    assert all(0.0 <= u <= 1.0 for u in util.values())
    assert all(b <= res.step_ms + 1e-6 for b in res.busy_ms.values())
    assert res.step_ms == pytest.approx(max(e.end for e in res.events))


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("two_groups", [False, True])
def test_zebra_invariants(r, two_groups):
    cost = _cost()
    groups = [[0, 2], [1, 3]] if two_groups else None
    res = simulate_layout(cost, _zebra(cost, r, groups), "zebra")
    _check_invariants(res)
    assert set(res.busy_ms) == {0, 1, 2, 3}
    assert res.tokens_per_step == 8 * 1024


def test_overlap_beats_no_overlap():
    cost = _cost(seq=512)
    dist = simulate_layout(cost, _zebra(cost, 1), "DistEP")
    zebra = simulate_layout(cost, _zebra(cost, 4), "zebra")
    assert zebra.step_ms < dist.step_ms


def test_baselines():
    cost = _cost()
    ep = simulate_layout(cost, ep_layout(cost), "EP")
    _check_invariants(ep)
    dp = simulate_data_parallel(cost)
    _check_invariants(dp)
    assert dp.tokens_per_step == ep.tokens_per_step == 8 * 1024
    # speed-balanced: the faster A40s get at least as many sequences as the V100s
    assert "r0:" in dp.note and dp.busy_ms[0] > 0


def test_data_parallel_runs_experts_on_moe_layers_only():
    """A dense layer costs its attention and its dense MLP (as `dense_scale` experts over every token), not the
    routed experts; the gradient all-reduce moves the dense MLP's parameters, not 8 experts'."""
    def dp(dims):
        cost = _cost()
        cost = CostModel(dims, cost.cluster, preset_profiles(cost.cluster.kinds(), dims, 1024))
        res = simulate_data_parallel(cost)
        return res, cost

    all_moe, cost = dp(DIMS)
    first_dense = replace(DIMS, moe_layer_mask=(False, True, True, True), dense_intermediate_size=2048)
    mixed, _ = dp(first_dense)
    prof = cost.profile(0)

    def layer0(res, kind):
        return next(e for e in res.events
                    if e.rank == 0 and e.action.kind == kind and e.action.layer == 0 and e.action.mb == 0)

    for kind, backward in (("attn_fwd", False), ("attn_bwd", True)):
        want = prof.attn_ms(1024, backward) + 2 * prof.expert_ms(1024, backward)  # 2048 / 1024 experts' width
        assert layer0(mixed, kind).end - layer0(mixed, kind).start == pytest.approx(want)
        assert layer0(all_moe, kind).end - layer0(all_moe, kind).start == pytest.approx(
            prof.attn_ms(1024, backward) + 8 * prof.expert_ms(1024 * 2 / 8, backward))
    grad = [e for e in mixed.events if e.stream == "grad"][0]
    grad_all = [e for e in all_moe.events if e.stream == "grad"][0]
    assert grad.end - grad.start < grad_all.end - grad_all.start  # 2 experts' parameters fewer than 8


def test_attention_side_counts_every_block_and_dense_mlp():
    """LongCat-Flash-like layers: two attention blocks and two dense MLPs run on the attention ranks, and identity
    experts take a third of the router's picks away from the real experts."""
    cost = _cost()
    dims = replace(DIMS, attention_sublayers=2, dense_mlps_per_layer=2, dense_intermediate_size=2048, zero_experts=4)
    longcat = CostModel(dims, cost.cluster, preset_profiles(cost.cluster.kinds(), dims, 1024))
    lay = _zebra(longcat, 2)
    prof = longcat.profile(lay.ranks[0])
    tokens = longcat.micro_batch_tokens(lay)
    for backward in (False, True):
        want = 2 * prof.attn_ms(tokens, backward) + 2 * 2 * prof.expert_ms(tokens, backward)
        assert longcat.attn_ms(lay, lay.ranks[0], 1, backward) == pytest.approx(want)
    assert dims.routed_top_k == pytest.approx(DIMS.top_k * 8 / 12)
    assert longcat.tokens_per_expert(lay) == pytest.approx(cost.tokens_per_expert(_zebra(cost, 2)) * 8 / 12)


def test_traces_say_emulated(tmp_path):
    cost = _cost(emulate="v100-like")
    res = simulate_layout(cost, _zebra(cost, 2), "zebra")
    assert res.emulated
    trace = chrome_trace(res)
    assert trace["metadata"]["emulated"] is True
    assert any("EMULATED" in e["args"].get("name", "") for e in trace["traceEvents"] if e["ph"] == "M")
    write_chrome_trace(res, tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    write_timeline_png(res, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
