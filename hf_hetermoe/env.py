"""Every environment toggle of hf-hetermoe, in one place.

| variable | effect |
|---|---|
| ``HETERMOE_DISABLE=1`` | ``prepare`` returns the model untouched (with a warning): a kill switch for debugging |
| ``HETERMOE_BACKEND`` | ``auto``, ``triton`` or ``reference``, read at import: overrides ``HeterMoEConfig.backend`` |
| ``HETERMOE_AUTOTUNE=0`` | pin the measured kernel tiles instead of tuning them per shape bucket on first use |
| ``HETERMOE_VENDOR_WGRAD=0`` | weight gradients in Triton (default: ``torch._grouped_mm``, bf16 on sm_90/100) |
| ``HETERMOE_GLUON=0`` | no Gluon kernel at all (default: the tuner weighs them, bf16/fp16 on sm_90) |
| ``HETERMOE_GLUON_GEMM=0`` | no Gluon kernel for the down projection and dx (the weight gradients keep theirs) |
| ``HETERMOE_VENDOR_MATMUL=0`` | no ``torch._grouped_mm`` for gate/up, the down projection and dx (default: tuned) |
| ``HETERMOE_VENDOR_GATE_UP=0`` | no ``torch._grouped_mm`` + activation pass for gate/up only (default: tuned) |
| ``HETERMOE_SORTED_G=0`` | the backward's first matmul always gathers ``dout``'s rows (default: tuned, long experts) |
| ``HETERMOE_SPLIT_TAIL=0`` | every row tile at full height (default: tiles of <= half the rows run at half height) |
| ``HETERMOE_ONE_DOT_GATE_UP=0`` | gate and up as two dots (default: one interleaved dot of twice the width) |
| ``HETERMOE_PERSISTENT`` | one-program-per-SM matmul tiles: ``auto`` (the tuner weighs them), ``1`` only, ``0`` no |
| ``HETERMOE_CALLING_THREAD_BACKWARD`` | ``0``/``1``: overrides ``HeterMoEConfig.backward_on_calling_thread`` |
| ``HETERMOE_FAST_LAUNCH=0`` | launches through Triton's ``kernel[grid](...)`` (default: compiled kernel; at import) |
| ``HETERMOE_COMPILE_THREADS`` | threads compiling a tuning's candidate kernels at once (default: this rank's CPUs) |
| ``HETERMOE_RECOMPUTE_CHUNKS`` | chunks of the backward under ``recompute_gate_up``: 1 (default), N or ``auto`` |
| ``HETERMOE_CE_CHUNK_MB`` | logits per chunk of the fused linear cross-entropy, in MiB (default 2048) |
| ``HETERMOE_CACHE_DIR`` | where tuned tiles are cached (default ``~/.cache/hf_hetermoe``; file ``tuning.json``) |
| ``TRITON_INTERPRET=1`` | Triton's own: run the kernels on CPU tensors in the interpreter (tests only; slow) |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use one of {sorted(_TRUE | _FALSE)}")


def disabled() -> bool:
    return _flag("HETERMOE_DISABLE", False)


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET", False)


def backend_override() -> str | None:
    value = os.environ.get("HETERMOE_BACKEND", "").strip().lower()
    return value or None


def autotune() -> bool:
    return _flag("HETERMOE_AUTOTUNE", True)


def calling_thread_backward(default: bool) -> bool:
    """``HETERMOE_CALLING_THREAD_BACKWARD``: whether ``prepare`` runs the backward on the calling thread (see
    ``HeterMoEConfig.backward_on_calling_thread``); unset, the config's ``default``."""
    return _flag("HETERMOE_CALLING_THREAD_BACKWARD", default)


def vendor_wgrad() -> bool:
    return _flag("HETERMOE_VENDOR_WGRAD", True)


def gluon() -> bool:
    """``HETERMOE_GLUON``: the Gluon kernels for Hopper (weight gradients, sorted-row matmuls) may run."""
    return _flag("HETERMOE_GLUON", True)


def gluon_gemm() -> bool:
    """``HETERMOE_GLUON_GEMM``: the Gluon sorted-row matmuls may run (the weight gradients keep ``HETERMOE_GLUON``)."""
    return gluon() and _flag("HETERMOE_GLUON_GEMM", True)


def vendor_matmul() -> bool:
    return _flag("HETERMOE_VENDOR_MATMUL", True)


def vendor_gate_up() -> bool:
    return _flag("HETERMOE_VENDOR_GATE_UP", True)


def sorted_g() -> bool:
    return _flag("HETERMOE_SORTED_G", True)


def split_tail() -> bool:
    return _flag("HETERMOE_SPLIT_TAIL", True)


def one_dot_gate_up() -> bool:
    return _flag("HETERMOE_ONE_DOT_GATE_UP", True)


def persistent() -> bool | None:
    """``HETERMOE_PERSISTENT``: ``None`` (auto: the tuner decides), ``True`` (only) or ``False`` (never)."""
    value = os.environ.get("HETERMOE_PERSISTENT", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError(f"HETERMOE_PERSISTENT={value!r}: use auto, 1 (only persistent tiles) or 0 (none)")


def fast_launch() -> bool:
    """``HETERMOE_FAST_LAUNCH``: repeated launches skip Triton's per-call binding (``kernels.launch``)."""
    return _flag("HETERMOE_FAST_LAUNCH", True)


class Toggles(NamedTuple):
    """The kernel toggles above, read together: the experts operator reads them once per forward and once per backward
    and hands them to its launchers, whose cached launch decisions are keyed on them (``kernels.tuning.remembered``).
    A toggle changed between calls takes effect at the next call, as when each launch read its own."""

    autotune: bool
    vendor_wgrad: bool
    gluon: bool
    gluon_gemm: bool
    vendor_matmul: bool
    vendor_gate_up: bool
    sorted_g: bool
    split_tail: bool
    one_dot_gate_up: bool
    persistent: bool | None


def toggles() -> Toggles:
    """Every kernel toggle, read now."""
    return Toggles(
        autotune(),
        vendor_wgrad(),
        gluon(),
        gluon_gemm(),
        vendor_matmul(),
        vendor_gate_up(),
        sorted_g(),
        split_tail(),
        one_dot_gate_up(),
        persistent(),
    )


def compile_threads() -> int:
    """``HETERMOE_COMPILE_THREADS``: threads that compile the candidate kernels of one tuning at once (``1``: one after
    the other). Default: the CPUs this process may run on, shared by the ranks of this node (``LOCAL_WORLD_SIZE``)."""
    value = os.environ.get("HETERMOE_COMPILE_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) == 0:
            raise ValueError(f"HETERMOE_COMPILE_THREADS={value!r} must be a positive integer (1: compile serially)")
        return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return max(1, cpus // int(ranks)) if ranks.isdigit() and int(ranks) > 0 else cpus


def recompute_chunks() -> int | None:
    """``HETERMOE_RECOMPUTE_CHUNKS``: how many chunks of sorted rows the experts' backward runs in when the forward
    saved no pre-activations (``recompute_gate_up``): ``1`` (the default: the whole routing at once), a count, or
    ``None`` for ``auto`` (chunks sized to the weight gradients; see ``triton_ops.recompute_chunk_rows``)."""
    value = os.environ.get("HETERMOE_RECOMPUTE_CHUNKS", "").strip().lower()
    if value == "":
        return 1
    if value == "auto":
        return None
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"HETERMOE_RECOMPUTE_CHUNKS={value!r}: use auto or a positive number of chunks (1: none)")
    return int(value)


def ce_chunk_mb() -> int:
    value = os.environ.get("HETERMOE_CE_CHUNK_MB", "").strip()
    if not value:
        return 2048
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"HETERMOE_CE_CHUNK_MB={value!r} must be a positive integer (MiB of logits per chunk)")
    return int(value)


def cache_dir() -> Path:
    value = os.environ.get("HETERMOE_CACHE_DIR", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "hf_hetermoe"
