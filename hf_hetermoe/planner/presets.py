"""Device profiles built from published ratios, for planning before anything is measured.

Each :class:`DeviceSpec` holds *effective* throughputs (what real MoE fine-tuning kernels reach, not peak),
chosen so the ratios between kinds match published measurements:

- A40 vs V100: ~1.25x on expert FFNs, ~3.7x on attention at 64K tokens (HeterMoE, arXiv 2504.03871, Fig. 1);
  V100 has no FlashAttention, so its attention runs memory-efficient kernels.
- L40S vs T4: ~7x on MLPs, 10-14x on attention (same paper's motivation figures).
- A100 / H100 / H200: relative to the above from vendor dense-FP16 numbers scaled by the same efficiency.

A profile from these specs is labelled ``source="preset:<spec>"``; the planner prints that it is an estimate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hf_hetermoe.errors import ConfigError

from .model_dims import ModelDims
from .profiles import DeviceProfile, ProfileSet


@dataclass(frozen=True)
class DeviceSpec:
    """Effective throughputs of one GPU kind. TFLOP/s are dense bf16/fp16."""

    name: str
    gemm_tflops: float  # expert FFN / projection matmuls at large token counts
    attn_tflops: float  # causal attention core (QK^T, softmax, PV) with the best backend the GPU supports
    hbm_gbps: float  # memory bandwidth, GB/s, for the memory-bound parts (norms, residuals, softmax)
    memory_gib: float
    link_gbps: float = 25.0  # default peer bandwidth per direction (PCIe 4 x16 ~ 25 GB/s)
    launch_ms: float = 0.02  # fixed cost of one small kernel sequence (one expert call)


SPECS: dict[str, DeviceSpec] = {
    s.name: s
    for s in (
        DeviceSpec("v100", gemm_tflops=85.0, attn_tflops=15.5, hbm_gbps=900, memory_gib=32, link_gbps=20.0),
        DeviceSpec("a40", gemm_tflops=106.0, attn_tflops=60.0, hbm_gbps=696, memory_gib=48, link_gbps=25.0),
        DeviceSpec("t4", gemm_tflops=28.0, attn_tflops=7.0, hbm_gbps=320, memory_gib=16, link_gbps=12.0),
        DeviceSpec("l40s", gemm_tflops=196.0, attn_tflops=84.0, hbm_gbps=864, memory_gib=48, link_gbps=25.0),
        DeviceSpec("a100", gemm_tflops=230.0, attn_tflops=170.0, hbm_gbps=2000, memory_gib=80, link_gbps=250.0),
        DeviceSpec("h100", gemm_tflops=600.0, attn_tflops=420.0, hbm_gbps=3350, memory_gib=80, link_gbps=400.0),
        DeviceSpec("h200", gemm_tflops=650.0, attn_tflops=450.0, hbm_gbps=4800, memory_gib=141, link_gbps=400.0),
    )
}


# Attention per SM of each SDPA backend relative to cuDNN's on a Hopper host (H100, causal, 64K tokens, torch 2.11:
# cuDNN 14.4 ms, flash 26.5, memory-efficient 48.6; results/emulation_sdpa_check_NVIDIA_H100_80GB_HBM3.json).
_SDPA_PER_SM = {"cudnn": 1.0, "flash": 0.54, "efficient": 0.30, "math": 0.02}
# A green context of a fraction f of the SMs runs GEMMs at ~1.15 f of the whole GPU for f <= 0.5 (H200: v100-like's
# 32 of 132 SMs ran a bf16 GEMM 3.56x slower, not 4.1x; results/emulation_calibration_NVIDIA_H200.json).
_SMALL_CONTEXT_GAIN = 1.15


def emulated_spec(host: DeviceSpec, preset_name: str, host_sms: int = 132) -> DeviceSpec:
    """What a ``hetermoe.emulate`` preset on ``host`` really is: the host's throughputs scaled by the preset's SM
    shares and attention backend, its memory cap. Not the published GPU the preset imitates: its SM shares were
    calibrated on the ratios *between* presets, so an emulated V100 on an H200 is ~2x a real V100 in absolute terms.
    """
    from hf_hetermoe.emulate import get_preset

    p = get_preset(preset_name)
    gemm_share = p.num_sms(host_sms) / host_sms
    attn_share = p.attn_num_sms(host_sms) / host_sms
    return DeviceSpec(
        name=f"{host.name} [emulated {preset_name}]",
        gemm_tflops=host.gemm_tflops * min(1.0, _SMALL_CONTEXT_GAIN * gemm_share),
        attn_tflops=host.attn_tflops * min(1.0, _SMALL_CONTEXT_GAIN * attn_share) * _SDPA_PER_SM[p.sdpa_backends[0]],
        hbm_gbps=host.hbm_gbps * min(1.0, 2 * gemm_share),  # a few SMs cannot saturate HBM
        memory_gib=p.memory_gib,
        link_gbps=p.link_gbps or host.link_gbps,
        launch_ms=host.launch_ms,
    )


def _named_spec(name: str) -> str | None:
    """The :data:`SPECS` key whose model number stands in ``name`` (``"NVIDIA A40"`` -> ``"a40"``), if any."""
    lowered = name.lower()
    return next((n for n in ("l40s", "a100", "a40", "v100", "h100", "h200", "t4")
                 if re.search(rf"(?<![a-z0-9]){n}(?![0-9])", lowered)), None)


def spec_for(kind: str) -> DeviceSpec:
    """The spec of a device kind, found by model number in the name. ``"<H100/H200> [emulated v100-like]"`` is the
    host scaled as the emulation preset scales it (:func:`emulated_spec`); other hosts with an emulation tag get
    the imitated GPU's published spec."""
    m = re.search(r"\[emulated ([a-z0-9]+)-like\]", kind)
    if m:
        host = _named_spec(kind[:m.start()])
        if host in ("h100", "h200"):
            return emulated_spec(SPECS[host], f"{m.group(1)}-like")
        if m.group(1) in SPECS:
            return SPECS[m.group(1)]
    name = _named_spec(kind)
    if name is not None:
        return SPECS[name]
    raise ConfigError(
        f"no built-in spec for device {kind!r} (known: {sorted(SPECS)}); pass --profiles with measured profiles "
        "from `hetermoe profile`"
    )


def _gemm_ms(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e9)


def preset_profile(kind: str, dims: ModelDims, seq_len: int, attn_tokens: int | None = None) -> DeviceProfile:
    """A :class:`DeviceProfile` of ``kind`` for ``dims`` at ``seq_len``, computed from its :class:`DeviceSpec`."""
    spec = spec_for(kind)
    attn_tokens = attn_tokens or seq_len
    h, q, kv, e, dt = dims.hidden_size, dims.q_dim, dims.kv_dim, dims.num_experts, 2
    shared = dims.num_shared_experts * (3 if dims.gated else 2) * h * dims.shared_intermediate_size
    proj_flops = 2 * attn_tokens * (h * (q + 2 * kv) + q * h + h * e + shared)
    core_flops = 2 * attn_tokens * q * seq_len  # causal: QK^T and PV over seq_len/2 keys on average
    mem_bytes = 24 * h * dt * attn_tokens
    mem_ms = mem_bytes / (spec.hbm_gbps * 1e6)
    fwd = _gemm_ms(proj_flops, spec.gemm_tflops) + _gemm_ms(core_flops, spec.attn_tflops) + mem_ms + 5 * spec.launch_ms
    bwd = (2 * _gemm_ms(proj_flops, spec.gemm_tflops) + 2.5 * _gemm_ms(core_flops, spec.attn_tflops) + 2 * mem_ms
           + 10 * spec.launch_ms)
    head = _gemm_ms(6 * attn_tokens * h * dims.vocab_size, spec.gemm_tflops) + (
        3 * dims.vocab_size * 4 * attn_tokens / (spec.hbm_gbps * 1e6)
    )
    mats = 3 if dims.gated else 2
    tokens = [16, 64, 256, 1024, 4096, 16384, 65536]
    # Small token counts under-fill the GPU: efficiency n / (n + 256).
    eff = [n / (n + 256) for n in tokens]
    efwd = [_gemm_ms(2 * n * mats * h * dims.expert_intermediate_size, spec.gemm_tflops * f) + spec.launch_ms
            for n, f in zip(tokens, eff)]
    ebwd = [2 * (t - spec.launch_ms) + 2 * spec.launch_ms for t in efwd]
    return DeviceProfile(
        seq_len=seq_len,
        attn_tokens=attn_tokens,
        attn_fwd_ms=fwd,
        attn_bwd_ms=bwd,
        head_ms=head,
        expert_tokens=tokens,
        expert_fwd_ms=efwd,
        expert_bwd_ms=ebwd,
        memory_bytes=spec.memory_gib * 2**30 * 0.92,  # CUDA context, allocator slack
        act_bytes_per_token=float((4 * h + 2 * q + 2 * kv + 2 * e) * dt),
        act_bytes_per_token_ckpt=float(h * dt),
        expert_act_bytes_per_token=float((h + (mats * dims.expert_intermediate_size)) * dt),
        link_gbps={},
        source=f"preset:{spec.name}",
        emulated="[emulated" in kind,
    )


def preset_profiles(kinds: list[str], dims: ModelDims, seq_len: int) -> ProfileSet:
    """Preset profiles for every kind in ``kinds``."""
    return ProfileSet(devices={k: preset_profile(k, dims, seq_len) for k in kinds}, model=dims.to_dict())
