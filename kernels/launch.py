"""Launching Triton and Gluon kernels without Triton's per-call argument binding.

``kernel[grid](*args, **kwargs)`` goes through Triton's ``JITFunction.run`` on every call: it binds and specialises
every argument, builds a cache key, and builds launch metadata. On a lent H100's host one small launch cost 54.6 us
that way, against 8.8 us for the compiled kernel's own launcher. In the experts layer the forward's issue time
dropped by ~100 us for its 7 launches (benchmarks/NOTES.md, v2.20). Where a call's GPU work takes a few
milliseconds, host time is what leaves the GPU waiting on a slow host.

``fast(kernel)[grid](*args, **kwargs)`` launches exactly what ``kernel[grid](*args, **kwargs)`` would:

- The first launch of each *argument key* goes through Triton (which compiles or finds the kernel) and keeps the
  compiled kernel it returns.
- Later launches with the same key call that compiled kernel's launcher directly.
- The key is at least as specific as Triton's specialisation:
  - tensors: dtype and 16-byte alignment;
  - integers, booleans, floats and strings: type and exact value (Triton looks at less: ``== 1``, divisibility by
    16 and width; a float passed to a constexpr parameter selects a kernel by its value);
  - TMA descriptors: dtype, shape, strides, box, layout, padding, base alignment;
  - every keyword argument (constexprs and compile options): its value;
  - the current device.
  So the same compiled kernel is found as Triton's lookup would find it.
- Anything unexpected (a grid callable, an unhashable argument, launch hooks installed by a profiler, pre-run hooks,
  a kernel compiled asynchronously, the interpreter) goes through Triton unchanged.

``HETERMOE_FAST_LAUNCH=0`` (read at import) sends every launch through Triton; so does setting ``ENABLED = False``
at run time (an A/B in one process).

Inside ``compile_only()`` a launch only compiles its kernel (Triton's ``warmup``) and runs nothing: under Triton's
asynchronous compile mode the autotuner uses it to compile all of a tuning's candidates at once (``tuning.py``).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .. import env

ENABLED = env.fast_launch()
_MAX_KEYS = 1024  # per kernel; cleared when exceeded (shapes that change every call keep the plain path's cost)
_COMPILE_ONLY = contextvars.ContextVar("hetermoe_compile_only", default=False)


@contextlib.contextmanager
def compile_only():
    """Launches in this context (this thread) compile their kernel and return without running it."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


def compiling_only() -> bool:
    return _COMPILE_ONLY.get()


class _Unkeyable(Exception):
    pass


def _descriptor_key(d) -> tuple:
    base = d.base
    return (
        type(d),
        base.dtype,
        base.data_ptr() % 16 == 0,
        tuple(d.shape),
        tuple(d.strides),
        tuple(d.block_shape),
        getattr(d, "layout", None),
        getattr(d, "padding", None),
    )


def _arg_key(a):
    """What of one argument may select a compiled kernel (a superset of what Triton specialises on)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if a is None or isinstance(a, (bool, int, float, str)):
        return (type(a), a)  # the type too: True, 1 and 1.0 are different arguments to Triton
    if hasattr(a, "block_shape") and hasattr(a, "base"):  # a TMA descriptor (Triton's or Gluon's)
        return _descriptor_key(a)
    raise _Unkeyable(type(a))


class FastKernel:
    """``fast(kernel)``: indexable by a grid like the kernel itself."""

    __slots__ = ("kernel", "_compiled", "_names", "_defaults", "_device", "_stream", "_knobs", "_usable")

    def __init__(self, kernel):
        from triton.runtime.jit import JITFunction

        self.kernel = kernel
        self._compiled: dict = {}
        # The interpreter's kernels (TRITON_INTERPRET=1) are not JITFunctions: they always take Triton's path.
        self._usable = isinstance(kernel, JITFunction)
        if self._usable:
            from triton import knobs
            from triton.runtime import driver

            params = kernel.params
            self._names = [p.name for p in params]
            self._defaults = {p.name: p.default for p in params if p.has_default}
            self._device = driver.active.get_current_device
            self._stream = driver.active.get_current_stream
            self._knobs = knobs.runtime

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _hooks_active(self) -> bool:
        """A launch hook is installed (e.g. by Triton's profiler), or a pre-run hook on the kernel: they get Triton's
        own path (and the hooks their launch metadata)."""
        if getattr(self.kernel, "pre_run_hooks", None):
            return True
        for hook in (self._knobs.launch_enter_hook, self._knobs.launch_exit_hook):
            if hook is not None and getattr(hook, "calls", True):
                return True
        return False

    def launch(self, grid, args: tuple, kwargs: dict):
        if _COMPILE_ONLY.get():
            # Triton's warmup: specialise and compile (or submit the compile, under its async mode), launch nothing.
            return self.kernel.run(*args, grid=grid, warmup=True, **kwargs) if self._usable else None
        if not (ENABLED and self._usable) or callable(grid) or self._hooks_active():
            return self.kernel[grid](*args, **kwargs)
        device = self._device()
        try:
            key = (device, tuple(_arg_key(a) for a in args), tuple(kwargs.items()))
            entry = self._compiled.get(key)
        except (_Unkeyable, TypeError):  # an argument we do not know how to key, or an unhashable value
            return self.kernel[grid](*args, **kwargs)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            trailing = self._trailing(len(args), kwargs)
            if _launchable(compiled) and trailing is not None:
                if len(self._compiled) >= _MAX_KEYS:
                    self._compiled.clear()
                self._compiled[key] = (compiled, trailing)
            return compiled
        compiled, trailing = entry
        values = args + tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in trailing)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        # No launch metadata and no hooks: _hooks_active() said there are none to call.
        compiled.run(
            g0, g1, g2, self._stream(device), compiled.function, compiled.packed_metadata, None, None, None, *values
        )
        return compiled

    def _trailing(self, num_positional: int, kwargs: dict) -> tuple | None:
        """The parameters after the positional ones, in signature order (the launcher takes every parameter), or
        ``None`` when one has neither a keyword value nor a default (not a call Triton accepts: not kept)."""
        names = tuple(self._names[num_positional:])
        if any(n not in kwargs and n not in self._defaults for n in names):
            return None
        return names


def _launchable(compiled) -> bool:
    """A compiled kernel whose launcher can be called directly (not an asynchronous compile's future)."""
    return compiled is not None and not hasattr(compiled, "result") and getattr(compiled, "function", None) is not None


_FAST: dict = {}


def fast(kernel) -> FastKernel:
    """The fast launcher of ``kernel`` (one per kernel, kept for the process)."""
    # By identity: a JITFunction hashes its source's digest under a lock. The launcher holds the kernel, so the id
    # is never reused while the entry exists.
    launcher = _FAST.get(id(kernel))
    if launcher is None:
        launcher = _FAST[id(kernel)] = FastKernel(kernel)
    return launcher


def clear() -> None:
    """Forget every kept compiled kernel (the next launch of each goes through Triton again)."""
    for launcher in _FAST.values():
        launcher._compiled.clear()
