"""Zebra vs EP vs speed-balanced DP on one node, tokens/s of whole training steps (issue 6 benchmark).

    torchrun --nproc_per_node 4 benchmarks/bench_zebra.py --out benchmarks/results        # 2 new + 2 old
    torchrun --nproc_per_node 2 benchmarks/bench_zebra.py --models d1 --seq-lens 4096      # 1 new + 1 old
    NCCL_P2P_DISABLE=1 torchrun ... --links capped                                         # links through host

Any even number W of GPUs: the first W/2 ranks are full GPUs ("new"), the last W/2 are EMULATED older GPUs
(hetermoe.emulate preset, default ``v100-like``: fewer SMs on a green-context stream, memory-efficient SDPA,
memory cap). Methods, all on the same engine, kernels and model:

* ``zebra``: attention on the new ranks, routed experts on the old ones, R micro-batches (zebra schedule);
* ``zebra+asym``: the same with ``--asym`` experts of every layer moved to the attention ranks (Asym-EA);
* ``planned``: whatever ``hetermoe.planner.make_plan`` picks for this cluster from its built-in preset profiles
  (roles, R, Asym-EA per layer): what ``hetermoe launch --cluster`` would run;
* ``replanned``: the planner again, its profiles fitted to the measured ``planned`` step (``hetermoe plan
  --feedback``): the loop a user closes after one measured step;
* ``EP``: every rank runs attention on an equal batch and holds E/W experts;
* ``DP``: speed-balanced data parallelism (each rank the whole model, batch proportional to its measured speed);
* ``EP-full``: EP with no emulation on all W GPUs, the homogeneous reference (CSV method ``EP (W full)``).

Writes ``zebra_<device>[_w<W>][_<links>].csv`` (one row per method, model and sequence length; rows of earlier
runs with other keys are kept, so one configuration per torchrun call builds up one table), a measured timeline
PNG of one zebra step (CUDA events per action and rank) beside the simulator's prediction for the same plan,
and the simulator's error.
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
from hf_hetermoe.files import atomic_write, write_json
from hf_hetermoe.runtime import dp_plan, ep_plan, speed_shares, zebra_plan

MODELS = {
    # The paper's D1 shape: 8 layers, hidden 1024, 24 experts, top-2.
    "d1": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=16, num_local_experts=24, num_experts_per_tok=2),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
    "d1-large": dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2),
}


# bf16 weights, bf16 gradients and AdamW's two bf16 moments (the model is built in bf16; no fp32 master copy)
BYTES_PER_PARAM = 8


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


def devices(emulate: str | None, world: int) -> list[str]:
    host = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    half = world // 2
    return [host] * half + ([f"{host} [emulated {emulate}]"] * half if emulate else [host] * half)


def run(plan, name, seq_len, experts, steps, warmup, timeline=False):
    model = build(name, seq_len, experts)
    engine = hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-5, foreach=True),
                                 timeout_s=120, record_timeline=timeline)  # a lost peer is named within 2 min
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


def planned(cfg, world: int, seq_len: int, seqs: int, emulate: str | None, feedback: Path | None = None):
    """The plan ``hetermoe launch --cluster`` would make for W/2 host GPUs + W/2 emulated ones; with ``feedback``
    (a measured step of an earlier plan), from profiles fitted to it (``hetermoe plan --feedback``)."""
    from hf_hetermoe.planner import make_plan

    cluster = _cluster(devices(None, world)[0], world, seq_len, seqs, emulate, max_micro_batches=4)
    profiles = _profiles(None, None, seq_len) if PROFILES else None
    if feedback is not None:
        from hf_hetermoe.planner.feedback import describe, fitted_profiles

        profiles, factors = fitted_profiles(cfg, cluster, profiles, feedback)
        if dist.is_initialized() and dist.get_rank() == 0:
            print(f"  profiles fitted to {feedback.name}: {describe(factors)}", flush=True)
    return make_plan(cfg, cluster, profiles).plan


def link_gbps(world: int, mib: int = 64) -> float:
    """Measured all_to_all_single bandwidth (GB/s each rank sends) with this job's NCCL settings, for the CSV."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    x = torch.empty(mib * 2**20 // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    for _ in range(2):
        dist.all_to_all_single(y, x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dist.all_to_all_single(y, x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sent = x.numel() * 2 * (world - 1) / world * 5
    return sent / (time.perf_counter() - t) / 1e9


def record_oom(path: Path, name: str, seq_len: int, method: str, plan, date: str, err: Exception) -> None:
    """Append this rank's out-of-memory error to ``path`` and end the job: the peers wait in a collective that
    will never complete, so the process exits (torchrun then stops them) instead of raising."""
    rank = dist.get_rank()
    with open(path, "a") as f:
        f.write(json.dumps({"model": name, "seq_len": seq_len, "method": method, "rank": rank,
                            "device": plan.ranks[rank]["device"], "date": date,
                            "error": str(err).split(". ")[0]}) + "\n")
    print(f"{name} S={seq_len} {method}: rank {rank} out of memory; recorded in {path}, ending the job", flush=True)
    os._exit(3)


def median_step(results):
    """The timed step of median length (the step the CSV row and the saved measurement describe)."""
    return sorted(results, key=lambda r: r.seconds)[len(results) // 2]


def summarise(results) -> dict:
    # Busy time and length of the same step: the mean busy time over the timed steps divided by the median length
    # read 1.50 on an emulated rank with one timed step far longer than the median (first-use autotuning).
    mid = median_step(results)
    return {"step_ms": mid.seconds * 1e3, "tokens": mid.tokens, "tokens_per_s": mid.tokens / mid.seconds,
            "util": mid.utilisation}


PROFILES = ""  # --profiles: a path pattern with {seq_len}, measured by `hetermoe profile`; "" = built-in presets


def _profiles(kinds, dims, seq_len):
    from hf_hetermoe.planner import ProfileSet, preset_profiles

    if PROFILES:
        return ProfileSet.load(PROFILES.format(seq_len=seq_len))
    return preset_profiles(kinds, dims, seq_len)


def _cluster(host, world, seq_len, seqs, emulate, max_micro_batches=8):
    """This node as a cluster file would describe it: W/2 host GPUs, then W/2 emulated ones."""
    from hf_hetermoe.planner import ClusterConfig

    half = world // 2
    host = "NVIDIA H100 80GB HBM3" if host == "cpu" else host  # CPU smoke run: plan as if on H100s
    old = {"device": host, "count": half, **({"emulate": emulate} if emulate else {})}
    return ClusterConfig.from_dict({
        "nodes": [{"name": "n0", "gpus": [{"device": host, "count": half}, old]}],
        "training": {"seq_len": seq_len, "global_batch_sequences": seqs, "max_micro_batches": max_micro_batches,
                     "bytes_per_param": BYTES_PER_PARAM}})


def _cost(name, seq_len, emulate, host, world, seqs):
    """The planner's cost model of this node: W/2 host GPUs + W/2 emulated ones (--profiles, or presets)."""
    from hf_hetermoe.planner import CostModel, model_dims

    cluster = _cluster(host, world, seq_len, seqs, emulate)
    dims = model_dims(config(name, seq_len))
    return CostModel(dims, cluster, _profiles(cluster.kinds(), dims, seq_len))


def simulate(plan, name, seq_len, emulate, host, world):
    """The simulator's prediction for ``plan`` with preset profiles of the host and the emulated kind."""
    from hf_hetermoe.planner.feedback import layout_of
    from hf_hetermoe.planner.simulator import simulate_layout

    seqs = plan.sequences_per_attention_rank * sum(r["role"] == "attention" for r in plan.ranks)
    return simulate_layout(_cost(name, seq_len, emulate, host, world, seqs), layout_of(plan), f"simulated {name}")


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
    half = len(events_by_rank) // 2
    ax.set_yticklabels([f"rank {r}" + (" (emulated)" if r >= half else "") for r in range(len(events_by_rank))])
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
    ap.add_argument("--tokens", type=int, default=0, help="tokens per step (global batch); 0: 16384 per GPU")
    ap.add_argument("--emulate", default="v100-like")
    ap.add_argument("--asym", type=int, default=2, help="experts per layer moved to attention ranks (zebra+asym)")
    ap.add_argument("--experts", default="hetermoe", help="experts implementation: hetermoe, grouped_mm, ...")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps: JIT compiling and autotuning")
    ap.add_argument("--links", default="nvlink", help="label for the CSV (nvlink, or capped with NCCL_P2P_DISABLE=1)")
    ap.add_argument("--timeline-seq", type=int, default=16384, help="seq_len of the first model whose zebra step "
                    "is drawn (measured and simulated timeline PNGs)")
    ap.add_argument("--timeline-model", default="d1", help="model whose step is drawn")
    ap.add_argument("--timeline-method", default="planned", help="method whose step is drawn")
    # The baselines that can run out of memory on the emulated ranks (an OOM ends the case's job) come last.
    ap.add_argument("--methods", default="planned,replanned,zebra,zebra+asym,EP-full,EP,DP")
    ap.add_argument("--profiles", default="", help="profiles JSON for the planner and simulator, measured by "
                    "`hetermoe profile` on these GPUs; may contain {seq_len} (default: built-in preset profiles)")
    args = ap.parse_args()
    global PROFILES
    PROFILES = args.profiles
    if os.environ.get("BENCH_DUMP_AFTER"):  # print every thread's stack and exit if the run hangs
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["BENCH_DUMP_AFTER"]), exit=True)
    smoke = not torch.cuda.is_available()  # CPU: a gloo smoke run of the script itself (tiny model, no emulation)
    dist.init_process_group("gloo" if smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not smoke:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if world < 2 or world % 2:
        raise SystemExit(f"bench_zebra needs an even number of ranks (half new, half emulated); got {world}")
    half = world // 2
    args.tokens = args.tokens or 16384 * world
    host = torch.cuda.get_device_name() if not smoke else "cpu"
    if smoke:
        args.emulate = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = host.lower().replace("nvidia ", "").replace(" ", "_")
    tag = (slug if world == 4 else f"{slug}_w{world}") + ("" if args.links == "nvlink" else f"_{args.links}")
    rows = []
    methods = args.methods.split(",")
    gbps = link_gbps(world)
    if rank == 0:
        print(f"{world} ranks, all_to_all {gbps:.1f} GB/s per rank ({args.links})", flush=True)
    date = dt.date.today().isoformat()
    for mi, name in enumerate(args.models.split(",")):
        seq_lens = args.seq_lens if mi == 0 else args.large_seq_lens
        for seq_len in [int(s) for s in seq_lens.split(",")]:
            seqs = max(args.tokens // seq_len, world)
            per_attn = seqs // half
            R = min(per_attn, 4)
            cfg = config(name, seq_len)
            emu, full = devices(args.emulate, world), devices(None, world)
            plans = {
                "zebra": zebra_plan(cfg, half, half, micro_batches=R, sequences_per_attention_rank=per_attn,
                                    seq_len=seq_len, devices=emu),
                "zebra+asym": zebra_plan(cfg, half, half, micro_batches=R, sequences_per_attention_rank=per_attn,
                                         seq_len=seq_len, devices=emu,
                                         asym_ea={li: args.asym for li in range(cfg.num_hidden_layers)}),
                "EP": ep_plan(cfg, world, sequences_per_rank=seqs // world, seq_len=seq_len, devices=emu),
                "EP-full": ep_plan(cfg, world, sequences_per_rank=seqs // world, seq_len=seq_len, devices=full),
            }
            for method in methods:
                t0 = time.time()
                measured = out / f"zebra_step_{tag}_{name}_{seq_len}.json"  # the planned step, for `replanned`
                if method in ("planned", "replanned"):  # rank 0 plans, every rank runs that very plan
                    box = [None]
                    if rank == 0 and (method == "planned" or measured.exists()):
                        box[0] = planned(cfg, world, seq_len, seqs, args.emulate,
                                         measured if method == "replanned" else None)
                    dist.broadcast_object_list(box, src=0)
                    plan = box[0]
                    if plan is None:
                        if rank == 0:
                            print(f"{name} S={seq_len} replanned: no {measured.name} (run 'planned' first); skipped")
                        continue
                    if rank == 0:
                        layer0 = {k: len(v) for k, v in (plan.placement[0] if plan.placement else {}).items()}
                        print(f"  planned: R={plan.micro_batches}, roles {[r['role'] for r in plan.ranks]}, "
                              f"experts per local rank in layer 0 {layer0}", flush=True)
                elif method == "DP":
                    # speed-balanced: measure one sequence per rank, then split the batch by speed
                    probe_plan = dp_plan(cfg, [1] * world, seq_len, emu)
                    try:
                        probe = run(probe_plan, name, seq_len, args.experts, 1, 1)
                    except torch.OutOfMemoryError as err:
                        record_oom(out / f"zebra_{tag}_oom.jsonl", name, seq_len, "DP (speed probe)", probe_plan,
                                   date, err)
                    speed = [1.0 / max(b, 1e-9) for b in probe[-1].busy_s]
                    plan = dp_plan(cfg, speed_shares(seqs, speed), seq_len, emu)
                else:
                    plan = plans[method]
                pick = int(seq_lens.split(",")[-1]) if smoke else args.timeline_seq
                timeline = method == args.timeline_method and name == args.timeline_model and seq_len == pick
                try:
                    res = run(plan, name, seq_len, args.experts, args.steps, args.warmup, timeline)
                except torch.OutOfMemoryError as err:
                    record_oom(out / f"zebra_{tag}_oom.jsonl", name, seq_len, method, plan, date, err)
                s = summarise(res)
                if method == "planned" and rank == 0:
                    from hf_hetermoe.planner.feedback import save_measurement

                    mid = median_step(res)
                    save_measurement(measured, plan, mid.busy_s, mid.seconds)
                label = f"EP ({world} full)" if method == "EP-full" else method
                label = "planned (profiled)" if method == "planned" and PROFILES else label
                row = {"model": name, "seq_len": seq_len, "method": label, "tokens_per_step": s["tokens"],
                       "step_ms": round(s["step_ms"], 2), "tokens_per_s": round(s["tokens_per_s"]),
                       "util": " ".join(f"{u:.2f}" for u in s["util"]), "R": plan.micro_batches,
                       "batch_split": " ".join(str(r.get("sequences", plan.sequences_per_attention_rank)
                                                   if r["role"] == "attention" else 0) for r in plan.ranks),
                       "links": args.links, "link_GBps": round(gbps, 1),
                       "profiles": "measured" if PROFILES else "presets", "experts": args.experts, "device": host,
                       "gpus": world, "emulated": (f"ranks {half}-{world - 1} EMULATED {args.emulate}"
                                                   if method != "EP-full" and args.emulate else "none"),
                       "torch": torch.__version__, "date": date}
                if timeline:
                    gathered = [None] * world
                    dist.all_gather_object(gathered, median_step(res).timeline)  # the step the CSV reports
                    if rank == 0 and smoke:
                        plot_measured(gathered, out / "zebra_timeline_measured_smoke.png", "smoke")
                    if rank == 0 and not smoke:
                        sim = simulate(plan, name, seq_len, args.emulate, host, world)
                        err = (sim.step_ms - s["step_ms"]) / s["step_ms"]
                        row["simulated_step_ms"] = round(sim.step_ms, 2)
                        row["simulator_error"] = f"{err:+.1%}"
                        title = (f"measured {label} step, {name} seq {seq_len}, R={plan.micro_batches}, {host}; "
                                 f"ranks {half}-{world - 1} EMULATED {args.emulate}; step {s['step_ms']:.1f} ms "
                                 f"(simulator {sim.step_ms:.1f} ms, error {err:+.1%})")
                        plot_measured(gathered, out / f"zebra_timeline_measured_{tag}.png", title)
                        from hf_hetermoe.planner.trace import write_timeline_png

                        write_timeline_png(sim, out / f"zebra_timeline_simulated_{tag}.png",
                                           title=f"simulated (preset profiles), same plan: {sim.step_ms:.1f} ms")
                        write_json(out / f"zebra_timeline_{tag}.json", gathered)
                if rank == 0:
                    print(f"{name} S={seq_len} {label:12s} {row['tokens_per_s']:>9} tok/s  step {row['step_ms']} ms  "
                          f"util {row['util']}  ({time.time() - t0:.0f}s)", flush=True)
                rows.append(row)
                if rank == 0:
                    write_csv(rows, out / f"zebra_{tag}.csv")
    dist.destroy_process_group()


def write_csv(rows: list[dict], path: Path) -> None:
    """Rewrite the CSV atomically after every row, so a cut-off run keeps what it measured. Rows already in the
    file for other (model, seq_len, method) keys are kept; this run's rows replace those with the same key."""
    def key(r):
        return (r["model"], str(r["seq_len"]), r["method"])

    mine = {key(r) for r in rows}
    old = []
    if path.exists():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if key(r) not in mine]
    rows = old + rows
    first = max(rows, key=len)
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(first).index(k) if k in first else 99)
    with atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
