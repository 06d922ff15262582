"""Expert placement: speed-proportional base split over expert GPUs, then asymmetric expert assignment
(Asym-EA, HeterMoE Algorithm 1) that moves whole experts of chosen layers onto attention GPUs.

Algorithm 1, as implemented ("gather and squeeze"): walk the MoE layers in order; each attention GPU
*gathers* the idle time (bubble) it would have in the layer -- the slowest expert GPU's work minus its own --
into a credit; while some attention GPU's credit covers ``squeeze`` times the cost of running one more expert
of this layer, *squeeze* one expert from the busiest expert GPU of this layer onto it and charge the credit.
Since zebra overlaps neighbouring layers by up to R micro-batches, bubble gathered over several layers can pay
for a whole expert in one layer, which a per-layer rule (moving a fraction of an expert) cannot do.

Generalised past the paper: any M attention and N expert GPUs (no divisibility needed: moves are per GPU), GPU
kinds of any number and speed (the base split is proportional to each GPU's measured expert speed), and memory
bounds: ``n_max[g]``, the experts an attention GPU can hold on top of its attention state, and ``n_min``, the
experts that *must* leave the expert GPUs because they cannot hold them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hf_hetermoe.errors import ConfigError

from .cost import CostModel, MemoryError_, ZPLayout

GiB = 2**30


@dataclass
class AsymEAReport:
    """What Algorithm 1 did."""

    moved: list[dict[int, int]] = field(default_factory=list)  # per layer: attention local rank -> experts moved
    n_max: dict[int, int] = field(default_factory=dict)  # attention local rank -> expert capacity
    n_min: int = 0  # experts that had to leave the expert GPUs for memory
    credit_left: dict[int, float] = field(default_factory=dict)  # ms of bubble not used

    @property
    def total_moved(self) -> int:
        return sum(sum(m.values()) for m in self.moved)


def _apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Integers summing to ``total``, proportional to ``weights`` (largest remainder), each <= its cap."""
    if total > sum(caps):
        raise ConfigError(f"cannot place {total} experts within per-GPU capacities {caps}")
    out = [0] * len(weights)
    left = total
    active = [i for i in range(len(weights)) if caps[i] > 0]
    while left > 0:
        wsum = sum(weights[i] for i in active)
        quota = {i: left * weights[i] / wsum for i in active}
        add = {i: min(int(quota[i]), caps[i] - out[i]) for i in active}
        if sum(add.values()) == 0:
            i = max(active, key=lambda i: (quota[i] - int(quota[i]), -i))
            add[i] = 1
        for i, a in add.items():
            out[i] += a
        left -= sum(add.values())
        active = [i for i in active if out[i] < caps[i]]
    return out


def expert_capacity(cost: CostModel, lay: ZPLayout, local: int) -> int:
    """Experts (over all layers) local rank ``local`` can hold beyond its attention state and activations."""
    empty = replace(lay, placement=[{} for _ in lay.placement])
    used = cost.memory_bytes(empty, local)["total"]
    d, tr = cost.dims, cost.cluster.training
    per_token = d.hidden_size * tr.dtype_bytes if tr.activation_checkpointing else \
        cost.profile(lay.ranks[local]).expert_act_bytes_per_token
    per_expert = d.expert_params * tr.bytes_per_param + cost.tokens_per_expert(lay) * lay.micro_batches * per_token
    free = cost.memory_capacity(lay.ranks[local]) - used
    return max(int(free // per_expert), 0)


def base_placement(cost: CostModel, lay: ZPLayout, expert_ranks: list[int]) -> tuple[list[dict], int]:
    """Experts of every MoE layer split over ``expert_ranks`` (local) in proportion to their expert speed,
    within memory. Returns the placement and ``n_min`` (experts that did not fit and must go elsewhere)."""
    d = cost.dims
    moe_layers = [li for li in range(d.num_layers) if d.is_moe_layer(li)]
    tok = cost.tokens_per_expert(lay)
    speed = [1.0 / (cost.profile(lay.ranks[j]).expert_ms(tok) + cost.profile(lay.ranks[j]).expert_ms(tok, True))
             for j in expert_ranks]
    total_cap = [expert_capacity(cost, lay, j) for j in expert_ranks]
    placement: list[dict[int, tuple[int, ...]]] = [{} for _ in range(d.num_layers)]
    n_min = 0
    used = [0] * len(expert_ranks)
    for idx, li in enumerate(moe_layers):
        # Spread each GPU's remaining capacity evenly over the layers still to place.
        layers_left = len(moe_layers) - idx
        caps = [min(d.num_experts, (total_cap[i] - used[i]) // layers_left if layers_left else 0)
                for i in range(len(expert_ranks))]
        want = min(d.num_experts, sum(caps))
        n_min += d.num_experts - want
        counts = _apportion(want, speed, caps)
        eid = 0
        for j, n in zip(expert_ranks, counts):
            if n:
                placement[li][j] = tuple(range(eid, eid + n))
            eid += n
        used = [u + n for u, n in zip(used, counts)]
        # Experts that did not fit stay unassigned here (ids eid..E-1); asym_ea must place them.
        if eid < d.num_experts:
            placement[li][-1] = tuple(range(eid, d.num_experts))
    return placement, n_min


def layer_work(cost: CostModel, lay: ZPLayout, layer: int, local: int) -> float:
    """ms of compute local rank ``local`` does in ``layer`` over the whole step (all R micro-batches)."""
    g = lay.ranks[local]
    w = cost.expert_ms(lay, g, layer, local, False) + cost.expert_ms(lay, g, layer, local, True)
    if local in lay.attention:
        w += cost.attn_ms(lay, g, layer, False) + cost.attn_ms(lay, g, layer, True)
    return w * lay.micro_batches


def asym_ea(cost: CostModel, lay: ZPLayout, squeeze: float = 1.0) -> tuple[ZPLayout, AsymEAReport]:
    """Algorithm 1 on ``lay`` (whose placement may carry unplaced experts under key -1). Returns a new layout."""
    d = cost.dims
    placement = [{r: tuple(e) for r, e in p.items()} for p in lay.placement]
    work_lay = replace(lay, placement=placement)
    report = AsymEAReport(n_max={a: expert_capacity(cost, lay, a) for a in lay.attention},
                          n_min=sum(len(p.get(-1, ())) for p in placement))
    if report.n_min > sum(report.n_max.values()):
        raise MemoryError_(
            f"{report.n_min} experts do not fit on the expert GPUs and the attention GPUs can take only "
            f"{sum(report.n_max.values())} (n_min={report.n_min} > sum n_max={sum(report.n_max.values())}): short "
            f"by {report.n_min - sum(report.n_max.values())} experts of {d.expert_params * 2 / 2**20:.0f} MiB "
            "weights each; add GPUs, enable activation checkpointing or lower the batch"
        )
    held = dict.fromkeys(lay.attention, 0)
    credit = dict.fromkeys(lay.attention, 0.0)
    expert_ranks = [r for r in range(len(lay.ranks)) if r not in lay.attention]
    for li in range(d.num_layers):
        moved: dict[int, int] = {}
        if not placement[li]:
            report.moved.append(moved)
            continue
        one = {a: lay.micro_batches * (cost.profile(lay.ranks[a]).expert_ms(cost.tokens_per_expert(lay))
                                       + cost.profile(lay.ranks[a]).expert_ms(cost.tokens_per_expert(lay), True))
               for a in lay.attention}
        def bubble(a: int) -> float:  # attention rank a's idle time in this layer under the current placement
            slowest = max((layer_work(cost, work_lay, li, j) for j in expert_ranks), default=0.0)
            return slowest - layer_work(cost, work_lay, li, a)

        while True:
            room = [a for a in lay.attention if held[a] < report.n_max[a]]
            if not room:
                break
            a = max(room, key=lambda x: (credit[x] + bubble(x), -x))
            unplaced = placement[li].get(-1, ())
            donors = [j for j in expert_ranks if placement[li].get(j)]
            if not unplaced and (not donors or credit[a] + bubble(a) < squeeze * one[a]):
                break
            if unplaced:  # memory forces it (n_min), whatever the bubble
                eid, placement[li][-1] = unplaced[-1], unplaced[:-1]
                if not placement[li][-1]:
                    del placement[li][-1]
            else:
                j = max(donors, key=lambda x: (layer_work(cost, work_lay, li, x), x))
                eid, placement[li][j] = placement[li][j][-1], placement[li][j][:-1]
                if not placement[li][j]:
                    del placement[li][j]
            placement[li][a] = tuple(sorted(placement[li].get(a, ()) + (eid,)))
            held[a] += 1
            moved[a] = moved.get(a, 0) + 1
        # Gather: what is left of this layer's bubble (negative after an over-full squeeze) carries on.
        for a in lay.attention:
            credit[a] += bubble(a)
        if placement[li].get(-1):
            raise MemoryError_(f"layer {li}: {len(placement[li][-1])} experts have no GPU with room (n_max reached)")
        report.moved.append(moved)
    report.credit_left = credit
    return work_lay, report
