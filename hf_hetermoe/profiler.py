"""``hetermoe profile``: measure one GPU kind for one model, for the planner (CUDA only).

Measured, bf16, CUDA-event medians:

- attention half of one decoder layer (input norm, the family's real HF attention module with rotary embeddings,
  residual, post-attention norm, router) forward and backward on a micro-batch of ``micro_batch_size`` sequences
  of ``seq_len`` tokens, built from the config with one layer;
- final norm + LM head + cross-entropy, forward and backward, same micro-batch;
- one expert FFN (plain matmuls: gate/up, SiLU, down) forward and backward vs its token count;
- activation memory per token of the attention half with and without activation checkpointing, and of one
  expert per routed token;
- with a process group up (torchrun), point-to-point bandwidth from this rank to every other rank.

Writes/merges a :class:`~hf_hetermoe.planner.profiles.ProfileSet` JSON keyed by device kind; under
``hetermoe.emulate`` the kind is ``"<device> [emulated <preset>]"`` and the profile is marked emulated.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_hetermoe.errors import HeterMoEError
from hf_hetermoe.planner.model_dims import model_dims
from hf_hetermoe.planner.profiles import DeviceProfile, ProfileSet

EXPERT_TOKENS = (16, 64, 256, 1024, 4096, 16384)


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise HeterMoEError("`hetermoe profile` measures a GPU and needs CUDA; none is visible on this machine")
    return torch


def time_ms(fn: Callable[[], Any], warmup: int = 3, reps: int = 10) -> float:
    """Median CUDA-event time of ``fn()`` in ms."""
    torch = _require_cuda()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _find_router(layer) -> Any:
    import torch

    for name, mod in layer.named_modules():
        if name.split(".")[-1] in ("gate", "router") and any(p.dim() == 2 for p in mod.parameters(recurse=False)):
            return mod
    for name, mod in layer.named_modules():  # e.g. routers that wrap a Linear
        if name.split(".")[-1] in ("gate", "router") and isinstance(getattr(mod, "weight", None), torch.Tensor):
            return mod
    raise HeterMoEError(f"no router module (named gate/router) in {type(layer).__name__}")


def _one_layer_model(config: Any):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, Path)):
        config = AutoConfig.from_pretrained(config)
    cfg = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 0})
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).cuda()
    return cfg, model


def measure_attention(config: Any, seq_len: int, micro_batch_size: int) -> dict[str, float]:
    """Attention-half and head times (ms) and activation bytes per token."""
    torch = _require_cuda()
    cfg, model = _one_layer_model(config)
    inner = model.model
    layer = inner.layers[0]
    router = _find_router(layer)
    h = cfg.hidden_size
    x = torch.randn(micro_batch_size, seq_len, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq_len, device="cuda").unsqueeze(0).expand(micro_batch_size, -1)
    pos_emb = inner.rotary_emb(x, pos) if hasattr(inner, "rotary_emb") else None

    def half(inp):
        r = inp
        y = layer.self_attn(hidden_states=layer.input_layernorm(inp), position_embeddings=pos_emb,
                            attention_mask=None)[0]
        y = r + y
        z = layer.post_attention_layernorm(y)
        logits = router(z)
        logits = logits[0] if isinstance(logits, tuple) else logits
        return y + z, logits

    def fwd():
        return half(x)

    grads = None

    def fwd_bwd():
        y, logits = half(x)
        torch.autograd.backward((y, logits), grads)

    y, logits = half(x)
    grads = (torch.randn_like(y), torch.randn_like(logits))
    t_fwd = time_ms(lambda: fwd())
    t_fb = time_ms(fwd_bwd)
    tokens = micro_batch_size * seq_len
    act = {}
    for ckpt in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if ckpt:
            out = torch.utils.checkpoint.checkpoint(half, x, use_reentrant=False)
        else:
            out = half(x)
        act[ckpt] = max(torch.cuda.memory_allocated() - base, 0) / tokens
        del out
    head_in = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (tokens,), device="cuda")

    def head():
        loss = torch.nn.functional.cross_entropy(model.lm_head(inner.norm(head_in)).float(), labels)
        loss.backward()

    return {"attn_fwd_ms": t_fwd, "attn_bwd_ms": max(t_fb - t_fwd, 1e-3), "head_ms": time_ms(head, reps=5),
            "act_bytes_per_token": act[False], "act_bytes_per_token_ckpt": act[True]}


def measure_expert(hidden: int, inter: int, tokens: tuple[int, ...] = EXPERT_TOKENS) -> dict[str, Any]:
    """One gated expert FFN forward / backward time (ms) at each token count, and activation bytes per token."""
    torch = _require_cuda()
    w_gu = (torch.randn(hidden, 2 * inter, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    w_d = (torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()

    def ffn(x):
        g, u = (x @ w_gu).chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u) @ w_d

    fwd_ms, bwd_ms = [], []
    for n in tokens:
        x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
        f = time_ms(lambda: ffn(x))
        fb = time_ms(lambda: ffn(x).backward(dy))
        fwd_ms.append(f)
        bwd_ms.append(max(fb - f, 1e-3))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    x = torch.randn(4096, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = ffn(x)
    per_token = (torch.cuda.memory_allocated() - base) / 4096
    del y
    return {"expert_tokens": list(tokens), "expert_fwd_ms": fwd_ms, "expert_bwd_ms": bwd_ms,
            "expert_act_bytes_per_token": per_token}


def measure_links(nbytes: int = 64 * 2**20) -> dict[int, float]:
    """GB/s from this rank to each other rank (send then receive, in rank-pair order); {} without a group."""
    torch = _require_cuda()
    import torch.distributed as dist  # the profiler is not part of the planner layer

    if not (dist.is_available() and dist.is_initialized()):
        return {}
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out: dict[int, float] = {}
    for a in range(world):
        for b in range(a + 1, world):
            dist.barrier()
            if rank not in (a, b):
                continue
            peer = b if rank == a else a

            def xfer():
                if rank == a:
                    dist.send(buf, peer)
                else:
                    dist.recv(buf, peer)

            out[peer] = nbytes / (time_ms(xfer, warmup=2, reps=5) * 1e6)
    return out


def profile_device(config: Any, seq_len: int, micro_batch_size: int, kind: str | None = None,
                   emulation: dict[str, Any] | None = None) -> tuple[str, DeviceProfile]:
    """Measure this process's GPU; returns (device kind, profile)."""
    torch = _require_cuda()
    dims = model_dims(config if not isinstance(config, (str, Path)) else str(config))
    name = torch.cuda.get_device_name()
    kind = kind or (f"{name} [emulated {emulation['preset']}]" if emulation else name)
    attn = measure_attention(config, seq_len, micro_batch_size)
    expert = measure_expert(dims.hidden_size, dims.expert_intermediate_size)
    free, total = torch.cuda.mem_get_info()
    memory = emulation["memory_gib"] * 2**30 if emulation else total
    return kind, DeviceProfile(seq_len=seq_len, attn_tokens=seq_len * micro_batch_size, memory_bytes=memory * 0.92,
                               source="measured", emulated=emulation is not None, **attn, **expert)


def save_profiles(path: str | Path, profiles: dict[str, DeviceProfile], model: dict[str, Any]) -> ProfileSet:
    """Merge ``profiles`` into the JSON at ``path`` (created if missing) and write it back."""
    new = ProfileSet(devices=profiles, model=model)
    path = Path(path)
    merged = ProfileSet.load(path).merge(new) if path.is_file() else new
    merged.save(path)
    return merged
