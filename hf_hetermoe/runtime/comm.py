"""Process groups of a plan, the all-to-alls of the zebra schedule, gradient all-reduces and the rank watchdog.

Everything goes through ``torch.distributed`` (NCCL on GPUs, gloo on CPU). Streams: every process group owns
its own NCCL communication stream, so the ``dispatch`` and ``combine`` groups are the two streams on which the two
directions of the all-to-all run concurrently; a collective is issued from the compute stream (NCCL makes its
stream wait for the compute stream there, which orders it after the producer of its send buffer) and
``Work.wait()`` makes the compute stream wait for it where the result is consumed, without blocking the host.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hf_hetermoe.errors import HeterMoEError
from hf_hetermoe.planner.plan import Plan


class RankLostError(HeterMoEError, RuntimeError):
    """Another rank of the job stopped (killed, crashed or hung); this rank cannot continue."""


@dataclass
class Groups:
    """This rank's process groups (None where it is not a member) and its place in the plan."""

    rank: int
    world: int
    zp_group: int
    local_rank: int
    zp_ranks: list[int]
    dispatch: object
    combine: object
    attn_dp: object | None
    attn_dp_ranks: list[int]
    expert_dp: object | None
    expert_dp_ranks: list[int]

    @property
    def zp_world(self) -> int:
        return len(self.zp_ranks)

    def group_index(self, local_rank: int) -> int:
        """Rank inside the dispatch/combine groups of the ZP group's ``local_rank`` (groups order global ranks)."""
        return sorted(self.zp_ranks).index(self.zp_ranks[local_rank])


def build_groups(plan: Plan, timeout_s: float) -> Groups:
    """Create every process group of ``plan`` (collectively: all ranks call ``new_group`` in the same order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    timeout = timedelta(seconds=timeout_s)
    me = plan.ranks[rank]
    mine: dict[str, object] = {}
    made = []

    def make(kind: str, ranks: list[int]):
        g = dist.new_group(ranks=sorted(ranks), timeout=timeout)
        made.append(g)
        if rank in ranks:
            mine.setdefault(kind, (g, list(ranks)))

    for gi in range(len(plan.zp_groups)):
        make("dispatch", plan.process_groups["dispatch"][gi])
        make("combine", plan.process_groups["combine"][gi])
    for ranks in plan.process_groups["attn_dp"]:
        make("attn_dp", ranks)
    for ranks in plan.process_groups["expert_dp"]:
        make("expert_dp", ranks)
    # Create the NCCL communicators now, in creation order (each group's members all reach its collective).
    probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device())) if dist.get_backend() == "nccl" \
        else torch.zeros(1)
    dist.all_reduce(probe)  # the default group too (metrics, clipping, checkpoints use it)
    for g in made:
        if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER and dist.get_world_size(g) > 1:
            dist.all_reduce(probe, group=g)
    zp = plan.zp_groups[me["zp_group"]]
    attn_dp, attn_ranks = mine.get("attn_dp", (None, []))
    exp_dp, exp_ranks = mine.get("expert_dp", (None, []))
    return Groups(rank, world, me["zp_group"], me["local_rank"], list(zp), mine["dispatch"][0], mine["combine"][0],
                  attn_dp, attn_ranks, exp_dp, exp_ranks)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """Async uneven all-to-all of rows; returns the ``Work`` (``wait()`` where ``out`` is consumed)."""
    return dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group, async_op=True)


def exchange_counts(send_counts: torch.Tensor, group) -> list[int]:
    """Rows each peer will send this rank, given the rows this rank sends each peer (``[zp_world]`` int64).

    The split sizes of ``all_to_all_single`` are host integers, so this is the one host synchronisation of a
    dispatch: the token counts per destination exist only on the device, after the router ran. It happens once
    per (layer, micro-batch) forward dispatch; the combine and both backward all-to-alls reuse these counts.
    """
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv.tolist()


def all_reduce_grads(params: list[torch.nn.Parameter], group, bucket_bytes: int = 256 * 2**20) -> None:
    """Sum the gradients of ``params`` over ``group`` in flat buckets (missing gradients count as zero)."""
    if group is None or dist.get_world_size(group) == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        off = 0
        for g in bucket:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        bucket, size = [], 0

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes:
                flush()
        flush()


class Watchdog:
    """Heartbeats through the job's rendezvous store; names a lost rank instead of hanging.

    Every rank bumps ``hb/<rank>`` once per ``interval`` seconds from a daemon thread. If another rank's counter
    has not moved for ``timeout_s`` (and it did not say it finished), or the store itself is gone (its host,
    global rank 0, died), the watchdog prints which rank was lost and ends this process with exit code 1, so no
    rank waits forever in a collective. The last checkpoint is untouched: saves are atomic (temporary directory,
    then rename).
    """

    _instances = 0  # engines are built collectively, so every rank numbers its watchdogs alike

    def __init__(self, timeout_s: float, interval: float = 1.0) -> None:
        from torch.distributed.distributed_c10d import _get_default_store

        Watchdog._instances += 1

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout_s, self.interval = timeout_s, interval
        self.store = dist.PrefixStore(f"hetermoe_watchdog/{Watchdog._instances}", _get_default_store())
        self.closing = threading.Event()
        self.lost: list[int] = []
        self._seen = {r: (-1, time.monotonic()) for r in range(self.world) if r != self.rank}
        self._count = 0
        self.store.set(f"hb/{self.rank}", "0")
        self._thread = threading.Thread(target=self._run, name="hetermoe-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.closing.wait(self.interval):
            try:
                self._count += 1
                self.store.set(f"hb/{self.rank}", str(self._count))
                now = time.monotonic()
                for r, (last, since) in list(self._seen.items()):
                    if self.store.check([f"done/{r}"]):
                        del self._seen[r]
                        continue
                    value = int(self.store.get(f"hb/{r}")) if self.store.check([f"hb/{r}"]) else -1
                    if value != last:
                        self._seen[r] = (value, now)
                    elif now - since > self.timeout_s:
                        self._die(f"rank {r} sent no heartbeat for {now - since:.0f} s (killed, crashed or hung)", r)
            except Exception as err:  # the store is hosted by global rank 0; losing it means losing rank 0
                if self.closing.is_set():
                    return
                self._die(f"lost the rendezvous store hosted by rank 0 ({type(err).__name__}: {err}); "
                          "rank 0 is gone", 0)

    def _die(self, why: str, lost: int) -> None:
        self.lost.append(lost)
        print(f"[hetermoe rank {self.rank}] RankLostError: {why}; exiting with code 1 "
              f"(watchdog timeout {self.timeout_s:.0f} s)", file=sys.stderr, flush=True)
        os._exit(1)

    def diagnose(self, wait_s: float) -> list[int]:
        """Ranks whose heartbeat stopped, waiting up to ``wait_s`` for the verdict (after a failed collective)."""
        end = time.monotonic() + wait_s
        while time.monotonic() < end and not self.lost:
            time.sleep(self.interval / 2)
            now = time.monotonic()
            stale = [r for r, (_, since) in self._seen.items() if now - since > 3 * self.interval + 1]
            if stale:
                return stale
        return list(self.lost)

    def close(self) -> None:
        if self.closing.is_set():
            return
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the store may be gone at shutdown; nothing left to tell
            pass
        self.closing.set()
