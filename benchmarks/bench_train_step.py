"""Whole training step: tokens/s and peak memory of forward+backward+AdamW on a 4-layer, full-width
Qwen3-30B-A3B-shaped model, prepared with hetermoe vs transformers' default experts (``grouped_mm``): the experts
alone (``hetermoe_experts``) and ``prepare``'s defaults (``hetermoe``: plus the fused loss and RMSNorm).

Both variants start from the same weights and batch; their first-step losses are compared before timing.
Each timed step is ``loss = model(ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()``.

    python benchmarks/bench_train_step.py                         # 4 layers, batch 4 x 4096 tokens
    python benchmarks/bench_train_step.py --layers 2 --batch 2   # smaller
    python benchmarks/bench_train_step.py --tiny --device cpu    # smoke test of the script itself
    python benchmarks/bench_train_step.py --frozen-experts       # expert weights frozen in every variant

On a GPU whose driver counts energy (NVML, ``gpu_energy.py``) the timed steps' board energy is read too: joules per
step, mean watts and tokens per joule (at the power limit, tokens/s is the limit's watts times tokens per joule).

Appends rows to ``benchmarks/results/train_step_<gpu>.csv``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import platform
import time
from pathlib import Path

import torch

# What each prepared variant turns on (HeterMoEConfig fields). Rows written before the fused loss and norms
# existed (before 2026-11-22, session 5) named "hetermoe" ran the experts only, i.e. today's "hetermoe_experts".
VARIANTS = {
    "hetermoe_experts": dict(fused_cross_entropy=False, fused_rms_norm=False),
    "hetermoe": {},  # prepare's defaults: experts, fused linear cross-entropy, fused RMSNorm
    "hetermoe_recompute": dict(recompute_gate_up=True),  # not run by default: --variants ...,hetermoe_recompute
    # not run by default: the backward on autograd's device worker thread, PyTorch's default, instead of the calling
    # thread (prepare's default since benchmarks/NOTES.md v2.29)
    "hetermoe_worker_thread": dict(backward_on_calling_thread=False),
}
DEFAULT_VARIANTS = ("grouped_mm", "hetermoe_experts", "hetermoe")


def model_config(layers: int, tiny: bool):
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
        )
    # Qwen3-30B-A3B widths (hidden 2048, 128 experts of 768, top-8, 32 query / 4 KV heads of 128), fewer layers.
    return Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        max_position_embeddings=32768,
    )


def step_fn(model, opt, ids):
    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def print_top_kernels(step, variant: str, rows: int = 30) -> None:
    """One step under torch.profiler: the kernels that take the most GPU time, summed by name."""
    from bench_experts import cuda_kernels  # benchmarks/ is on sys.path when run as a script

    totals: dict[str, list] = {}
    for event in cuda_kernels(step):
        entry = totals.setdefault(event.name[:90], [0.0, 0])
        entry[0] += event.device_time
        entry[1] += 1
    busy = sum(t for t, _ in totals.values())
    print(f"  {variant}: one step, {busy / 1e3:.1f} ms of kernels; top {rows} by time:")
    for name, (us, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {us / 1e3:9.2f} ms {100 * us / busy:5.1f}% x{count:<4d} {name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, back to back")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=8,
        help="untimed steps first (after the compiling one): at the GPU's power limit the clocks settle over about a "
        "second of load, and a timing that starts earlier reads high (benchmarks/NOTES.md, v2.15)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--optimizer",
        default="foreach",
        choices=("foreach", "fused"),
        help="torch.optim.AdamW implementation, the same for both variants (fused: one kernel per parameter group)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated; grouped_mm (transformers' default, the baseline) first",
    )
    parser.add_argument("--profile", action="store_true", help="print each variant's top kernels of one step")
    parser.add_argument(
        "--frozen-experts",
        action="store_true",
        help="the experts' weights require no gradient in every variant (fine-tuning that trains the rest only, "
        "e.g. LoRA on attention): no expert weight gradient and no AdamW state for them",
    )
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - {"grouped_mm", *VARIANTS}
    if unknown or not args.variants.startswith("grouped_mm"):
        parser.error(f"--variants: grouped_mm first, then any of {', '.join(VARIANTS)} (got {args.variants!r})")
    warmup_steps = max(args.warmup_steps, 1)  # at least the one step that follows the compiling one
    import transformers
    from transformers import AutoModelForCausalLM

    import hf_hetermoe as hetermoe

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    config = model_config(args.layers, args.tiny)
    base = AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm").to(device, dtype)
    if args.frozen_experts:
        frozen = [p.requires_grad_(False) for n, p in base.named_parameters() if ".experts." in n]
        if not frozen:
            raise SystemExit("--frozen-experts: the model has no parameter under an '.experts.' module")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    gpu = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    import gpu_energy  # benchmarks/ is on sys.path when run as a script

    meter = gpu_energy.EnergyMeter.open(device.index) if cuda else None
    results = {}
    for variant in args.variants.split(","):
        model = copy.deepcopy(base)
        if variant != "grouped_mm":
            model = hetermoe.prepare(model, hetermoe.HeterMoEConfig(**VARIANTS[variant]))
        model.train()
        fused = args.optimizer == "fused" and cuda
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=not fused, fused=fused or None)
        step = step_fn(model, opt, ids)
        began = time.perf_counter()
        first_loss = step().item()  # the first call compiles (and autotunes) the kernels
        first_s = time.perf_counter() - began
        for _ in range(warmup_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start_mj = meter.energy_mj() if meter else None
        began = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - began
        seconds = wall / args.steps
        energy = {}
        end_mj = meter.energy_mj() if meter else None
        if start_mj is not None and end_mj is not None:
            window = gpu_energy.window(start_mj, end_mj, wall, args.steps, clocks=[])
            energy = dict(
                step_joules=round(window.joules_per_call, 2),
                watts=round(window.watts, 1),
                tokens_per_joule=round(tokens / window.joules_per_call, 1),
            )
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        results[variant] = dict(
            date=datetime.date.today().isoformat(),
            gpu=gpu,
            torch=torch.__version__,
            transformers=transformers.__version__,
            layers=args.layers,
            batch=args.batch,
            seq=args.seq,
            variant=variant,
            optimizer=args.optimizer,
            frozen_experts=args.frozen_experts,
            warmup_steps=warmup_steps,
            steps=args.steps,
            first_loss=round(first_loss, 4),
            first_step_s=round(first_s, 2),
            step_ms=round(seconds * 1e3, 2),
            tokens_per_s=round(tokens / seconds),
            peak_gib=round(peak, 2),
            **energy,
        )
        print(results[variant], flush=True)
        if args.profile and cuda:
            print_top_kernels(step, variant)
        if hetermoe.is_prepared(model):
            hetermoe.unprepare(model)  # what prepare set for this thread (the calling-thread backward) goes back
        del model, opt, step
        gc.collect()  # whatever a variant left in reference cycles must not count toward the next one's peak
        if cuda:
            torch.cuda.empty_cache()
    a = results["grouped_mm"]
    for name, b in results.items():
        # Same weights and batch: the first losses must agree to bf16 rounding.
        if abs(a["first_loss"] - b["first_loss"]) > 2e-2 * abs(a["first_loss"]):
            raise SystemExit(f"first-step losses differ: grouped_mm {a['first_loss']} vs {name} {b['first_loss']}")
        if name != "grouped_mm":
            print(
                f"{name} / grouped_mm tokens/s: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x, "
                f"peak memory {b['peak_gib']} vs {a['peak_gib']} GiB"
                + (
                    f", tokens per joule {b['tokens_per_joule']} vs {a['tokens_per_joule']}"
                    if "tokens_per_joule" in a and "tokens_per_joule" in b
                    else ""
                )
            )
    if args.tiny:
        return
    from bench_experts import append_rows, gpu_slug  # benchmarks/ is on sys.path when run as a script

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_step_{gpu_slug(gpu)}.csv"
    # rows from before the optimizer / steps columns ran foreach AdamW, one warm-up step and 5 timed ones
    old_defaults = {"optimizer": "foreach", "warmup_steps": "1", "steps": "5", "frozen_experts": "False"}
    fields = list(dict.fromkeys(k for row in results.values() for k in row))  # energy columns only where measured
    append_rows(path, list(results.values()), fields, old_defaults=old_defaults)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
