"""Busy time is the union of a rank's compute intervals: overlapping or nested intervals count once, so
utilisation stays <= 1."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from test_runtime import SEQ_LEN, tiny_config
from transformers import AutoModelForCausalLM

from hf_hetermoe.runtime import zebra_plan
from hf_hetermoe.runtime.engine import _Step, union_length


@pytest.mark.parametrize(
    "intervals, want",
    [
        ([], 0.0),
        ([(1.0, 3.0)], 2.0),
        ([(0.0, 1.0), (2.0, 4.0)], 3.0),  # disjoint
        ([(0.0, 2.0), (1.0, 3.0)], 3.0),  # overlapping
        ([(0.0, 10.0), (2.0, 3.0), (4.0, 9.0)], 10.0),  # nested
        ([(1.0, 2.0), (1.0, 2.0)], 1.0),  # recorded twice
        ([(0.0, 1.0), (1.0, 2.0)], 2.0),  # touching
        ([(5.0, 7.0), (0.0, 1.0), (6.0, 8.0), (0.5, 0.75)], 4.0),  # unsorted
        ([(2.0, 2.0), (3.0, 3.0)], 0.0),  # empty actions
    ],
)
def test_union_length(intervals, want):
    assert union_length(intervals) == pytest.approx(want)
    assert union_length(intervals) <= sum(e - s for s, e in intervals) + 1e-12


def _engine(**kw):
    import hf_hetermoe as hetermoe

    model = AutoModelForCausalLM.from_config(tiny_config())
    plan = zebra_plan(model.config, 1, 0, micro_batches=2, sequences_per_attention_rank=2, seq_len=SEQ_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-3), watchdog=False, **kw)


def test_step_utilisation_at_most_one():
    """A world-of-one CPU step: 0 < utilisation <= 1, busy time = the union of the recorded timeline."""
    engine = _engine(record_timeline=True)
    ids = torch.randint(0, 64, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        res = engine.train_step({"input_ids": ids})
        (util,) = res.utilisation
        assert 0 < util <= 1, res
        spans = [(e["start_ms"], e["end_ms"]) for e in res.timeline]
        assert res.busy_s[0] == pytest.approx(union_length(spans) / 1e3)


def test_overlapping_actions_count_once():
    """Overlapping and nested action intervals of one step (as two streams would give) add up to their union."""
    engine = _engine()
    st = _Step(batches=[], train=False)
    t0 = time.perf_counter()
    st.events = [(None, t0 + 0.1, t0 + 0.4), (None, t0 + 0.2, t0 + 0.3), (None, t0 + 0.35, t0 + 0.5)]
    *_, seconds, busy = engine._metrics(st, sync=False, t0=t0)
    assert busy == [pytest.approx(0.4)]


def test_speed_shares_of_speed_balanced_dp():
    from hf_hetermoe.errors import ConfigError
    from hf_hetermoe.runtime import speed_shares

    # Two full GPUs and two at 0.28x: the minimum of one each must not leave a rank with none (was [0, 2, 1, 1]).
    assert speed_shares(4, [1.0, 1.0, 0.28, 0.28]) == [1, 1, 1, 1]
    assert speed_shares(16, [1.0, 1.0, 0.28, 0.28]) == [6, 6, 2, 2]
    assert speed_shares(7, [3.0, 1.0]) == [5, 2]
    shares = speed_shares(10, [0.9, 0.1, 0.1, 0.1])
    assert sum(shares) == 10 and min(shares) == 1 and shares[0] == 7
    with pytest.raises(ConfigError, match="one of 3 sequences"):
        speed_shares(3, [1.0] * 4)
