"""Zebra vs EP vs speed-balanced DP on one node, tokens/s of whole training steps (issue 6 benchmark).

    torchrun --nproc_per_node 4 benchmarks/bench_zebra.py --out benchmarks/results        # 4 GPUs
    NCCL_P2P_DISABLE=1 torchrun ... --links capped                                         # links through host

Ranks 0-1 are full GPUs ("new"); ranks 2-3 are EMULATED older GPUs (hetermoe.emulate preset, default
``v100-like``: fewer SMs in a green context, memory-efficient SDPA, memory cap). Methods, all on the same engine,
kernels and model:

* ``zebra``: attention on ranks 0-1, routed experts on ranks 2-3, R micro-batches (zebra schedule);
* ``zebra+asym``: the same with ``--asym`` experts of every layer moved to the attention ranks (Asym-EA);
* ``EP``: every rank runs attention on an equal batch and holds E/4 experts;
* ``DP``: speed-balanced data parallelism (each rank the whole model, batch proportional to its measured speed);
* ``EP (4 full)``: EP with no emulation, the homogeneous reference.

Writes ``zebra_<device>.csv`` (one row per method, model and sequence length), a measured timeline PNG of one
zebra step (CUDA events per action and rank) beside the simulator's prediction for the same plan, and the
simulator's error.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, MixtralConfig

import hf_hetermoe as hetermoe
from hf_hetermoe.runtime import dp_plan, ep_plan, zebra_plan

MODELS = {
    # The paper's D1 shape: 8 layers, hidden 1024, 24 experts, top-2.
    "d1": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=16, num_local_experts=24, num_experts_per_tok=2),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
    "d1-large": dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2),
}


def config(name: str, seq_len: int) -> MixtralConfig:
    return MixtralConfig(vocab_size=32000, max_position_embeddings=max(seq_len, 4096), output_router_logits=False,
                         **MODELS[name])


def build(name: str, seq_len: int, experts: str):
    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with dev:  # initialise on the GPU (seconds instead of minutes on the host); distribute keeps this rank's part
        model = AutoModelForCausalLM.from_config(config(name, seq_len), dtype=torch.bfloat16)
    if experts == "hetermoe":
        model = hetermoe.prepare(model)
    else:
        model.set_experts_implementation(experts)
    return model


def devices(emulate: str | None) -> list[str]:
    host = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [host, host] + ([f"{host} [emulated {emulate}]"] * 2 if emulate else [host, host])


def run(plan, name, seq_len, experts, steps, warmup, timeline=False):
    model = build(name, seq_len, experts)
    engine = hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-5, foreach=True),
                                 timeout_s=600, record_timeline=timeline)
    rank = dist.get_rank()
    seqs = next((r.get("sequences", plan.sequences_per_attention_rank) for r in plan.ranks
                 if r["rank"] == rank and r["role"] == "attention"), 0)
    g = torch.Generator().manual_seed(rank)
    batch = {"input_ids": torch.randint(0, 32000, (seqs, seq_len), generator=g)} if seqs else None
    results = []
    for i in range(warmup + steps):
        res = engine.train_step(batch)
        if rank == 0 and os.environ.get("BENCH_VERBOSE"):
            print(f"  step {i}: {res.seconds * 1e3:.1f} ms", flush=True)
        if i >= warmup:
            results.append(res)
    engine.close()
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def summarise(results) -> dict:
    secs = sorted(r.seconds for r in results)[len(results) // 2]
    tokens = results[0].tokens
    busy = [sum(r.busy_s[i] for r in results) / len(results) for i in range(len(results[0].busy_s))]
    return {"step_ms": secs * 1e3, "tokens": tokens, "tokens_per_s": tokens / secs,
            "util": [b / secs for b in busy]}


def simulate(plan, name, seq_len, emulate, host):
    """The simulator's prediction for ``plan`` with preset profiles of the host and the emulated kind."""
    from hf_hetermoe.planner import ClusterConfig, CostModel, ZPLayout, model_dims, preset_profiles
    from hf_hetermoe.planner.simulator import simulate_layout

    cluster = ClusterConfig.from_dict({
        "nodes": [{"name": "n0", "gpus": [{"device": host, "count": 2},
                                          {"device": host, "count": 2, "emulate": emulate}]}],
        "training": {"seq_len": seq_len, "global_batch_sequences": plan.sequences_per_attention_rank * 2,
                     "max_micro_batches": 8}})
    dims = model_dims(config(name, seq_len))
    cost = CostModel(dims, cluster, preset_profiles(cluster.kinds(), dims, seq_len))
    sched = plan.get_schedule(validate=False)
    lay = ZPLayout(plan.zp_groups, list(sched.attention_ranks), sched.placement, plan.micro_batches,
                   plan.sequences_per_attention_rank)
    return simulate_layout(cost, lay, "zebra (simulated)")


def plot_measured(events_by_rank: list[list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"attn_fwd": "#4c72b0", "attn_bwd": "#1f3f73", "expert_fwd": "#dd8452", "expert_bwd": "#a0522d",
              "head": "#55a868"}
    fig, ax = plt.subplots(figsize=(14, 1 + 0.6 * len(events_by_rank)))
    for r, events in enumerate(events_by_rank):
        for e in events:
            ax.barh(r, e["end_ms"] - e["start_ms"], left=e["start_ms"], color=colors.get(e["kind"], "#999"),
                    edgecolor="none", height=0.7)
    ax.set_yticks(range(len(events_by_rank)))
    ax.set_yticklabels([f"rank {r}" + (" (emulated)" if r >= 2 else "") for r in range(len(events_by_rank))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (CUDA events on each rank's compute stream; ranks' clocks aligned at step start)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper right", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default="d1,d1-large")
    ap.add_argument("--seq-lens", default="4096,16384,32768")
    ap.add_argument("--large-seq-lens", default="4096,16384", help="sequence lengths for the models after the first")
    ap.add_argument("--tokens", type=int, default=131072, help="tokens per step (global batch)")
    ap.add_argument("--emulate", default="v100-like")
    ap.add_argument("--asym", type=int, default=2, help="experts per layer moved to attention ranks (zebra+asym)")
    ap.add_argument("--experts", default="hetermoe", help="experts implementation: hetermoe, grouped_mm, ...")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--links", default="nvlink", help="label for the CSV (nvlink, or capped with NCCL_P2P_DISABLE=1)")
    ap.add_argument("--methods", default="zebra,zebra+asym,EP,DP,EP (4 full)")
    args = ap.parse_args()
    if os.environ.get("BENCH_DUMP_AFTER"):  # print every thread's stack and exit if the run hangs
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["BENCH_DUMP_AFTER"]), exit=True)
    smoke = not torch.cuda.is_available()  # CPU: a gloo smoke run of the script itself (tiny model, no emulation)
    dist.init_process_group("gloo" if smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not smoke:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    assert world == 4, "bench_zebra runs on 4 GPUs (2 new + 2 emulated)"
    host = torch.cuda.get_device_name() if not smoke else "cpu"
    if smoke:
        args.emulate = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = host.lower().replace("nvidia ", "").replace(" ", "_")
    rows = []
    methods = args.methods.split(",")
    date = dt.date.today().isoformat()
    for mi, name in enumerate(args.models.split(",")):
        seq_lens = args.seq_lens if mi == 0 else args.large_seq_lens
        for seq_len in [int(s) for s in seq_lens.split(",")]:
            seqs = max(args.tokens // seq_len, 4)
            per_attn = seqs // 2
            R = min(per_attn, 4)
            cfg = config(name, seq_len)
            plans = {
                "zebra": zebra_plan(cfg, 2, 2, micro_batches=R, sequences_per_attention_rank=per_attn,
                                    seq_len=seq_len, devices=devices(args.emulate)),
                "zebra+asym": zebra_plan(cfg, 2, 2, micro_batches=R, sequences_per_attention_rank=per_attn,
                                         seq_len=seq_len, devices=devices(args.emulate),
                                         asym_ea={li: args.asym for li in range(cfg.num_hidden_layers)}),
                "EP": ep_plan(cfg, 4, sequences_per_rank=seqs // 4, seq_len=seq_len, devices=devices(args.emulate)),
                "EP (4 full)": ep_plan(cfg, 4, sequences_per_rank=seqs // 4, seq_len=seq_len, devices=devices(None)),
            }
            for method in methods:
                t0 = time.time()
                if method == "DP":
                    # speed-balanced: measure one sequence per rank, then split the batch by speed
                    probe = run(dp_plan(cfg, [1, 1, 1, 1], seq_len, devices(args.emulate)), name, seq_len,
                                args.experts, 1, 1)
                    speed = [1.0 / max(b, 1e-9) for b in probe[-1].busy_s]
                    share = [max(1, round(seqs * s / sum(speed))) for s in speed]
                    share[0] += seqs - sum(share)
                    plan = dp_plan(cfg, share, seq_len, devices(args.emulate))
                else:
                    plan = plans[method]
                lens = seq_lens.split(",")
                pick = lens[-1 if smoke else min(1, len(lens) - 1)]
                timeline = method == "zebra" and mi == 0 and seq_len == int(pick)
                res = run(plan, name, seq_len, args.experts, args.steps, args.warmup, timeline)
                s = summarise(res)
                row = {"model": name, "seq_len": seq_len, "method": method, "tokens_per_step": s["tokens"],
                       "step_ms": round(s["step_ms"], 2), "tokens_per_s": round(s["tokens_per_s"]),
                       "util": " ".join(f"{u:.2f}" for u in s["util"]), "R": plan.micro_batches,
                       "batch_split": " ".join(str(r.get("sequences", plan.sequences_per_attention_rank)
                                                   if r["role"] == "attention" else 0) for r in plan.ranks),
                       "links": args.links, "experts": args.experts, "device": host,
                       "emulated": f"ranks 2-3 {args.emulate}" if method != "EP (4 full)" and args.emulate else "none",
                       "torch": torch.__version__, "date": date}
                if timeline:
                    gathered = [None] * world
                    dist.all_gather_object(gathered, res[-1].timeline)
                    if rank == 0 and smoke:
                        plot_measured(gathered, out / "zebra_timeline_measured_smoke.png", "smoke")
                    if rank == 0 and not smoke:
                        sim = simulate(plan, name, seq_len, args.emulate, host)
                        err = (sim.step_ms - s["step_ms"]) / s["step_ms"]
                        row["simulated_step_ms"] = round(sim.step_ms, 2)
                        row["simulator_error"] = f"{err:+.1%}"
                        title = (f"measured zebra step, {name} seq {seq_len}, R={plan.micro_batches}, {host}; "
                                 f"ranks 2-3 EMULATED {args.emulate}; step {s['step_ms']:.1f} ms (simulator "
                                 f"{sim.step_ms:.1f} ms, error {err:+.1%})")
                        plot_measured(gathered, out / f"zebra_timeline_measured_{slug}.png", title)
                        from hf_hetermoe.planner.trace import write_timeline_png

                        write_timeline_png(sim, out / f"zebra_timeline_simulated_{slug}.png",
                                           title=f"simulated (preset profiles), same plan: {sim.step_ms:.1f} ms")
                        (out / f"zebra_timeline_{slug}.json").write_text(json.dumps(gathered))
                if rank == 0:
                    print(f"{name} S={seq_len} {method:12s} {row['tokens_per_s']:>9} tok/s  step {row['step_ms']} ms  "
                          f"util {row['util']}  ({time.time() - t0:.0f}s)", flush=True)
                rows.append(row)
                if rank == 0:
                    write_csv(rows, out, slug, args.links)
    dist.destroy_process_group()


def write_csv(rows: list[dict], out: Path, slug: str, links: str) -> None:
    """Rewrite the whole CSV atomically after every row, so a cut-off run keeps what it measured."""
    path = out / f"zebra_{slug}{'' if links == 'nvlink' else '_' + links}.csv"
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
