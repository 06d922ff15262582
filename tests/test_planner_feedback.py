"""Fitting profiles to a measured step (hf_hetermoe.planner.feedback) and re-planning with them."""

import json

import pytest

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.planner import ClusterConfig, CostModel, make_plan, preset_profiles
from hf_hetermoe.planner.feedback import fit_profiles, fitted_profiles, layout_of, save_measurement
from hf_hetermoe.planner.model_dims import ModelDims
from hf_hetermoe.planner.simulator import simulate_layout

DIMS = ModelDims(hidden_size=1024, num_layers=4, num_experts=24, top_k=2, expert_intermediate_size=4096,
                 num_attention_heads=16, vocab_size=32000)
HOST = "NVIDIA H200"


def cluster(seq=4096):
    return ClusterConfig.from_dict({
        "nodes": [{"name": "n0", "gpus": [{"device": HOST, "count": 1},
                                          {"device": HOST, "count": 1, "emulate": "v100-like"}]}],
        "training": {"seq_len": seq, "global_batch_sequences": 8, "max_micro_batches": 4, "bytes_per_param": 8}})


def experts_on(plan, local):
    return sum(len(p.get(str(local), p.get(local, ()))) for p in plan.placement)


def test_fit_recovers_per_kind_factors_and_replanning_follows(tmp_path):
    c = cluster()
    first = make_plan(DIMS, c)
    cost = CostModel(DIMS, c, preset_profiles(c.kinds(), DIMS, 4096))
    sim = simulate_layout(cost, layout_of(first.plan), "replay")
    # The "measured" step: the new GPU 1.6x slower than its profile, the emulated one as profiled.
    busy_s = [sim.busy_ms[r] * (1.6 if c.kinds()[0] == cost.kind_of[r] else 1.0) / 1e3 for r in range(2)]
    path = tmp_path / "step.json"
    save_measurement(path, first.plan, busy_s, max(busy_s) * 1.1)
    profiles, factors = fitted_profiles(DIMS, c, None, path)
    assert factors[HOST] == pytest.approx(1.6, rel=1e-6)
    assert factors[f"{HOST} [emulated v100-like]"] == pytest.approx(1.0, rel=1e-6)
    assert profiles[HOST].attn_fwd_ms == pytest.approx(cost.profiles[HOST].attn_fwd_ms * 1.6)
    assert "fitted" in profiles[HOST].source
    again = make_plan(DIMS, c, profiles)
    new_rank = next(r for r in range(2) if cost.kind_of[r] == HOST)
    local = first.plan.zp_groups[0].index(new_rank)
    assert experts_on(again.plan, local) < experts_on(first.plan, local)  # work moves off the slower-than-thought


def test_measurement_errors(tmp_path):
    c = cluster()
    plan = make_plan(DIMS, c).plan
    with pytest.raises(ConfigError, match="busy_s has 3 ranks"):
        save_measurement(tmp_path / "x.json", plan, [0.1, 0.1, 0.1], 0.2)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a step measurement"):
        fitted_profiles(DIMS, c, None, tmp_path / "bad.json")
    save_measurement(tmp_path / "step.json", plan, [0.1, 0.1], 0.2)
    with pytest.raises(ConfigError, match="seq_len=4096"):
        fitted_profiles(DIMS, cluster(seq=8192), None, tmp_path / "step.json")
    cost = CostModel(DIMS, c, preset_profiles(c.kinds(), DIMS, 4096))
    with pytest.raises(ConfigError, match="not positive"):
        fit_profiles(cost, plan, [0.0, 0.0])
    other = ModelDims(**{**DIMS.to_dict(), "num_layers": 6})
    with pytest.raises(ConfigError, match="another model"):
        fitted_profiles(other, c, None, tmp_path / "step.json")


def test_plan_cli_feedback(tmp_path, capsys):
    from test_planner_config import _cli

    (tmp_path / "config.json").write_text(json.dumps(DIMS.to_dict()))
    c = cluster()
    c.to_yaml(tmp_path / "cluster.yaml")
    first = make_plan(DIMS, c)
    cost = CostModel(DIMS, c, preset_profiles(c.kinds(), DIMS, 4096))
    sim = simulate_layout(cost, layout_of(first.plan), "replay")
    save_measurement(tmp_path / "step.json", first.plan, [sim.busy_ms[r] * 1.3e-3 for r in range(2)], 0.5)
    assert _cli(["plan", "--model", str(tmp_path / "config.json"), "--cluster", str(tmp_path / "cluster.yaml"),
                 "--feedback", str(tmp_path / "step.json"), "--out", str(tmp_path / "out")]) == 0
    assert "fitted to the measured step" in capsys.readouterr().out
    assert (tmp_path / "out" / "plan.json").is_file()
