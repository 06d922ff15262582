"""The benchmark's own helpers that run without a GPU: balanced routing and the energy window."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_experts  # noqa: E402
import gpu_energy  # noqa: E402


@pytest.mark.parametrize("T, E, k", [(4096, 128, 8), (64, 8, 2), (96, 32, 4), (10, 5, 5)])
def test_balanced_routing_gives_every_expert_the_same_pairs(T, E, k):
    g = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(0)
    index = bench_experts.route(T, E, k, "balanced", generator=g)
    assert index.shape == (T, k)
    assert (index.sort(dim=1).values.diff(dim=1) > 0).all(), "a token was routed to one expert twice"
    counts = torch.bincount(index.flatten().cpu(), minlength=E)
    assert (counts == T * k // E).all(), counts


def test_random_routing_spreads_pairs_and_bad_routing_is_refused():
    index = bench_experts.route(4096, 128, 8, "random")
    counts = torch.bincount(index.flatten().cpu(), minlength=128)
    assert counts.sum() == 4096 * 8 and counts.min() < counts.max()  # binomial spread, not balanced
    with pytest.raises(ValueError, match="T\\*k divisible by E"):
        bench_experts.route(100, 64, 8, "balanced")
    with pytest.raises(ValueError, match="k <= E"):
        bench_experts.route(64, 4, 8, "balanced")
    with pytest.raises(ValueError, match="'random' or 'balanced'"):
        bench_experts.route(64, 8, 2, "uniform")


def test_energy_window_figures():
    w = gpu_energy.window(start_mj=1_000_000, end_mj=1_700_000, seconds=1.0, calls=50, clocks=[1500, 1700])
    assert w.joules_per_call == pytest.approx(14.0)
    assert w.watts == pytest.approx(700.0)
    assert w.sm_mhz == pytest.approx(1600.0)
    with pytest.raises(ValueError, match="calls > 0"):
        gpu_energy.window(0, 1, 1.0, 0, [])


def test_energy_meter_is_absent_without_a_gpu_and_reads_with_one():
    meter = gpu_energy.EnergyMeter.open()
    if not torch.cuda.is_available():
        assert meter is None
        return
    if meter is None:
        pytest.skip("this GPU or driver does not count energy through NVML")
    first = meter.energy_mj()
    torch.randn(4096, 4096, device="cuda").matmul(torch.randn(4096, 4096, device="cuda"))
    torch.cuda.synchronize()
    assert meter.energy_mj() >= first and meter.sm_mhz() > 0


def test_results_rows_append_atomically_and_keep_every_column(tmp_path):
    path = tmp_path / "train_step_cpu.csv"
    bench_experts.append_rows(path, [dict(a=1, b=2, energy=3.5)], ["a", "b", "energy"])
    # A later run without the energy column (no NVML), and with a new column: nothing earlier is lost.
    bench_experts.append_rows(path, [dict(a=4, b=5, c=6)], ["a", "b", "c"], old_defaults={"c": "old"})
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        dict(a="1", b="2", energy="3.5", c="old"),
        dict(a="4", b="5", energy="", c="6"),
    ]
    assert not path.with_suffix(".tmp").exists()


def test_tile_sweep_has_dense_roofs_with_the_matmuls_flops():
    """sweep_tiles' per-matmul cuBLAS roofs (dense_up / dense_down) run and match torch, with the FLOPs of the
    expert matmuls they stand beside."""
    import sweep_tiles

    H, I, E, k, T = 32, 16, 4, 2, 24
    problems = {kind: (flops, run, check) for kind, flops, run, check in sweep_tiles.problems(
        "qwen3_30b_a3b", H, I, E, k, T, device="cpu", dtype=torch.float32)}
    assert {"dense_up", "dense_down"} <= set(problems) <= set(sweep_tiles.KERNELS)
    assert problems["dense_up"][0] == problems["fwd_gate_up"][0] == problems["bwd_dx"][0]
    assert problems["dense_down"][0] == problems["fwd_down"][0] == problems["wgrad_down"][0]
    for kind in ("dense_up", "dense_down"):
        _, run, check = problems[kind]
        run(None)
        assert check() < 1e-5


def test_merging_device_results_appends_new_rows_once(tmp_path, capsys):
    """A device run's CSV merged into the results: new rows appended with every column kept, providers relabelled
    where asked, and a second merge of the same file adds nothing."""
    import csv

    import merge_results

    results, fetched = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    fetched.mkdir()
    old = [{"run": "r1", "shape": "s", "T": "4096", "provider": "hetermoe", "fwd_bwd_tflops": "360", "old_col": "x"}]
    new = [
        {"run": "r2", "shape": "s", "T": "4096", "provider": "hetermoe", "fwd_bwd_tflops": "370", "joules": "1.7"},
        {"run": "r2", "shape": "s", "T": "4096", "provider": "grouped_mm", "fwd_bwd_tflops": "160", "joules": "2.4"},
    ]
    for path, rows in ((results / "experts_gpu.csv", old), (fetched / "experts_gpu.csv", new)):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    relabel = {"hetermoe": "hetermoe@old-code"}
    assert merge_results.merge(fetched / "experts_gpu.csv", results, relabel) == 2
    assert merge_results.merge(fetched / "experts_gpu.csv", results, relabel) == 0
    with open(results / "experts_gpu.csv", newline="") as f:
        merged = list(csv.DictReader(f))
    assert [r["provider"] for r in merged] == ["hetermoe", "hetermoe@old-code", "grouped_mm"]
    assert merged[0]["old_col"] == "x" and merged[0]["joules"] == "" and merged[2]["joules"] == "2.4"
    with pytest.raises(SystemExit):
        merge_results.main(["--relabel", "hetermoe", str(fetched / "experts_gpu.csv")])
    assert "write it OLD=NEW" in capsys.readouterr().err


def test_ab_code_prepares_the_old_package_and_refuses_bad_input(tmp_path):
    """``benchmarks/ab_code.sh prepare <ref>`` exports the package at a commit (with its REF) for a device A/B;
    an unknown commit, or ``run`` before ``prepare`` or without ``OUT``, stops with a message saying what to do."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "ab_code.sh"

    def ab(*args, **env):
        return subprocess.run(
            ["bash", str(script), *args], capture_output=True, text=True, env={**os.environ, **env}, cwd=root
        )

    old = tmp_path / "ab_old"
    done = ab("prepare", "HEAD", AB_OLD=str(old))
    assert done.returncode == 0, done.stderr
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
    assert (old / "REF").read_text().strip() == head
    assert (old / "kernels" / "triton_ops.py").is_file() and (old / "pyproject.toml").is_file()
    bad = ab("prepare", "no-such-ref", AB_OLD=str(tmp_path / "other"))
    assert bad.returncode == 2 and "no commit 'no-such-ref'" in bad.stderr
    early = ab("run", "1", AB_OLD=str(tmp_path / "missing"))
    assert early.returncode == 2 and "prepare <git-ref>' first" in early.stderr
    no_out = ab("run", "1", AB_OLD=str(old), OUT="")
    assert no_out.returncode != 0 and "set OUT" in no_out.stderr
