"""The Gluon weight gradient (``kernels/gluon_wgrad.py``): compiled for Hopper on any machine (no GPU needed: Gluon
has no interpreter, but Triton compiles for a named target), the implementation choice it enters, and on an sm_90
GPU its results against an fp32 reference."""

import json
import math

import pytest
import torch
from _gluon_compile import HOPPER_SHARED_LIMIT, compile_for_hopper, compile_report_in_child, hopper_report

from hf_hetermoe.kernels import gluon_wgrad, tuning

requires_gluon = pytest.mark.skipif(not gluon_wgrad._GLUON, reason="this Triton has no Gluon")


def _compile_for_hopper(cfg: dict):
    """``_grouped_wgrad_kernel`` compiled for sm_90 from CPU tensors' descriptors (nothing is launched)."""
    s, m, n, e = 512, 256, 384, 4
    a = torch.empty(s, m, dtype=torch.bfloat16)
    b = torch.empty(s, n, dtype=torch.bfloat16)
    out = torch.empty(e, m, n, dtype=torch.bfloat16)
    offsets = torch.zeros(e + 1, dtype=torch.int32)
    a_desc, b_desc, a_slice_desc, b_slice_desc, c_desc = gluon_wgrad._descriptors(a, b, out, cfg)
    values = dict(
        a_desc=a_desc,
        b_desc=b_desc,
        a_slice_desc=a_slice_desc,
        b_slice_desc=b_slice_desc,
        c_desc=c_desc,
        offsets_ptr=offsets,
        num_tiles=24,
        tiles_n=3,
        tiles_per_expert=6,
        c_ptr=out,
        stride_ce=m * n,
        stride_cm=n,
        m_size=m,
        n_size=n,
        whole_offsets_ptr=offsets,
        chunk_start=0,
        chunk_end=7,
        total_rows=9,
    )
    constants = dict(STAGES=cfg["STAGES"], CONSUMER_REGS=cfg["CONSUMER_REGS"], ACCUMULATE=cfg.get("ACCUMULATE", False))
    return compile_for_hopper(gluon_wgrad._grouped_wgrad_kernel, values, constants, cfg["MAXNREG"])


# Every configuration the tuner may pick, and the chunked backward's accumulating variant (default tiles).
_COMPILED = [*gluon_wgrad.CONFIGS, dict(gluon_wgrad.DEFAULT_CONFIG, ACCUMULATE=True)]


def _compile_report() -> list[dict]:
    """Per configuration: shared memory and which of the expected instructions the PTX holds."""
    return [hopper_report(_compile_for_hopper(cfg)) for cfg in _COMPILED]


@requires_gluon
def test_compiles_for_hopper_without_a_gpu():
    """Every configuration the tuner may pick compiles for sm_90 with the installed Triton, fits an H100's shared
    memory, and is what it claims to be: warpgroup MMAs, TMA and register reallocation between the partitions.
    In a fresh interpreter without TRITON_INTERPRET: the interpreter the CPU suite runs in patches Triton's language
    while kernels run, which a real compilation must not meet."""
    report = compile_report_in_child(__file__)
    assert len(report) == len(_COMPILED)
    for cfg, item in zip(_COMPILED, report):
        assert item["shared"] <= HOPPER_SHARED_LIMIT, (cfg, item)
        assert not item["missing"], (cfg, item)


def test_no_gluon_off_hopper():
    """CPU tensors (and so CI) never take the Gluon kernel; asking for it anyway says what to use instead."""
    a = torch.randn(64, 128, dtype=torch.bfloat16)
    assert not gluon_wgrad.available(a)
    assert gluon_wgrad.candidates(a, a) == []
    with pytest.raises(ValueError, match="CUTLASS or Triton"):
        gluon_wgrad.grouped_wgrad(a, a, torch.tensor([0, 64], dtype=torch.int32))


def test_choose_impl_measures_caches_and_falls_back(tmp_path, monkeypatch):
    """The implementation choice: the default without autotuning or off CUDA; else the fastest candidate, cached;
    a cached choice that is no longer a candidate is measured again."""
    monkeypatch.setenv("HETERMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuning.clear()
    cuda = torch.device("cuda", 0)
    gluon = [dict(IMPL="gluon", STAGES=4), dict(IMPL="gluon", STAGES=5)]
    cutlass = dict(IMPL="cutlass")
    timed = []

    def fake_times(run, cands, rounds=5):
        timed.append(cands)
        return [{4: 2.0, 5: 1.0}.get(c.get("STAGES"), 3.0) for c in cands]

    monkeypatch.setattr(tuning, "time_candidates", fake_times)

    def run(cfg):
        raise AssertionError("choose_impl does not run candidates itself")

    cpu_pick = tuning.choose_impl(
        "wgrad_impl", ("k",), gluon + [cutlass], run, device=torch.device("cpu"), default=cutlass
    )
    assert cpu_pick == cutlass
    tuning.set_autotune(False)
    assert tuning.choose_impl("wgrad_impl", ("k",), gluon + [cutlass], run, device=cuda, default=cutlass) == cutlass
    assert timed == []
    tuning.set_autotune(True)
    try:
        pick = tuning.choose_impl("wgrad_impl", ("k",), gluon + [cutlass], run, device=cuda, default=cutlass)
        assert pick == gluon[1] and len(timed) == 1
        tuning.clear()  # a new process reads the cache file
        assert tuning.choose_impl("wgrad_impl", ("k",), gluon + [cutlass], run, device=cuda, default=cutlass) == pick
        assert len(timed) == 1
        # The five-stage configuration is gone from the candidates (say, a smaller GPU): measured again.
        pick = tuning.choose_impl("wgrad_impl", ("k",), gluon[:1] + [cutlass], run, device=cuda, default=cutlass)
        assert pick == gluon[0] and len(timed) == 2
    finally:
        tuning.set_autotune(None)
        tuning.clear()


def _reference(a, b, offsets):
    bounds = offsets.tolist()
    return torch.stack([a[s:e].float().T @ b[s:e].float() for s, e in zip(bounds[:-1], bounds[1:])])


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and gluon_wgrad._GLUON),
    reason="needs an sm_90 GPU (Hopper) and Gluon",
)
@pytest.mark.parametrize("index", range(len(gluon_wgrad.CONFIGS)))
@pytest.mark.parametrize(
    "s,m,n,counts",
    [
        # experts of 0 rows, 1 row, under one K step, exactly one, one and a bit; a partial column tile
        (1000, 256, 320, [0, 1, 63, 64, 65, 200, 0, 607]),
        # more tiles than SMs, every expert ending mid-step, N not a multiple of the tile
        (4096, 128, 2880, [300] * 13 + [196]),
        # the last experts empty: their tiles are written as zeros
        (2000, 1536, 256, [17, 1983, 0, 0]),
        # M not a multiple of the tile (GPT-OSS's 2880): each expert's last row tile is clipped at its own end
        (1500, 200, 136, [700, 0, 800]),
    ],
)
def test_matches_fp32_reference_on_hopper(index, s, m, n, counts):
    cfg = gluon_wgrad.CONFIGS[index]
    torch.manual_seed(0)
    a = torch.randn(s, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(s, n, device="cuda", dtype=torch.bfloat16)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32, device="cuda")
    offsets[1:] = torch.cumsum(torch.tensor(counts, device="cuda"), 0)
    out = gluon_wgrad.grouped_wgrad(a, b, offsets, config=cfg)
    want = _reference(a, b, offsets)
    assert out.shape == want.shape and out.dtype == torch.bfloat16
    err = (out.float() - want).abs().max() / want.abs().max()
    assert err < 1e-2, err
    for e, count in enumerate(counts):
        if count == 0:
            assert out[e].abs().max() == 0
    assert math.isfinite(err)


if __name__ == "__main__":  # the compilation test's child process
    print(json.dumps(_compile_report()))
