"""Plans for hand-chosen layouts: zebra with a given role split, EP, and speed-balanced data parallelism.

``hetermoe plan`` chooses a layout by simulation; these helpers build the same ``plan.json`` for a layout you
name, which is what the correctness tests and the baselines of ``benchmarks/bench_zebra.py`` need. Every
layout runs on the same engine and the same kernels:

* zebra: local ranks ``0..A-1`` of each ZP group run attention, the others hold the routed experts
  (optionally some experts of some layers on attention ranks: Asym-EA);
* EP: every rank runs attention on an equal batch and holds ``E / world`` experts of every layer;
* DP (speed-balanced): every rank is its own ZP group holding every expert, with a batch proportional to its
  speed (``sequences`` per rank).
"""

from __future__ import annotations

from typing import Any

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.planner.model_dims import ModelDims, model_dims
from hf_hetermoe.planner.plan import Plan
from hf_hetermoe.planner.schedule import build_zebra_schedule


def _moe_layers(dims: ModelDims) -> list[bool]:
    """Which layers route to experts (``ModelDims.is_moe_layer``: the config's per-layer fields, as transformers'
    modeling files read them)."""
    return [dims.is_moe_layer(li) for li in range(dims.num_layers)]


def spread(experts: list[int], ranks: list[int]) -> dict[int, tuple[int, ...]]:
    """Contiguous, as-even-as-possible split of ``experts`` over ``ranks``."""
    out: dict[int, tuple[int, ...]] = {}
    n, start = len(ranks), 0
    for i, r in enumerate(ranks):
        take = len(experts) // n + (1 if i < len(experts) % n else 0)
        if take:
            out[r] = tuple(experts[start:start + take])
        start += take
    return out


def plan_from_layout(
    model: Any,
    zp_groups: list[list[int]],
    attention: list[int],
    placement: list[dict[int, tuple[int, ...]]],
    micro_batches: int,
    sequences_per_attention_rank: int,
    seq_len: int,
    devices: list[str] | None = None,
    sequences: list[int] | None = None,
    notes: list[str] | None = None,
) -> Plan:
    """A :class:`Plan` for an explicit layout (identical ZP groups; local ranks in ``attention`` run attention).

    ``placement[layer]`` maps local rank -> expert ids ({} for a dense layer). ``sequences`` optionally gives
    per-global-rank batch sizes (speed-balanced DP); attention ranks default to ``sequences_per_attention_rank``.
    """
    dims = model_dims(model)
    world = sum(len(g) for g in zp_groups)
    zp_world = len(zp_groups[0])
    if any(len(g) != zp_world for g in zp_groups):
        raise ConfigError(f"ZP groups must have equal sizes, got {[len(g) for g in zp_groups]}")
    if len(placement) != dims.num_layers:
        raise ConfigError(f"placement has {len(placement)} layers; the model has {dims.num_layers}")
    for li, p in enumerate(placement):
        held = sorted(e for ids in p.values() for e in ids)
        if p and held != list(range(dims.num_experts)):
            raise ConfigError(
                f"layer {li}: placement must hold each of the {dims.num_experts} experts exactly once, got {held}"
            )
        if any(not 0 <= r < zp_world for r in p):
            raise ConfigError(f"layer {li}: placement names local ranks {sorted(p)} outside 0..{zp_world - 1}")
    devices = devices or ["cpu"] * world
    if len(devices) != world:
        raise ConfigError(f"devices lists {len(devices)} entries for a world of {world}")
    sched = build_zebra_schedule(dims.num_layers, micro_batches, attention, placement, zp_world)
    ranks = []
    for gi, grp in enumerate(zp_groups):
        for li, g in enumerate(grp):
            entry = {"rank": g, "node": "node0", "device": devices[g], "zp_group": gi, "local_rank": li,
                     "role": "attention" if li in attention else "expert"}
            if sequences is not None:
                entry["sequences"] = sequences[g]
            ranks.append(entry)
    ranks.sort(key=lambda r: r["rank"])
    holders = sorted({r for p in placement for r in p})
    process_groups = {
        "dispatch": zp_groups, "combine": zp_groups,
        "attn_dp": [[grp[a] for grp in zp_groups for a in sorted(attention)]],
        "expert_dp": [[grp[h] for grp in zp_groups] for h in holders],
    }
    return Plan(
        world_size=world, micro_batches=micro_batches, sequences_per_attention_rank=sequences_per_attention_rank,
        seq_len=seq_len, model=dims.to_dict(), ranks=ranks, zp_groups=zp_groups, process_groups=process_groups,
        placement=[{str(r): list(e) for r, e in p.items()} for p in placement], schedule=sched.to_dict(),
        notes=list(notes or []),
    )


def zebra_plan(
    model: Any, attention_ranks: int, expert_ranks: int, micro_batches: int = 1, sequences_per_attention_rank: int = 1,
    seq_len: int = 128, asym_ea: dict[int, int] | None = None, zp_groups: int = 1, devices: list[str] | None = None,
) -> Plan:
    """Zebra layout: per ZP group ``attention_ranks`` attention ranks then ``expert_ranks`` expert ranks.

    ``asym_ea`` maps layer -> how many of its experts move onto the attention ranks (round-robin over them),
    taken from the end of the expert range; the rest spread evenly over the expert ranks.
    """
    dims = model_dims(model)
    if attention_ranks < 1 or expert_ranks < 0:
        raise ConfigError(f"need >= 1 attention rank and >= 0 expert ranks, got {attention_ranks}, {expert_ranks}")
    size = attention_ranks + expert_ranks
    groups = [list(range(g * size, (g + 1) * size)) for g in range(zp_groups)]
    attn = list(range(attention_ranks))
    exp_ranks = list(range(attention_ranks, size)) or attn
    placement: list[dict[int, tuple[int, ...]]] = []
    for li, moe in enumerate(_moe_layers(dims)):
        if not moe:
            placement.append({})
            continue
        moved = (asym_ea or {}).get(li, 0)
        if not 0 <= moved <= dims.num_experts:
            raise ConfigError(f"asym_ea[{li}]={moved} must be in 0..{dims.num_experts}")
        keep = list(range(dims.num_experts - moved))
        p = spread(keep, exp_ranks)
        for j, e in enumerate(range(dims.num_experts - moved, dims.num_experts)):
            a = attn[j % len(attn)]
            p[a] = tuple(p.get(a, ())) + (e,)
        placement.append(p)
    return plan_from_layout(model, groups, attn, placement, micro_batches, sequences_per_attention_rank, seq_len,
                            devices, notes=[f"zebra {attention_ranks}+{expert_ranks}, asym_ea={asym_ea or {}}"])


def ep_plan(model: Any, world: int, sequences_per_rank: int = 1, seq_len: int = 128,
            devices: list[str] | None = None) -> Plan:
    """EP baseline: every rank runs attention on an equal batch and holds E/world experts of every MoE layer."""
    dims = model_dims(model)
    placement = [spread(list(range(dims.num_experts)), list(range(world))) if moe else {}
                 for moe in _moe_layers(dims)]
    return plan_from_layout(model, [list(range(world))], list(range(world)), placement, 1, sequences_per_rank,
                            seq_len, devices, notes=[f"EP over {world} ranks"])


def speed_shares(total: int, speeds: list[float]) -> list[int]:
    """Split ``total`` sequences over ranks in proportion to ``speeds``, at least one each (largest remainder):
    the batch of speed-balanced DP."""
    if total < len(speeds) or any(s <= 0 for s in speeds):
        raise ConfigError(f"cannot give {len(speeds)} ranks of speeds {speeds} one of {total} sequences each")
    ideal = [total * s / sum(speeds) for s in speeds]
    shares = [max(1, int(x)) for x in ideal]
    while sum(shares) < total:  # the rank furthest below its ideal share gets the next sequence
        shares[max(range(len(shares)), key=lambda r: ideal[r] - shares[r])] += 1
    while sum(shares) > total:  # the minimum of one pushed the sum up: take back where furthest above
        shares[min((r for r in range(len(shares)) if shares[r] > 1), key=lambda r: ideal[r] - shares[r])] -= 1
    return shares


def dp_plan(model: Any, sequences: list[int], seq_len: int = 128, devices: list[str] | None = None) -> Plan:
    """Speed-balanced DP baseline: rank ``r`` trains ``sequences[r]`` whole sequences with every expert local."""
    dims = model_dims(model)
    if any(s < 1 for s in sequences):
        raise ConfigError(f"every rank needs >= 1 sequence, got {sequences}")
    placement = [{0: tuple(range(dims.num_experts))} if moe else {} for moe in _moe_layers(dims)]
    groups = [[r] for r in range(len(sequences))]
    return plan_from_layout(model, groups, [0], placement, 1, max(sequences), seq_len, devices, sequences=sequences,
                            notes=[f"speed-balanced DP, sequences per rank {sequences}"])
