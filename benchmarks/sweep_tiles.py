"""Tile sweep of the expert kernels over the autotuner's candidate lists (issue 3; GPU only).

For a few shapes, times every candidate of ``hf_hetermoe.kernels.tuning`` on each matmul of one experts layer
(bf16; GPT-OSS in its interleaved, transposed layout): the forward gate/up gathered matmul with the fused
activation (``fwd_gate_up``), the down projection (``fwd_down``), the backward's ``g = dout @ w2`` (``bwd_g``)
and ``dx = dgu @ w1`` (``bwd_dx``), and the two weight gradients (``wgrad_up``: dgu^T x[tok], ``wgrad_down``:
dout[tok]^T (w h)). Each kernel's output is checked against torch on the first candidate. Times are medians of
``--rounds`` rounds over all candidates of a kernel, their order rotated each round (the GPU's clocks drop under
sustained load); ``--timing sustained`` or ``both`` times each candidate back to back at its sustained clocks.
Prints one line per (shape, kernel, candidate), the best per (shape, kernel) last, and writes
``sweep_candidates_<gpu>.csv`` to ``--out`` (``sweep_tiles_<gpu>.csv`` holds the earlier, v1 sweep of this script).

    python benchmarks/sweep_tiles.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
from pathlib import Path

import torch

# name: (H, I, E, k, T)
SHAPES = {
    "qwen3_30b_a3b": (2048, 768, 128, 8, 16384),
    "olmoe_1b_7b": (2048, 1024, 64, 8, 16384),
    "deepseek_v3_like": (7168, 2048, 32, 8, 16384),
    "gpt_oss_20b": (2880, 2880, 32, 4, 16384),
    "mixtral_8x7b": (4096, 14336, 8, 2, 4096),
}
KERNELS = (
    "fwd_gate_up", "fwd_down", "bwd_g", "bwd_dx", "wgrad_up", "wgrad_down",
    # the weight gradients on operands gathered beforehand (no row indices in the loop), and that gather itself
    "wgrad_up_contig", "wgrad_down_contig", "gather_rows",
    # torch._grouped_mm (CUTLASS on sm_90) on the same pre-gathered operands: a vendor reference per matmul
    "fwd_gate_up_grouped_mm", "fwd_down_grouped_mm", "wgrad_up_grouped_mm", "wgrad_down_grouped_mm",
    "bwd_g_grouped_mm", "bwd_dx_grouped_mm",
    # cuBLAS on one dense weight with the same FLOPs (gate/up, dx, dW1: [S, H] x [H, 2I]; down, g, dW2: [S, I] x
    # [I, H]): no expert weights to stream, the per-matmul roof (with --timing sustained, its energy per FLOP too)
    "dense_up", "dense_down",
)


def problems(name, H, I, E, k, T, device="cuda", dtype=torch.bfloat16, block_m=None):
    """(kernel, flops, run(config), check()) for every matmul of one layer on random data."""
    from hf_hetermoe.kernels import ExpertLayout, build_routing, split_gate_up, triton_ops

    gpt_oss = name.startswith("gpt_oss")  # gate/up interleaved, weights stored [E, in, out]
    layout = ExpertLayout(is_concatenated=not gpt_oss, is_transposed=gpt_oss)
    bf = dict(device=device, dtype=dtype)
    S = T * k
    x = torch.randn(T, H, **bf)
    index = torch.rand(T, E, device=device).topk(k, dim=-1).indices
    routing_block_m = block_m or triton_ops.block_m_for(x.device)
    routing = build_routing(index, E, routing_block_m)
    if gpt_oss:  # logical [E, N, K] views of [E, in, out] storage
        w1 = torch.randn(E, H, 2 * I, **bf).mul_(H**-0.5).transpose(1, 2)
        w2 = torch.randn(E, I, H, **bf).mul_(I**-0.5).transpose(1, 2)
    else:
        w1 = torch.randn(E, 2 * I, H, **bf).mul_(H**-0.5)
        w2 = torch.randn(E, H, I, **bf).mul_(I**-0.5)
    w_gate, w_up = split_gate_up(w1, 1, layout)
    gu = torch.empty(S, 2 * I, **bf)
    gu_gate, gu_up = split_gate_up(gu, 1, layout)
    h = torch.randn(S, I, **bf)
    y = torch.empty(S, H, **bf)
    dout = torch.randn(T, H, **bf)
    dgu = torch.randn(S, 2 * I, **bf) * 0.1
    g = torch.empty(S, I, **bf)
    dxs = torch.empty(S, H, **bf)
    dw1 = torch.empty_like(w1)  # same strides as the weights (empty_like keeps a transposed view's layout)
    dw2 = torch.empty_like(w2)
    tok = routing.order.long() // k
    experts = routing.expert.long()
    e0 = int(experts[0])
    rows0 = (experts == e0).nonzero().squeeze(1)  # sorted rows of the first expert, for spot checks

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def gemm(kind):
        if kind == "fwd_gate_up" and gpt_oss:  # interleaved: one operand, the activation pairs adjacent columns
            return lambda c: triton_ops.gather_gemm(
                x,
                w1,
                routing,
                k,
                gather_a=True,
                out=gu,
                act_out=h,
                layout=layout,
                block_m=routing_block_m,
                paired=True,
                config=c,
            )
        if kind == "fwd_gate_up":
            return lambda c: triton_ops.gather_gemm(
                x,
                w_gate,
                routing,
                k,
                gather_a=True,
                b_up=w_up,
                out=gu_gate,
                out_up=gu_up,
                act_out=h,
                layout=layout,
                block_m=routing_block_m,
                config=c,
            )
        if kind == "fwd_down":
            return lambda c: triton_ops.gather_gemm(
                h, w2, routing, k, gather_a=False, out=y, block_m=routing_block_m, config=c
            )
        if kind == "bwd_g":
            return lambda c: triton_ops.gather_gemm(
                dout, w2.transpose(1, 2), routing, k, gather_a=True, out=g, block_m=routing_block_m, config=c
            )
        return lambda c: triton_ops.gather_gemm(
            dgu, w1.transpose(1, 2), routing, k, gather_a=False, out=dxs, block_m=routing_block_m, config=c
        )

    checks = {
        "fwd_gate_up": lambda: rel(gu_gate[rows0], x[tok[rows0]] @ w_gate[e0].T),
        "fwd_down": lambda: rel(y[rows0], h[rows0] @ w2[e0].T),
        "bwd_g": lambda: rel(g[rows0], dout[tok[rows0]] @ w2[e0]),
        "bwd_dx": lambda: rel(dxs[rows0], dgu[rows0] @ w1[e0]),
        "wgrad_up": lambda: rel(dw1[e0], dgu[rows0].T @ x[tok[rows0]]),
        "wgrad_down": lambda: rel(dw2[e0], dout[tok[rows0]].T @ h[rows0]),
    }
    flops_up, flops_down = 2 * S * H * 2 * I, 2 * S * H * I
    out = []
    for kind, flops in (
        ("fwd_gate_up", flops_up),
        ("fwd_down", flops_down),
        ("bwd_g", flops_down),
        ("bwd_dx", flops_up),
    ):
        out.append((kind, flops, gemm(kind), checks[kind]))
    out.append(
        (
            "wgrad_up",
            flops_up,
            lambda c: triton_ops.wgrad(dgu, x, routing, k, dw1, gather_a=False, gather_b=True, config=c),
            checks["wgrad_up"],
        )
    )
    out.append(
        (
            "wgrad_down",
            flops_down,
            lambda c: triton_ops.wgrad(dout, h, routing, k, dw2, gather_a=True, gather_b=False, config=c),
            checks["wgrad_down"],
        )
    )
    # Upper bound of pre-gathering: the same kernel with contiguous operands (x[tok], dout[tok] copied before).
    x_rows, dout_rows = x[tok], dout[tok]
    out.append(
        (
            "wgrad_up_contig",
            flops_up,
            lambda c: triton_ops.wgrad(dgu, x_rows, routing, k, dw1, gather_a=False, gather_b=False, config=c),
            checks["wgrad_up"],
        )
    )
    out.append(
        (
            "wgrad_down_contig",
            flops_down,
            lambda c: triton_ops.wgrad(dout_rows, h, routing, k, dw2, gather_a=False, gather_b=False, config=c),
            checks["wgrad_down"],
        )
    )
    # The gather's cost (reported as TB/s in the tflops column: bytes read + written over time).
    out.append(("gather_rows", 2 * S * H * x.element_size(), lambda c: torch.index_select(x, 0, tok, out=x_rows),
                lambda: rel(x_rows[rows0], x[tok[rows0]])))
    # Dense roofs: one weight, the same FLOPs (cuBLAS).
    w_dense_up, w_dense_down = w1[0].T.contiguous(), w2[0].T.contiguous()  # [H, 2I], [I, H]
    y_dense_up, y_dense_down = torch.empty(S, 2 * I, **bf), torch.empty(S, H, **bf)

    def dense(a, b, c_out):
        return lambda c: torch.mm(a, b, out=c_out)

    out += [
        ("dense_up", flops_up, dense(x_rows, w_dense_up, y_dense_up),
         lambda: rel(y_dense_up[:64], x_rows[:64].float() @ w_dense_up.float())),
        ("dense_down", flops_down, dense(h, w_dense_down, y_dense_down),
         lambda: rel(y_dense_down[:64], h[:64].float() @ w_dense_down.float())),
    ]
    # Vendor reference: torch._grouped_mm on pre-gathered rows (the forward without the fused activation).
    if hasattr(torch, "_grouped_mm") and not gpt_oss:
        ends, res = routing.offsets[1:], {}

        def vendor(key, a, b):
            def run(c):
                res[key] = torch._grouped_mm(a, b, offs=ends)

            return run

        out += [
            ("fwd_gate_up_grouped_mm", flops_up, vendor("gu", x_rows, w1.transpose(1, 2)),
             lambda: rel(res["gu"][rows0], x[tok[rows0]] @ w1[e0].T)),
            ("fwd_down_grouped_mm", flops_down, vendor("y", h, w2.transpose(1, 2)),
             lambda: rel(res["y"][rows0], h[rows0] @ w2[e0].T)),
            ("wgrad_up_grouped_mm", flops_up, vendor("dw1", dgu.T, x_rows),
             lambda: rel(res["dw1"][e0], dgu[rows0].T @ x[tok[rows0]])),
            ("wgrad_down_grouped_mm", flops_down, vendor("dw2", dout_rows.T, h),
             lambda: rel(res["dw2"][e0], dout[tok[rows0]].T @ h[rows0])),
            ("bwd_g_grouped_mm", flops_down, vendor("g", dout_rows, w2),
             lambda: rel(res["g"][rows0], dout[tok[rows0]] @ w2[e0])),
            ("bwd_dx_grouped_mm", flops_up, vendor("dx", dgu, w1),
             lambda: rel(res["dx"][rows0], dgu[rows0] @ w1[e0])),
        ]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS[:6]), choices=KERNELS)
    parser.add_argument("--tokens", type=int, default=None, help="T for every shape (default: each shape's own)")
    parser.add_argument("--block-m", type=int, default=None, help="routing rows per tile (default: block_m_for)")
    parser.add_argument("--tag", default="", help="written to sweep_candidates_<tag>_<gpu>.csv")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over the candidates, rotating order")
    parser.add_argument("--rep", type=int, default=20, help="do_bench repetitions per round, ms")
    parser.add_argument(
        "--timing",
        default="burst",
        choices=("burst", "sustained", "both"),
        help="burst: do_bench medians (as the tuner's short timings); sustained: each candidate back to back for "
        "--sustain-warmup s, then timed over --sustain s (bench_experts.sustained_ms), the clocks a training run "
        "keeps at the power limit; both: the two, in the same rounds (columns tflops and tflops_sustained)",
    )
    parser.add_argument("--sustain-warmup", type=float, default=0.5, help="sustained timing: untimed warm-up, s")
    parser.add_argument("--sustain", type=float, default=0.5, help="sustained timing: timed window per round, s")
    args = parser.parse_args(argv)
    import gpu_energy  # benchmarks/ is on sys.path when run as a script
    import triton
    from bench_experts import gpu_slug, sustained_ms
    from triton.testing import do_bench

    from hf_hetermoe.kernels import tuning

    gpu = torch.cuda.get_device_name()
    limit = tuning.shared_memory_per_block(torch.device("cuda"))
    meter = gpu_energy.EnergyMeter.open() if args.timing != "burst" else None
    rows = []
    for name in args.shapes:
        H, I, E, k, T = SHAPES[name]
        T = args.tokens or T
        for kind, flops, run, check in problems(name, H, I, E, k, T, block_m=args.block_m):
            if kind not in args.kernels:
                continue
            family = "wgrad" if kind.startswith("wgrad") else "gemm"
            num_b = 1
            listed = tuning.WGRAD_CANDIDATES if family == "wgrad" else tuning.GEMM_CANDIDATES
            one_run = kind == "gather_rows" or kind.endswith("_grouped_mm") or kind.startswith("dense_")  # no tiles
            if one_run:
                listed = [dict(BLOCK_N=0, BLOCK_K=0, num_stages=1)]
            if kind == "fwd_gate_up" and not name.startswith("gpt_oss"):
                listed, num_b = tuning.GATED_CANDIDATES, 2
            cands = listed if one_run else [tuning.fit(family, c, limit, args.block_m or 128, num_b) for c in listed]
            cands = [c for i, c in enumerate(cands) if c not in cands[:i]]
            # First call of each candidate (compile, check the first), then timing in rounds over all candidates,
            # starting one later each round (the GPU's clocks drop under sustained load, see NOTES.md v2.10).
            errs, failed = {}, {}
            times, sustained = {i: [] for i in range(len(cands))}, {i: [] for i in range(len(cands))}
            energy = {i: [] for i in range(len(cands))}
            for i, cfg in enumerate(cands):
                try:
                    run(cfg)
                    errs[i] = check() if i == 0 else float("nan")
                except Exception as e:  # noqa: BLE001  (resource errors: report and go on)
                    failed[i] = f"{type(e).__name__}: {str(e)[:120]}"
                    print(f"  {name} {kind} {cfg}: {failed[i]}", flush=True)
            alive = [i for i in range(len(cands)) if i not in failed]
            for round_order in tuning.rotating_rounds(alive, args.rounds):
                for i in round_order:
                    if args.timing != "sustained":
                        ms = do_bench(lambda cfg=cands[i]: run(cfg), warmup=5, rep=args.rep, return_mode="median")
                        times[i].append(ms)
                    if args.timing != "burst":
                        ms = sustained_ms(
                            lambda cfg=cands[i]: run(cfg), args.sustain_warmup, args.sustain, meter, energy[i]
                        )
                        sustained[i].append(ms)
            for i, cfg in enumerate(cands):
                ms = statistics.median(times[i]) if times[i] else float("nan")
                ms_s = statistics.median(sustained[i]) if sustained[i] else float("nan")
                joules = statistics.median(w.joules_per_call for w in energy[i]) if energy[i] else float("nan")
                row = dict(
                    date=datetime.date.today().isoformat(),
                    block_m=args.block_m or 128,
                    gpu=gpu,
                    torch=torch.__version__,
                    triton=triton.__version__,
                    shape=name,
                    T=T,
                    kernel=kind,
                    candidate=i,
                    config=" ".join(f"{a}={b}" for a, b in cfg.items()),
                    ms=round(ms, 4),
                    tflops=round(flops / ms / 1e9, 1),
                    tflops_sustained=round(flops / ms_s / 1e9, 1),
                    joules=round(joules, 5),
                    gflops_per_joule=round(flops / joules / 1e9, 1),
                    rel_err=f"{errs.get(i, float('nan')):.1e}",
                )
                rows.append(row)
                print(
                    f"{name:>16} {kind:>11} #{i} {row['config']:<80} {row['tflops']:6.1f} TF/s burst "
                    f"{row['tflops_sustained']:6.1f} sustained {row['gflops_per_joule']:6.1f} GFLOP/J  "
                    f"err {row['rel_err']}",
                    flush=True,
                )
    from hf_hetermoe.files import atomic_write

    path = args.out / f"sweep_candidates_{args.tag + '_' if args.tag else ''}{gpu_slug(gpu)}.csv"
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    for name in args.shapes:
        for kind in args.kernels:
            for col in ("tflops", "tflops_sustained"):
                mine = [r for r in rows if r["shape"] == name and r["kernel"] == kind and r[col] == r[col]]
                if mine:
                    best = max(mine, key=lambda r: r[col])
                    first = mine[0][col] if mine[0]["candidate"] == 0 else float("nan")
                    print(
                        f"best {col:<16} {name:>16} {kind:>11}: {best[col]:6.1f} TF/s (#{best['candidate']} "
                        f"{best['config']}); default #0 {first} TF/s"
                    )


if __name__ == "__main__":
    main()
