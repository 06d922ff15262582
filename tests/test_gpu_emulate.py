"""hetermoe.emulate on a CUDA device (skipped elsewhere): results under emulation equal results without it, in
forward and autograd backward, with attention on its own green-context stream. Speed is measured by
benchmarks/calibrate_emulation.py, never asserted here."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from hf_hetermoe.emulate import PRESETS, emulate, green_stream

pytestmark = pytest.mark.gpu


def _step(x, w, q):
    """A matmul and causal attention, forward and backward."""
    x, w, q = (t.detach().clone().requires_grad_() for t in (x, w, q))
    y = (x @ w).square().sum() + F.scaled_dot_product_attention(q, q, q, is_causal=True).square().sum()
    y.backward()
    return [y.detach(), x.grad, w.grad, q.grad]


@pytest.mark.parametrize("attn_share", [0.0, 0.5])
def test_emulate_gives_the_same_results(attn_share):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 128, device="cuda", generator=g)
    w = torch.randn(128, 64, device="cuda", generator=g)
    q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.float16, generator=g)
    want = _step(x, w, q)
    preset = dataclasses.replace(PRESETS["a40-like"], attn_sm_fraction=attn_share, memory_gib=1e6)
    caller = torch.cuda.current_stream()
    with emulate(preset) as info:
        assert torch.cuda.current_stream() == green_stream(torch.cuda.current_device(), info["num_sms"])
        got = _step(x, w, q)
    assert torch.cuda.current_stream() == caller
    assert (info["attn_num_sms"] != info["num_sms"]) == bool(attn_share)
    for a, b in zip(got, want):
        assert rel_err(a.float(), b.float()) < 1e-3
