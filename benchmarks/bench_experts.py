"""Experts-layer benchmark: transformers eager / grouped_mm vs hetermoe vs a dense cuBLAS roof.

Every provider runs the same real transformers experts module (only ``config._experts_implementation``
changes) on the same inputs; outputs and gradients are checked against each other before anything is
timed. FLOPs are the three expert matmuls: forward ``6*T*k*H*I``, forward+backward three times that.

    python benchmarks/bench_experts.py                     # the issue's five shapes, T in 4096 16384
    python benchmarks/bench_experts.py --shapes qwen3_235b_a22b mixtral_8x22b   # more released models' shapes
    python benchmarks/bench_experts.py --shapes qwen3_30b_a3b --tokens 4096 --providers grouped_mm hetermoe
    python benchmarks/bench_experts.py --providers hetermoe hetermoe@HETERMOE_SPLIT_TAIL=0   # A/B of one toggle
    python benchmarks/bench_experts.py --frozen-experts    # expert weights frozen (LoRA on attention): no dW

Roofs: ``dense_roof`` is one dense FFN over all ``T*k`` rows through autograd (cuBLAS matmuls plus the activation's
elementwise kernels); ``gemm_roof`` is the six cuBLAS matmuls of forward+backward alone (two for the forward), on
preallocated operands: nothing an experts layer can do is faster. ``bmm_roof`` (not run by default) is the same six as
batched matmuls over the experts' own weights, each expert's rows zero-padded to the largest expert's count.

Timing is sustained by default: each provider runs back to back for a second, then is timed over a second (mean per
call), in rounds that rotate the providers' order. An H100 / H200 runs these matmuls at its power limit, where a short
``do_bench`` burst catches boost clocks that training does not keep (``--timing burst`` times that way, as the tables
before 2026-11-23 did; benchmarks/NOTES.md, v2.15).

With ``--frozen-experts`` no expert weight requires a gradient (fine-tuning that leaves the experts alone, e.g. LoRA
on attention): every provider's backward computes dx and the routing weights' gradient only, forward+backward is
four of the six matmuls (FLOPs twice the forward's), and rows go to ``frozen_experts_<gpu>.csv`` instead.

With ``--routing balanced`` every expert gets exactly ``T*k/E`` routed pairs (a load-balanced router's ideal; the
default ``random`` spreads them binomially): the difference is what partial row tiles cost. Rows go to
``balanced_experts_<gpu>.csv``.

Sustained timing also reads the board's energy counter (NVML, ``gpu_energy.py``) over each timed window: joules per
call, mean watts, mean SM clock and GFLOP per joule of the forward+backward; joules and GFLOP per joule of the
forward. At the power limit, time per call follows energy per call; these columns say whether a change saved FLOP
time or energy.

Writes ``benchmarks/results/experts_<gpu>.csv`` (appending) and ``experts_<gpu>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# name: (family, H, I, E, k)
SHAPES = {
    "qwen3_30b_a3b": ("qwen3_moe", 2048, 768, 128, 8),
    "olmoe_1b_7b": ("olmoe", 2048, 1024, 64, 8),
    "deepseek_v3_like": ("qwen3_moe", 7168, 2048, 32, 8),  # 32 local experts of DeepSeek-V3's width
    "gpt_oss_20b": ("gpt_oss", 2880, 2880, 32, 4),
    "mixtral_8x7b": ("mixtral", 4096, 14336, 8, 2),
    # More released models' expert shapes (not run by default; --shapes ...): does the speed hold off the tuned five?
    "qwen3_235b_a22b": ("qwen3_moe", 4096, 1536, 128, 8),
    "qwen2_57b_a14b": ("qwen3_moe", 3584, 2560, 64, 8),  # routed experts; its shared expert is a dense MLP
    "deepseek_v2_lite": ("qwen3_moe", 2048, 1408, 64, 6),  # routed experts
    "gpt_oss_120b": ("gpt_oss", 2880, 2880, 128, 4),
    "mixtral_8x22b": ("mixtral", 6144, 16384, 8, 2),
}
DEFAULT_SHAPES = ("qwen3_30b_a3b", "olmoe_1b_7b", "deepseek_v3_like", "gpt_oss_20b", "mixtral_8x7b")  # the issue's
PROVIDERS = ("eager", "grouped_mm", "hetermoe", "dense_roof", "gemm_roof")
# Not run by default: hetermoe with HeterMoEConfig(recompute_gate_up=True), the memory-saving mode (no pre-activations
# saved; the backward recomputes them, in chunks of sorted rows where that lowers its peak).
# bmm_roof: the six matmuls as cuBLAS batched matmuls over experts padded to the largest one's rows (see bmm_roof).
MORE_PROVIDERS = ("hetermoe_recompute", "bmm_roof")
# "hetermoe@VAR=VALUE" (any environment toggle of hf_hetermoe.env) times hetermoe with that toggle set: a before /
# after comparison in the same run, e.g. --providers hetermoe hetermoe@HETERMOE_SPLIT_TAIL=0


def experts_module(family: str, H: int, I: int, E: int, k: int, dtype):
    """A real transformers experts module of ``family`` with the given width, randomly initialised."""
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    elif family == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as cls

        config = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    elif family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    elif family == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    else:
        raise ValueError(family)
    with torch.device("cuda"):
        module = cls(config).to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = H if "gate_up" in name else I
            p.normal_(0, fan_in**-0.5 if p.dim() == 3 else 0.02)
    return module


def select_provider(module, provider: str) -> None:
    """Point the shared experts module at ``provider`` (a transformers implementation name, or hetermoe's modes)."""
    from hf_hetermoe.experts import RECOMPUTE_ATTR

    module.config._experts_implementation = "hetermoe" if provider.startswith("hetermoe") else provider
    setattr(module, RECOMPUTE_ATTR, provider == "hetermoe_recompute")


def run_provider(module, provider: str, x, index, weights, dout):
    """Closures for forward and forward+backward of one provider."""
    import hf_hetermoe  # noqa: F401  (registers "hetermoe")
    from hf_hetermoe import HeterMoEConfig, env

    params = [p for p in module.parameters() if p.requires_grad]  # none with --frozen-experts
    select_provider(module, provider)
    # What hetermoe.prepare sets for its user's loop (HeterMoEConfig.backward_on_calling_thread, on by default since
    # v2.29: the backward on the calling thread); hetermoe@HETERMOE_CALLING_THREAD_BACKWARD=0 runs it on autograd's
    # device worker thread, as the transformers baselines do (PyTorch's default).
    calling_thread = provider.startswith("hetermoe") and env.calling_thread_backward(
        HeterMoEConfig().backward_on_calling_thread
    )

    def fwd():
        return module(x, index, weights)

    def fwd_bwd():
        out = module(x, index, weights)
        with torch.autograd.set_multithreading_enabled(not calling_thread):
            return torch.autograd.grad(out, [x, weights, *params], dout)

    return fwd, fwd_bwd


def dense_roof(T, H, I, k, dtype, frozen=False):
    """cuBLAS chain with the same FLOPs: one dense FFN over all T*k routed rows."""
    S = T * k
    a = torch.randn(S, H, device="cuda", dtype=dtype, requires_grad=True)
    w1 = torch.randn(2 * I, H, device="cuda", dtype=dtype, requires_grad=not frozen)
    w2 = torch.randn(H, I, device="cuda", dtype=dtype, requires_grad=not frozen)
    dout = torch.randn(S, H, device="cuda", dtype=dtype)

    def fwd():
        g, u = torch.nn.functional.linear(a, w1).chunk(2, dim=-1)
        return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w2)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), [a] if frozen else [a, w1, w2], dout)

    return fwd, fwd_bwd


def gemm_roof(T, H, I, k, dtype, frozen=False):
    """The six cuBLAS matmuls of a dense FFN's forward+backward over all T*k rows, alone, into preallocated
    outputs (``_six_matmuls``; the weight gradients not with ``frozen`` weights)."""
    S = T * k
    a, dy, y, dx = (torch.randn(S, H, device="cuda", dtype=dtype) for _ in range(4))
    gu, dgu = (torch.randn(S, 2 * I, device="cuda", dtype=dtype) for _ in range(2))
    h, g = (torch.randn(S, I, device="cuda", dtype=dtype) for _ in range(2))
    w1, dw1 = (torch.randn(2 * I, H, device="cuda", dtype=dtype) for _ in range(2))
    w2, dw2 = (torch.randn(H, I, device="cuda", dtype=dtype) for _ in range(2))
    return _six_matmuls(torch.mm, a, dy, dgu, h, y, dx, gu, g, w1, dw1, w2, dw2, frozen)


def _six_matmuls(mm, a, dy, dgu, h, y, dx, gu, g, w1, dw1, w2, dw2, frozen):
    """``fwd`` and ``fwd_bwd`` of the roofs: gu = a w1^T, y = h w2^T; g = dy w2, dx = dgu w1, dW1 = dgu^T a,
    dW2 = dy^T h, each through ``mm`` (``torch.mm``, or ``torch.bmm`` on a leading expert dimension) into the given
    outputs; without the weight gradients when ``frozen``."""

    def t(m):
        return m.transpose(-2, -1)

    def fwd():
        mm(a, t(w1), out=gu)
        mm(h, t(w2), out=y)
        return y

    def fwd_bwd():
        fwd()
        mm(dy, w2, out=g)
        mm(dgu, w1, out=dx)
        if frozen:
            return (dx,)
        mm(t(dgu), a, out=dw1)
        mm(t(dy), h, out=dw2)
        return dx, dw1, dw2

    return fwd, fwd_bwd


def bmm_roof(T, H, I, E, k, index, dtype, frozen=False):
    """The six matmuls as cuBLAS batched matmuls, one batch entry per expert (``torch.bmm`` on ``[E, C, .]``), each
    expert's rows padded with zeros to ``C``, the largest expert's count of this routing rounded up to 64: what the
    vendor library reaches with E distinct weights once routing is made rectangular. Same outputs as ``gemm_roof``
    per expert (gu, y; g, dx, dW1, dW2). TF/s counts the routed rows' FLOPs only, so the padding is a cost here; it is
    work on zeros, cheap in energy. Not a layer: no gather, activation or combine."""
    counts = torch.bincount(index.flatten(), minlength=E)
    cap = -(-int(counts.max()) // 64) * 64
    live = (torch.arange(cap, device="cuda")[None, :] < counts[:, None])[..., None]  # [E, C, 1]

    def rows(n):
        return torch.randn(E, cap, n, device="cuda", dtype=dtype) * live

    a, dy = rows(H), rows(H)
    dgu, h = rows(2 * I), rows(I)
    y, dx = (torch.empty(E, cap, H, device="cuda", dtype=dtype) for _ in range(2))
    gu = torch.empty(E, cap, 2 * I, device="cuda", dtype=dtype)
    g = torch.empty(E, cap, I, device="cuda", dtype=dtype)
    w1, dw1 = (torch.randn(E, 2 * I, H, device="cuda", dtype=dtype) for _ in range(2))
    w2, dw2 = (torch.randn(E, H, I, device="cuda", dtype=dtype) for _ in range(2))
    return _six_matmuls(torch.bmm, a, dy, dgu, h, y, dx, gu, g, w1, dw1, w2, dw2, frozen)


def _variant(provider: str) -> tuple[str, dict]:
    """``"hetermoe@VAR=VALUE"`` -> ("hetermoe", {VAR: VALUE}); plain names -> (name, {})."""
    base, _, setting = provider.partition("@")
    if not setting:
        return base, {}
    var, sep, value = setting.partition("=")
    if not base.startswith("hetermoe") or not sep or not var.startswith("HETERMOE_"):
        raise SystemExit(f"provider {provider!r}: variants are written hetermoe@HETERMOE_<TOGGLE>=<value>")
    return base, {var: value}


@contextlib.contextmanager
def _toggles(settings: dict):
    """Environment variables set for the duration of one provider's measurement, then restored."""
    saved = {var: os.environ.get(var) for var in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


BF16_TOLERANCE = 3e-2  # relative-norm error of a bf16 experts layer against fp32


def fp32_truth(module, x, index, weights, dout):
    """Output and gradients (x, weights, every parameter) of transformers' eager loop on fp32 copies."""
    import copy

    exact = copy.deepcopy(module).float()
    exact.config = copy.copy(module.config)
    exact.config._experts_implementation = "eager"
    x32 = x.detach().float().requires_grad_()
    w32 = weights.detach().float().requires_grad_()
    out = exact(x32, index, w32)
    params = [p for p in exact.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x32, w32, *params], dout.float())
    truth = [out.detach(), *[g.detach() for g in grads]]
    del exact
    return truth


def route(T: int, E: int, k: int, routing: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[T, k]`` expert indices, ``k`` distinct experts per token, on CUDA (on the CPU without a GPU):

    - ``random``: each token's top-k of uniform scores (the tables' default): about ``T*k/E`` pairs per expert,
      binomially spread (Qwen3-30B-A3B at T=4096: 256 +- 16);
    - ``balanced``: exactly ``T*k/E`` pairs per expert (a load-balanced router's ideal): pair ``p = t*k + j`` goes to
      expert ``perm[p % E]``, tokens shuffled. Every expert's row count is then a multiple of what its tiles hold only
      if ``T*k/E`` is, which is the point of comparing the two: what the random spread costs in partial row tiles."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if routing == "random":
        return torch.rand(T, E, device=device, generator=generator).topk(k, dim=-1).indices
    if routing != "balanced":
        raise ValueError(f"routing {routing!r}: use 'random' or 'balanced'")
    if k > E or (T * k) % E:
        raise ValueError(f"balanced routing needs k <= E and T*k divisible by E (got T={T}, k={k}, E={E})")
    perm = torch.randperm(E, device=device, generator=generator)
    pairs = torch.arange(T * k, device=device).reshape(T, k)
    index = perm[pairs % E]
    return index[torch.randperm(T, device=device, generator=generator)]


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3'."""
    return name.lower().replace("nvidia", "").strip().replace(" ", "_")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench_one(name, T, providers, dtype, args, writer, meta):
    from triton.testing import do_bench

    from hf_hetermoe.kernels import tuning

    family, H, I, E, k = SHAPES[name]
    module = experts_module(family, H, I, E, k, dtype)
    module.requires_grad_(not args.frozen_experts)
    x = torch.randn(T, H, device="cuda", dtype=dtype, requires_grad=True)
    index = route(T, E, k, args.routing)
    weights = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype).requires_grad_()
    dout = torch.randn(T, H, device="cuda", dtype=dtype)
    flops_fwd = 6 * T * k * H * I
    # forward+backward: 3x the forward's FLOPs (gate/up, down; g, dx, dW1, dW2), 2x with frozen experts (no dW)
    fb_factor = 2 if args.frozen_experts else 3
    truth = fp32_truth(module, x, index, weights, dout)
    # Set-up of each provider: first call (compile, tune), check against the truth, peak memory. Timing follows in
    # rounds over all providers (see below).
    ready = {}
    for provider in providers:
        if provider == "eager" and T * k > args.eager_max_pairs and E > 8:
            continue
        base, settings = _variant(provider)
        with _toggles(settings):  # read by hf_hetermoe.env at every launch
            if base == "bmm_roof":
                fwd, fwd_bwd = bmm_roof(T, H, I, E, k, index, dtype, frozen=args.frozen_experts)
            elif base in ("dense_roof", "gemm_roof"):
                roof = dense_roof if base == "dense_roof" else gemm_roof
                fwd, fwd_bwd = roof(T, H, I, k, dtype, frozen=args.frozen_experts)
            else:
                fwd, fwd_bwd = run_provider(module, base, x, index, weights, dout)
            try:
                torch.cuda.synchronize()
                base_mem = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                began = time.perf_counter()
                grads = fwd_bwd()  # the first call: Triton compiles, and with autotuning on, tunes, here
                torch.cuda.synchronize()
                first_call_s = time.perf_counter() - began
                peak_extra = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
                # What every provider must hold at the end anyway (dx, d weights, every parameter's gradient): the
                # part of the peak no implementation can save (the weight gradients alone are 0.8x grouped_mm's peak
                # on Mixtral at T=4096).
                grads_gib = sum(g.numel() * g.element_size() for g in grads) / 2**30
                max_err = float("nan")
                if not base.endswith("_roof"):
                    check = [fwd().detach(), *[g.detach() for g in grads]]
                    max_err = max(rel(a, b) for a, b in zip(check, truth))
                    status = "ok" if max_err < BF16_TOLERANCE else "MISMATCH"
                    print(f"  verify {provider} against fp32: max rel err {max_err:.1e} {status}")
                    if status != "ok" and base.startswith("hetermoe"):
                        raise RuntimeError(
                            f"hetermoe is off the fp32 truth on {name} T={T}: max rel err {max_err:.2e}"
                        )
                del grads
                t_host = host_ms(fwd)
                # The backward's issue time too: below T=4096 it is what bounds a call (NOTES v2.28).
                t_host_fb = host_ms(fwd_bwd)
            except torch.OutOfMemoryError:
                print(f"  {provider}: out of memory")
                torch.cuda.empty_cache()
                continue
            except ValueError as err:  # e.g. UnsupportedLayoutError: a family this provider does not cover yet
                print(f"  {provider}: skipped ({type(err).__name__}: {err})")
                continue
        ready[provider] = dict(
            base=base, settings=settings, fwd=fwd, fwd_bwd=fwd_bwd, peak_extra=peak_extra, grads_gib=grads_gib,
            max_err=max_err, first_call_s=first_call_s, t_host=t_host, t_host_fb=t_host_fb, t_fwd=[], t_fb=[],
            energy=[], energy_fwd=[],
        )

    # Timing in rounds, each round over every provider, starting one provider later each round: a GPU under
    # sustained load slows down (clocks), so a provider timed late in a fixed order would pay for the ones before
    # it (3-10% on an H200, benchmarks/NOTES.md v2.9 and v2.10). Each provider's figure is its median over rounds.
    if args.timing == "sustained":

        def measure(fn, energy=None):
            return sustained_ms(fn, args.sustain_warmup, args.sustain, args.meter, energy)
    else:

        def measure(fn, energy=None):
            return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    for round_order in tuning.rotating_rounds(list(ready), args.rounds):
        for provider in round_order:
            p = ready[provider]
            with _toggles(p["settings"]):
                if not p["base"].endswith("_roof"):
                    select_provider(module, p["base"])
                p["t_fwd"].append(measure(p["fwd"], p["energy_fwd"]))
                p["t_fb"].append(measure(p["fwd_bwd"], p["energy"]))

    results = {}
    for provider, p in ready.items():
        t_fwd, t_fb = statistics.median(p["t_fwd"]), statistics.median(p["t_fb"])
        energy = {}
        if p["energy"]:  # the forward+backward windows' medians: joules per call, watts, SM clock
            joules, watts, mhz = (statistics.median(w[i] for w in p["energy"]) for i in range(3))
            energy = dict(
                fwd_bwd_joules=round(joules, 4),
                fwd_bwd_watts=round(watts, 1),
                fwd_bwd_sm_mhz=round(mhz),
                fwd_bwd_gflops_per_joule=round(fb_factor * flops_fwd / joules / 1e9, 1),
            )
        if p["energy_fwd"]:
            joules = statistics.median(w.joules_per_call for w in p["energy_fwd"])
            energy.update(fwd_joules=round(joules, 4), fwd_gflops_per_joule=round(flops_fwd / joules / 1e9, 1))
        row = dict(
            meta,
            shape=name,
            H=H,
            I=I,
            E=E,
            k=k,
            T=T,
            dtype=str(dtype).replace("torch.", ""),
            routing=args.routing,
            provider=provider,
            fwd_ms=round(t_fwd, 4),
            fwd_bwd_ms=round(t_fb, 4),
            fwd_tflops=round(flops_fwd / t_fwd / 1e9, 1),
            fwd_bwd_tflops=round(fb_factor * flops_fwd / t_fb / 1e9, 1),
            peak_extra_gib=round(p["peak_extra"], 3),
            grads_gib=round(p["grads_gib"], 3),
            max_rel_err_vs_fp32=f"{p['max_err']:.1e}",
            first_call_s=round(p["first_call_s"], 2),
            fwd_host_ms=round(p["t_host"], 4),
            fwd_bwd_host_ms=round(p["t_host_fb"], 4),
            rounds=len(p["t_fb"]),
            timing=(
                f"sustained {args.sustain_warmup:g}s+{args.sustain:g}s"
                if args.timing == "sustained"
                else f"burst {args.warmup}ms+{args.rep}ms"
            ),
            fwd_bwd_tflops_spread="-".join(
                f"{fb_factor * flops_fwd / t / 1e9:.0f}" for t in (max(p["t_fb"]), min(p["t_fb"]))
            ),
            **energy,
        )
        writer.writerow(row)
        results[provider] = row
        print(
            f"  {provider:>11}: fwd {row['fwd_tflops']:6.1f} TF/s ({t_fwd:.3f} ms)  "
            f"fwd+bwd {row['fwd_bwd_tflops']:6.1f} TF/s ({t_fb:.3f} ms; rounds {row['fwd_bwd_tflops_spread']})  "
            f"peak extra {p['peak_extra']:.2f} GiB (gradients {p['grads_gib']:.2f})  "
            f"first call {p['first_call_s']:.1f} s  host {p['t_host']:.3f} ms/fwd {p['t_host_fb']:.3f} ms/fwd+bwd"
            + (
                f"  {energy['fwd_bwd_joules']:.3f} J/call at {energy['fwd_bwd_watts']:.0f} W, "
                f"{energy['fwd_bwd_sm_mhz']} MHz ({energy['fwd_bwd_gflops_per_joule']:.0f} GFLOP/J)"
                if energy
                else ""
            ),
            flush=True,
        )
        if args.profile and (p["base"].startswith("hetermoe") or p["base"] == "bmm_roof"):
            with _toggles(p["settings"]):
                if p["base"] != "bmm_roof":
                    select_provider(module, p["base"])
                print(f"  {provider}:")
                print_kernel_times(p["fwd_bwd"])
    del module
    torch.cuda.empty_cache()
    return results


def sustained_ms(fn, warmup_s: float, measure_s: float, meter=None, energy: list | None = None) -> float:
    """Mean milliseconds per call of ``fn`` run back to back: ``warmup_s`` seconds untimed, then batches of ~50 ms
    timed with CUDA events until ``measure_s`` seconds are measured.

    Under these matmuls an H100 / H200 sits at its power limit, and the limiter acts over about a second: a burst of
    50-100 ms after a lighter kernel (``do_bench``'s default) runs at boost clocks that a training run does not
    keep (benchmarks/NOTES.md, v2.15). Running the provider alone for a while first, then averaging over a window
    longer than the clock swings, measures it at its own sustained clocks, whatever ran before it.

    With an ``EnergyMeter`` (``gpu_energy.py``) the timed window's joules per call, mean watts and mean SM clock are
    appended to ``energy`` as a ``gpu_energy.Window``."""
    fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    batch = max(1, round(0.05 / max(time.perf_counter() - began, 1e-6)))
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        for _ in range(batch):
            fn()
        torch.cuda.synchronize()
    total_ms, calls, clocks = 0.0, 0, []
    start_mj, wall = (meter.energy_mj(), time.perf_counter()) if meter is not None else (None, None)
    while total_ms < measure_s * 1e3:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        if meter is not None:  # sampled while the batch runs, i.e. at the clocks it runs at
            clocks.append(meter.sm_mhz())
        end.synchronize()
        total_ms += start.elapsed_time(end)
        calls += batch
    if meter is not None and energy is not None:
        import gpu_energy

        end_mj = meter.energy_mj()
        if start_mj is not None and end_mj is not None:
            energy.append(
                gpu_energy.window(start_mj, end_mj, time.perf_counter() - wall, calls, [c for c in clocks if c])
            )
    return total_ms / calls


def host_ms(fn, calls: int = 10) -> float:
    """CPU time to issue one call (the GPU runs behind): when it exceeds the kernels' time, the call is host-bound."""
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - began
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def cuda_kernels(fn) -> list:
    """The GPU kernel events of one call of ``fn`` under torch.profiler, in launch order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)


def print_kernel_times(fn) -> None:
    """Every GPU kernel of one call of ``fn`` in launch order, with its time (torch.profiler; a warm call first)."""
    fn()
    try:
        kernels = cuda_kernels(fn)
    except Exception as err:  # noqa: BLE001  (a diagnostic: never lose the benchmark to it)
        print(f"  profile failed: {type(err).__name__}: {err}")
        return
    total = sum(e.time_range.elapsed_us() for e in kernels)
    print(f"  kernels of one fwd+bwd call ({len(kernels)}, {total / 1e3:.3f} ms busy):")
    for e in kernels:
        print(f"    {e.time_range.elapsed_us():9.1f} us  {e.name[:100]}")


def append_rows(path: Path, rows: list[dict], fields: list[str], old_defaults: dict | None = None) -> None:
    """Append ``rows`` to the results file ``path`` atomically (temporary file, then rename): earlier rows stay,
    with ``old_defaults`` filling columns they predate; columns only earlier rows have are kept (left empty in
    ``rows``)."""
    old, old_fields = [], []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = [{**(old_defaults or {}), **r} for r in reader]
            old_fields = reader.fieldnames or []
    fields = list(dict.fromkeys([*old_fields, *fields, *(old_defaults or {})]))
    from hf_hetermoe.files import atomic_write

    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows([*old, *rows])


def _migrate_header(csv_path: Path, current: list[str]) -> None:
    """Earlier results files may lack newer columns: rewrite them (atomically) with the current header, so that
    appending never mixes layouts and no earlier row is lost."""
    if not csv_path.exists():
        return
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        old_fields, rows = reader.fieldnames or [], list(reader)
    fields = list(dict.fromkeys([*old_fields, *current]))
    if fields == old_fields:
        return
    from hf_hetermoe.files import atomic_write

    with atomic_write(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(csv_path: Path, png_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from update_readme import newest_rows, run_of  # this directory

    # As the README's table: a sweep split over several runs (one device call per group of shapes) is drawn whole.
    with open(csv_path, newline="") as f:
        rows = list(newest_rows(list(csv.DictReader(f))).values())
    runs = sorted({run_of(r) for r in rows})
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for provider in PROVIDERS:
            pts = sorted(
                (int(r["T"]), float(r["fwd_bwd_tflops"]))
                for r in rows
                if r["shape"] == shape and r["provider"] == provider
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set_title(shape, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("fwd+bwd TF/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['gpu']}, bf16, run{'s' if len(runs) > 1 else ''} {', '.join(runs)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument(
        "--providers",
        nargs="+",
        default=["grouped_mm", "hetermoe", "eager", "dense_roof", "gemm_roof"],
        help=f"any of {', '.join(PROVIDERS + MORE_PROVIDERS)}, or hetermoe@HETERMOE_<TOGGLE>=<value>",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument(
        "--routing",
        default="random",
        choices=("random", "balanced"),
        help="random: top-k of uniform scores (the tables); balanced: exactly T*k/E pairs per expert (rows go to "
        "balanced_experts_<gpu>.csv)",
    )
    parser.add_argument("--eager-max-pairs", type=int, default=40_000, help="skip eager above this many routed pairs")
    parser.add_argument(
        "--timing",
        default="sustained",
        choices=("sustained", "burst"),
        help="sustained: each provider runs back to back (--sustain-warmup s), then is timed over --sustain s "
        "(mean per call), at the clocks a training run keeps; burst: triton do_bench medians (--warmup, --rep), the "
        "tables before 2026-11-23, which catch boost clocks",
    )
    parser.add_argument("--sustain-warmup", type=float, default=1.0, help="sustained timing: untimed warm-up, s")
    parser.add_argument("--sustain", type=float, default=1.0, help="sustained timing: timed window per round, s")
    parser.add_argument("--warmup", type=int, default=25, help="burst timing: do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=50, help="burst timing: do_bench repetitions per round, ms")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timing rounds over all providers, rotating their order; medians (default: 2 sustained, 3 burst)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--profile", action="store_true", help="print the kernels of one fwd+bwd, timed (hetermoe and bmm_roof)"
    )
    parser.add_argument(
        "--frozen-experts",
        action="store_true",
        help="no expert weight requires a gradient (every provider, roofs included): dx and the routing weights' "
        "gradient only; rows go to frozen_experts_<gpu>.csv",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.timing == "sustained" else 3
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.sustain <= 0 or args.sustain_warmup < 0:
        parser.error(f"--sustain must be > 0 and --sustain-warmup >= 0 (got {args.sustain}, {args.sustain_warmup})")
    for provider in args.providers:
        if _variant(provider)[0] not in PROVIDERS + MORE_PROVIDERS:
            known = ", ".join(PROVIDERS + MORE_PROVIDERS)
            parser.error(f"unknown provider {provider!r}: use one of {known} or hetermoe@VAR=VALUE")
    if not torch.cuda.is_available():
        sys.exit("bench_experts.py needs a CUDA GPU")
    import transformers
    import triton

    import hf_hetermoe
    from hf_hetermoe.kernels import tuning

    gpu = torch.cuda.get_device_name()
    now = datetime.datetime.now()
    meta = dict(
        date=now.date().isoformat(),
        run=now.isoformat(timespec="seconds"),
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        hetermoe=hf_hetermoe.__version__,
        python=platform.python_version(),
        autotune=int(tuning.autotune_enabled()),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = ("frozen_" if args.frozen_experts else "") + ("balanced_" if args.routing == "balanced" else "")
    csv_path = args.out / f"{prefix}experts_{gpu_slug(gpu)}.csv"
    import gpu_energy

    args.meter = gpu_energy.EnergyMeter.open() if args.timing == "sustained" else None
    print(f"energy: {'NVML board energy per timed window' if args.meter else 'not measured (no NVML energy counter)'}")
    dtype = getattr(torch, args.dtype)
    fields = [
        *meta,
        *("shape", "H", "I", "E", "k", "T", "dtype", "provider", "fwd_ms", "fwd_bwd_ms", "fwd_tflops"),
        *("fwd_bwd_tflops", "peak_extra_gib", "grads_gib", "max_rel_err_vs_fp32", "first_call_s", "fwd_host_ms"),
        *("rounds", "fwd_bwd_tflops_spread", "timing", "routing"),
        *("fwd_bwd_joules", "fwd_bwd_watts", "fwd_bwd_sm_mhz", "fwd_bwd_gflops_per_joule"),
        *("fwd_joules", "fwd_gflops_per_joule", "fwd_bwd_host_ms"),
    ]
    _migrate_header(csv_path, fields)
    new = not csv_path.exists()
    if not new:  # append in the file's own column order
        with open(csv_path, newline="") as f:
            fields = next(csv.reader(f))
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        for name in args.shapes:
            for T in args.tokens:
                print(f"{name} T={T} ({gpu}, {args.dtype})", flush=True)
                bench_one(name, T, args.providers, dtype, args, writer, meta)
                f.flush()
    plot(csv_path, csv_path.with_suffix(".png"))
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
