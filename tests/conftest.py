"""Test setup. Without CUDA, Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be
set before any @triton.jit decorator runs, so it is set here, before hf_hetermoe is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_hetermoe.kernels import triton_available  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Relative-norm tolerance ||a - b|| / ||b|| per dtype (accumulation-order noise, never NaN).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# The Triton interpreter computes bf16 arithmetic wrongly (FACTS.md): CPU runs test fp32 and fp16.
KERNEL_DTYPES = [torch.float32, torch.float16] if DEVICE.type == "cpu" else [torch.float32, torch.bfloat16]

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    denom = expected.norm().item()
    return (actual - expected).norm().item() / (denom if denom > 0 else 1.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _fresh_launch_decisions():
    """Each test decides its launches anew: a decision remembered by an earlier test (``tuning.remembered``) would
    bypass what a test monkeypatches (a tuner stand-in, a support check)."""
    from hf_hetermoe.kernels import tuning

    tuning.forget_decisions()
    yield
    tuning.forget_decisions()


@pytest.fixture(autouse=True)
def _autograd_threads_restored():
    """``prepare`` runs later backward passes on the calling thread (``HeterMoEConfig.backward_on_calling_thread``,
    a thread-local autograd mode): a test that prepares a model and does not unprepare it must not hand that mode to
    the next test."""
    import importlib

    prepare = importlib.import_module("hf_hetermoe.prepare")  # the module: the package exports the function

    mode = torch._C._is_multithreading_enabled()
    yield
    torch.autograd.set_multithreading_enabled(mode)
    prepare._CALLING_THREAD.holders = 0  # nor its count of models that hold the mode


@pytest.fixture(autouse=True)
def _pinned_tiles():
    """On a GPU, the measured default tiles in every test: autotuning (on by default) compiles and times every
    candidate of every kernel for every new shape, which made two tiny-model tests take two minutes each on an H200
    and the GPU suite outrun a device call. The tests of tuning itself switch it on (``set_autotune(True)``)."""
    from hf_hetermoe.kernels import tuning

    tuning.set_autotune(False)
    yield
    tuning.set_autotune(None)


def enable_checkpointing(model, use_reentrant: bool, offload: bool) -> None:
    """transformers >= 5.2x names it ``activation_checkpointing_enable`` (with ``offload``); older releases
    ``gradient_checkpointing_enable``, which Trainer's ``gradient_checkpointing=True`` calls."""
    kwargs = {"use_reentrant": use_reentrant}
    if offload and not torch.cuda.is_available():
        pytest.skip("checkpoint offload keeps the saved activations in pinned host memory: needs CUDA")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    elif offload:
        pytest.skip("this transformers has no checkpoint offload")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
