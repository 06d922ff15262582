"""The language-model head and its loss, forward+backward: transformers' path against the fused linear
cross-entropy, with the three bare matmuls (cuBLAS) as the roof.

transformers: ``logits = F.linear(h, W)``, then ``ForCausalLMLoss`` (float upcast, ``F.cross_entropy``).
hetermoe: ``kernels.linear_ce.linear_cross_entropy`` (chunks of logits, one Triton kernel each).
Both are checked against an fp32 truth on the same inputs before timing; peak memory is measured above the inputs.

    python benchmarks/bench_loss.py                  # Qwen3 (V=151936, H=2048) and Mixtral (V=32000, H=4096)

Appends rows to ``benchmarks/results/loss_<gpu>.csv``.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

# name: (tokens, hidden, vocab)
SHAPES = {"qwen3": (16384, 2048, 151936), "mixtral": (16384, 4096, 32000), "qwen3_4k": (4096, 2048, 151936)}


def transformers_loss(h, w, labels):
    from transformers.loss.loss_utils import fixed_cross_entropy

    return fixed_cross_entropy(F.linear(h, w).float(), labels)


def main(argv=None):
    import transformers
    from bench_experts import append_rows, gpu_slug  # benchmarks/ is on sys.path when run as a script
    from triton.testing import do_bench

    from hf_hetermoe.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in args.shapes.split(","):
        n, hdim, vocab = SHAPES[name]
        torch.manual_seed(0)
        h = torch.randn(n, hdim, device="cuda", dtype=torch.bfloat16).requires_grad_()
        w = (torch.randn(vocab, hdim, device="cuda") / hdim**0.5).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, vocab, (n,), device="cuda")
        labels[::7] = -100
        truth = linear_cross_entropy_reference(h.float(), w.float(), labels)
        (truth_dh, truth_dw) = torch.autograd.grad(truth, [h, w])
        providers = {
            "transformers": lambda: transformers_loss(h, w, labels),
            "hetermoe": lambda: linear_cross_entropy(h, w, labels),
        }
        for provider, fn in providers.items():
            loss = fn()
            dh, dw = torch.autograd.grad(loss, [h, w])
            err = max(
                abs(loss.item() - truth.item()) / abs(truth.item()),
                ((dh.float() - truth_dh).norm() / truth_dh.norm()).item(),
                ((dw.float() - truth_dw).norm() / truth_dw.norm()).item(),
            )
            del loss, dh, dw
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.autograd.grad(fn(), [h, w])
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = do_bench(lambda fn=fn: torch.autograd.grad(fn(), [h, w]), warmup=25, rep=200, return_mode="median")
            rows.append(dict(provider=provider, rel_err=f"{err:.2e}", ms=round(ms, 3), peak_extra_gib=round(peak, 2)))
        dlogits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)

        def roof(dlogits=dlogits):
            logits = F.linear(h, w)
            torch.mm(dlogits, w)
            torch.mm(dlogits.t(), h)
            return logits

        rows.append(
            dict(
                provider="matmuls_roof",
                rel_err="",
                ms=round(do_bench(roof, return_mode="median"), 3),
                peak_extra_gib="",
            )
        )
        del dlogits
        flops = 6 * n * hdim * vocab
        for row in rows[-3:]:
            row.update(shape=name, tokens=n, hidden=hdim, vocab=vocab, tflops=round(flops / row["ms"] / 1e9, 1))
            print(row, flush=True)
    meta = dict(
        date=datetime.date.today().isoformat(), gpu=gpu, torch=torch.__version__, transformers=transformers.__version__
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"loss_{gpu_slug(gpu)}.csv"
    fields = [*meta, "shape", "tokens", "hidden", "vocab", "provider", "rel_err", "ms", "tflops", "peak_extra_gib"]
    append_rows(path, [{**meta, **r} for r in rows], fields)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
