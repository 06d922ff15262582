"""What is live at the peak of one experts-layer forward+backward: the allocations, grouped by where they were
made, from the CUDA caching allocator's trace (``torch.cuda.memory._record_memory_history``).

    python benchmarks/memory_peak.py                                  # Qwen3, GPT-OSS and Mixtral at T=16384
    python benchmarks/memory_peak.py qwen3_30b_a3b:4096 olmoe_1b_7b:16384

Prints transformers' ``grouped_mm`` and hetermoe's peak extra memory (as ``bench_experts.py`` measures it) and, for
hetermoe, the live allocations at the traced peak by source line.
"""

from __future__ import annotations

import argparse
import collections

import torch
from bench_experts import SHAPES, experts_module, run_provider  # benchmarks/ is on sys.path when run as a script


def _where(event: dict) -> str:
    """The innermost frames of hf-hetermoe (or the benchmark) that made an allocation."""
    frames = event.get("frames") or []
    ours = [
        f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}"
        for f in frames
        if "hetermoe" in f["filename"] or "/kernels/" in f["filename"] or "bench_" in f["filename"]
    ]
    if ours:
        return " < ".join(ours[:4])
    return f"{frames[0]['filename'].rsplit('/', 1)[-1]}:{frames[0]['name']}" if frames else "?"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """Replay alloc / free events; the bytes and the allocations live when the running total was highest."""
    live: dict[int, dict] = {}
    current = best = 0
    best_live: dict[int, dict] = {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > best:
                best, best_live = current, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return best, best_live


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=["qwen3_30b_a3b:16384", "gpt_oss_20b:16384", "mixtral_8x7b:16384"])
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args(argv)
    for case in args.cases:
        name, tokens = case.split(":")
        family, H, I, E, k = SHAPES[name]
        T = int(tokens)
        module = experts_module(family, H, I, E, k, torch.bfloat16)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        index = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
        weights = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(torch.bfloat16).requires_grad_()
        dout = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        peaks = {}
        for provider in ("grouped_mm", "hetermoe"):
            _, fwd_bwd = run_provider(module, provider, x, index, weights, dout)
            fwd_bwd()  # compile and tune outside the measured call (the gradients are dropped at once)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            fwd_bwd()
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peaks[provider] = (torch.cuda.max_memory_allocated() - base) / 2**30
        traced, live = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
        print(
            f"== {name} T={T}: peak extra grouped_mm {peaks['grouped_mm']:.2f} GiB, hetermoe {peaks['hetermoe']:.2f} "
            f"GiB ({peaks['hetermoe'] / peaks['grouped_mm']:.2f}x); hetermoe's live allocations at the traced peak "
            f"({traced / 2**30:.2f} GiB):"
        )
        by_site = collections.Counter()
        for event in live.values():
            by_site[_where(event)] += event["size"]
        for where, size in by_site.most_common(args.rows):
            print(f"   {size / 2**20:9.1f} MiB  {where}")


if __name__ == "__main__":
    main()
