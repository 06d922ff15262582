"""The zebra schedule as data: per rank of one ZP group, the ordered list of :class:`Action` s it issues.

Order (HeterMoE Theorem 1): forward breadth-first over micro-batches layer by layer; at the last layer the
forward and backward of micro-batches interleave one-forward-one-backward; then backward breadth-first, layer
by layer in reverse. All ranks' lists are projections of ONE global sequence, so every rank issues the
collectives of each process group in the same order (checked again by :func:`validate_schedule`).
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


def _global_order(num_layers: int, r: int, is_moe: list[bool]) -> Iterator[tuple[str, int, int]]:
    """The one global sequence of (kind, layer, mb) every rank's list is filtered from."""
    last = num_layers - 1

    def fwd(li: int, m: int) -> Iterator[tuple[str, int, int]]:
        yield ("attn_fwd", li, m)
        if is_moe[li]:
            yield from (("dispatch_fwd", li, m), ("expert_fwd", li, m), ("combine_fwd", li, m))

    def bwd_experts(li: int, m: int) -> Iterator[tuple[str, int, int]]:
        if is_moe[li]:
            yield from (("dispatch_bwd", li, m), ("expert_bwd", li, m), ("combine_bwd", li, m))

    for li in range(last):
        for m in range(r):
            yield from fwd(li, m)
    # Last layer: one forward, one backward (the backward lags one micro-batch so its inputs are ready).
    for m in range(r):
        yield from fwd(last, m)
        if m > 0:
            yield ("head", -1, m - 1)
            yield from bwd_experts(last, m - 1)
    yield ("head", -1, r - 1)
    yield from bwd_experts(last, r - 1)
    for li in range(last, -1, -1):
        for m in range(r):
            yield ("attn_bwd", li, m)
            if li > 0:
                yield from bwd_experts(li - 1, m)


def build_zebra_schedule(
    num_layers: int,
    num_micro_batches: int,
    attention_ranks: tuple[int, ...] | list[int],
    placement: list[dict[int, tuple[int, ...]]],
    world: int,
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
    is_moe = [sched.is_moe(li) for li in range(num_layers)]
    attn = set(attention_ranks)
    for rank in range(world):
        acts: list[Action] = []
        for kind, li, m in _global_order(num_layers, num_micro_batches, is_moe):
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


def dependencies(sched: Schedule, rank: int, act: Action) -> list[tuple[str, int, int]]:
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
