"""kernels.launch: repeated launches through the compiled kernel, keyed at least as finely as Triton specialises.

The key and the interpreter's pass-through run on CPU; the fast path itself (a real compiled kernel, its launcher
called directly) needs a GPU."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, requires_triton

from hf_hetermoe.kernels import launch
from hf_hetermoe.kernels.launch import _arg_key, _Unkeyable, fast

pytestmark = requires_triton


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, stride, alpha, BLOCK: tl.constexpr, SQUARE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride, mask=mask)
    if SQUARE:
        x = x * x
    tl.store(out_ptr + offs, alpha * x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def _axpy(x, y, alpha, *, stride=1, square=False, block=64):
    n = y.numel()
    out = torch.empty_like(y)
    fast(_axpy_kernel)[(triton.cdiv(n, block),)](x, y, out, n, stride, alpha, BLOCK=block, SQUARE=square)
    return out


def _expected(x, y, alpha, stride=1, square=False):
    x = x[::stride][: y.numel()]
    return alpha * (x * x if square else x) + y


def test_key_separates_what_triton_specialises_on():
    base = torch.zeros(64, dtype=torch.float32)
    assert _arg_key(base) == _arg_key(torch.ones(8, dtype=torch.float32))
    assert _arg_key(base) != _arg_key(base[1:])  # 16-byte alignment of the base
    assert _arg_key(base) != _arg_key(base.half())  # dtype
    # Integers by value (Triton looks at == 1, divisibility by 16 and width), booleans and floats apart from them.
    assert len({_arg_key(v) for v in (1, 2, 16, 32, 2**40, True, 1.0, None)}) == 8
    assert _arg_key(0.5) != _arg_key(0.25)  # a float may be a constexpr: its value is kept
    with pytest.raises(_Unkeyable):
        _arg_key(object())


def test_launches_match_triton_and_reuse_the_compiled_kernel():
    launch.clear()
    x = torch.randn(300, device=DEVICE)
    y = torch.randn(150, device=DEVICE)
    for _ in range(3):  # the second and third launch of one key are the fast ones on a GPU
        torch.testing.assert_close(_axpy(x, y, 0.5), _expected(x, y, 0.5))
    # Every argument change that selects another compiled kernel, and back again.
    cases = [
        dict(alpha=2.0),
        dict(alpha=0.5, stride=2),
        dict(alpha=0.5, square=True),
        dict(alpha=0.5, offset=1),  # x's base not 16-byte aligned
        dict(alpha=0.5),
    ]
    for case in cases:
        offset = case.pop("offset", 0)
        xs = x[offset:]
        for _ in range(2):
            out = _axpy(xs, y, case["alpha"], stride=case.get("stride", 1), square=case.get("square", False))
            torch.testing.assert_close(out, _expected(xs, y, **case))
    kept = fast(_axpy_kernel)._compiled
    if DEVICE.type == "cuda":
        assert len(kept) == 5  # 0.5 / 2.0 / stride 2 / squared / unaligned; the repeats were found again
    else:
        assert not kept  # the interpreter's kernels always take Triton's own path


def test_disabled_or_unkeyable_launches_take_tritons_path(monkeypatch):
    launch.clear()
    x = torch.randn(128, device=DEVICE)
    y = torch.randn(128, device=DEVICE)
    # A grid function: Triton's path, same result.
    out = torch.empty_like(y)
    fast(_axpy_kernel)[lambda meta: (triton.cdiv(128, meta["BLOCK"]),)](x, y, out, 128, 1, 3.0, BLOCK=32)
    torch.testing.assert_close(out, _expected(x, y, 3.0))
    assert not fast(_axpy_kernel)._compiled
    monkeypatch.setattr(launch, "ENABLED", False)
    for _ in range(2):
        torch.testing.assert_close(_axpy(x, y, 1.5), _expected(x, y, 1.5))
    assert not fast(_axpy_kernel)._compiled


@pytest.mark.gpu
def test_a_launch_hook_sees_every_launch():
    """A profiler's launch hook (Triton's knobs) gets Triton's path, so it is called for every launch."""
    from triton import knobs

    launch.clear()
    x = torch.randn(256, device="cuda")
    y = torch.randn(256, device="cuda")
    _axpy(x, y, 1.0)  # kept
    seen = []

    def hook(metadata):
        seen.append(metadata)

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        install, remove = (lambda: chain.add(hook)), (lambda: chain.remove(hook))
    else:  # Triton versions whose hook is one function
        install = lambda: setattr(knobs.runtime, "launch_enter_hook", hook)  # noqa: E731
        remove = lambda: setattr(knobs.runtime, "launch_enter_hook", None)  # noqa: E731
    install()
    try:
        for _ in range(3):
            torch.testing.assert_close(_axpy(x, y, 1.0), _expected(x, y, 1.0))
    finally:
        remove()
    assert len(seen) == 3


@pytest.mark.gpu
def test_fast_launches_are_captured_by_cuda_graphs():
    launch.clear()
    x = torch.randn(512, device="cuda")
    y = torch.randn(512, device="cuda")
    _axpy(x, y, 2.0)
    _axpy(x, y, 2.0)  # the compiled kernel is kept; the captured launch below is a fast one
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _axpy(x, y, 2.0)
    x.copy_(torch.randn(512, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _expected(x, y, 2.0))


def test_compile_only_launches_run_nothing_and_compile_for_later():
    """``compile_only()``: a launch compiles (Triton's warmup; on the interpreter, nothing) and runs nothing; under
    Triton's asynchronous compile mode on a thread pool (what the autotuner does with its candidates) the kernels
    compiled there are what later launches run."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    launch.clear()
    x = torch.randn(200, device=DEVICE)
    y = torch.randn(200, device=DEVICE)
    out = torch.full_like(y, 7.0)
    blocks = (32, 128)  # specialisations no other test launches
    with ThreadPoolExecutor(2) as pool, AsyncCompileMode(pool), launch.compile_only():
        assert launch.compiling_only()
        for block in blocks:
            fast(_axpy_kernel)[(triton.cdiv(200, block),)](x, y, out, 200, 1, 0.25, BLOCK=block, SQUARE=True)
    assert not launch.compiling_only()
    assert torch.equal(out, torch.full_like(y, 7.0))  # nothing ran
    assert not fast(_axpy_kernel)._compiled  # nothing kept from a launch that did not run
    for block in blocks:
        torch.testing.assert_close(_axpy(x, y, 0.25, square=True, block=block), _expected(x, y, 0.25, square=True))
