"""Emulate an older GPU inside one process of a newer one (H100/H200), for benchmarking heterogeneity.

An older GPU differs from a newer one in four ways this module can reproduce per process:

- fewer streaming multiprocessors: a CUDA green context with ``num_sms`` SMs
  (``torch.cuda.green_contexts.GreenContext``); slows GEMMs and attention alike. A preset may give attention
  its own share (``attn_sm_fraction``): SDPA calls then run on a stream of a second green context (a
  ``TorchFunctionMode`` moves them; their backward follows, as autograd runs a backward op on its forward op's
  stream). One SM share cannot hit both published ratios of A40 vs V100 (1.25x on GEMMs, ~3.7x on attention):
  FlashAttention-2 per SM on a Hopper host is not FlashAttention-2 per SM on an A40;
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
    attn_sm_fraction: float = field(default=0.0, metadata={
        "help": "Share of SMs for SDPA attention (a second green context); 0 = the same as sm_fraction."})

    def __post_init__(self) -> None:
        if not 0 < self.sm_fraction <= 1:
            raise ConfigError(f"{self.name}: sm_fraction={self.sm_fraction} must be in (0, 1]")
        bad = [b for b in self.sdpa_backends if b not in SDPA_BACKENDS]
        if bad or not self.sdpa_backends:
            raise ConfigError(f"{self.name}: sdpa_backends={self.sdpa_backends} invalid; allowed: {SDPA_BACKENDS}")
        if not 0 <= self.attn_sm_fraction <= 1:
            raise ConfigError(f"{self.name}: attn_sm_fraction={self.attn_sm_fraction} must be in [0, 1] (0: same as "
                              "sm_fraction)")
        if self.memory_gib <= 0:
            raise ConfigError(f"{self.name}: memory_gib={self.memory_gib} must be > 0")

    def num_sms(self, total_sms: int) -> int:
        """SMs to request, rounded down to a multiple of 8 (green-context SM granularity on Hopper)."""
        return max(8, int(total_sms * self.sm_fraction) // 8 * 8)

    def attn_num_sms(self, total_sms: int) -> int:
        """SMs for SDPA attention: ``attn_sm_fraction`` of the host's, or :meth:`num_sms` when it is 0."""
        frac = self.attn_sm_fraction or self.sm_fraction
        return max(8, int(total_sms * frac) // 8 * 8)


# Targets (published): A40/V100 ~1.25x expert FFN and ~3.7x attention at 64K tokens; L40S/T4 ~7x MLP and
# 10-14x attention. SM shares from benchmarks/results/emulation_calibration_NVIDIA_H200.json (2026-11-22, H200,
# torch 2.11): A40/V100 1.24x FFN, 3.52x attention; L40S/T4 6.83x FFN, 12.2x attention.
PRESETS: dict[str, EmulationPreset] = {
    p.name: p
    for p in (
        EmulationPreset("v100-like", 0.25, ("efficient", "math"), 32, 20.0, "Tesla V100 32GB: no FlashAttention"),
        EmulationPreset("a40-like", 0.31, ("flash", "efficient"), 48, 25.0, "A40: 1.25x V100 GEMM, 3.7x attention",
                        attn_sm_fraction=0.4375),
        EmulationPreset("t4-like", 0.0625, ("efficient", "math"), 16, 12.0, "T4: no FlashAttention"),
        EmulationPreset("l40s-like", 0.44, ("flash", "efficient"), 48, 25.0, "L40S: ~7x T4 MLP, 10-14x attention",
                        attn_sm_fraction=0.375),
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
    """Presets with ``sm_fraction`` / ``attn_sm_fraction`` / ``sdpa_backends`` from a calibration JSON's ``chosen``."""
    data = json.loads(Path(path).read_text())
    out = dict(PRESETS)
    for name, chosen in data.get("chosen", {}).items():
        if name in out:
            out[name] = replace(out[name], sm_fraction=float(chosen["sm_fraction"]),
                                attn_sm_fraction=float(chosen.get("attn_sm_fraction", 0.0)),
                                sdpa_backends=tuple(chosen["sdpa_backends"]))
    return out


def _sdpa_backends(names: tuple[str, ...]) -> list[Any]:
    from torch.nn.attention import SDPBackend

    table = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [table[n] for n in names]


def _attention_on(stream: Any) -> Any:
    """A ``TorchFunctionMode`` that runs ``F.scaled_dot_product_attention`` on ``stream`` (another green context).

    The attention stream waits for the caller's stream before and the caller's waits for it after, so the two
    never run at once (the emulated GPU is one device); autograd runs the backward on the same stream.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class _AttentionOnStream(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            caller = torch.cuda.current_stream()
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                out = func(*args, **kwargs)
            caller.wait_stream(stream)
            return out

    return _AttentionOnStream()


_GREEN_STREAMS: dict[tuple[int, int], Any] = {}  # (device, SMs) -> stream; contexts live as long as the process


def _driver_green_stream(device: int, num_sms: int) -> Any:
    """A stream of a new ``num_sms``-SM green context, made through the CUDA driver API (ctypes).

    For torch builds whose ``GreenContext`` has no ``Stream()``. Structures the driver fills are opaque buffers
    larger than any CUDA version's ``CUdevResource``; only one group is requested, so their stride never matters.
    Not yet exercised on a GPU: the lent machines' torch 2.11 has ``GreenContext.Stream()``, which is used first.
    """
    import ctypes

    import torch

    cu = ctypes.CDLL("libcuda.so.1")

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise HeterMoEError(f"hetermoe.emulate: {what} failed (CUDA driver error {rc}); green contexts need "
                                "driver 12.4+ on a Hopper/Ampere-or-newer GPU")

    dev, groups = ctypes.c_int(), ctypes.c_uint(1)
    resource, split, rest = (ctypes.create_string_buffer(4096) for _ in range(3))
    desc, gctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    check(cu.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(device)), "cuDeviceGet")
    check(cu.cuDeviceGetDevResource(dev, resource, ctypes.c_int(1)), "cuDeviceGetDevResource(SM)")
    check(cu.cuDevSmResourceSplitByCount(split, ctypes.byref(groups), resource, rest, ctypes.c_uint(0),
                                         ctypes.c_uint(num_sms)), f"cuDevSmResourceSplitByCount({num_sms})")
    check(cu.cuDevResourceGenerateDesc(ctypes.byref(desc), split, ctypes.c_uint(1)), "cuDevResourceGenerateDesc")
    check(cu.cuGreenCtxCreate(ctypes.byref(gctx), desc, dev, ctypes.c_uint(1)), "cuGreenCtxCreate")
    check(cu.cuGreenCtxStreamCreate(ctypes.byref(stream), gctx, ctypes.c_uint(1), ctypes.c_int(0)),
          "cuGreenCtxStreamCreate")
    return torch.cuda.ExternalStream(stream.value, device=device)


def green_stream(device: int, num_sms: int) -> Any:
    """A CUDA stream whose kernels run on ``num_sms`` SMs of ``device`` (a green context's stream), cached.

    Every kernel queued on it keeps the limit, whichever thread queues it: autograd runs a backward op on its
    forward op's stream from its own device thread, where a green context made current with ``set_context`` on
    the main thread does not apply (it would leave every backward kernel on all SMs).
    """
    key = (device, num_sms)
    if key not in _GREEN_STREAMS:
        from torch.cuda.green_contexts import GreenContext

        ctx = GreenContext.create(num_sms=num_sms, device_id=device)
        if callable(getattr(type(ctx), "Stream", None)):
            _GREEN_STREAMS[key] = (ctx, ctx.Stream())
        else:  # torch builds without GreenContext.Stream()
            _GREEN_STREAMS[key] = (ctx, _driver_green_stream(device, num_sms))
    return _GREEN_STREAMS[key][1]


@contextlib.contextmanager
def emulate(preset: str | EmulationPreset, device: int | None = None,
            presets: dict[str, EmulationPreset] | None = None) -> Iterator[dict[str, Any]]:
    """Run the body as an emulated older GPU on CUDA device ``device`` (default: current).

    The body's kernels go to a green context's stream (:func:`green_stream`), made the current stream; SDPA
    attention goes to a second one when the preset gives attention its own share. Kernels a library queues on
    a stream of its own (NCCL) keep every SM. Yields a dict describing the emulation (preset, SMs, memory cap,
    label) to store with any measurement. On exit the memory cap, the current stream and the SDPA restriction
    are restored (memory the body still holds stays allocated).
    """
    import torch

    if not torch.cuda.is_available():
        raise HeterMoEError("hetermoe.emulate needs a CUDA GPU (green contexts); none is visible")
    p = preset if isinstance(preset, EmulationPreset) else (presets or PRESETS).get(preset) or get_preset(preset)
    device = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(device)
    total_gib = props.total_memory / 2**30
    try:
        import torch.cuda.green_contexts  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the torch build
        raise HeterMoEError(f"this torch ({torch.__version__}) has no torch.cuda.green_contexts") from err
    sms = p.num_sms(props.multi_processor_count)
    attn_sms = p.attn_num_sms(props.multi_processor_count)
    before = torch.cuda.get_per_process_memory_fraction(device)
    torch.cuda.set_per_process_memory_fraction(min(p.memory_gib / total_gib, 1.0), device)
    stream = green_stream(device, sms)
    attn_stream = green_stream(device, attn_sms) if attn_sms != sms else None
    from torch.nn.attention import sdpa_kernel

    info = {"preset": p.name, "num_sms": sms, "attn_num_sms": attn_sms, "host_sms": props.multi_processor_count,
            "memory_gib": p.memory_gib, "sdpa_backends": list(p.sdpa_backends), "link_gbps_cap": p.link_gbps,
            "label": emulation_label(p, props.name), "preset_fields": asdict(p)}
    caller = torch.cuda.current_stream(device)
    stream.wait_stream(caller)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.cuda.stream(stream))
            if attn_stream is not None:
                stack.enter_context(_attention_on(attn_stream))
            stack.enter_context(sdpa_kernel(_sdpa_backends(p.sdpa_backends), set_priority=True))
            yield info
    finally:
        caller.wait_stream(stream)
        torch.cuda.set_per_process_memory_fraction(before, device)
