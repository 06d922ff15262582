"""Emulate an older GPU inside one process of a newer one (H100/H200), for benchmarking heterogeneity.

An older GPU differs from a newer one in four ways this module can reproduce per process:

- fewer streaming multiprocessors: a CUDA green context with ``num_sms`` SMs
  (``torch.cuda.green_contexts.GreenContext``); slows GEMMs and attention alike;
- no FlashAttention / cuDNN attention (V100, T4): ``torch.nn.attention.sdpa_kernel`` restricted to the
  memory-efficient or math backend; this is what changes the attention-vs-GEMM ratio. Ampere/Ada presets
  (A40, L40S, A100) use FlashAttention-2 (``flash``), never cuDNN: cuDNN's SDPA on a Hopper host is a wgmma
  kernel no Ampere/Ada GPU can run, and it is 2x faster per SM than ``flash`` (H100, 64K tokens);
- less memory: ``torch.cuda.set_per_process_memory_fraction``;
- slower links: a cap in GB/s, *recorded* for the simulator and the planner (NCCL traffic itself is not
  throttled: green contexts do not slow NCCL, see FACTS.md).

Presets are data (:data:`PRESETS`); ``num_sms`` are for a 132-SM H100/H200 and are re-derived by
``benchmarks/calibrate_emulation.py``, whose measurements :func:`load_calibration` applies. Every number
measured under emulation must be reported as emulated: :func:`emulation_label` gives the label.

One preset per process. cuDNN attention first run inside a green context keeps that context's SMs for later
calls of the same shape, even under another green context (H100, torch 2.11: every cuDNN preset of a
one-process calibration grid ran at its first share's speed); flash and memory-efficient attention follow the
current context. A process that compares presets runs its attention once outside any green context first.

    with hetermoe.emulate.emulate("v100-like"):
        loss = model(**batch).loss; loss.backward()
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hf_hetermoe.errors import ConfigError, HeterMoEError

SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


@dataclass(frozen=True)
class EmulationPreset:
    """How to make one process of a big GPU behave like an older one."""

    name: str = field(metadata={"help": "Preset name, e.g. 'v100-like'."})
    sm_fraction: float = field(metadata={"help": "Share of the host GPU's SMs to keep (green context)."})
    sdpa_backends: tuple[str, ...] = field(metadata={"help": "Allowed SDPA backends, best first."})
    memory_gib: float = field(metadata={"help": "Memory cap in GiB (per-process memory fraction)."})
    link_gbps: float = field(default=0.0, metadata={"help": "Link cap GB/s for the simulator; 0 = none."})
    emulates: str = field(default="", metadata={"help": "The real GPU and what the ratios target."})

    def __post_init__(self) -> None:
        if not 0 < self.sm_fraction <= 1:
            raise ConfigError(f"{self.name}: sm_fraction={self.sm_fraction} must be in (0, 1]")
        bad = [b for b in self.sdpa_backends if b not in SDPA_BACKENDS]
        if bad or not self.sdpa_backends:
            raise ConfigError(f"{self.name}: sdpa_backends={self.sdpa_backends} invalid; allowed: {SDPA_BACKENDS}")
        if self.memory_gib <= 0:
            raise ConfigError(f"{self.name}: memory_gib={self.memory_gib} must be > 0")

    def num_sms(self, total_sms: int) -> int:
        """SMs to request, rounded down to a multiple of 8 (green-context SM granularity on Hopper)."""
        return max(8, int(total_sms * self.sm_fraction) // 8 * 8)


# Targets (published): A40/V100 ~1.25x expert FFN and ~3.7x attention at 64K tokens; L40S/T4 ~7x MLP and
# 10-14x attention. Starting points from FACTS.md GEMM-vs-SM figures; calibration refines sm_fraction.
PRESETS: dict[str, EmulationPreset] = {
    p.name: p
    for p in (
        EmulationPreset("v100-like", 0.25, ("efficient", "math"), 32, 20.0, "Tesla V100 32GB: no FlashAttention"),
        EmulationPreset("a40-like", 0.31, ("flash", "efficient"), 48, 25.0, "A40: 1.25x V100 on GEMM"),
        EmulationPreset("t4-like", 0.0625, ("efficient", "math"), 16, 12.0, "T4: no FlashAttention"),
        EmulationPreset("l40s-like", 0.44, ("flash", "efficient"), 48, 25.0, "L40S: ~7x T4 on MLP"),
        EmulationPreset("a100-like", 0.5, ("flash", "efficient"), 80, 250.0, "A100 80GB"),
    )
}


def get_preset(name: str) -> EmulationPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown emulation preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]


def emulation_label(preset: str | EmulationPreset, host: str = "") -> str:
    """The label every emulated figure carries, e.g. ``'EMULATED v100-like on NVIDIA H200'``."""
    name = preset if isinstance(preset, str) else preset.name
    return f"EMULATED {name}" + (f" on {host}" if host else "")


def load_calibration(path: str | Path) -> dict[str, EmulationPreset]:
    """Presets with ``sm_fraction`` / ``sdpa_backends`` replaced by a calibration JSON's ``chosen`` entries."""
    data = json.loads(Path(path).read_text())
    out = dict(PRESETS)
    for name, chosen in data.get("chosen", {}).items():
        if name in out:
            out[name] = replace(out[name], sm_fraction=float(chosen["sm_fraction"]),
                                sdpa_backends=tuple(chosen["sdpa_backends"]))
    return out


def _sdpa_backends(names: tuple[str, ...]) -> list[Any]:
    from torch.nn.attention import SDPBackend

    table = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [table[n] for n in names]


@contextlib.contextmanager
def emulate(preset: str | EmulationPreset, device: int | None = None,
            presets: dict[str, EmulationPreset] | None = None) -> Iterator[dict[str, Any]]:
    """Run the body as an emulated older GPU on CUDA device ``device`` (default: current).

    Yields a dict describing the emulation (preset, SMs, memory cap, label) to store with any measurement.
    The memory fraction stays set after exit (CUDA cannot give it back); the green context and the SDPA
    restriction are undone.
    """
    import torch

    if not torch.cuda.is_available():
        raise HeterMoEError("hetermoe.emulate needs a CUDA GPU (green contexts); none is visible")
    p = preset if isinstance(preset, EmulationPreset) else (presets or PRESETS).get(preset) or get_preset(preset)
    device = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(device)
    total_gib = props.total_memory / 2**30
    try:
        from torch.cuda.green_contexts import GreenContext
    except ImportError as err:  # pragma: no cover - depends on the torch build
        raise HeterMoEError(f"this torch ({torch.__version__}) has no torch.cuda.green_contexts") from err
    sms = p.num_sms(props.multi_processor_count)
    torch.cuda.set_per_process_memory_fraction(min(p.memory_gib / total_gib, 1.0), device)
    ctx = GreenContext.create(num_sms=sms, device_id=device)
    from torch.nn.attention import sdpa_kernel

    info = {"preset": p.name, "num_sms": sms, "host_sms": props.multi_processor_count, "memory_gib": p.memory_gib,
            "sdpa_backends": list(p.sdpa_backends), "link_gbps_cap": p.link_gbps,
            "label": emulation_label(p, props.name), "preset_fields": asdict(p)}
    # The green context is current on this thread only; autograd runs backward kernels on its own device thread.
    # A stream that belongs to the green context carries the SM limit to every kernel queued on it, whichever
    # thread queues it (backward ops run on their forward op's stream), so make it the current stream as well.
    green_stream = ctx.Stream() if hasattr(ctx, "Stream") else None
    info["green_stream"] = green_stream is not None
    ctx.set_context()
    try:
        with contextlib.ExitStack() as stack:
            if green_stream is not None:
                stack.enter_context(torch.cuda.stream(green_stream))
            stack.enter_context(sdpa_kernel(_sdpa_backends(p.sdpa_backends), set_priority=True))
            yield info
    finally:
        try:
            ctx.pop_context()
        except RuntimeError as err:  # another context was made current meanwhile (e.g. by a library)
            import warnings

            warnings.warn(f"hetermoe.emulate: could not pop the green context ({err}); kernels outside the "
                          "green stream may have run with every SM", stacklevel=3)
