"""``hetermoe launch``: plan (or read plan.json), then ``accelerate launch`` the training script with the plan.

    hetermoe launch --cluster cluster.yaml --model ./my-moe [accelerate launch options] train.py [script args]
    hetermoe launch --plan plan.json --num_processes 4 train.py

Our options (``--cluster``, ``--model``, ``--profiles``, ``--plan``, ``--plan-out``, ``--feedback STEP_JSON``:
a measured step of an earlier run, see ``hf_hetermoe.planner.feedback``) may appear anywhere before the script;
everything else goes to ``accelerate launch`` unchanged, so multi-node jobs use accelerate's own
``--num_machines``/``--machine_rank``/``--main_process_ip``. Filled in when not given: ``--num_processes`` (the
plan's world size) and, for a multi-process job, ``--multi_gpu`` (on a machine without GPUs accelerate turns that
into its multi-process CPU mode over gloo) with ``--num_machines 1 --mixed_precision no --dynamo_backend no``.
The script reads the plan from ``$HETERMOE_PLAN`` (``hetermoe.distribute(model)`` does); emulation presets
named in the cluster file are applied per rank by ``distribute``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

OURS = ("--cluster", "--model", "--profiles", "--plan", "--plan-out", "--feedback")


def launch_command_parser(subparsers) -> argparse.ArgumentParser:
    # Options are parsed by split_argv (accelerate's own options pass through untouched), so the parser only
    # documents them for `hetermoe --help`; `hetermoe launch ...` is routed to launch_main by the CLI.
    parser = subparsers.add_parser(
        "launch", help="plan and start a zebra training job through accelerate launch",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="[--cluster F --model M [--feedback S] | --plan F] "
                        "[accelerate launch options] script.py [args]")
    parser.set_defaults(func=lambda args: launch_main(args.rest))
    return parser


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take our options out of ``argv`` (up to the script), leave the rest in order."""
    ours: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key, _, value = a.partition("=")
        if key in OURS and not any(x.endswith(".py") for x in rest):
            if not value:
                if i + 1 >= len(argv):
                    raise SystemExit(f"hetermoe launch: {key} needs a value")
                value = argv[i + 1]
                i += 1
            ours[key.lstrip("-").replace("-", "_")] = value
        else:
            rest.append(a)
        i += 1
    return ours, rest


def _has(args: list[str], *flags: str) -> bool:
    script = next((i for i, a in enumerate(args) if a.endswith(".py") or a == "-m"), len(args))
    return any(a.split("=")[0] in flags for a in args[:script])


def accelerate_args(rest: list[str], world: int) -> list[str]:
    """``accelerate launch`` arguments with the plan's process count and, on CPU, the gloo multi-process mode."""
    extra: list[str] = []
    if not _has(rest, "--num_processes"):
        extra += ["--num_processes", str(world)]
    else:
        script = next((i for i, a in enumerate(rest) if a.endswith(".py")), len(rest))
        for i, a in enumerate(rest[:script]):
            given = a.split("=", 1)[1] if a.startswith("--num_processes=") else (
                rest[i + 1] if a == "--num_processes" and i + 1 < len(rest) else None)
            if given is not None and int(given) != world:
                raise SystemExit(f"hetermoe launch: --num_processes {given} but the plan is for {world} processes; "
                                 "drop --num_processes or re-plan for this cluster")
    if world > 1 and not _has(rest, "--multi_gpu", "--cpu", "--use_deepspeed", "--use_fsdp"):
        extra.append("--multi_gpu")
    if not _has(rest, "--num_machines"):
        extra += ["--num_machines", "1"]
    if not _has(rest, "--mixed_precision"):
        extra += ["--mixed_precision", "no"]
    if not _has(rest, "--dynamo_backend"):
        extra += ["--dynamo_backend", "no"]
    return extra + rest


def make_or_load_plan(ours: dict[str, str]):
    from hf_hetermoe.planner import ClusterConfig, ProfileSet, format_plan, make_plan
    from hf_hetermoe.planner.plan import Plan

    if "plan" in ours:
        return Plan.load(ours["plan"]), Path(ours["plan"]).resolve()
    if "cluster" not in ours or "model" not in ours:
        raise SystemExit("hetermoe launch: give --plan plan.json, or --cluster cluster.yaml and --model <config>")
    profiles = ProfileSet.load(ours["profiles"]) if "profiles" in ours else None
    cluster = ClusterConfig.load(ours["cluster"])
    if "feedback" in ours:  # a measured step of an earlier run: fit the profiles to it first
        from hf_hetermoe.planner.feedback import describe, fitted_profiles

        profiles, factors = fitted_profiles(ours["model"], cluster, profiles, ours["feedback"])
        print(f"hetermoe launch: profiles fitted to {ours['feedback']}: {describe(factors)}", flush=True)
    result = make_plan(ours["model"], cluster, profiles)
    print(format_plan(result), flush=True)
    out = Path(ours.get("plan_out", "hetermoe_plan/plan.json")).resolve()
    result.plan.save(out)  # atomically: a plan file is whole or the previous one
    return result.plan, out


def launch_main(argv: list[str]) -> int:
    from hf_hetermoe.errors import HeterMoEError
    from hf_hetermoe.runtime import PLAN_ENV

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    ours, rest = split_argv(list(argv))
    if not any(a.endswith(".py") for a in rest) and "-m" not in rest:
        print("hetermoe launch: error: no training script given (launch [options] train.py [args])", file=sys.stderr)
        return 2
    try:
        plan, path = make_or_load_plan(ours)
    except HeterMoEError as err:
        print(f"hetermoe launch: error: {err}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args(rest, plan.world_size)]
    env = dict(os.environ, **{PLAN_ENV: str(path)})
    import torch

    if not torch.cuda.is_available():  # Accelerator() then picks MULTI_CPU (gloo) for the --multi_gpu processes
        env.setdefault("ACCELERATE_USE_CPU", "true")
    print(f"hetermoe launch: {plan.world_size} processes, plan {path}\n  {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env)
