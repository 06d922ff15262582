"""Regenerate the README's generated sections: the supported-models table (from the model-patch registry) and
the performance table (from the newest run in ``benchmarks/results/experts_*.csv``).

    python benchmarks/update_readme.py          # rewrite README.md in place
    python benchmarks/update_readme.py --check  # exit 1 if README.md is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
PROVIDERS = ("eager", "grouped_mm", "hetermoe", "dense_roof", "gemm_roof")  # the table's columns
if str(ROOT / "benchmarks") not in sys.path:  # also when loaded by file path (tests)
    sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_experts import DEFAULT_SHAPES  # noqa: E402  (the issue's five shapes: the table lists them first)

from hf_hetermoe.files import write_text  # noqa: E402


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)}[^>]*-->\n)(.*?)(<!-- END {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


def supported_models() -> str:
    from hf_hetermoe.model_patches import supported_models_markdown

    return supported_models_markdown()


def benchmark_table() -> str:
    """One table per GPU (the GPU of the newest run first), each from the newest measurement of every (shape, T,
    provider) on that GPU."""
    rows = []
    for path in sorted(RESULTS.glob("experts_*.csv")):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    if not rows:
        return "No GPU results committed yet: run `python benchmarks/bench_experts.py` on a GPU.\n"
    newest_run = {}
    for r in rows:
        newest_run[r["gpu"]] = max(newest_run.get(r["gpu"], ""), run_of(r))
    gpus = sorted(newest_run, key=newest_run.get, reverse=True)
    lines = [
        "Roofs: `gemm_roof` is the six cuBLAS matmuls of a dense FFN over all `T*k` rows alone (no "
        "activation, no routing): nothing an experts layer does is faster; `dense_roof` is that FFN through "
        "autograd, with its activation kernels. Each cell is its provider's newest measurement on that GPU (the "
        "runs are named above each table). GFLOP per joule: the board's energy over the forward+backward windows "
        "(NVML; runs from 2026-12 on): under these matmuls the GPU sits at its power limit, where time per call "
        "follows energy per call.",
    ]
    for gpu in gpus:
        # Sustained and burst figures are never mixed in one table; sustained (what training keeps) first.
        for timing in ("sustained", "burst"):
            shown = [r for r in rows if r["gpu"] == gpu and timing_of(r)[0] == timing]
            if shown:
                lines += ["", *_gpu_table(shown, gpu)]
    return "\n".join(lines) + "\n"


def timing_of(r: dict) -> tuple[str, str]:
    """How a results row was timed: (``sustained`` or ``burst``, its window, e.g. ``1s+1s``). Rows from before the
    column were timed burst, with do_bench's 25 ms warm-up and 50 ms."""
    mode, window = (r.get("timing") or "burst 25ms+50ms").split()
    return mode, window


def run_of(r: dict) -> str:
    """A results row's run (its timestamp; older files have only the date)."""
    return r.get("run") or r["date"]


def newest_rows(rows: list[dict]) -> dict[tuple[str, int, str], dict]:
    """The newest measurement of each (shape, T, provider): what the README's table and the results plot show."""
    newest = {}
    for r in rows:
        key = (r["shape"], int(r["T"]), r["provider"])
        if key not in newest or run_of(r) >= run_of(newest[key]):
            newest[key] = r
    return newest


def _gpu_table(rows: list[dict], gpu: str) -> list[str]:
    latest = newest_rows(rows)
    first = next(iter(latest.values()))
    shown = [r for (_, _, p), r in latest.items() if p in PROVIDERS]
    runs = sorted({run_of(r) for r in shown})
    rounds = {r.get("rounds") or "1" for r in shown}
    if len(rounds) == 1 and "1" not in rounds:
        timing = f" Timing: median of {rounds.pop()} rounds over all providers, their order rotated each round"
    elif len(rounds) == 1:
        timing = " Timing: one round"
    else:  # runs of different round counts: each row's own in the CSV's `rounds` column
        counts = sorted(int(n) for n in rounds)
        timing = f" Timing: the median of {counts[0]}-{counts[-1]} rounds (each run's in the CSV's `rounds` column)"
    windows = {timing_of(r)[1] for r in shown}
    # "1s+1s" -> "1 s", "1 s"; "25ms+50ms" -> "25 ms", "50 ms"
    window = re.sub(r"(\d)([a-z]+)", r"\1 \2", windows.pop()) if len(windows) == 1 else None
    if timing_of(first)[0] == "sustained":
        warm, timed = window.split("+") if window else ("a while", "a window")
        timing += (
            f"; **sustained**: each provider runs back to back for {warm}, then is timed over {timed} (mean per "
            "call), at the power-limited clocks a training run keeps."
        )
    else:
        warm, timed = window.split("+") if window else ("short", "short")
        timing += (
            f"; **burst** (`triton.testing.do_bench`, {warm} warm-up, {timed} timed): bursts catch boost clocks that "
            "sustained load does not keep, so power-limited rows read high (benchmarks/NOTES.md, v2.15)."
        )
    lines = [
        f"Experts layer only (the three expert matmuls, routing, combine), forward+backward TF/s, bf16, "
        f"{gpu}, torch {first['torch']}, triton {first['triton']}, transformers {first['transformers']}, "
        f"run{'s' if len(runs) > 1 else ''} {', '.join(runs)}. Reproduce: `python benchmarks/bench_experts.py`; "
        "every provider is checked against an fp32 truth before timing; full numbers (forward, memory, errors) in "
        f"`benchmarks/results/`.{timing}",
        "",
        "| shape (H, I, E, k) | T | eager | grouped_mm (v5 default) | hetermoe | hetermoe / grouped_mm "
        "| hetermoe forward | peak extra memory, hetermoe / grouped_mm | cuBLAS GEMMs alone | dense FFN "
        "| GFLOP per joule: grouped_mm / hetermoe / cuBLAS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with_energy = any(r.get("fwd_bwd_gflops_per_joule") for r in shown)
    if not with_energy:  # tables from before the energy columns
        lines[-2] = lines[-2].rsplit(" GFLOP per joule", 1)[0].rstrip("| ") + " |"
        lines[-1] = lines[-1][: -len("---|")]
    for shape, T in sorted({(s, t) for s, t, _ in latest}, key=lambda st: (st[0] not in DEFAULT_SHAPES, *st)):
        get = {p: latest.get((shape, T, p)) for p in PROVIDERS}
        some = next(r for r in get.values() if r)

        def tf(row, col="fwd_bwd_tflops"):
            return f"{float(row[col]):.0f}" if row else "-"

        ratio = mem = "-"
        if get["hetermoe"] and get["grouped_mm"]:
            h, g = get["hetermoe"], get["grouped_mm"]
            ratio = f"{float(h['fwd_bwd_tflops']) / float(g['fwd_bwd_tflops']):.2f}x"
            mem = f"{float(h['peak_extra_gib']) / float(g['peak_extra_gib']):.2f}x"
        dims = f"{shape} ({some['H']}, {some['I']}, {some['E']}, {some['k']})"
        # Energy (NVML, forward+backward windows), from 2026-12: at the power limit time follows joules per call.
        per_joule = [(get[p] or {}).get("fwd_bwd_gflops_per_joule") for p in ("grouped_mm", "hetermoe", "gemm_roof")]
        energy = " / ".join(f"{float(v):.0f}" for v in per_joule) if all(per_joule) else "-"
        lines.append(
            f"| {dims} | {T} | {tf(get['eager'])} | {tf(get['grouped_mm'])} | {tf(get['hetermoe'])} | {ratio} "
            f"| {tf(get['hetermoe'], 'fwd_tflops')} | {mem} | {tf(get['gemm_roof'])} | {tf(get['dense_roof'])} "
            + (f"| {energy} |" if with_energy else "|")
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from what it would be")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = replace_section(text, "supported-models", supported_models())
    new = replace_section(new, "benchmark", benchmark_table())
    if args.check:
        if new != text:
            print("README.md is stale: run python benchmarks/update_readme.py", file=sys.stderr)
            return 1
        return 0
    write_text(README, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
