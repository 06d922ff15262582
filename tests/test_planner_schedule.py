"""Zebra schedule: Theorem-1 order, dependencies, identical collective order on every rank, validator errors."""

import pytest

from hf_hetermoe.planner.engine import run_schedule
from hf_hetermoe.planner.schedule import (
    LOCAL_EXPERT_ORDERS,
    Action,
    Schedule,
    ScheduleError,
    build_zebra_schedule,
    dependencies,
    format_schedule,
    validate_schedule,
)


def _placement(layers, holders, experts=8, dense=0):
    out = []
    for layer in range(layers):
        if layer < dense:
            out.append({})
            continue
        per, rest = divmod(experts, len(holders))
        p, e = {}, 0
        for i, h in enumerate(holders):
            n = per + (i < rest)
            p[h] = tuple(range(e, e + n))
            e += n
        out.append(p)
    return out


CASES = [
    # layers, R, attention ranks, expert holders, world, dense layers
    (4, 1, [0], [1], 2, 0),
    (4, 3, [0], [1], 2, 0),
    (3, 4, [0, 1], [2, 3, 4], 5, 0),  # M does not divide N
    (5, 2, [0, 1, 2], [1, 3], 4, 1),  # an attention rank holds experts (Asym-EA); one dense layer
    (2, 2, [0, 1, 2, 3], [0, 1, 2, 3], 4, 0),  # EP: every rank both
]


@pytest.mark.parametrize("order", LOCAL_EXPERT_ORDERS)
@pytest.mark.parametrize("layers,r,attn,holders,world,dense", CASES)
def test_schedule_valid_and_same_collective_order(layers, r, attn, holders, world, dense, order):
    sched = build_zebra_schedule(layers, r, attn, _placement(layers, holders, dense=dense), world, order)
    validate_schedule(sched)
    for group in ("dispatch", "combine"):
        orders = [[a.key for a in sched.actions[x] if a.group == group] for x in range(world)]
        assert all(o == orders[0] for o in orders)
        n_moe = layers - dense
        assert len(orders[0]) == 2 * n_moe * r  # forward + backward collective per MoE layer and micro-batch
    assert Schedule.from_dict(sched.to_dict()).actions == sched.actions
    assert "rank 0 (attention" in format_schedule(sched)


def test_theorem1_order():
    layers, r = 3, 4
    sched = build_zebra_schedule(layers, r, [0], _placement(layers, [1]), 2)
    attn = [a.key for a in sched.actions[0] if a.kind == "attn_fwd"]
    # breadth-first forward: every micro-batch of layer l before any of layer l+1
    assert attn == [("attn_fwd", layer, m) for layer in range(layers) for m in range(r)]
    exp = [a.key for a in sched.actions[1] if a.kind.startswith("expert")]
    last = layers - 1
    # last layer interleaves: backward of m0 runs before the forward of the last micro-batch
    assert exp.index(("expert_bwd", last, 0)) < exp.index(("expert_fwd", last, r - 1))
    # then breadth-first backward, layers in reverse
    bwd = [k for k in exp if k[0] == "expert_bwd"]
    assert [k[1] for k in bwd] == sorted((k[1] for k in bwd), reverse=True)
    assert sched.actions[0][-1].kind == "grad_sync" and sched.actions[1][-1].group == "expert_dp"


def test_actions_are_concrete_for_the_runtime():
    sched = build_zebra_schedule(2, 2, [0, 1], _placement(2, [2, 3]), 4)
    disp = next(a for a in sched.actions[0] if a.kind == "dispatch_fwd")
    assert disp.group == "dispatch" and disp.send_to == (2, 3) and disp.recv_from == ()
    recv = next(a for a in sched.actions[2] if a.kind == "dispatch_fwd")
    assert recv.recv_from == (0, 1) and recv.send_to == ()
    comb = next(a for a in sched.actions[3] if a.kind == "combine_bwd")
    assert comb.group == "combine" and comb.send_to == (0, 1)
    assert Action.from_dict(disp.to_dict()) == disp


def test_validator_rejects_swapped_collectives():
    sched = build_zebra_schedule(2, 2, [0], _placement(2, [1]), 2)
    acts = sched.actions[1]
    i = next(i for i, a in enumerate(acts) if a.key == ("dispatch_fwd", 0, 1))
    j = next(i for i, a in enumerate(acts) if a.key == ("dispatch_fwd", 1, 0))
    acts[i], acts[j] = acts[j], acts[i]
    with pytest.raises(ScheduleError, match="collective order differs on group 'dispatch'|dependency"):
        validate_schedule(sched)


def test_validator_rejects_dependency_violation_and_missing_actions():
    sched = build_zebra_schedule(2, 1, [0], _placement(2, [1]), 2)
    acts = sched.actions[0]
    i = next(i for i, a in enumerate(acts) if a.key == ("attn_fwd", 1, 0))
    acts.insert(0, acts.pop(i))
    with pytest.raises(ScheduleError, match="before its dependency"):
        validate_schedule(sched)
    sched = build_zebra_schedule(2, 1, [0], _placement(2, [1]), 2)
    sched.actions[1] = [a for a in sched.actions[1] if a.kind != "expert_bwd"]
    with pytest.raises(ScheduleError, match="missing actions"):
        validate_schedule(sched)


def test_engine_reports_deadlock():
    # Rank 1 waits on the combine of micro-batch 1 first: a cycle across the two streams.
    sched = build_zebra_schedule(1, 2, [0], _placement(1, [1]), 2)
    acts = sched.actions[1]
    c0 = next(i for i, a in enumerate(acts) if a.key == ("combine_fwd", 0, 0))
    c1 = next(i for i, a in enumerate(acts) if a.key == ("combine_fwd", 0, 1))
    acts[c0], acts[c1] = acts[c1], acts[c0]
    with pytest.raises(ScheduleError):
        run_schedule(sched, lambda rank, act: 1.0)


def _pos(acts, key):
    return next(i for i, a in enumerate(acts) if a.key == key)


@pytest.mark.parametrize("r", [2, 3])
def test_attention_rank_runs_its_experts_after_the_next_attention(r):
    # Rank 0: attention + some experts (Asym-EA); ranks 1, 2: experts only.
    layers, placement = 3, [{0: (0,), 1: (1, 2, 3), 2: (4, 5, 6, 7)}] * 3
    plain = build_zebra_schedule(layers, r, [0], placement, 3, "none")
    for order in ("layer", "step"):
        sched = build_zebra_schedule(layers, r, [0], placement, 3, order)
        validate_schedule(sched)
        acts = sched.actions[0]
        for li in range(layers):
            for m in range(r - 1 if li < layers - 1 else 0):  # the last layer interleaves with the head
                # own experts of m wait behind attention on m+1, not in front of it
                assert _pos(acts, ("attn_fwd", li, m + 1)) < _pos(acts, ("expert_fwd", li, m))
            for m in range(r):
                # the executor's self-send: dispatch, then the local experts, then the combine
                assert (_pos(acts, ("dispatch_fwd", li, m)) < _pos(acts, ("expert_fwd", li, m))
                        < _pos(acts, ("combine_fwd", li, m)))
                if li > 0:
                    assert (_pos(acts, ("dispatch_bwd", li - 1, m)) < _pos(acts, ("expert_bwd", li - 1, m))
                            < _pos(acts, ("combine_bwd", li - 1, m)))
            for m in range(r - 1):
                if li > 0:
                    assert _pos(acts, ("attn_bwd", li, m + 1)) < _pos(acts, ("expert_bwd", li - 1, m))
        # every stream of the expert-only ranks and every collective order are unchanged: only rank 0's compute
        # order moved (list order across streams may differ: collectives are issued earlier)
        for rank in (1, 2):
            for stream in ("compute", "dispatch", "combine"):
                assert ([a for a in sched.actions[rank] if a.stream == stream]
                        == [a for a in plain.actions[rank] if a.stream == stream])
        for group in ("dispatch", "combine"):
            assert ([a.key for a in acts if a.group == group]
                    == [a.key for a in plain.actions[0] if a.group == group])


def test_local_expert_delay_shortens_the_step():
    # Attention 1.0, the attention rank's own experts 0.4, the expert rank's 1.0, all-to-alls 0.3: without the
    # delay the attention rank waits for every dispatch before its next attention.
    placement = [{0: (0,), 1: (1, 2, 3)}] * 4

    def duration(rank, act):
        if act.kind.startswith("expert"):
            return 0.4 if rank == 0 else 1.0
        return 0.3 if act.is_collective else 1.0

    steps = {}
    for order in LOCAL_EXPERT_ORDERS:
        sched = build_zebra_schedule(4, 4, [0], placement, 2, order)
        steps[order] = max(e.end for e in run_schedule(sched, duration))
    assert steps["layer"] < steps["none"] and steps["step"] < steps["none"]


def test_dependencies_cover_what_an_executor_needs():
    sched = build_zebra_schedule(3, 2, [0, 1], [{1: (0, 1), 2: (2, 3)}] * 3, 3)
    deps = {(r, a.key): set(dependencies(sched, r, a)) for r in range(3) for a in sched.actions[r]}
    # rank 1 is attention and holder: its experts read what the all-to-all (self-chunk included) delivered,
    # and its combine sends what its experts wrote
    assert ("dispatch_fwd", 1, 0) in deps[(1, ("expert_fwd", 1, 0))]
    assert ("expert_fwd", 1, 0) in deps[(1, ("combine_fwd", 1, 0))]
    assert {("dispatch_bwd", 1, 0), ("expert_fwd", 1, 0)} <= deps[(1, ("expert_bwd", 1, 0))]
    assert ("expert_bwd", 1, 0) in deps[(1, ("combine_bwd", 1, 0))]
    # an attention rank's next layer reads the combine; its backward reads the input gradients
    assert ("combine_fwd", 0, 1) in deps[(0, ("attn_fwd", 1, 1))]
    assert ("combine_bwd", 1, 1) in deps[(0, ("attn_bwd", 1, 1))]
    assert ("head", -1, 0) in deps[(0, ("dispatch_bwd", 2, 0))]
    # an expert-only rank's gradient all-reduce waits for all its expert backwards
    sync = next(a for a in sched.actions[2] if a.kind == "grad_sync")
    assert len(deps[(2, sync.key)]) == 3 * 2


def test_unknown_local_expert_order():
    with pytest.raises(ScheduleError, match="local_experts"):
        build_zebra_schedule(2, 2, [0], _placement(2, [1]), 2, "later")
