"""Simulate one training step from profiles: zebra (any R, with or without Asym-EA) and the baselines.

A :class:`SimResult` carries step time, tokens/s, and per-GPU busy time, utilisation and idle time; its
``events`` feed :mod:`.trace` (Chrome trace JSON and PNG timeline). Utilisation counts compute only: a GPU
waiting on a collective is idle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cost import CostModel, MemoryError_, ZPLayout, attention_side_ms
from .engine import Event, run_schedule
from .schedule import Schedule, build_zebra_schedule


@dataclass
class SimResult:
    """One simulated step of one method."""

    method: str
    step_ms: float
    tokens_per_step: int
    busy_ms: dict[int, float]  # global rank -> compute-stream busy time
    events: list[Event] = field(default_factory=list, repr=False)  # local ranks of ZP group 0 (or global)
    rank_of_local: dict[int, int] = field(default_factory=dict)  # event rank -> global rank
    fits: bool = True
    note: str = ""
    emulated: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / (self.step_ms / 1e3) if self.step_ms > 0 else 0.0

    def utilisation(self) -> dict[int, float]:
        return {r: min(b / self.step_ms, 1.0) if self.step_ms else 0.0 for r, b in self.busy_ms.items()}

    def idle_ms(self) -> dict[int, float]:
        return {r: max(self.step_ms - b, 0.0) for r, b in self.busy_ms.items()}

    def summary(self) -> dict[str, Any]:
        util = self.utilisation()
        return {
            "method": self.method, "step_ms": round(self.step_ms, 3), "tokens_per_s": round(self.tokens_per_s, 1),
            "fits": self.fits, "note": self.note, "emulated": self.emulated,
            "utilisation": {str(r): round(u, 4) for r, u in sorted(util.items())},
            "idle_ms": {str(r): round(v, 3) for r, v in sorted(self.idle_ms().items())},
        }


def schedule_for(cost: CostModel, lay: ZPLayout) -> Schedule:
    return build_zebra_schedule(cost.dims.num_layers, lay.micro_batches, lay.attention, lay.placement,
                                len(lay.ranks), lay.local_experts)


def _tokens_per_step(cost: CostModel, lay: ZPLayout) -> int:
    return lay.sequences_per_attention_rank * len(lay.attention) * lay.num_groups * cost.seq_len


def _emulated(cost: CostModel, ranks: list[int]) -> bool:
    return any(cost.profile(r).emulated for r in ranks)


def simulate_layout(cost: CostModel, lay: ZPLayout, method: str) -> SimResult:
    """Run the Theorem-1 schedule of ``lay`` (zebra, DistEP with R=1, or EP with all ranks attention)."""
    sched = schedule_for(cost, lay)
    events = run_schedule(sched, cost.durations(lay))
    step = max(e.end for e in events)
    busy_local = {r: 0.0 for r in range(len(lay.ranks))}
    for e in events:
        if e.stream == "compute":
            busy_local[e.rank] += e.end - e.start
    busy = {grp[local]: busy_local[local] for grp in lay.groups for local in busy_local}
    fits, note = True, ""
    try:
        cost.check_memory(lay)
    except MemoryError_ as err:
        fits, note = False, str(err)
    return SimResult(method, step, _tokens_per_step(cost, lay), busy, events,
                     {i: g for i, g in enumerate(lay.ranks)}, fits, note, _emulated(cost, lay.ranks))


def simulate_data_parallel(cost: CostModel) -> SimResult:
    """Speed-balanced data parallelism: every GPU holds the whole model; sequences go, one by one, to the
    GPU that would finish them soonest (optimal for min-max with per-sequence costs); then one all-reduce."""
    d, tr = cost.dims, cost.cluster.training
    world = cost.cluster.world_size
    s = cost.seq_len
    per_expert = s * d.routed_top_k / d.num_experts

    dense_scale = d.dense_intermediate_size / d.expert_intermediate_size  # a dense MLP as this many experts

    def layer_ms(rank: int, layer: int, backward: bool) -> float:
        prof = cost.profile(rank)
        t = attention_side_ms(d, prof, s, layer, backward)
        if d.is_moe_layer(layer):
            t += d.num_experts * prof.expert_ms(per_expert, backward)
        return t

    per_seq = {r: sum(layer_ms(r, li, False) + layer_ms(r, li, True) for li in range(d.num_layers))
               + cost.profile(r).head_time_ms(s) for r in range(world)}
    count = dict.fromkeys(range(world), 0)
    for _ in range(tr.global_batch_sequences):
        best = min(range(world), key=lambda r: ((count[r] + 1) * per_seq[r], r))
        count[best] += 1
    dense_layers = d.num_layers - d.num_moe_layers
    params = (d.num_layers * d.attention_half_params + d.num_moe_layers * d.num_experts * d.expert_params
              + round(dense_layers * dense_scale * d.expert_params) + d.embedding_params)
    sync = cost.allreduce_ms(params * 2.0, list(range(world)))
    events: list[Event] = []
    from .schedule import Action

    for r in range(world):
        t = 0.0
        for m in range(count[r]):
            for li in range(d.num_layers):
                dur = layer_ms(r, li, False)
                events.append(Event(r, "compute", Action("attn_fwd", li, m), t, t + dur))
                t += dur
            dur = cost.profile(r).head_time_ms(s)
            events.append(Event(r, "compute", Action("head", -1, m), t, t + dur))
            t += dur
            for li in reversed(range(d.num_layers)):
                dur = layer_ms(r, li, True)
                events.append(Event(r, "compute", Action("attn_bwd", li, m), t, t + dur))
                t += dur
    start = max((e.end for e in events), default=0.0)
    for r in range(world):
        events.append(Event(r, "grad", Action("grad_sync", group="dp"), start, start + sync))
    busy = {r: count[r] * per_seq[r] for r in range(world)}
    state = params * tr.bytes_per_param
    fits, note = True, "batch split " + ", ".join(f"r{r}:{c}" for r, c in count.items())
    for r in range(world):
        prof = cost.profile(r)
        act = s * d.num_layers * (prof.act_bytes_per_token_ckpt if tr.activation_checkpointing
                                  else prof.act_bytes_per_token * d.attention_sublayers
                                  + d.routed_top_k * prof.expert_act_bytes_per_token)
        need, cap = state + act, cost.memory_capacity(r)
        if need > cap:
            fits, note = False, (f"rank {r} ({cost.kind_of[r]}) needs {need / 2**30:.1f} GiB for the whole model, "
                                 f"has {cap / 2**30:.1f} GiB")
            break
    return SimResult("DP (speed-balanced)", start + sync, tr.global_batch_sequences * s, busy, events,
                     {r: r for r in range(world)}, fits, note, _emulated(cost, list(range(world))))
