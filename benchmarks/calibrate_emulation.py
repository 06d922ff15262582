"""Calibrate hetermoe.emulate presets on this GPU (CUDA only; run on an H100/H200).

For each SM share in a grid and each preset's SDPA backend, measure an expert FFN (plain bf16 matmuls) and
causal attention at 64K tokens; then pick the faster preset of each published pair its SM share so the FFN
ratio matches (A40/V100: 1.25x; L40S/T4: 7x) and its attention share (``attn_sm_fraction``, a second green
context for SDPA) so the attention ratio matches (A40/V100 ~3.7x at 64K tokens, L40S/T4 10-14x). The chosen
presets are then measured as they run (attention on its own stream) with forward and autograd backward, to
check that the backward keeps the SM limit. Writes benchmarks/results/emulation_calibration_<gpu>.json, which
`hetermoe.emulate.load_calibration` applies. All figures are of EMULATED GPUs.

Every SDPA backend is run once at the measured shape OUTSIDE any green context before the grid: cuDNN attention
first run inside a green context keeps that context's SMs for later calls of the same shape (the 2026-11-22
H100 grid measured every cuDNN preset at its first, 8-SM, share: ~187 ms whatever the share).
``--sdpa-check`` instead times each backend alone at several SM counts and records the kernel that ran
(``emulation_sdpa_check_<gpu>.json``).

    PYTHONUNBUFFERED=1 python benchmarks/calibrate_emulation.py [--sdpa-check]
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_hetermoe.emulate import PRESETS, _sdpa_backends, emulate
from hf_hetermoe.files import write_json
from hf_hetermoe.profiler import time_ms

GRID = (0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 1.0)
TARGETS = {"a40-like": ("v100-like", 1.25, 3.7), "l40s-like": ("t4-like", 7.0, 12.0)}


def ffn_ms() -> float:
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(4096, 2 * 14336, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02

    def run():
        g, u = (x @ w1).chunk(2, dim=-1)
        return (F.silu(g) * u) @ w2

    return time_ms(run)


def attn_ms(tokens: int = 65536) -> float:
    q, k, v = (torch.randn(1, 8, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=1, reps=3)


def warm_sdpa(tokens: int = 65536) -> None:
    """Build every backend's attention for the calibration shape in the primary context (see module doc)."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(1, 8, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for backend in _sdpa_backends(("cudnn", "flash", "efficient")):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
        except RuntimeError as err:  # a backend this GPU / torch lacks: the presets fall back to the next one
            print(f"warm-up: {backend} unavailable: {err}", flush=True)
    torch.cuda.synchronize()


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    return [e.key for e in events[:2]]


def sdpa_check(gpu: str) -> int:
    """Each SDPA backend alone at 64K tokens, full GPU and in green contexts of several SM counts."""
    from torch.cuda.green_contexts import GreenContext
    from torch.nn.attention import sdpa_kernel

    warm_sdpa()
    q, k, v = (torch.randn(1, 8, 65536, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows, total = [], torch.cuda.get_device_properties(0).multi_processor_count
    for sms in (0, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128):
        for name in ("cudnn", "flash", "efficient"):
            if name == "efficient" and sms not in (0, 8, 32):
                continue
            ctx = GreenContext.create(num_sms=sms, device_id=0) if sms else None
            if ctx:
                ctx.set_context()
            try:
                with sdpa_kernel(_sdpa_backends((name,))):
                    def fn():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                    row = {"backend": name, "num_sms": sms or total,
                           "green_context": bool(sms), "attn64k_ms": time_ms(fn, warmup=2, reps=3),
                           "kernels": _kernel_names(fn) if sms in (0, 32) else []}
            finally:
                if ctx:
                    ctx.pop_context()
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path("benchmarks/results") / f"emulation_sdpa_check_{gpu.replace(' ', '_')}.json"
    write_json(out, {"gpu": gpu, "torch": torch.__version__, "date": str(datetime.date.today()), "emulated": True,
                     "shape": "B1 H8 S65536 D128 bf16 causal, forward", "measurements": rows}, indent=1)
    print(f"wrote {out}")
    return 0


def train_gemm_ms() -> dict[str, float]:
    """Forward and backward of a bf16 linear layer through autograd (backward runs on autograd's own thread)."""
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    y = x @ w.t()
    dy = torch.randn_like(y)
    fwd = time_ms(lambda: x @ w.t())
    bwd = time_ms(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True))
    return {"fwd_ms": fwd, "bwd_ms": bwd}


def train_attn_ms(tokens: int = 16384) -> dict[str, float]:
    """Causal SDPA forward and backward through autograd (the backward of the attention-stream path)."""
    q, k, v = (torch.randn(1, 8, tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    do = torch.randn_like(o)
    fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=2, reps=5)
    bwd = time_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), warmup=2, reps=5)
    return {"fwd_ms": fwd, "bwd_ms": bwd}


def main() -> int:
    if not torch.cuda.is_available():
        print("calibrate_emulation.py needs a CUDA GPU (green contexts); none is visible", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    if "--sdpa-check" in sys.argv[1:]:
        return sdpa_check(gpu)
    warm_sdpa()
    # 1. The grid: FFN and 64K-token attention at every SM share, for each distinct SDPA backend list.
    rows, by_backends = [], {}
    for name, preset in PRESETS.items():
        key = preset.sdpa_backends
        if key in by_backends:  # same kernels as an earlier preset: reuse its rows
            rows += [{**r, "preset": name, "label": r["label"].replace(by_backends[key], name)}
                     for r in rows if r["preset"] == by_backends[key]]
            continue
        by_backends[key] = name
        for share in GRID:
            with emulate(replace(preset, sm_fraction=share, attn_sm_fraction=0.0)) as info:
                row = {"preset": name, "sm_fraction": share, "num_sms": info["num_sms"],
                       "sdpa_backends": list(preset.sdpa_backends), "ffn_ms": ffn_ms(), "attn64k_ms": attn_ms(),
                       "label": info["label"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # 2. Choose: the faster preset's SM share matches the FFN ratio, then its attention share the attention ratio
    #    (one share cannot do both: FlashAttention-2 per SM on a Hopper host is not FA2 per SM on an A40).
    by = {(r["preset"], r["sm_fraction"]): r for r in rows}
    chosen = {n: {"sm_fraction": p.sm_fraction, "attn_sm_fraction": p.attn_sm_fraction,
                  "sdpa_backends": list(p.sdpa_backends)} for n, p in PRESETS.items()}
    for name, (ref, ffn_target, attn_target) in TARGETS.items():
        base = by[(ref, PRESETS[ref].sm_fraction)]
        mine = [r for r in rows if r["preset"] == name]
        best = min(mine, key=lambda r: abs(base["ffn_ms"] / r["ffn_ms"] - ffn_target))
        attn = min(mine, key=lambda r: abs(base["attn64k_ms"] / r["attn64k_ms"] - attn_target))
        chosen[name]["sm_fraction"] = best["sm_fraction"]
        chosen[name]["attn_sm_fraction"] = 0.0 if attn["sm_fraction"] == best["sm_fraction"] else attn["sm_fraction"]
    # 3. Check the chosen presets as they will run (attention on its own green stream where the share differs),
    #    and that autograd's backward keeps the SM limit (it runs on another thread).
    final = {n: replace(PRESETS[n], sm_fraction=c["sm_fraction"], attn_sm_fraction=c["attn_sm_fraction"])
             for n, c in chosen.items()}
    checked, report = {"full GPU": {"gemm": train_gemm_ms(), "attn16k": train_attn_ms()}}, {}
    print(json.dumps(checked), flush=True)
    for name in sorted({n for pair in TARGETS.items() for n in (pair[0], pair[1][0])}):
        with emulate(final[name]) as info:
            checked[name] = {"num_sms": info["num_sms"], "attn_num_sms": info["attn_num_sms"], "ffn_ms": ffn_ms(),
                             "attn64k_ms": attn_ms(), "gemm": train_gemm_ms(), "attn16k": train_attn_ms(),
                             "label": info["label"]}
        print(json.dumps({name: checked[name]}), flush=True)
    for name, (ref, ffn_target, attn_target) in TARGETS.items():
        a, b = checked[name], checked[ref]
        report[name] = {"vs": ref, "ffn_ratio": b["ffn_ms"] / a["ffn_ms"], "ffn_target": ffn_target,
                        "attn_ratio": b["attn64k_ms"] / a["attn64k_ms"], "attn_target": attn_target,
                        "num_sms": [a["num_sms"], b["num_sms"]],
                        "attn_num_sms": [a["attn_num_sms"], b["attn_num_sms"]]}
    full, host_sms = checked["full GPU"]["gemm"], torch.cuda.get_device_properties(0).multi_processor_count
    backward = {n: {"gemm_fwd_slowdown": c["gemm"]["fwd_ms"] / full["fwd_ms"],
                    "gemm_bwd_slowdown": c["gemm"]["bwd_ms"] / full["bwd_ms"], "sm_ratio": host_sms / c["num_sms"]}
                for n, c in checked.items() if n != "full GPU"}
    out = Path("benchmarks/results") / f"emulation_calibration_{gpu.replace(' ', '_')}.json"
    write_json(out, {"gpu": gpu, "torch": torch.__version__, "date": str(datetime.date.today()), "emulated": True,
                     "measurements": rows, "chosen": chosen, "ratios": report, "checked": checked,
                     "backward_keeps_limit": backward}, indent=1)
    print(json.dumps({"ratios": report, "backward_keeps_limit": backward}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
