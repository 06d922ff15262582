"""Tile configurations of the Triton expert kernels: measured defaults, small candidate lists, autotuning.

Each launcher asks ``choose(kernel, key, candidates, launch)`` for a configuration. Without autotuning (the
default on CPU, under ``HETERMOE_AUTOTUNE=0``, or ``set_autotune(False)``) that is the first candidate that
fits the device's shared memory: the measured default. With autotuning, the first call of each key times every
candidate on the call's own inputs and outputs (no extra memory, so tuning cannot run out of memory; rounds over
all candidates, see ``time_candidates``), keeps the fastest, and stores it in a JSON file
(``$HETERMOE_CACHE_DIR`` or ``~/.cache/hf_hetermoe``, ``tuning.json``) that later processes read instead of tuning
again.

Keys name the kernel, the device, the dtype, the operand layout and *buckets* of the token count (powers of
two), never the exact token count, so a new batch size does not retune. Tuning synchronises the device, so it
is skipped while a CUDA graph is being captured (the default applies there, and nothing is cached).

Compiling the candidates is most of a tuning's time (an H100's first forward+backward at a new shape: 37 of 41 s,
benchmarks/NOTES.md v2.21), so they are compiled all at once first, on ``HETERMOE_COMPILE_THREADS`` threads through
Triton's asynchronous compile mode (its compiler releases the GIL), then timed one by one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import env
from . import launch as _launch

# Candidate lists, measured default first (benchmarks/sweep_tiles.py, results/sweep_tiles_*.csv).
# Gathered grouped matmul; BLOCK_M is fixed by the routing tiles. GROUP_M row tiles share each N tile (L2 reuse).
# One B operand (down projection, both backward matmuls, interleaved gate/up): 128x256 tiles won on every shape.
GEMM_CANDIDATES: list[dict] = [
    dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=8),
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=8),
    dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=16),
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=8),
    # v2.8: two programs per SM (96 KB of operands each: one's epilogue runs under the other's mainloop, for short
    # K such as the down projection's K = I), and a deeper pipeline for the wide tile.
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, GROUP_M=8),
    dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=8),
    # v2.9: one program per SM looping over the tiles (_gather_gemm_persistent_kernel): no per-tile program launch.
    dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=8, PERSISTENT=True),
    dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=8, PERSISTENT=True),
]
# Two B operands (concatenated gate and up, two accumulators): 128x128 tiles.
GATED_CANDIDATES: list[dict] = [
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=8),
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=8),
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=16),
    dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4, GROUP_M=8),
    # v2.15: persistent with 4 stages is gone. It won the tuner's short timings by 2-15% at Qwen3 / OLMoE / Mixtral
    # shapes and lost sustained by 2-15% (at the power limit it runs at lower clocks than it bursts at), so the tuner
    # picked it wherever it could.
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=8, PERSISTENT=True),
]
# Per-expert weight gradient; BLOCK_M rows per step; A_T loads A pre-transposed instead of tl.trans; PREFETCH
# (default off) loads the next step's row indices one step ahead (see _wgrad_kernel).
WGRAD_CANDIDATES: list[dict] = [
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, GROUP_N=8, A_T=False),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4, GROUP_N=8, A_T=False),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, GROUP_N=8, A_T=True),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=5, GROUP_N=8, A_T=False),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=3, GROUP_N=8, A_T=False),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, GROUP_N=8, A_T=False),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3, GROUP_N=8, A_T=False),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, GROUP_N=8, A_T=False),
    # v2.2: deeper operand pipelines (the index load takes a stage of its own)
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=5, GROUP_N=8, A_T=False),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=5, GROUP_N=8, A_T=False),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, GROUP_N=8, A_T=False, PREFETCH=True),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4, GROUP_N=8, A_T=False, PREFETCH=True),
]
# The interpreter runs one configuration, small, so CPU tests stay fast.
INTERPRETER = {
    "gemm": dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, GROUP_M=2),
    "wgrad": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, GROUP_N=2, A_T=False),
}

_SMEM: dict[int, int] = {}
_SMS: dict[int, int] = {}
_lock = threading.Lock()
_memory: dict[str, dict] = {}  # key -> chosen config, this process
_disk: dict[str, dict] | None = None  # the cache file's contents, read once
_override: bool | None = None
_decisions: dict[tuple, object] = {}  # launcher decisions by everything they depend on (``remembered``)
_DECISIONS_MAX = 4096  # distinct call signatures kept; past that the table starts over (varying shapes)
_device_names: dict[int, str] = {}
VERSION = 5  # bump when the kernels change meaning of a configuration: old cache entries are ignored
TUNE_LOG: list[tuple[str, float]] = []  # (key, seconds) of each tuning done in this process
logger = logging.getLogger("hf_hetermoe.tuning")


def set_autotune(enabled: bool | None) -> None:
    """Turn autotuning on or off for this process (``None``: back to ``HETERMOE_AUTOTUNE``, default on)."""
    global _override
    _override = enabled
    forget_decisions()


def autotune_enabled() -> bool:
    return _override if _override is not None else env.autotune()


def cache_path() -> Path:
    return env.cache_dir() / "tuning.json"


def shared_memory_per_block(device: torch.device) -> int:
    """Shared memory a program may use on ``device``, less room for Triton's own scratch (layout conversions)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMEM:
        props = torch.cuda.get_device_properties(index)
        _SMEM[index] = int(getattr(props, "shared_memory_per_block_optin", 99 * 1024)) - 16 * 1024
    return _SMEM[index]


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: the grid of the persistent kernels."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def with_persistence(candidates: list[dict], mode: bool | None) -> list[dict]:
    """``candidates`` as ``HETERMOE_PERSISTENT`` allows: all (``None``), only ``PERSISTENT`` ones, or none of them."""
    if mode is None:
        return candidates
    return [c for c in candidates if bool(c.get("PERSISTENT")) == mode]


def operand_bytes(kernel: str, cfg: dict, block_m: int, num_b: int, elem: int) -> int:
    """Shared memory of the operand pipeline of one configuration."""
    if kernel == "gemm":
        per_stage = block_m * cfg["BLOCK_K"] + num_b * cfg["BLOCK_K"] * cfg["BLOCK_N"]
    else:
        per_stage = cfg["BLOCK_M"] * (cfg["BLOCK_N"] + cfg["BLOCK_K"])
    return cfg["num_stages"] * per_stage * elem


def fit(kernel: str, cfg: dict, limit: int, block_m: int = 0, num_b: int = 1, elem: int = 2) -> dict:
    """``cfg`` with stages, then the widest tile dimension, shrunk until its pipeline fits ``limit`` bytes."""
    cfg = dict(cfg)
    wide = "BLOCK_N" if kernel == "gemm" else "BLOCK_K"
    while operand_bytes(kernel, cfg, block_m, num_b, elem) > limit:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg[wide] > 32:
            cfg[wide] //= 2
        elif kernel == "wgrad" and cfg["BLOCK_N"] > 32:
            cfg["BLOCK_N"] //= 2
        else:
            break
    return cfg


def bucket(n: int) -> int:
    """Next power of two (0 stays 0): token counts of one bucket share a tuned configuration."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def rows_bucket(pairs: int, experts: int) -> int:
    """``bucket`` of the rows per expert, rounded up: the key of choices that depend on experts' run lengths."""
    return bucket(-(-pairs // max(experts, 1)))


def _load_disk() -> dict[str, dict]:
    global _disk
    if _disk is None:
        try:
            _disk = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            _disk = {}
    return _disk


def _store_disk(key: str, cfg: dict) -> None:
    """Merge one entry into the cache file, atomically (processes tuning side by side lose nothing but races)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = {}
        current[key] = cfg
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home must not break training: the choice still holds for this process


def _out_of_resources(err: Exception) -> bool:
    """Triton's resource errors (shared memory, registers) differ in type across versions; match them by name."""
    return "OutOfResources" in type(err).__name__ or "out of resource" in str(err).lower()


def _cuda_stopwatch(fn: Callable[[], object]) -> Callable[[], float]:
    """Run ``fn`` between two CUDA events; the returned reader waits for the end event and gives milliseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()

    def read() -> float:
        end.synchronize()
        return start.elapsed_time(end)

    return read


def rotating_rounds(items: list, rounds: int) -> list[list]:
    """``rounds`` orders of ``items``, each starting one item later than the one before (wrapping around): timed in
    these, every item runs at every position, so a GPU slowing down under sustained load favours none of them."""
    return [items[r % len(items):] + items[: r % len(items)] for r in range(rounds)] if items else []


def time_candidates(
    launch: Callable[[dict], None],
    candidates: list[dict],
    rounds: int = 5,
    stopwatch: Callable[[Callable[[], object]], Callable[[], float]] = _cuda_stopwatch,
) -> list[float]:
    """Median milliseconds of one ``launch(cfg)`` per candidate (``inf`` where it does not compile for lack of
    shared memory or registers; other errors propagate).

    Every candidate is launched twice first (compile, warm caches), then timed once per round, all candidates in a
    round, starting one candidate later each round. Under sustained load a GPU at its power limit lowers its clocks
    within a second (an H200 from 1980 to ~1500 MHz, benchmarks/NOTES.md v2.10), so timing each candidate's
    repetitions back to back ranks them partly by when they ran; rounds give every candidate every position. On an
    H200 this picked a tile within 1% of the best for 37 of 48 (kernel, shape) draws, against 26 of 48 back to back.
    """
    alive = []
    for i, cand in enumerate(candidates):
        try:
            launch(cand)
            launch(cand)
        except Exception as err:  # noqa: BLE001  (only resource errors are skipped)
            if not _out_of_resources(err):
                raise
            continue
        alive.append(i)
    marks: dict[int, list[Callable[[], float]]] = {i: [] for i in alive}
    for order in rotating_rounds(alive, rounds):
        for i in order:
            marks[i].append(stopwatch(lambda cfg=candidates[i]: launch(cfg)))
    times = [math.inf] * len(candidates)
    for i, reads in marks.items():
        times[i] = statistics.median(read() for read in reads)
    return times


class _NotCompiled(Exception):
    """A candidate reached a tuning of its own while only compiling: left to the timed launches."""


def compile_concurrently(launch: Callable[[dict], object], candidates: list[dict]) -> None:
    """Compile the kernels of every candidate at once: each ``launch(cfg)`` runs in ``kernels.launch.compile_only``
    mode (its kernels compiled, nothing run), under Triton's asynchronous compile mode on a thread pool, and the
    compiled kernels land in Triton's caches before this returns. Best effort: whatever fails here (a compile error,
    a candidate that would tune something first) is compiled, or raises, at its timed launch as before."""
    workers = min(env.compile_threads(), len(candidates))
    if workers < 2:
        return
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # a Triton without it: candidates compile one by one at their first launch
        return
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="hetermoe-compile") as pool:
            with AsyncCompileMode(pool), _launch.compile_only():
                for cand in candidates:
                    try:
                        launch(cand)
                    except Exception:  # noqa: BLE001  (_NotCompiled, or an error its timed launch raises again)
                        continue
    except Exception as err:  # noqa: BLE001  (the timed launches raise whatever is real)
        logger.debug("compiling %d candidates at once failed (%s: %s); compiling them one by one", len(candidates),
                     type(err).__name__, err)


def _measure(launch: Callable[[dict], object], candidates: list[dict]) -> list[float]:
    compile_concurrently(launch, candidates)
    return time_candidates(launch, candidates)


def device_name(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def _entry_name(kernel: str, device: torch.device, key: tuple) -> str:
    """The cache entry of one tuning decision: version, kernel, GPU name and the caller's key."""
    return "|".join(map(str, (f"v{VERSION}", kernel, device_name(device), *key)))


def remembered(key: tuple, decide: Callable[[], object], device: torch.device):
    """``decide()``, made once per ``key`` in this process: a launcher's whole decision (which implementation, which
    tiles, which variant) for one call signature.

    ``key`` must hold everything the decision reads: the kernel, the operands' shapes, strides, dtypes and
    alignment, the device, the toggles (``env.toggles()``). Then a repeated call costs one dictionary look-up, where
    deciding again (candidate lists, support checks, the tuning cache's string keys) cost up to 100-250 us of host
    time per launch on an H200's host, enough to leave the GPU waiting at 4 K tokens (benchmarks/NOTES.md, v2.16).

    Not remembered: decisions off CUDA (the interpreter's are cheap) and while a CUDA graph is captured (the default
    applies there, untuned). ``clear``, ``set_autotune`` and ``forget_decisions`` forget them all."""
    hit = _decisions.get(key)
    if hit is not None:
        return hit
    value = decide()
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        if len(_decisions) >= _DECISIONS_MAX:
            _decisions.clear()
        _decisions[key] = value
    return value


def choose(
    kernel: str,
    key: tuple,
    candidates: list[dict],
    launch: Callable[[dict], None],
    *,
    device: torch.device,
    block_m: int = 0,
    num_b: int = 1,
    elem: int = 2,
) -> dict:
    """The configuration to launch ``kernel`` with for ``key`` (see the module docstring).

    ``launch(cfg)`` runs the kernel once with ``cfg``; it must be a pure function of its inputs (outputs fully
    overwritten), since tuning runs it several times on the real tensors.
    """
    if device.type != "cuda":
        return INTERPRETER[kernel]
    name = _entry_name(kernel, device, key)
    cfg = _memory.get(name)
    if cfg is not None:
        return cfg
    limit = shared_memory_per_block(device)
    fitted = [fit(kernel, c, limit, block_m, num_b, elem) for c in candidates]
    fitted = [c for i, c in enumerate(fitted) if c not in fitted[:i]]
    if not autotune_enabled() or torch.cuda.is_current_stream_capturing():
        return fitted[0]
    return select(name, fitted, lambda cands: _measure(launch, cands))


def choose_impl(
    kernel: str,
    key: tuple,
    candidates: list[dict],
    run: Callable[[dict], object],
    *,
    device: torch.device,
    default: dict,
    warm: Callable[[], object] | None = None,
) -> dict:
    """Which of ``candidates`` (implementations of one operation, each with its own tiles) runs ``key``: the
    fastest of them timed in rounds on the call's own inputs, cached like a tile choice. ``run(cfg)`` returns a
    fresh output that is dropped at once. Without autotuning, while a CUDA graph is captured, or off CUDA:
    ``default``. A cached choice that is no longer among ``candidates`` is ignored. ``warm()``, if given, runs once
    before timing: a candidate that tunes choices of its own must make them first (``select`` is not re-entrant)."""
    if device.type != "cuda":
        return default
    name = _entry_name(kernel, device, key)
    cached = _memory.get(name) or _load_disk().get(name)
    if cached is not None and cached in candidates:
        return cached
    if not autotune_enabled() or torch.cuda.is_current_stream_capturing():
        return default
    if cached is not None:  # stale entry (the candidate list changed): measure again
        with _lock:
            _memory.pop(name, None)
            _load_disk().pop(name, None)
    if warm is not None:
        warm()
    return select(name, candidates, lambda cands: _measure(run, cands))


def select(name: str, candidates: list[dict], measure: Callable[[list[dict]], list[float]]) -> dict:
    """The cached choice for ``name`` (this process, then the disk cache), else the candidate with the smallest
    time in ``measure(candidates)`` (milliseconds per candidate, ``inf`` for one that cannot run), remembered in
    both. When none can run, the first candidate is the fallback."""
    if _launch.compiling_only() and (_memory.get(name) or _load_disk().get(name)) is None:
        raise _NotCompiled(name)  # a measurement now would time launches that run nothing
    with _lock:
        cfg = _memory.get(name) or _load_disk().get(name)
        if cfg is None:
            began = time.perf_counter()
            times = measure(candidates)
            best = min(range(len(candidates)), key=lambda i: times[i])
            cfg = candidates[best] if math.isfinite(times[best]) else candidates[0]
            seconds = time.perf_counter() - began
            TUNE_LOG.append((name, seconds))
            _store_disk(name, cfg)
            logger.info(
                "tuned %s in %.1f s (compiling and timing %d candidates; once per shape bucket, cached in %s): %s",
                name, seconds, len(candidates), cache_path(), cfg,
            )
            # What each candidate measured: why the choice fell as it did (ms; inf: could not run).
            logger.debug("%s: %s", name, "; ".join(f"{c} {t:.4f} ms" for c, t in zip(candidates, times)))
        _memory[name] = cfg
    return cfg


def forget_decisions() -> None:
    """Forget the launchers' remembered decisions (``remembered``); the tuned choices stay."""
    _decisions.clear()


def clear() -> None:
    """Forget this process's choices and the cache file's contents read so far (tests; a new cache dir)."""
    global _disk
    with _lock:
        _memory.clear()
        _decisions.clear()
        _disk = None
