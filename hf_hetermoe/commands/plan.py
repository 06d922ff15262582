"""``hetermoe plan``: choose roles, R and expert placement for a model on a cluster; write plan.json,
a Chrome trace and a PNG timeline of the simulated step."""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_hetermoe.errors import HeterMoEError
from hf_hetermoe.files import write_json


def add_model_cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="config.json, a checkpoint directory, or a JSON of dims")
    parser.add_argument("--cluster", required=True, help="cluster.yaml (see examples/cluster.yaml)")
    parser.add_argument("--profiles", default=None,
                        help="profiles.json from `hetermoe profile`; default: built-in published-ratio presets")


def plan_command_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plan", help="plan HeterMoE roles, micro-batches and expert placement")
    add_model_cluster_args(parser)
    parser.add_argument("--out", default="hetermoe_plan", help="output directory (plan.json, trace.json, png)")
    parser.add_argument("--print-schedule", action="store_true", help="also print the per-rank action lists")
    parser.add_argument("--feedback", default=None, metavar="STEP_JSON",
                        help="a measured step of an earlier plan (hf_hetermoe.planner.feedback.save_measurement): "
                             "scale each GPU kind's profile to match it, then plan")
    parser.set_defaults(func=plan_command)
    return parser


def load_inputs(args: argparse.Namespace):
    from hf_hetermoe.planner import ClusterConfig, ProfileSet

    cluster = ClusterConfig.load(args.cluster)
    profiles = ProfileSet.load(args.profiles) if args.profiles else None
    return args.model, cluster, profiles


def write_outputs(result, out: Path) -> list[Path]:
    from hf_hetermoe.planner.trace import write_chrome_trace, write_timeline_png

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "plan.json", out / "trace.json", out / "timeline.png"]
    result.plan.save(paths[0])
    write_chrome_trace(result.best, paths[1])
    try:
        write_timeline_png(result.best, paths[2])
    except ImportError:
        print("note: no timeline PNG: matplotlib is not installed (pip install 'hf-hetermoe[bench]')")
        paths.pop()
    write_json(out / "summary.json", {k: v.summary() for k, v in result.results.items()}, indent=1)
    return paths


def plan_command(args: argparse.Namespace) -> int:
    from hf_hetermoe.planner import format_plan, format_schedule, make_plan

    try:
        model, cluster, profiles = load_inputs(args)
        if args.feedback:
            from hf_hetermoe.planner.feedback import describe, fitted_profiles

            profiles, factors = fitted_profiles(model, cluster, profiles, args.feedback)
            print(f"profiles fitted to the measured step in {args.feedback}: {describe(factors)}")
        result = make_plan(model, cluster, profiles)
    except HeterMoEError as err:
        print(f"hetermoe plan: error: {err}")
        return 2
    print(format_plan(result))
    if args.print_schedule:
        print(format_schedule(result.plan.get_schedule()))
    for path in write_outputs(result, Path(args.out)):
        print(f"wrote {path}")
    return 0
