"""Close the loop: fit the profiles to a measured step, then plan again.

Preset profiles (and single-FFN profiles from ``hetermoe profile``) mis-cost real steps, and not by the same factor
on every GPU kind: on 1 H200 + 1 emulated V100 the preset plan's simulated busy time was 1.53x short on the H200
and 1.26x on the emulated V100 (benchmarks/NOTES.md), so the plan left too many experts on the H200. A measured
step fixes that: every rank reports its busy time (``StepResult.busy_s``), the simulator replays the same plan,
and each device kind's profile is scaled by the least-squares factor that makes the replay's busy times match
the measured ones. Planning again with the fitted profiles moves experts toward the kind that was over-estimated.

    result = engine.train_step(batch)                      # any step after warm-up
    save_measurement("step.json", plan, result.busy_s, result.seconds)
    hetermoe plan --model M --cluster cluster.yaml --feedback step.json   # plans with fitted profiles
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.files import write_json

from .cost import CostModel, ZPLayout
from .plan import Plan
from .profiles import ProfileSet
from .simulator import simulate_layout

FORMAT = "hetermoe-step-measurement-v1"


def save_measurement(path: str | Path, plan: Plan, busy_s: list[float], step_s: float) -> None:
    """Write one measured step of ``plan`` (per-rank busy seconds, step seconds) for :func:`fit_profiles`."""
    if len(busy_s) != plan.world_size:
        raise ConfigError(f"busy_s has {len(busy_s)} ranks but the plan has {plan.world_size}")
    data = {"format": FORMAT, "plan": plan.to_dict(), "busy_ms": [b * 1e3 for b in busy_s], "step_ms": step_s * 1e3}
    write_json(path, data, indent=1)


def load_measurement(path: str | Path) -> tuple[Plan, list[float], float]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a step measurement (format {data.get('format')!r}, expected {FORMAT!r}); "
                          "write it with hf_hetermoe.planner.feedback.save_measurement")
    return Plan.from_dict(data["plan"]), [float(b) for b in data["busy_ms"]], float(data["step_ms"])


def layout_of(plan: Plan) -> ZPLayout:
    """The simulator's layout of a plan (what the runtime ran)."""
    sched = plan.get_schedule(validate=False)
    return ZPLayout(plan.zp_groups, list(sched.attention_ranks), sched.placement, plan.micro_batches,
                    plan.sequences_per_attention_rank)


def fit_profiles(cost: CostModel, plan: Plan, busy_ms: list[float]) -> tuple[ProfileSet, dict[str, float]]:
    """Profiles of ``cost`` with each device kind scaled so the simulated busy time of ``plan`` matches the
    measured ``busy_ms`` (per global rank) in the least-squares sense. Returns the profiles and the factors."""
    if len(busy_ms) != plan.world_size or plan.world_size != len(cost.kind_of):
        raise ConfigError(f"the measurement has {len(busy_ms)} ranks, the plan {plan.world_size}, the cluster "
                          f"{len(cost.kind_of)}: measure the plan you are re-planning")
    sim = simulate_layout(cost, layout_of(plan), "replay")
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for rank, simulated in sim.busy_ms.items():
        kind = cost.kind_of[rank]
        num[kind] = num.get(kind, 0.0) + busy_ms[rank] * simulated
        den[kind] = den.get(kind, 0.0) + simulated * simulated
    factors = {k: num[k] / den[k] for k in num if den[k] > 0}
    bad = {k: f for k, f in factors.items() if not f > 0}
    if bad:
        raise ConfigError(f"fitted factors {bad} are not positive: the measurement has no busy time for those GPUs")
    devices = {}
    for kind, prof in cost.profiles.devices.items():
        f = factors.get(kind, 1.0)
        devices[kind] = replace(prof, attn_fwd_ms=prof.attn_fwd_ms * f, attn_bwd_ms=prof.attn_bwd_ms * f,
                                head_ms=prof.head_ms * f, expert_fwd_ms=[t * f for t in prof.expert_fwd_ms],
                                expert_bwd_ms=[t * f for t in prof.expert_bwd_ms],
                                source=f"{prof.source} x{f:.3f} (fitted to a measured step)")
    return ProfileSet(devices=devices, model=cost.profiles.model), factors


def describe(factors: dict[str, Any]) -> str:
    return ", ".join(f"{k}: x{f:.2f}" for k, f in sorted(factors.items()))


def fitted_profiles(model: Any, cluster: Any, profiles: ProfileSet | None,
                    measurement: str | Path) -> tuple[ProfileSet, dict[str, float]]:
    """The profiles ``make_plan`` would use for ``model`` on ``cluster`` (given ones, or presets), fitted to the
    step measured in ``measurement`` (:func:`save_measurement`)."""
    from .model_dims import ModelDims, model_dims
    from .presets import preset_profiles

    dims = model_dims(model)
    plan, busy_ms, _ = load_measurement(measurement)
    if ModelDims.from_dict(plan.model) != dims:
        raise ConfigError(f"{measurement} measured a plan for another model ({plan.model.get('model_type') or 'dims'}"
                          f" {plan.model.get('hidden_size')}x{plan.model.get('num_layers')}): measure this model")
    if plan.seq_len != cluster.training.seq_len:
        raise ConfigError(f"the measured step ran seq_len={plan.seq_len}, the cluster file plans "
                          f"seq_len={cluster.training.seq_len}: measure at the length you plan for")
    if profiles is None:
        profiles = preset_profiles(cluster.kinds(), dims, cluster.training.seq_len)
    profiles.check_against(cluster.kinds(), dims, cluster.training.seq_len)
    return fit_profiles(CostModel(dims, cluster, profiles), plan, busy_ms)
