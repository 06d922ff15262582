"""``hetermoe simulate``: simulate one step of zebra (fixed R, with or without Asym-EA) and the baselines,
and write the Chrome trace and PNG timeline of each."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from hf_hetermoe.errors import HeterMoEError
from hf_hetermoe.files import write_json

from .plan import add_model_cluster_args


def simulate_command_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("simulate", help="simulate a training step: zebra vs EP, DP and DistEP")
    add_model_cluster_args(parser)
    parser.add_argument("--micro-batches", "-R", type=int, default=None, help="fix R (default: planner's best)")
    parser.add_argument("--no-asym-ea", action="store_true", help="zebra without asymmetric expert assignment")
    parser.add_argument("--out", default="hetermoe_sim", help="output directory for traces and PNGs")
    parser.set_defaults(func=simulate_command)
    return parser


def simulate_command(args: argparse.Namespace) -> int:
    from hf_hetermoe.planner import CostModel, model_dims, preset_profiles
    from hf_hetermoe.planner.planner import _best, candidates, ep_layout, refine_asym
    from hf_hetermoe.planner.simulator import simulate_data_parallel, simulate_layout
    from hf_hetermoe.planner.trace import write_chrome_trace, write_timeline_png

    from .plan import load_inputs

    try:
        model, cluster, profiles = load_inputs(args)
        dims = model_dims(model)
        if profiles is None:
            profiles = preset_profiles(cluster.kinds(), dims, cluster.training.seq_len)
            print("note: no --profiles: using built-in published-ratio presets (estimates)")
        profiles.check_against(cluster.kinds(), dims, cluster.training.seq_len)
        cost = CostModel(dims, cluster, profiles)
        cands = [c for c in candidates(cost, asym=not args.no_asym_ea)
                 if (args.micro_batches is None or c.layout.micro_batches == args.micro_batches)
                 and (not args.no_asym_ea or c.report is None)]
        best = _best(cands)
        if best is not None and best.report is not None:
            best = refine_asym(cost, best)
        if best is None:
            print(f"hetermoe simulate: error: no fitting zebra layout with R={args.micro_batches}")
            return 2
        name = "zebra" if args.no_asym_ea else "zebra+Asym-EA"
        results = {name: replace(best.result, method=f"{name} R={best.layout.micro_batches}"),
                   "EP": simulate_layout(cost, ep_layout(cost), "EP"),
                   "DP (speed-balanced)": simulate_data_parallel(cost)}
    except HeterMoEError as err:
        print(f"hetermoe simulate: error: {err}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = results[name].step_ms
    for key, res in results.items():
        util = res.utilisation()
        mean_util = sum(util.values()) / len(util)
        print(f"{res.method:<24} step {res.step_ms:9.2f} ms  {res.tokens_per_s:11.0f} tok/s  "
              f"mean util {mean_util:6.1%}  vs zebra {res.step_ms / ref:5.2f}x"
              + ("" if res.fits else "  (DOES NOT FIT)") + ("  [EMULATED]" if res.emulated else ""))
        stem = key.split()[0].lower().replace("+", "_")
        write_chrome_trace(res, out / f"{stem}_trace.json")
        write_timeline_png(res, out / f"{stem}_timeline.png")
    write_json(out / "summary.json", {k: v.summary() for k, v in results.items()}, indent=1)
    print(f"wrote traces and timelines to {out}/")
    return 0
