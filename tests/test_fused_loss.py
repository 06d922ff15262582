"""Fused linear cross-entropy: the kernel against F.cross_entropy, and prepare's fused loss on every family."""

import copy
import inspect
import pickle

import pytest
import torch
from conftest import DEVICE, requires_triton

import hf_hetermoe as hetermoe
from hf_hetermoe import fused_loss
from hf_hetermoe.kernels.linear_ce import chunk_rows, linear_cross_entropy, linear_cross_entropy_reference
from hf_hetermoe.model_patches import MODEL_PATCHES
from hf_hetermoe.model_patches.verify import build_tiny_model, tiny_inputs

# max |got - want| / max |want| per dtype: the kernel's gradients round once to the dtype, the reference's too.
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
CPU_DTYPES = [torch.float32, torch.float16] if DEVICE.type == "cpu" else [torch.float32, torch.bfloat16]


def _problem(n=37, h=24, v=100, dtype=torch.float32, bias=True):
    hidden = torch.randn(n, h, device=DEVICE).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, h, device=DEVICE)).to(dtype).requires_grad_()
    b = torch.randn(v, device=DEVICE).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[::5] = -100
    return hidden, weight, b, labels


def _loss_and_grads(fn, hidden, weight, bias, labels, grad_out=2.0, **kwargs):
    params = [t for t in (hidden, weight, bias) if t is not None]
    for t in params:
        t.grad = None
    loss = fn(hidden, weight, labels, bias=bias, **kwargs)
    loss.backward(torch.tensor(grad_out, device=loss.device))
    return loss.detach(), [t.grad.clone() for t in params]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_items", [None, 7, "tensor"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["no_cap", "softcap"])
def test_matches_reference(backend, dtype, num_items, softcap):
    hidden, weight, bias, labels = _problem(dtype=dtype)
    num_items = torch.tensor(7, device=DEVICE) if num_items == "tensor" else num_items
    # softcap=2 is within the range of these logits (|z| up to ~4): the tanh bends them, and its gradient matters.
    kwargs = dict(num_items_in_batch=num_items, logit_scale=0.5, softcap=softcap)
    want, want_grads = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, bias, labels, **kwargs)
    # 16 rows per chunk: three chunks, the last one partial.
    fn = lambda *a, **k: linear_cross_entropy(*a, rows_per_chunk=16, backend=backend, **k)  # noqa: E731
    got, got_grads = _loss_and_grads(fn, hidden, weight, bias, labels, **kwargs)
    assert abs(got.item() - want.item()) <= LOSS_TOL[dtype] * abs(want.item())
    for g, w, name in zip(got_grads, want_grads, ("hidden", "weight", "bias")):
        assert g.dtype == w.dtype
        assert _rel(g, w) < GRAD_TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_nan_loss_and_zero_gradients(backend):
    hidden, weight, _, labels = _problem(bias=False)
    labels.fill_(-100)
    loss, (dh, dw) = _loss_and_grads(
        lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k), hidden, weight, None, labels
    )
    assert torch.isnan(loss)  # as F.cross_entropy's mean over no items
    assert not dh.any() and not dw.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_outside_the_vocabulary_gives_nan(backend):
    hidden, weight, _, labels = _problem(bias=False)
    labels[3] = weight.shape[0]
    with torch.no_grad():
        assert torch.isnan(linear_cross_entropy(hidden, weight, labels, backend=backend))


def test_frozen_weight_and_no_grad():
    hidden, weight, _, labels = _problem(bias=False)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, rows_per_chunk=8)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = linear_cross_entropy(hidden, weight, labels, rows_per_chunk=8)
    assert again.grad_fn is None
    torch.testing.assert_close(again, loss.detach())


def test_second_backward_raises():
    hidden, weight, _, labels = _problem(bias=False)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU autocast")
def test_autocast_computes_in_the_autocast_dtype():
    hidden, weight, _, labels = _problem(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear_cross_entropy_reference(hidden, weight, labels)
        got = linear_cross_entropy(hidden, weight, labels, rows_per_chunk=8)
    got.backward()
    assert weight.grad.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-2 * abs(want.item())


def test_chunk_rows_and_bad_inputs(monkeypatch):
    assert chunk_rows(16384, 151936, 2) == 4096  # 2 GiB of bf16 logits per chunk
    assert chunk_rows(10, 151936, 2) == 10
    assert chunk_rows(100_000, 10**9, 4, budget_mb=1) == 16
    monkeypatch.setenv("HETERMOE_CE_CHUNK_MB", "big")
    with pytest.raises(ValueError, match="HETERMOE_CE_CHUNK_MB"):
        chunk_rows(10, 10, 2)
    monkeypatch.delenv("HETERMOE_CE_CHUNK_MB")
    hidden, weight, _, labels = _problem()
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(hidden, weight, labels, backend="cuda")


# ---------------------------------------------------------------------------------------------------------------
# prepare(model): the fused loss on every supported causal-LM family


def _train_step(model, inputs, router_logits=True):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(**inputs, output_router_logits=router_logits)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def _pair(model_type):
    patch = MODEL_PATCHES[model_type]
    base = build_tiny_model(patch).to(DEVICE)
    plain = hetermoe.prepare(copy.deepcopy(base), hetermoe.HeterMoEConfig(fused_cross_entropy=False)).train()
    fused = hetermoe.prepare(copy.deepcopy(base)).train()
    return patch, plain, fused


# Vision-language models too; token classifiers have no LM head (left alone, below).
CAUSAL = sorted(t for t, p in MODEL_PATCHES.items() if p.task in ("causal_lm", "image_text_to_text"))


@pytest.mark.parametrize("model_type", CAUSAL)
def test_family_loss_and_gradients_match_unfused(model_type):
    patch, plain, fused = _pair(model_type)
    lm = fused_loss.causal_lm_with_head(fused)
    # A head that is not a plain nn.Linear (Ergo's fp32-output head) is not fused: the model computes its own loss.
    unfused = lm is None
    assert not unfused or type(plain.lm_head) is not torch.nn.Linear
    assert unfused or "forward" in lm.__dict__
    inputs = tiny_inputs(patch, plain)
    try:
        want, want_grads = _train_step(plain, inputs)
        router_logits = True
    except Exception:  # an upstream bug with router logits in some transformers versions (verify.py records them)
        router_logits = False
        want, want_grads = _train_step(plain, inputs, router_logits)
    got, got_grads = _train_step(fused, inputs, router_logits)
    assert want.logits is not None and (got.logits is None) != unfused
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    if getattr(want, "aux_loss", None) is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss)
    # Relative to each gradient, or, for a gradient that is itself a near-cancelling sum (DeepSeek-V4's
    # hyper-connection scale: ~5e-8 where the largest are ~0.6), to the model's largest: the fused loss sums its
    # logit gradients in another order, so such a gradient moves by the same absolute round-off as any other.
    scale = max(g.float().abs().max().item() for g in want_grads.values() if g is not None)
    for name, grad in want_grads.items():
        if grad is None:
            assert got_grads[name] is None, name
        else:
            abs_err = (got_grads[name].float() - grad.float()).abs().max().item()
            assert _rel(got_grads[name], grad) < 1e-4 or abs_err < 1e-7 * scale, name


@pytest.mark.parametrize("model_type", sorted(t for t, p in MODEL_PATCHES.items()
                                                if p.task in ("seq2seq_lm", "token_classification")))
def test_seq2seq_and_classifier_families_are_left_alone(model_type):
    _, _, fused = _pair(model_type)
    assert fused_loss.causal_lm_with_head(fused) is None
    assert "forward" not in fused.__dict__


def test_an_unknown_logit_transform_keeps_the_loss_unfused(monkeypatch):
    """A family whose forward transforms the head's outputs in a way the fused loss does not know (here GraniteMoE's
    logit scaling, its table entry removed) is left unfused, with a warning, and keeps its exact loss."""
    monkeypatch.delitem(fused_loss._LOGIT_SCALE, "granitemoe")
    patch = MODEL_PATCHES["granitemoe"]
    base = build_tiny_model(patch).to(DEVICE)
    plain = hetermoe.prepare(copy.deepcopy(base), hetermoe.HeterMoEConfig(fused_cross_entropy=False)).train()
    with pytest.warns(UserWarning, match="fused cross-entropy is left off for GraniteMoeForCausalLM.*scale 1"):
        fused = hetermoe.prepare(copy.deepcopy(base)).train()
    assert "forward" not in fused_loss.causal_lm_with_head(fused).__dict__
    inputs = tiny_inputs(patch, plain)
    want, _ = _train_step(plain, inputs)
    got, _ = _train_step(fused, inputs)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, want.loss)


def test_a_vocabulary_sliced_after_the_head_is_fused_over_its_first_rows():
    """Inkling drops the padded vocabulary's columns from the head's output (``unpadded_vocab_size``): the check
    finds the cut, and the fused loss runs over the head's first rows only, with the unfused loss's value and
    gradients (none for the padded rows)."""
    patch = MODEL_PATCHES["inkling_text"]
    if not patch.available():
        pytest.skip("Inkling is not in this transformers")
    config = patch.tiny_config()
    config.unpadded_vocab_size = config.vocab_size - 8
    base = patch.auto_class().from_config(config).to(DEVICE)
    plain = hetermoe.prepare(copy.deepcopy(base), hetermoe.HeterMoEConfig(fused_cross_entropy=False)).train()
    fused = hetermoe.prepare(copy.deepcopy(base)).train()
    assert fused_loss.causal_lm_with_head(fused).__dict__[fused_loss.STATE_ATTR].vocab == config.unpadded_vocab_size
    inputs = tiny_inputs(patch, plain)
    inputs["labels"] = inputs["labels"].clamp(max=config.unpadded_vocab_size - 1)
    want, want_grads = _train_step(plain, inputs)
    got, got_grads = _train_step(fused, inputs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    head = want_grads["lm_head.weight"]
    assert head[config.unpadded_vocab_size:].abs().max() == 0
    torch.testing.assert_close(got_grads["lm_head.weight"], head, rtol=1e-4, atol=1e-7)


def test_outputs_and_api_of_a_fused_model():
    patch, plain, fused = _pair("qwen3_moe")
    inputs = tiny_inputs(patch, plain)
    # Trainer keeps dataset columns by the forward's signature.
    assert inspect.signature(fused.forward) == inspect.signature(plain.forward)
    # Gradient accumulation's num_items_in_batch, and shift_labels, reach the loss as in ForCausalLMLoss.
    for extra in ({"num_items_in_batch": 5}, {"shift_labels": inputs["labels"].roll(-1, 1)}):
        want = plain(**inputs, **extra).loss
        torch.testing.assert_close(fused(**inputs, **extra).loss, want)
    # Tuples: the loss first, no logits.
    as_tuple = fused(**inputs, return_dict=False)
    torch.testing.assert_close(as_tuple[0], plain(**inputs).loss)
    assert all(t.shape[-1:] != (0,) for t in as_tuple if torch.is_tensor(t))
    # Evaluation and calls without labels keep their logits.
    assert fused.eval()(**inputs).logits is not None
    assert fused.train()(input_ids=inputs["input_ids"]).logits is not None


def test_copies_custom_losses_and_unprepare():
    patch, plain, fused = _pair("mixtral")
    inputs = tiny_inputs(patch, plain)
    copied = copy.deepcopy(fused)  # e.g. a TRL reference model: its own head and state
    assert copied.forward.__self__ is copied and copied.lm_head.forward.__self__ is copied.lm_head
    pickled = pickle.loads(pickle.dumps(fused))  # torch.save(model) pickles the whole module
    torch.testing.assert_close(pickled(**inputs).loss, fused(**inputs).loss)
    with torch.no_grad():
        copied.lm_head.weight.mul_(2)
    assert not torch.allclose(copied(**inputs).loss, fused(**inputs).loss)
    # A user-set loss_function is respected (not fused).
    custom = copy.deepcopy(plain)
    hetermoe.unprepare(custom)
    custom.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum() * 0
    hetermoe.prepare(custom)
    assert custom(**inputs).logits is not None
    hetermoe.unprepare(fused)
    assert "forward" not in fused.__dict__ and "forward" not in fused.lm_head.__dict__
    assert "_loss_function" not in fused.__dict__
    assert fused(**inputs).logits is not None


def test_compiled_training_step_fullgraph():
    patch, plain, fused = _pair("qwen3_moe")
    inputs = tiny_inputs(patch, plain)
    want = plain(**inputs).loss
    step = torch.compile(lambda **kw: fused(**kw).loss, fullgraph=True, backend="aot_eager")
    got = step(**inputs)
    got.backward()
    torch.testing.assert_close(got, want)
    assert fused.lm_head.weight.grad is not None


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU autocast through accelerate")
def test_accelerate_mixed_precision_wraps_the_fused_forward():
    """accelerate re-binds ``model.forward.__func__`` under autocast: the fused loss runs inside, in bf16, and the
    forward keeps transformers' signature (Trainer and TRL read it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    patch, plain, fused = _pair("qwen3_moe")
    inputs = tiny_inputs(patch, plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(**inputs).loss
    AcceleratorState._reset_state(True)  # process-wide: an earlier test may have set another precision
    try:
        wrapped = Accelerator(mixed_precision="bf16", cpu=True).prepare(fused)
        out = wrapped(**inputs)
    finally:
        AcceleratorState._reset_state(True)  # and later tests pick their own
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-3, atol=1e-3)
    assert inspect.signature(wrapped.forward) == inspect.signature(plain.forward)
