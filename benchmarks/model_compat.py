"""Generate MODEL_COMPATIBILITY.md from the model-patch registry.

For every registered family: a prepared tiny model against the unprepared one (transformers' eager experts) in
fp32 on CPU (reference backend), and in bf16 on CUDA (Triton kernels) when a GPU is present. Measured: max
|delta logits|, max |delta grad| over every parameter, the largest aux / z loss delta, the save_pretrained ->
plain from_pretrained round trip, generate(), and the layer-anatomy split (forward and backward).

Each run stores its measurements in ``benchmarks/results/model_compat_<cpu|cuda>.json`` and rewrites the
markdown from every stored file, so a CPU run keeps the GPU column of an earlier GPU run and vice versa.

    python benchmarks/model_compat.py                 # CPU fp32 (+ GPU bf16 when CUDA is available)
    python benchmarks/model_compat.py --family Mixtral --no-write
    python benchmarks/model_compat.py --no-cpu         # GPU column only, the stored CPU column kept
    python benchmarks/model_compat.py --no-cpu --missing   # only the families the stored GPU column lacks, added
                                                           # to it (each merged run's environment is listed)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings
from pathlib import Path

import torch

from hf_hetermoe.files import write_json, write_text
from hf_hetermoe.model_patches import model_patches, supported_models_markdown
from hf_hetermoe.model_patches.verify import verify_anatomy, verify_family

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "MODEL_COMPATIBILITY.md"


def _environment(device: str) -> dict:
    import transformers

    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cpu" if device == "cpu" else torch.cuda.get_device_name(0),
    }
    if device == "cuda":
        import triton

        env["triton"] = triton.__version__
    return env


def measure(device: str, families: list[str] | None) -> dict:
    """Verify every (selected) family on ``device``; returns the JSON-able record of one run."""
    import transformers

    dtype, backend = (torch.float32, "reference") if device == "cpu" else (torch.bfloat16, "triton")
    rows = {}
    for patch in model_patches():
        if families and patch.family not in families:
            continue
        if not patch.available():
            rows[patch.family] = {"unavailable": f"not in transformers {transformers.__version__}"}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = verify_family(patch, backend=backend, dtype=dtype, device=device)
            anatomy = verify_anatomy(patch, backend=backend, dtype=dtype, device=device) if patch.anatomy else None
        row = report.to_dict()
        if anatomy is not None:
            atol = 1e-5 if dtype == torch.float32 else 5e-2
            row["anatomy"] = {**anatomy.__dict__, "failures": anatomy.failures(atol)}
        rows[patch.family] = row
        print(f"{device} {patch.family:20s} {'PASS' if report.passed else 'FAIL ' + '; '.join(report.failures())}")
    return {"environment": _environment(device), "dtype": str(dtype).removeprefix("torch."), "backend": backend,
            "families": rows}


def missing_families(stored: dict | None) -> list[str]:
    """Registered families that ``stored`` (one device's run) has no measurement of: never run, or unavailable in
    the transformers it ran with."""
    rows = (stored or {}).get("families", {})
    return [p.family for p in model_patches() if p.family not in rows or "unavailable" in rows[p.family]]


def merge(stored: dict, new: dict) -> dict:
    """``stored`` with ``new``'s rows added (or replaced); each row keeps the index of the run that measured it in
    ``environments``."""
    environments = list(stored.get("environments") or [stored["environment"]])
    families = {k: {"run": 0, **v} if "run" not in v else v for k, v in stored["families"].items()}
    if new["environment"] not in environments[1:]:  # one entry per run, however many merges it made
        environments.append(new["environment"])
    index = len(environments) - 1 - environments[::-1].index(new["environment"])
    families.update({k: {**v, "run": index} for k, v in new["families"].items()})
    return {**stored, "environments": environments, "families": families}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _verdict(row: dict | None) -> str:
    if row is None:
        return "not run"
    if "unavailable" in row:
        return row["unavailable"]
    failures = row["failures"] + (row.get("anatomy") or {}).get("failures", [])
    if failures:
        return "FAIL: " + "; ".join(failures)
    if row.get("upstream_error"):
        return f"PASS (upstream bug: `{row['upstream_error']}` with `output_router_logits=True`, unprepared too)"
    return "PASS"


def render(runs: dict[str, dict]) -> str:
    """The markdown page from the stored runs (``{"cpu": run, "cuda": run}``, either may be missing)."""
    cpu, gpu = runs.get("cpu"), runs.get("cuda")
    lines = [
        "# Model compatibility",
        "",
        "Generated by `python benchmarks/model_compat.py` from the model-patch registry (`model_patches/`); do not "
        "edit by hand. Each family's tiny config (`tiny_config` in its patch file, 1-2 layers) is built twice with "
        "the same weights: transformers' eager experts (the truth) and `hetermoe.prepare`d. One training step with "
        "`output_router_logits=True` compares logits, loss including router aux / z losses, and every parameter's "
        "gradient; then `save_pretrained` -> plain `from_pretrained` (round trip: reloaded logits vs the original), "
        "greedy `generate()`, and the layer anatomy (each layer run whole vs attention half -> expert half -> "
        "finish, outputs and all gradients).",
        "",
        "CPU fp32 uses the reference backend; GPU bf16 uses the Triton kernels. Deltas are max absolute "
        "differences, prepared vs eager. PASS means: identical state dict and saved files; the reloaded model "
        "(plain transformers, eager) matches; in fp32, logits, loss, aux losses and gradients within 1e-4 + 1e-4 x "
        "scale of eager and the same generated tokens; in bf16, where two correct implementations can differ "
        "much more (a norm after the experts, as in FlexOlmo, turns a router near-tie into another expert for a "
        "token), each of them at most 2 x as far from an fp32 truth (same rounded weights, upcast) as transformers' "
        "own bf16 eager / grouped_mm path is, plus 2^-8 x scale.",
        "",
        "Where the unprepared model itself raises in a training step with `output_router_logits=True` (a bug of "
        "that transformers version), the prepared one must raise the same error, and the comparison runs without "
        "router logits (see the verdict and the upstream quirks below).",
        "",
    ]
    for name, run in (("CPU", cpu), ("GPU", gpu)):
        if run:
            environments = run.get("environments") or [run["environment"]]
            for i, environment in enumerate(environments):
                env = ", ".join(f"{k} {v}" for k, v in environment.items())
                which = ""
                if len(environments) > 1:
                    which = f" {i + 1} of {len(environments)}" + (" (the families it added)" if i else "")
                lines.append(f"- {name} run{which}: {env}, {run['dtype']}, backend `{run['backend']}`.")
    lines += [
        "",
        "| Family | max \\|Δlogits\\| | max \\|Δgrad\\| | aux-loss Δ | round trip | generate | anatomy | CPU fp32 "
        "| GPU bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for patch in model_patches():
        row = (cpu or {}).get("families", {}).get(patch.family)
        grow = (gpu or {}).get("families", {}).get(patch.family)
        if row is None or "unavailable" in row:
            cells = ["-"] * 5
        else:
            anatomy = row.get("anatomy")
            cells = [
                _fmt(row["logits_delta"]),
                _fmt(row["grad_delta"]),
                _fmt(row["aux_delta"]) if row["aux_delta"] is not None else
                "upstream raises" if row.get("upstream_error") else "no aux loss upstream",
                f"identical keys, Δ {_fmt(row['round_trip_delta'])}" if row["saved_same"] else "FAIL",
                "not generative" if row["generate_same"] is None else
                "same tokens" if row["generate_same"] else "tokens differ",
            ]
            cells.append(
                "no" if anatomy is None else
                f"{anatomy['moe_layers']}/{anatomy['layers']} MoE layers, Δ {_fmt(anatomy['output_delta'])}"
            )
        lines.append(f"| {patch.family} | " + " | ".join(cells) + f" | {_verdict(row)} | {_verdict(grow)} |")
    lines += ["", "## Supported models", "", supported_models_markdown(), "## Upstream quirks, reproduced", ""]
    for patch in model_patches():
        for quirk in patch.quirks:
            lines.append(f"- **{patch.family}**: {quirk}")
    lines += ["", "## Layer anatomy notes", ""]
    for patch in model_patches():
        if patch.anatomy is not None and patch.anatomy.notes:
            lines.append(f"- **{patch.family}**: {patch.anatomy.notes}")
    return "\n".join(lines) + "\n"


def _write(path: Path, run: dict) -> None:
    """``run`` to ``path`` through a temporary file: an interrupted write leaves the stored file whole."""
    write_json(path, run, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU bf16 run even when CUDA is available")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU fp32 run (keep the stored CPU column)")
    parser.add_argument("--no-write", action="store_true", help="print results, write no file")
    parser.add_argument("--missing", action="store_true",
                        help="only the families the stored run of each device lacks, merged into it")
    args = parser.parse_args(argv)
    if args.missing and args.family:
        parser.error("--missing picks the families itself; drop --family")

    devices = ([] if args.no_cpu else ["cpu"]) + (["cuda"] if torch.cuda.is_available() and not args.no_gpu else [])
    runs = {}
    for device in ("cpu", "cuda"):
        path = RESULTS / f"model_compat_{device}.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        if device in devices:
            families = missing_families(stored) if args.missing and stored else args.family
            if args.missing and stored and not families:
                print(f"{device}: every family is in {path.relative_to(ROOT)}")
                runs[device] = stored
                continue
            if args.missing and stored:
                # One family at a time, each merged and written: a run cut short keeps every family it finished.
                for family in families:
                    stored = merge(stored, measure(device, [family]))
                    if not args.no_write:
                        _write(path, stored)
                runs[device] = stored
                continue
            runs[device] = measure(device, families)
            if not args.no_write and not args.family:
                _write(path, runs[device])
        elif stored is not None:
            runs[device] = stored
    if not args.no_write and not args.family:
        write_text(OUTPUT, render(runs))
        print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
