"""Cluster file, profiles, plan.json: round trips and clear errors on bad input."""

import json

import pytest

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.planner import (
    ClusterConfig,
    MemoryError_,
    ModelDims,
    Plan,
    PlanMismatchError,
    ProfileSet,
    make_plan,
    model_dims,
    preset_profiles,
)

SMALL = {"model_type": "mixtral", "hidden_size": 256, "num_hidden_layers": 4, "num_local_experts": 8,
         "num_experts_per_tok": 2, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1000}


def cluster(new="NVIDIA A40", old="Tesla V100-SXM2-32GB", n_new=2, n_old=2, batch=8, seq=1024, **training):
    return ClusterConfig.from_dict({
        "nodes": [{"name": "a", "gpus": [{"device": new, "count": n_new}]},
                  {"name": "b", "gpus": [{"device": old, "count": n_old}]}],
        "inter_node_gbps": 25.0,
        "training": {"seq_len": seq, "global_batch_sequences": batch, **training},
    })


def test_cluster_round_trip(tmp_path):
    c = cluster()
    c.to_yaml(tmp_path / "c.yaml")
    c.to_json(tmp_path / "c.json")
    assert ClusterConfig.load(tmp_path / "c.yaml") == c == ClusterConfig.load(tmp_path / "c.json")
    assert c.world_size == 4 and c.kinds() == ["NVIDIA A40", "Tesla V100-SXM2-32GB"]
    assert c.link_gbps(0, 1) == 25.0 and c.link_gbps(0, 2) == 25.0


def test_example_cluster_loads():
    c = ClusterConfig.load("examples/cluster.yaml")
    assert any("[emulated v100-like]" in k for k in c.kinds())


@pytest.mark.parametrize("data,match", [
    ({"nodes": []}, "lists no nodes"),
    ({"nodes": [{"name": "a", "gpus": [{"device": "x", "count": 0}]}]}, "count=0"),
    ({"nodes": [{"name": "a", "gpus": [{"device": "x", "emulate": "p100-like"}]}]}, "v100-like"),
    ({"nodes": [{"name": "a", "gpus": [{"device": "x"}]}], "bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
    ({"nodes": [{"name": "a", "gpus": [{"device": "x"}]}], "training": {"seq_len": -1}}, "seq_len=-1"),
])
def test_cluster_bad_input(data, match):
    with pytest.raises(ConfigError, match=match):
        ClusterConfig.from_dict(data)


@pytest.mark.parametrize("cfg,expect", [
    (SMALL, (8, 2, 512)),
    ({"model_type": "qwen3_moe", "hidden_size": 128, "num_hidden_layers": 2, "num_experts": 16,
      "num_experts_per_tok": 4, "moe_intermediate_size": 64, "intermediate_size": 999, "num_attention_heads": 4,
      "vocab_size": 100}, (16, 4, 64)),
    ({"model_type": "deepseek_v3", "hidden_size": 128, "num_hidden_layers": 3, "n_routed_experts": 32,
      "num_experts_per_tok": 8, "moe_intermediate_size": 32, "intermediate_size": 256, "n_shared_experts": 1,
      "first_k_dense_replace": 1, "num_attention_heads": 4, "vocab_size": 100}, (32, 8, 32)),
    ({"model_type": "ernie4_5_moe", "hidden_size": 128, "num_hidden_layers": 4, "moe_num_experts": 16, "moe_k": 4,
      "moe_intermediate_size": 32, "intermediate_size": 256, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
      "num_attention_heads": 4, "vocab_size": 100}, (16, 4, 32)),
    ({"model_type": "hunyuan_v1_moe", "hidden_size": 128, "num_hidden_layers": 2, "num_experts": [8, 16],
      "moe_topk": [2, 4], "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 100}, (16, 4, 64)),
])
def test_model_dims_families(cfg, expect):
    d = model_dims(cfg)
    assert (d.num_experts, d.top_k, d.expert_intermediate_size) == expect
    if cfg["model_type"] in ("ernie4_5_moe", "hunyuan_v1_moe"):  # shared experts and leading dense layers
        assert d.num_shared_experts == (2 if cfg["model_type"] == "ernie4_5_moe" else 1)
        assert d.first_dense_layers == cfg.get("moe_layer_start_index", 0)
    assert ModelDims.from_dict(d.to_dict()) == d


@pytest.mark.parametrize("fields,expect", [
    ({}, (True, True, True, True)),
    ({"first_k_dense_replace": 1}, (False, True, True, True)),
    ({"num_dense_layers": 2}, (False, False, True, True)),  # LFM2-MoE
    ({"mlp_layer_types": ["dense", "sparse", "dense", "sparse"]}, (False, True, False, True)),
    ({"expert_layer_period": 2, "expert_layer_offset": 1}, (False, True, False, True)),  # Jamba
    ({"mlp_only_layers": [2], "decoder_sparse_step": 1}, (True, True, False, True)),  # Qwen2/3-MoE
    ({"decoder_sparse_step": 2}, (False, True, False, True)),
    ({"moe_layer_start_index": 1, "moe_layer_end_index": 2}, (False, True, True, False)),  # Ernie-4.5
    ({"layers_block_type": ["mamba", "moe", "attention", "moe"]}, (False, True, False, True)),  # Nemotron-H
    ({"layers_block_type": ["mamba", "attention", "mamba", "attention"]}, (True, True, True, True)),  # Jamba's
])
def test_model_dims_moe_layers(fields, expect):
    """Which layers have routed experts, read as transformers' modeling files read it; the plan places experts on
    exactly those (the runtime refuses a plan whose MoE layers differ from the model's)."""
    d = model_dims({**SMALL, **fields})
    assert tuple(d.is_moe_layer(li) for li in range(4)) == expect
    assert d.num_moe_layers == sum(expect)
    assert ModelDims.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    with pytest.raises(ConfigError, match="moe_layer_mask has 3 entries"):
        ModelDims.from_dict({**d.to_dict(), "moe_layer_mask": [True, True, False]})


def test_model_dims_longcat_flash():
    """LongCat-Flash: two attention blocks and two dense MLPs per layer beside the MoE block, and identity experts
    among the router's choices; released sizes give its ~560B parameters."""
    from transformers import CONFIG_MAPPING

    if "longcat_flash" not in CONFIG_MAPPING:
        pytest.skip("LongCat-Flash is not in this transformers")
    d = model_dims(CONFIG_MAPPING["longcat_flash"]())
    assert (d.attention_sublayers, d.dense_mlps_per_layer, d.dense_intermediate_size) == (2, 2, 12288)
    assert (d.num_experts, d.zero_experts, d.top_k, d.routed_top_k) == (512, 256, 12, 8.0)
    total = d.num_layers * (d.attention_half_params + d.num_experts * d.expert_params) + d.embedding_params
    assert 540e9 < total < 580e9
    assert ModelDims.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    with pytest.raises(ConfigError, match="attention_sublayers=0"):
        ModelDims.from_dict({**d.to_dict(), "attention_sublayers": 0})


def test_model_dims_not_moe():
    with pytest.raises(ConfigError, match="num_experts"):
        model_dims({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})


def test_profiles_round_trip_and_unknown_gpu(tmp_path):
    c, d = cluster(), model_dims(SMALL)
    profs = preset_profiles(c.kinds(), d, 1024)
    profs.save(tmp_path / "p.json")
    again = ProfileSet.load(tmp_path / "p.json")
    assert again.to_dict() == profs.to_dict()
    extra = again.merge(preset_profiles(["NVIDIA H100 80GB HBM3"], d, 1024))
    with pytest.raises(ConfigError, match="'NVIDIA H100 80GB HBM3'.*not in the cluster"):
        make_plan(d, c, extra)
    with pytest.raises(ConfigError, match="no profile for device kind 'Tesla V100-SXM2-32GB'"):
        make_plan(d, c, preset_profiles(["NVIDIA A40"], d, 1024))
    with pytest.raises(ConfigError, match="seq_len=2048"):
        make_plan(d, c, preset_profiles(c.kinds(), d, 2048))


def test_cluster_that_cannot_hold_the_model():
    big = dict(SMALL, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
    with pytest.raises(MemoryError_, match=r"over by [0-9.]+ GiB|short by \d+ experts"):
        make_plan(big, cluster(new="Tesla T4", old="Tesla T4"))


def test_plan_round_trip_and_world_mismatch(tmp_path):
    res = make_plan(SMALL, cluster())
    res.plan.save(tmp_path / "plan.json")
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.to_dict() == json.loads(json.dumps(res.plan.to_dict()))
    plan.get_schedule()  # validates
    plan.check_world(4)
    with pytest.raises(PlanMismatchError, match="made for 4 GPUs but this job has 6"):
        plan.check_world(6)
    with pytest.raises(PlanMismatchError, match="rank 0 is a 'Tesla T4'"):
        plan.check_world(4, ["Tesla T4"] * 4)
    data = plan.to_dict()
    data["world_size"] = 5
    with pytest.raises(ConfigError, match="lists 4 ranks but world_size=5"):
        Plan.from_dict(data)


def _cli(argv):
    import argparse

    from hf_hetermoe.commands.plan import plan_command_parser
    from hf_hetermoe.commands.simulate import simulate_command_parser

    parser = argparse.ArgumentParser("hetermoe")
    sub = parser.add_subparsers()
    plan_command_parser(sub)
    simulate_command_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_and_simulate_cli_write_outputs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    cluster().to_yaml(tmp_path / "cluster.yaml")
    assert _cli(["plan", "--model", str(tmp_path), "--cluster", str(tmp_path / "cluster.yaml"),
                 "--out", str(tmp_path / "out")]) == 0
    for name in ("plan.json", "trace.json", "timeline.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert _cli(["plan", "--model", str(tmp_path), "--cluster", str(tmp_path / "missing.yaml")]) == 2
    assert _cli(["simulate", "--model", str(tmp_path), "--cluster", str(tmp_path / "cluster.yaml"), "-R", "2",
                 "--out", str(tmp_path / "sim")]) == 0
    assert (tmp_path / "sim" / "ep_timeline.png").is_file()


def test_emulated_kind_is_its_host_scaled():
    """An emulated preset on an H100/H200 is planned as the host scaled by the preset's SM shares (what the
    emulation really runs), not as the published GPU it imitates; other hosts keep the imitated GPU's spec."""
    from hf_hetermoe.emulate import PRESETS
    from hf_hetermoe.planner.presets import SPECS, spec_for

    host = SPECS["h200"]
    v100 = spec_for("NVIDIA H200 [emulated v100-like]")
    a40 = spec_for("NVIDIA H200 [emulated a40-like]")
    assert v100.memory_gib == PRESETS["v100-like"].memory_gib
    assert host.gemm_tflops / 4.5 < v100.gemm_tflops < host.gemm_tflops / 3  # 32 of 132 SMs
    assert 1.1 < a40.gemm_tflops / v100.gemm_tflops < 1.4  # calibrated: A40/V100 ~1.25x on GEMMs
    assert 3.0 < a40.attn_tflops / v100.attn_tflops < 7.0  # attention: own SM share, flash vs memory-efficient
    assert spec_for("NVIDIA A40 [emulated v100-like]") == SPECS["v100"]
    assert spec_for("Tesla V100-PCIE-32GB") == SPECS["v100"]


def test_emulation_preset_bad_input():
    from hf_hetermoe.emulate import EmulationPreset

    with pytest.raises(ConfigError, match="attn_sm_fraction"):
        EmulationPreset("x", 0.25, ("efficient",), 16, attn_sm_fraction=1.5)
    with pytest.raises(ConfigError, match="sdpa_backends"):
        EmulationPreset("x", 0.25, ("fast",), 16)
    p = EmulationPreset("x", 0.25, ("flash",), 16, attn_sm_fraction=0.5)
    assert (p.num_sms(132), p.attn_num_sms(132)) == (32, 64)
    assert EmulationPreset("y", 0.25, ("flash",), 16).attn_num_sms(132) == 32


def test_calibration_file_applies():
    """The committed H200 calibration loads into presets (SM shares, attention share, backends)."""
    from pathlib import Path

    from hf_hetermoe.emulate import load_calibration

    path = Path(__file__).parent.parent / "benchmarks/results/emulation_calibration_NVIDIA_H200.json"
    presets = load_calibration(path)
    assert presets["a40-like"].attn_sm_fraction > presets["a40-like"].sm_fraction  # attention on more SMs
    assert presets["v100-like"].sdpa_backends[0] == "efficient"
    data = json.loads(path.read_text())
    assert abs(data["ratios"]["a40-like"]["ffn_ratio"] - 1.25) < 0.1
    assert 3.3 < data["ratios"]["a40-like"]["attn_ratio"] < 4.1
    assert 10 <= data["ratios"]["l40s-like"]["attn_ratio"] <= 14
