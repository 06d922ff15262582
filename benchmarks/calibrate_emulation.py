"""Calibrate hetermoe.emulate presets on this GPU (CUDA only; run on an H100/H200).

For each SM share in a grid and each preset's SDPA backend, measure an expert FFN (plain bf16 matmuls) and
causal attention at 64K tokens; then pick each preset's SM share so the ratios between presets match the
published ones (A40/V100: 1.25x FFN; L40S/T4: 7x FFN; attention ratios are reported next to their targets:
A40/V100 ~3.7x at 64K tokens, L40S/T4 10-14x). Writes benchmarks/results/emulation_calibration_<gpu>.json,
which `hetermoe.emulate.load_calibration` applies. All figures are of EMULATED GPUs.

    PYTHONUNBUFFERED=1 python benchmarks/calibrate_emulation.py
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_hetermoe.emulate import PRESETS, emulate
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


def main() -> int:
    if not torch.cuda.is_available():
        print("calibrate_emulation.py needs a CUDA GPU (green contexts); none is visible", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    rows = []
    for name, preset in PRESETS.items():
        for share in GRID:
            p = preset.__class__(**{**preset.__dict__, "sm_fraction": share})
            with emulate(p) as info:
                row = {"preset": name, "sm_fraction": share, "num_sms": info["num_sms"],
                       "sdpa_backends": list(p.sdpa_backends), "ffn_ms": ffn_ms(), "attn64k_ms": attn_ms(),
                       "label": info["label"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["preset"], r["sm_fraction"]): r for r in rows}
    chosen = {n: {"sm_fraction": p.sm_fraction, "sdpa_backends": list(p.sdpa_backends)} for n, p in PRESETS.items()}
    report = {}
    for name, (ref, ffn_target, attn_target) in TARGETS.items():
        base = by[(ref, PRESETS[ref].sm_fraction)]
        best = min((r for r in rows if r["preset"] == name),
                   key=lambda r: abs(base["ffn_ms"] / r["ffn_ms"] - ffn_target))
        chosen[name]["sm_fraction"] = best["sm_fraction"]
        report[name] = {"vs": ref, "ffn_ratio": base["ffn_ms"] / best["ffn_ms"], "ffn_target": ffn_target,
                        "attn_ratio": base["attn64k_ms"] / best["attn64k_ms"], "attn_target": attn_target}
    out = Path("benchmarks/results") / f"emulation_calibration_{gpu.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "date": str(datetime.date.today()),
                               "emulated": True, "measurements": rows, "chosen": chosen, "ratios": report},
                              indent=1))
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
