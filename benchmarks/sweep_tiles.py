"""Tile-size sweep of the two dominant expert kernels (issue 3 groundwork; GPU only).

Times, for a few shapes, the forward gate/up gathered grouped matmul (with the fused activation) and the
down-projection weight-gradient kernel over a grid of tile sizes, by overriding the launchers' tile choices.
Prints one line per configuration and writes ``sweep_tiles_<gpu>.csv`` to ``--out``.

    python benchmarks/sweep_tiles.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
from pathlib import Path

import torch

SHAPES = {"qwen3_30b_a3b": (2048, 768, 128, 8, 16384), "mixtral_8x7b": (4096, 14336, 8, 2, 4096)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    kernels = ["fwd_gate_up", "wgrad_down"]
    parser.add_argument("--kernels", nargs="+", default=kernels, choices=kernels, help="which kernels to time")
    args = parser.parse_args(argv)
    import triton
    from bench_experts import gpu_slug  # benchmarks/ is on sys.path when run as a script
    from triton.testing import do_bench

    from hf_hetermoe.kernels import ExpertLayout, build_routing, triton_ops

    gpu = torch.cuda.get_device_name()
    rows = []
    layout = ExpertLayout()
    for name, (H, I, E, k, T) in SHAPES.items():
        S = T * k
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        index = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
        w1 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
        dout = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        weights = torch.rand(T, k, device="cuda")
        h = torch.randn(S, I, device="cuda", dtype=torch.bfloat16)
        dw2 = torch.empty(E, H, I, device="cuda", dtype=torch.bfloat16)
        fwd_flops, wgrad_flops = 2 * S * H * 2 * I, 2 * S * H * I
        for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128, 256), (64,), (4, 8), (3, 4)):
            if bm * bn > 128 * 128 and warps == 4:
                continue
            routing = build_routing(index, E, bm)
            gu = x.new_empty(S, 2 * I)
            hb = x.new_empty(S, I)
            cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            triton_ops._gemm_blocks = lambda t, block_m, num_b, cfg=cfg: cfg

            def fwd():
                triton_ops.gather_gemm(
                    x,
                    w1[:, :I],
                    routing,
                    k,
                    gather_a=True,
                    b_up=w1[:, I:],
                    out=gu[:, :I],
                    out_up=gu[:, I:],
                    act_out=hb,
                    layout=layout,
                    block_m=bm,
                )

            wcfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            triton_ops._wgrad_blocks = lambda t, wcfg=wcfg: wcfg

            def wgrad():
                triton_ops.wgrad(dout, h, routing, k, dw2, gather_a=True, gather_b=False, scale=weights.reshape(-1))

            result = {}
            for label, fn, flops in (("fwd_gate_up", fwd, fwd_flops), ("wgrad_down", wgrad, wgrad_flops)):
                if label not in args.kernels:
                    result[label] = float("nan")
                    continue
                try:
                    ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                    result[label] = flops / ms / 1e9
                except (triton.runtime.errors.OutOfResources, RuntimeError) as err:
                    result[label] = float("nan")
                    print(f"  {name} {wcfg}: {label} failed: {type(err).__name__}")
            row = dict(
                date=datetime.date.today().isoformat(),
                gpu=gpu,
                triton=triton.__version__,
                shape=name,
                T=T,
                BLOCK_M=bm,
                BLOCK_N=bn,
                BLOCK_K=bk,
                num_warps=warps,
                num_stages=stages,
                fwd_gate_up_tflops=round(result["fwd_gate_up"], 1),
                wgrad_down_tflops=round(result["wgrad_down"], 1),
            )
            rows.append(row)
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sweep_tiles_{gpu_slug(gpu)}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in SHAPES:
        for col in ("fwd_gate_up_tflops", "wgrad_down_tflops"):
            best = max((r for r in rows if r["shape"] == name), key=lambda r: r[col] if r[col] == r[col] else -1)
            tiles = {key: best[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}
            print(f"best {name} {col}: {best[col]} TF/s with {tiles}")


if __name__ == "__main__":
    main()
