"""The README's generated sections match their sources (the registry, the committed benchmark results)."""

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _benchmark_script(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _update_readme():
    return _benchmark_script("update_readme")


def test_readme_generated_sections_are_current():
    assert _update_readme().main(["--check"]) == 0, "run: python benchmarks/update_readme.py"


def test_readme_names_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "bash dev.sh demo" in readme and "bash dev.sh test" in readme
    assert "bash dev.sh test" in (ROOT / ".ci" / "run").read_text().replace("dev.sh test -p", "dev.sh test")


def test_sustained_and_burst_rows_never_share_a_table(tmp_path, monkeypatch):
    """Each GPU gets one table per timing mode, sustained first; rows from before the ``timing`` column are burst;
    each table says how it was timed."""
    module = _update_readme()
    base = dict(gpu="GPU X", torch="t", triton="tr", transformers="tf", H="8", I="4", E="2", k="1", rounds="2")
    base.update(shape="s", T="16", peak_extra_gib="1")

    def row(run, timing, provider, tflops):
        return dict(base, run=run, timing=timing, provider=provider, fwd_bwd_tflops=tflops, fwd_tflops=tflops)

    rows = [
        row("2026-01-01T00:00:00", "", "hetermoe", "300"),
        row("2026-01-01T00:00:00", "", "grouped_mm", "100"),
        row("2026-01-02T00:00:00", "sustained 1s+1s", "hetermoe", "250"),
        row("2026-01-02T00:00:00", "sustained 1s+1s", "grouped_mm", "100"),
    ]
    with open(tmp_path / "experts_gpu_x.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    text = module.benchmark_table()
    sustained, burst = text.index("**sustained**"), text.index("**burst**")
    assert sustained < burst
    assert "for 1 s, then is timed over 1 s" in text
    assert "| 250 | 2.50x |" in text[:burst] and "| 300 | 3.00x |" in text[burst:]


def test_model_compat_merges_the_missing_families():
    """``model_compat.py --missing`` measures only the families a stored run lacks and adds them to it, each row
    keeping which run (environment) measured it; the page lists every run."""
    import json

    compat = _benchmark_script("model_compat")
    stored = json.loads((ROOT / "benchmarks" / "results" / "model_compat_cpu.json").read_text())
    # A run of its own (the stored file may already hold merged runs): three of its rows, one environment.
    some = {k: {f: v for f, v in row.items() if f != "run"} for k, row in list(stored["families"].items())[:3]}
    stored = {k: v for k, v in stored.items() if k != "environments"}
    partial = {**stored, "families": some}
    missing = compat.missing_families(partial)
    assert set(missing).isdisjoint(some) and len(missing) == len(compat.model_patches()) - 3
    new_env = {**stored["environment"], "date": "2099-01-01"}
    row = next(iter(some.values()))
    added = {"environment": new_env, "families": dict.fromkeys(missing, row)}
    merged = compat.merge(partial, added)
    assert merged["environments"] == [stored["environment"], new_env]
    runs = {k: v["run"] for k, v in merged["families"].items()}
    assert runs == {**dict.fromkeys(some, 0), **dict.fromkeys(missing, 1)}
    assert compat.missing_families(merged) == []
    # Family by family, as the tool merges them: one environment per run.
    one_by_one = partial
    for name in missing:
        one_by_one = compat.merge(one_by_one, {"environment": new_env, "families": {name: row}})
    assert one_by_one == merged
    page = compat.render({"cpu": merged})
    assert "CPU run 1 of 2" in page and "CPU run 2 of 2" in page and "2099-01-01" in page
