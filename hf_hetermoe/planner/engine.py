"""Execute a :class:`Schedule` in simulated time: the reference semantics the runtime (issue 6) implements.

Each rank has one compute stream and one stream per process group (``dispatch``, ``combine``, ``grad``).
Actions are issued in list order without blocking the host (CUDA streams); an action runs on its stream after
the previous action of that stream and after its dependencies (:func:`schedule.dependencies`). A collective
starts when every member rank has reached it on that group's stream, and lasts the same time on all of them.
If no action can progress before all are done, the schedule deadlocks and :class:`ScheduleError` says where.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .schedule import Action, Schedule, ScheduleError, dependencies


@dataclass(frozen=True)
class Event:
    """One executed action: ``rank`` ran ``action`` on ``stream`` from ``start`` to ``end`` (ms)."""

    rank: int
    stream: str
    action: Action
    start: float
    end: float


def _members(sched: Schedule, group: str) -> list[int]:
    if group in ("dispatch", "combine"):
        return sorted(sched.actions)
    return sorted(r for r, acts in sched.actions.items() if any(a.group == group for a in acts))


def run_schedule(sched: Schedule, duration: Callable[[int, Action], float]) -> list[Event]:
    """Simulate ``sched``; ``duration(rank, action)`` gives ms (for a collective, the max over members counts)."""
    queues: dict[tuple[int, str], list[Action]] = {}
    for rank, acts in sched.actions.items():
        for act in acts:
            queues.setdefault((rank, act.stream), []).append(act)
    heads = dict.fromkeys(queues, 0)
    stream_free = dict.fromkeys(queues, 0.0)
    done: dict[tuple[int, tuple[str, int, int]], float] = {}
    members = {g: _members(sched, g) for g in ("dispatch", "combine", "attn_dp", "expert_dp")}
    events: list[Event] = []
    remaining = sum(len(q) for q in queues.values())

    def ready_at(rank: int, act: Action) -> float | None:
        t = stream_free[(rank, act.stream)]
        for dep in dependencies(sched, rank, act):
            if (rank, dep) not in done:
                return None
            t = max(t, done[(rank, dep)])
        return t

    progress = True
    while remaining and progress:
        progress = False
        for qk, queue in queues.items():
            rank, stream = qk
            if heads[qk] >= len(queue):
                continue
            act = queue[heads[qk]]
            if not act.is_collective:
                t = ready_at(rank, act)
                if t is None:
                    continue
                parts = [(rank, t)]
            else:
                parts = []
                for other in members[act.group]:
                    oq = (other, stream)
                    if oq not in queues or heads[oq] >= len(queues[oq]) or queues[oq][heads[oq]].key != act.key:
                        break
                    t = ready_at(other, queues[oq][heads[oq]])
                    if t is None:
                        break
                    parts.append((other, t))
                if len(parts) != len(members[act.group]):
                    continue
            start = max(t for _, t in parts)
            dur = max(duration(r, queues[(r, stream)][heads[(r, stream)]]) for r, _ in parts)
            for r, _ in parts:
                a = queues[(r, stream)][heads[(r, stream)]]
                events.append(Event(r, stream, a, start, start + dur))
                done[(r, a.key)] = start + dur
                stream_free[(r, stream)] = start + dur
                heads[(r, stream)] += 1
                remaining -= 1
            progress = True
    if remaining:
        blocked = []
        for (rank, stream), queue in sorted(queues.items()):
            if heads[(rank, stream)] < len(queue):
                act = queue[heads[(rank, stream)]]
                unmet = [d for d in dependencies(sched, rank, act) if (rank, d) not in done]
                blocked.append(f"rank {rank} {stream}: {act.label()} waits for {unmet or 'peers on ' + act.group}")
        raise ScheduleError("schedule deadlocks; blocked heads: " + "; ".join(blocked[:8]))
    return events
