"""The planner: choose attention/expert roles, ZP groups, R and the expert placement by simulating candidates,
check memory, and produce a :class:`Plan` plus the simulated baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from hf_hetermoe.errors import ConfigError

from .asym_ea import AsymEAReport, asym_ea, base_placement, layer_work
from .cluster import ClusterConfig
from .cost import CostModel, MemoryError_, ZPLayout
from .model_dims import ModelDims, model_dims
from .plan import Plan
from .presets import preset_profiles
from .profiles import ProfileSet
from .schedule import LOCAL_EXPERT_ORDERS
from .simulator import SimResult, schedule_for, simulate_data_parallel, simulate_layout

SQUEEZES = (0.5, 1.0, 1.5)


@dataclass
class Candidate:
    layout: ZPLayout
    result: SimResult
    report: AsymEAReport | None = None


@dataclass
class PlanResult:
    """The chosen plan, its simulation, and every baseline."""

    plan: Plan
    best: SimResult
    results: dict[str, SimResult] = field(default_factory=dict)  # method -> result, baselines included
    layout: ZPLayout | None = None


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _attention_affinity(cost: CostModel, kind: str, tokens: float) -> float:
    """How much better ``kind`` is at attention than at experts: lower = give it attention."""
    prof = cost.profiles[kind]
    attn = prof.attn_ms(cost.seq_len) + prof.attn_ms(cost.seq_len, True)
    exp = prof.expert_ms(tokens) + prof.expert_ms(tokens, True)
    return attn / exp


def role_splits(cost: CostModel) -> list[tuple[list[int], list[int]]]:
    """Candidate (attention ranks, expert ranks): the kinds with the best attention affinity go to attention.
    A single-kind cluster is split in halves and quarters (zebra still overlaps; there is no heterogeneity)."""
    ranks = cost.cluster.ranks()
    kinds = cost.cluster.kinds()
    tok = cost.seq_len * cost.dims.routed_top_k / cost.dims.num_experts
    order = sorted(kinds, key=lambda k: _attention_affinity(cost, k, tok))
    by_kind = {k: [r for r, _, g in ranks if g.kind == k] for k in kinds}
    splits = []
    if len(kinds) == 1:
        world = len(ranks)
        for m in sorted({world // 2, world // 4} - {0}):
            splits.append((list(range(m)), list(range(m, world))))
        return splits
    for j in range(1, len(order)):
        attn = sorted(r for k in order[:j] for r in by_kind[k])
        splits.append((attn, sorted(set(range(len(ranks))) - set(attn))))
    return splits


def _groups(cost: CostModel, attn: list[int], experts: list[int], g: int) -> list[list[int]] | None:
    """Split ranks into ``g`` identical ZP groups (same kinds at the same local positions), or None."""
    kinds = cost.kind_of
    out: list[list[int]] = [[] for _ in range(g)]
    for side in (attn, experts):
        for kind in dict.fromkeys(kinds[r] for r in side):
            members = [r for r in side if kinds[r] == kind]
            if len(members) % g:
                return None
            per = len(members) // g
            for i in range(g):
                out[i].extend(members[i * per:(i + 1) * per])
    return out


def candidates(cost: CostModel, asym: bool = True, errors: list[Exception] | None = None) -> list[Candidate]:
    """Every (roles, G, R, placement) the planner considers, simulated; memory failures go to ``errors``."""
    tr = cost.cluster.training
    out: list[Candidate] = []
    for attn, experts in role_splits(cost):
        for g in _divisors(math.gcd(len(attn), len(experts)), len(attn)):
            groups = _groups(cost, attn, experts, g)
            if groups is None:
                continue
            m = len(attn) // g
            if tr.global_batch_sequences % (g * m):
                continue
            seqs = tr.global_batch_sequences // (g * m)
            for r in _divisors(seqs, tr.max_micro_batches):
                lay = ZPLayout(groups, list(range(m)), [{} for _ in range(cost.dims.num_layers)], r, seqs)
                placement, n_min = base_placement(cost, lay, list(range(m, len(groups[0]))))
                lay = replace(lay, placement=placement)
                if n_min == 0:
                    out.append(Candidate(lay, simulate_layout(cost, lay, f"zebra R={r}")))
                if not asym:
                    continue
                for s in SQUEEZES:
                    try:
                        lay2, rep = asym_ea(cost, lay, squeeze=s)
                    except MemoryError_ as err:
                        if errors is not None:
                            errors.append(err)
                        continue
                    for order in LOCAL_EXPERT_ORDERS[:2]:  # "layer", "step": the delay that fits R best
                        lay3 = replace(lay2, local_experts=order)
                        out.append(Candidate(lay3, simulate_layout(cost, lay3, f"zebra+Asym-EA R={r}"), rep))
    return out


def _one_round(cost: CostModel, lay: ZPLayout, layer: int, room: dict[int, int]) -> tuple[ZPLayout, dict[int, int]]:
    """Each attention rank with ``room`` takes one expert of ``layer`` from that layer's busiest expert rank."""
    placement = [dict(p) for p in lay.placement]
    new = replace(lay, placement=placement)
    p = placement[layer]
    expert_ranks = [r for r in range(len(lay.ranks)) if r not in lay.attention]
    moved: dict[int, int] = {}
    for a in lay.attention:
        donors = [j for j in expert_ranks if p.get(j)]
        if room.get(a, 0) <= 0 or not donors:
            continue
        j = max(donors, key=lambda x: (layer_work(cost, new, layer, x), x))
        eid, p[j] = p[j][-1], p[j][:-1]
        if not p[j]:
            del p[j]
        p[a] = tuple(sorted(p.get(a, ()) + (eid,)))
        moved[a] = 1
    return new, moved


def refine_asym(cost: CostModel, cand: Candidate, max_sims: int = 48) -> Candidate:
    """Past Algorithm 1: add rounds of moves (one more expert per attention rank with room) to the MoE layers
    that hold the fewest moved experts -- all of them at once, or the one that helps most -- while the simulated
    step improves, memory (``n_max``) allows, and at most ``max_sims`` simulations. Algorithm 1's bubble is
    per-layer work; the simulated schedule also leaves attention ranks idle during all-to-alls and pipeline
    fill, which only the simulation sees."""
    if cand.report is None:
        return cand
    rep = AsymEAReport([dict(m) for m in cand.report.moved], dict(cand.report.n_max), cand.report.n_min,
                       dict(cand.report.credit_left))
    best, method, sims = cand, cand.result.method, 0
    held = {a: sum(len(p.get(a, ())) for p in cand.layout.placement) for a in cand.layout.attention}
    moe = [li for li, p in enumerate(cand.layout.placement) if p]
    while moe and sims < max_sims:
        counts = {li: sum(rep.moved[li].values()) for li in moe}
        low = [li for li in moe if counts[li] == min(counts.values())]
        trials = []
        for layers in ([low] if len(low) > 1 else []) + [[li] for li in low]:
            if sims >= max_sims:
                break
            lay, moves = best.layout, {}
            room = {a: rep.n_max.get(a, 0) - held[a] for a in held}
            for li in layers:
                lay, moved = _one_round(cost, lay, li, room)
                for a in moved:
                    room[a] -= 1
                if moved:
                    moves[li] = moved
            if moves:
                sims += 1
                trials.append((simulate_layout(cost, lay, method), len(trials), lay, moves))
        if not trials:
            break
        res, _, lay, moves = min(trials, key=lambda t: (t[0].step_ms, t[1]))
        if not res.fits or res.step_ms >= best.result.step_ms * (1 - 1e-6):
            break
        for li, moved in moves.items():
            for a, n in moved.items():
                held[a] += n
                rep.moved[li][a] = rep.moved[li].get(a, 0) + n
        best = Candidate(lay, res, rep)
    return best


def _best(cands: list[Candidate]) -> Candidate | None:
    fitting = [c for c in cands if c.result.fits]
    return min(fitting, key=lambda c: c.result.step_ms) if fitting else None


def ep_layout(cost: CostModel) -> ZPLayout:
    """EP baseline: every GPU runs attention on an equal batch and holds E/ep experts of every layer."""
    world, e = cost.cluster.world_size, cost.dims.num_experts
    ep = max(d for d in range(1, world + 1) if world % d == 0 and e % d == 0)
    groups = [list(range(i * ep, (i + 1) * ep)) for i in range(world // ep)]
    per = e // ep
    placement = [{} if not cost.dims.is_moe_layer(li) else {r: tuple(range(r * per, (r + 1) * per))
                                                                  for r in range(ep)}
                 for li in range(cost.dims.num_layers)]
    seqs = math.ceil(cost.cluster.training.global_batch_sequences / world)
    return ZPLayout(groups, list(range(ep)), placement, 1, seqs)


def make_plan(model: Any, cluster: ClusterConfig, profiles: ProfileSet | None = None) -> PlanResult:
    """Plan ``model`` (config object, dict, path or :class:`ModelDims`) on ``cluster``."""
    dims: ModelDims = model_dims(model)
    notes: list[str] = []
    if profiles is None:
        profiles = preset_profiles(cluster.kinds(), dims, cluster.training.seq_len)
        notes.append("no --profiles: costs are estimates from built-in published-ratio presets, not measurements")
    profiles.check_against(cluster.kinds(), dims, cluster.training.seq_len)
    cost = CostModel(dims, cluster, profiles)
    errors: list[Exception] = []
    cands = candidates(cost, errors=errors)
    if not cands and errors:
        raise errors[0]
    asym = _best([c for c in cands if c.report is not None])
    if asym is not None:
        cands.append(refine_asym(cost, asym))
    if not cands:
        raise ConfigError(
            f"no ZP layout fits training.global_batch_sequences={cluster.training.global_batch_sequences}: it must "
            "be a multiple of the number of attention GPUs; change the batch or the cluster"
        )
    chosen = _best(cands)
    if chosen is None:
        worst = min(cands, key=lambda c: c.result.step_ms)
        raise MemoryError_(f"no layout fits in memory. Closest: {worst.result.note}")
    results: dict[str, SimResult] = {}
    plain = _best([c for c in cands if c.report is None])
    if plain is not None:
        results["zebra (no Asym-EA)"] = plain.result
    dist = [c for c in cands if c.report is None and c.layout.micro_batches == 1
            and c.layout.groups == chosen.layout.groups]
    if dist:
        results["DistEP"] = replace(dist[0].result, method="DistEP")
    ep = simulate_layout(cost, ep_layout(cost), "EP")
    results["EP"] = ep
    results["DP (speed-balanced)"] = simulate_data_parallel(cost)
    results["HeterMoE (chosen)"] = chosen.result
    if any(p.emulated for p in profiles.devices.values()):
        notes.append("some GPUs are EMULATED older GPUs (hetermoe.emulate): figures are for emulated devices")
    notes.append("assumes balanced routing, k copies per routed token, no compute/communication interference")
    for name, res in results.items():
        if res.fits and res.step_ms < chosen.result.step_ms and name != "zebra (no Asym-EA)":
            notes.append(f"{name} is faster than zebra here ({res.step_ms:.1f} vs {chosen.result.step_ms:.1f} ms): "
                         "attention is too small a share of the step to pay for disaggregation; train with it")
    plan = build_plan(cost, chosen, results, profiles, notes)
    return PlanResult(plan, chosen.result, results, chosen.layout)


def build_plan(cost: CostModel, chosen: Candidate, results: dict[str, SimResult], profiles: ProfileSet,
               notes: list[str]) -> Plan:
    lay = chosen.layout
    sched = schedule_for(cost, lay)
    local_of = {g: (gi, li) for gi, grp in enumerate(lay.groups) for li, g in enumerate(grp)}
    ranks = []
    for rank, node, group in cost.cluster.ranks():
        gi, li = local_of[rank]
        ranks.append({"rank": rank, "node": node, "device": group.kind, "zp_group": gi, "local_rank": li,
                      "role": "attention" if li in lay.attention else "expert"})
    holders = sorted({r for p in lay.placement for r in p})
    process_groups = {
        "dispatch": lay.groups, "combine": lay.groups,
        "attn_dp": [[grp[a] for grp in lay.groups for a in lay.attention]],
        "expert_dp": [[grp[h] for grp in lay.groups] for h in holders],
    }
    rep = chosen.report
    return Plan(
        world_size=cost.cluster.world_size, micro_batches=lay.micro_batches,
        sequences_per_attention_rank=lay.sequences_per_attention_rank, seq_len=cost.seq_len,
        model=cost.dims.to_dict(), ranks=ranks, zp_groups=lay.groups, process_groups=process_groups,
        placement=[{str(r): list(e) for r, e in p.items()} for p in lay.placement],
        schedule=sched.to_dict(), expected=chosen.result.summary(),
        baselines={k: v.summary() for k, v in results.items() if k != "HeterMoE (chosen)"},
        asym_ea={} if rep is None else {"moved": [{str(a): n for a, n in m.items()} for m in rep.moved],
                                        "n_max": {str(a): n for a, n in rep.n_max.items()}, "n_min": rep.n_min},
        profiles={k: ("emulated, " if p.emulated else "") + p.source for k, p in profiles.devices.items()},
        notes=notes,
    )


def _experts_summary(counts: list[int]) -> str:
    """'8x6, 7x2' style: count x layers, most common first; '-' for none."""
    if not any(counts):
        return "-"
    tally: dict[int, int] = {}
    for c in counts:
        tally[c] = tally.get(c, 0) + 1
    return ", ".join(f"{c}x{n}L" for c, n in sorted(tally.items(), key=lambda kv: (-kv[1], -kv[0])))


def format_plan(result: PlanResult) -> str:
    """The table `hetermoe plan` prints: per GPU, then per method."""
    plan, best = result.plan, result.best
    util = best.utilisation()
    lines = [f"HeterMoE plan: {plan.world_size} GPUs, {len(plan.zp_groups)} ZP group(s), R={plan.micro_batches}, "
             f"{plan.sequences_per_attention_rank} x {plan.seq_len}-token sequences per attention GPU"]
    lines.append(f"{'rank':>4}  {'device':<38} {'role':<9} {'experts/layer':<18} {'util':>6}")
    for r in plan.ranks:
        li = r["local_rank"]
        counts = [len(p.get(str(li), ())) for p in plan.placement]
        lines.append(f"{r['rank']:>4}  {r['device'][:38]:<38} {r['role']:<9} {_experts_summary(counts):<18} "
                     f"{util.get(r['rank'], 0.0):>6.1%}")
    lines.append("")
    lines.append(f"{'method':<22} {'step ms':>10} {'tokens/s':>12} {'HeterMoE speed-up':>18}  note")
    for name, res in result.results.items():
        speed = res.step_ms / best.step_ms if best.step_ms else float("nan")
        note = ("" if res.fits else "DOES NOT FIT: ") + res.note
        lines.append(f"{name:<22} {res.step_ms:>10.2f} {res.tokens_per_s:>12.0f} {speed:>17.2f}x  {note[:90]}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    for kind, src in plan.profiles.items():
        lines.append(f"profile {kind}: {src}")
    return "\n".join(lines)
