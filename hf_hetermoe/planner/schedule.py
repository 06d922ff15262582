"""The zebra schedule as data: per rank of one ZP group, the ordered list of :class:`Action` s it issues.

Order (HeterMoE Theorem 1): forward breadth-first over micro-batches layer by layer; at the last layer the
forward and backward of micro-batches interleave one-forward-one-backward; then backward breadth-first, layer
by layer in reverse. An attention rank that holds experts (Asym-EA) runs its own expert work of micro-batch m
after its attention on m+1, in the time it waits for the all-to-all of m (``local_experts``). All ranks' lists
are projections of ONE global sequence, so every rank issues the collectives of each process group in the
same order (checked again by :func:`validate_schedule`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hf_hetermoe.errors import HeterMoEError

COMPUTE_KINDS = ("attn_fwd", "expert_fwd", "head", "expert_bwd", "attn_bwd")
A2A_KINDS = {
    "dispatch_fwd": "dispatch", "dispatch_bwd": "dispatch", "combine_fwd": "combine", "combine_bwd": "combine",
}
GRAD_KINDS = ("grad_sync",)
STREAMS = ("compute", "dispatch", "combine", "grad")


class ScheduleError(HeterMoEError, ValueError):
    """A schedule breaks a dependency, a collective order, or deadlocks."""


@dataclass(frozen=True)
class Action:
    """One step of one rank.

    ``kind``: ``attn_fwd``/``attn_bwd`` (attention half of ``layer`` on micro-batch ``mb``), ``expert_fwd``/
    ``expert_bwd`` (this rank's experts of ``layer`` on ``mb``), ``head`` (final norm + LM head + loss,
    forward and backward, on ``mb``), ``dispatch_fwd``/``dispatch_bwd`` (all-to-all attention -> expert
    holders: token states forward, output gradients backward), ``combine_fwd``/``combine_bwd`` (all-to-all
    expert holders -> attention: expert outputs forward, input gradients backward), ``grad_sync`` (all-reduce
    of ``group``'s gradients at the end of the step). ``group``: process group / stream (``dispatch``,
    ``combine``, ``attn_dp``, ``expert_dp``); ``send_to``/``recv_from``: local ranks this rank exchanges
    data with in the collective (empty = takes part with zero-size buffers).
    """

    kind: str
    layer: int = -1
    mb: int = -1
    group: str = ""
    send_to: tuple[int, ...] = ()
    recv_from: tuple[int, ...] = ()

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.layer, self.mb)

    @property
    def stream(self) -> str:
        if self.kind in A2A_KINDS:
            return A2A_KINDS[self.kind]
        return "grad" if self.kind in GRAD_KINDS else "compute"

    @property
    def is_collective(self) -> bool:
        return self.stream != "compute"

    def label(self) -> str:
        where = f"L{self.layer}" if self.layer >= 0 else ""
        return f"{self.kind}({where}{',' if where and self.mb >= 0 else ''}{f'm{self.mb}' if self.mb >= 0 else ''})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        for name in ("layer", "mb"):
            if getattr(self, name) >= 0:
                d[name] = getattr(self, name)
        if self.group:
            d["group"] = self.group
        if self.send_to:
            d["send_to"] = list(self.send_to)
        if self.recv_from:
            d["recv_from"] = list(self.recv_from)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Action:
        return cls(d["kind"], d.get("layer", -1), d.get("mb", -1), d.get("group", ""),
                   tuple(d.get("send_to", ())), tuple(d.get("recv_from", ())))


@dataclass
class Schedule:
    """Per-rank action lists of one ZP group (local ranks ``0..world-1``) for one training step."""

    num_layers: int
    num_micro_batches: int
    attention_ranks: tuple[int, ...]
    # placement[li][rank] = expert ids of layer li on that local rank; an empty layer dict is a dense layer.
    placement: list[dict[int, tuple[int, ...]]]
    actions: dict[int, list[Action]] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return len(self.actions)

    def is_moe(self, layer: int) -> bool:
        return bool(self.placement[layer])

    def holds(self, rank: int, layer: int) -> bool:
        return bool(self.placement[layer].get(rank))

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_micro_batches": self.num_micro_batches,
            "attention_ranks": list(self.attention_ranks),
            "placement": [{str(r): list(e) for r, e in p.items()} for p in self.placement],
            "actions": {str(r): [a.to_dict() for a in acts] for r, acts in self.actions.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(
            d["num_layers"], d["num_micro_batches"], tuple(d["attention_ranks"]),
            [{int(r): tuple(e) for r, e in p.items()} for p in d["placement"]],
            {int(r): [Action.from_dict(a) for a in acts] for r, acts in d["actions"].items()},
        )


Key = tuple[str, int, int]
LOCAL_EXPERT_ORDERS = ("layer", "step", "none")


def _steps(num_layers: int, r: int, is_moe: list[bool]) -> Iterator[tuple[list[Key], list[Key]]]:
    """Theorem-1 order as (attention part, expert part) steps: an attention-side compute action with the
    all-to-all it feeds, then the expert compute and the all-to-all back that answer it."""
    last = num_layers - 1

    def fwd(li: int, m: int) -> tuple[list[Key], list[Key]]:
        if not is_moe[li]:
            return [("attn_fwd", li, m)], []
        return [("attn_fwd", li, m), ("dispatch_fwd", li, m)], [("expert_fwd", li, m), ("combine_fwd", li, m)]

    def bwd(head_or_attn: Key, li: int, m: int) -> tuple[list[Key], list[Key]]:
        # The gradient that `head_or_attn` produces feeds the experts of layer `li` (the layer below).
        if li < 0 or not is_moe[li]:
            return [head_or_attn], []
        return [head_or_attn, ("dispatch_bwd", li, m)], [("expert_bwd", li, m), ("combine_bwd", li, m)]

    for li in range(last):
        for m in range(r):
            yield fwd(li, m)
    # Last layer: one forward, one backward (the backward lags one micro-batch so its inputs are ready).
    for m in range(r):
        yield fwd(last, m)
        if m > 0:
            yield bwd(("head", -1, m - 1), last, m - 1)
    yield bwd(("head", -1, r - 1), last, r - 1)
    for li in range(last, -1, -1):
        for m in range(r):
            yield bwd(("attn_bwd", li, m), li - 1, m)


def _global_order(sched: Schedule, local_experts: str) -> Iterator[Key]:
    """The one global sequence of (kind, layer, mb) every rank's list is filtered from.

    Theorem-1 steps (:func:`_steps`); ``local_experts`` says when a step's expert part is issued:

    - ``"none"``: right after its own attention part (plain Theorem-1 order);
    - ``"layer"``: after the attention part of the NEXT micro-batch of the same layer and direction:
      ``attn_fwd(l, m), dispatch_fwd(l, m), attn_fwd(l, m+1), dispatch_fwd(l, m+1), expert_fwd(l, m),
      combine_fwd(l, m), ...``; the last micro-batch of a layer is not delayed;
    - ``"step"``: after the next step's attention part, whatever it is, unless that attention part needs it.

    Every expert-only rank sees the same order on each of its streams under all three (its collectives are
    only issued earlier relative to its compute): only an attention rank that holds experts (Asym-EA, EP)
    changes, running its own experts of micro-batch m while the all-to-all of m is under way instead of
    waiting for it in front of attention on m+1. A runtime therefore keeps all-to-all buffers per
    (layer, micro-batch), as expert ranks already need. The best choice depends on R (a
    delay across a layer boundary puts a combine on the next layer's path when R is small), so the planner
    simulates both delays.
    """
    if local_experts not in LOCAL_EXPERT_ORDERS:
        raise ScheduleError(f"local_experts={local_experts!r}; allowed: {LOCAL_EXPERT_ORDERS}")
    probe = sched.attention_ranks[0]
    pending: list[Key] = []  # expert part of the previous step, not yet issued
    for attn_part, expert_part in _steps(sched.num_layers, sched.num_micro_batches,
                                         [sched.is_moe(li) for li in range(sched.num_layers)]):
        if pending:
            needed = any(dep in pending for key in attn_part for dep in dependencies(sched, probe, Action(*key)))
            same = bool(expert_part) and expert_part[0][:2] == pending[0][:2]  # same kind and layer
            if needed or local_experts == "none" or (local_experts == "layer" and not same):
                yield from pending
                pending = []
        yield from attn_part
        yield from pending
        pending = expert_part
    yield from pending


def build_zebra_schedule(
    num_layers: int,
    num_micro_batches: int,
    attention_ranks: tuple[int, ...] | list[int],
    placement: list[dict[int, tuple[int, ...]]],
    world: int,
    local_experts: str = "layer",
) -> Schedule:
    """Build the Theorem-1 schedule of one ZP group of ``world`` local ranks.

    ``placement[li]`` maps local rank -> expert ids of layer ``li`` it holds (attention ranks may hold some:
    Asym-EA); a layer with an empty dict is dense (no dispatch/combine). EP is the special case where every
    rank is an attention rank and holds E/world experts; DistEP is ``num_micro_batches=1``.
    """
    attention_ranks = tuple(sorted(attention_ranks))
    if len(placement) != num_layers:
        raise ScheduleError(f"placement has {len(placement)} layers, the model {num_layers}")
    if num_micro_batches < 1 or not attention_ranks:
        raise ScheduleError(f"need R >= 1 (got {num_micro_batches}) and at least one attention rank")
    sched = Schedule(num_layers, num_micro_batches, attention_ranks, [dict(p) for p in placement])
    attn = set(attention_ranks)
    order = list(_global_order(sched, local_experts))
    for rank in range(world):
        acts: list[Action] = []
        for kind, li, m in order:
            if kind in ("attn_fwd", "attn_bwd", "head") and rank not in attn:
                continue
            if kind in ("expert_fwd", "expert_bwd") and not sched.holds(rank, li):
                continue
            if kind in A2A_KINDS:
                holders = tuple(x for x in range(world) if sched.holds(x, li))
                to_experts = kind.startswith("dispatch")
                src, dst = (attention_ranks, holders) if to_experts else (holders, attention_ranks)
                send = tuple(x for x in dst if x != rank) if rank in src else ()
                recv = tuple(x for x in src if x != rank) if rank in dst else ()
                acts.append(Action(kind, li, m, A2A_KINDS[kind], send, recv))
            else:
                acts.append(Action(kind, li, m))
        if rank in attn:
            acts.append(Action("grad_sync", group="attn_dp"))
        if any(sched.holds(rank, li) for li in range(num_layers)):
            acts.append(Action("grad_sync", group="expert_dp"))
        sched.actions[rank] = acts
    return sched


def dependencies(sched: Schedule, rank: int, act: Action) -> list[Key]:
    """Keys of the actions of the same rank that must finish before ``act`` may start."""
    k, li, m, last = act.kind, act.layer, act.mb, sched.num_layers - 1
    is_attn, holds = rank in sched.attention_ranks, sched.holds(rank, li) if li >= 0 else False

    def layer_out_fwd(layer: int) -> tuple[str, int, int]:
        return ("combine_fwd", layer, m) if sched.is_moe(layer) else ("attn_fwd", layer, m)

    def grad_in(layer: int) -> tuple[str, int, int]:  # gradient of layer `layer`'s output
        return ("head", -1, m) if layer == last else ("attn_bwd", layer + 1, m)

    if k == "attn_fwd":
        return [layer_out_fwd(li - 1)] if li > 0 else []
    if k == "dispatch_fwd":
        return [("attn_fwd", li, m)] if is_attn else []
    if k == "expert_fwd":
        return [("dispatch_fwd", li, m)]
    if k in ("combine_fwd", "combine_bwd"):
        return [("expert_fwd" if k == "combine_fwd" else "expert_bwd", li, m)] if holds else []
    if k == "head":
        return [layer_out_fwd(last)]
    if k == "dispatch_bwd":
        return [grad_in(li)] if is_attn else []
    if k == "expert_bwd":
        return [("dispatch_bwd", li, m), ("expert_fwd", li, m)]
    if k == "attn_bwd":
        deps = [("attn_fwd", li, m), grad_in(li)]
        return deps + ([("combine_bwd", li, m)] if sched.is_moe(li) else [])
    if k == "grad_sync":
        kind = "attn_bwd" if act.group == "attn_dp" else "expert_bwd"
        return [a.key for a in sched.actions[rank] if a.kind == kind]
    raise ScheduleError(f"unknown action kind {k!r}; allowed: {COMPUTE_KINDS + tuple(A2A_KINDS) + GRAD_KINDS}")


def validate_schedule(sched: Schedule, check_deadlock: bool = True) -> None:
    """Raise :class:`ScheduleError` unless: every rank has each action its role needs exactly once, each
    action comes after its dependencies, every rank issues each group's collectives in the same order, and
    (``check_deadlock``) executing the lists with blocking collectives finishes."""
    world = sched.world
    reference = build_zebra_schedule(sched.num_layers, sched.num_micro_batches, sched.attention_ranks,
                                     sched.placement, world)
    for rank in range(world):
        acts = sched.actions.get(rank)
        if acts is None:
            raise ScheduleError(f"schedule has no action list for local rank {rank} of world {world}")
        keys = [(a.key, a.group) for a in acts]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ScheduleError(f"rank {rank} issues {dup} more than once")
        want = {(a.key, a.group) for a in reference.actions[rank]}
        if set(keys) != want:
            missing, extra = sorted(want - set(keys)), sorted(set(keys) - want)
            raise ScheduleError(f"rank {rank}: missing actions {missing[:5]}, unexpected {extra[:5]}")
        seen: set[tuple[str, int, int]] = set()
        for pos, act in enumerate(acts):
            for dep in dependencies(sched, rank, act):
                if dep not in seen:
                    raise ScheduleError(f"rank {rank} action #{pos} {act.label()} comes before its dependency {dep}")
            seen.add(act.key)
    for group in ("dispatch", "combine"):
        orders = {r: [a.key for a in sched.actions[r] if a.group == group] for r in range(world)}
        first = orders[0]
        for r, order in orders.items():
            if order != first:
                i = next((i for i, (x, y) in enumerate(zip(first, order)) if x != y), min(len(first), len(order)))
                raise ScheduleError(
                    f"collective order differs on group {group!r}: rank 0 issues "
                    f"{first[i] if i < len(first) else 'nothing'} as #{i}, rank {r} "
                    f"{order[i] if i < len(order) else 'nothing'}"
                )
    if check_deadlock:
        from .engine import run_schedule

        run_schedule(sched, lambda rank, act: 1.0)


def format_schedule(sched: Schedule, ranks: list[int] | None = None, width: int = 6) -> str:
    """Human-readable per-rank listing; collectives are marked with the group they run on."""
    lines = [f"zebra schedule: {sched.num_layers} layers, R={sched.num_micro_batches}, "
             f"attention ranks {list(sched.attention_ranks)}"]
    for rank in ranks if ranks is not None else sorted(sched.actions):
        role = "attention" if rank in sched.attention_ranks else "expert"
        lines.append(f"rank {rank} ({role}, {len(sched.actions[rank])} actions):")
        items = [a.label() + (f"@{a.group}" if a.is_collective else "") for a in sched.actions[rank]]
        for i in range(0, len(items), width):
            lines.append("    " + "  ".join(items[i:i + width]))
    return "\n".join(lines)
