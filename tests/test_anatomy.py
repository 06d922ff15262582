"""Layer anatomy: attention half -> expert half -> finish equals the decoder layer, forward and backward.

Parametrised over every registered family with an anatomy; tiny fp32 models on CPU, reference backend.
"""

from __future__ import annotations

import pytest
import torch

import hf_hetermoe as hetermoe
from hf_hetermoe.model_patches import attention_half, decoder_layers, expert_half, finish, model_patches
from hf_hetermoe.model_patches.verify import build_tiny_model, tiny_inputs

PATCHES = [p for p in model_patches() if p.anatomy is not None]


def _layer_calls(patch, model, inputs):
    """(layer, args, kwargs) of every splittable layer during one forward."""
    calls = []

    def record(module, args, kwargs):
        calls.append((module, args, dict(kwargs)))

    handles = [
        layer.register_forward_pre_hook(record, with_kwargs=True) for layer in decoder_layers(patch, model)
    ]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(layer, fn, hidden, args, kwargs, seed=0):
    """Forward ``fn(hidden)`` and backward a fixed cotangent; returns (output, grads of hidden and params)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    hidden = hidden.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = _first(fn(hidden, *args, **kwargs))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad(out, [hidden, *params], cotangent, allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.family)
def test_halves_equal_layer(patch):
    if not patch.available():
        pytest.skip(f"{patch.family} is not in this transformers version")
    model = build_tiny_model(patch)
    hetermoe.prepare(model, hetermoe.HeterMoEConfig(backend="reference"))
    model.train()
    inputs = tiny_inputs(patch, model)
    inputs.pop("labels")
    if patch.task == "seq2seq_lm":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    calls = _layer_calls(patch, model, inputs)
    assert calls, f"no {patch.anatomy.layer_classes} layer ran"

    moe_layers = 0
    for layer, args, kwargs in calls:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]

        def split_layer(h, *a, _layer=layer, **kw):
            split = attention_half(patch, _layer, h, *a, **kw)
            routed = None
            if split.is_moe:
                assert split.hidden.shape[-1] == h.shape[-1] and split.top_k_index.dim() == 2
                assert split.top_k_weights.shape == split.top_k_index.shape
                routed = expert_half(patch, _layer, split.hidden, split.top_k_index, split.top_k_weights)
            split_layer.moe = split.is_moe
            return finish(patch, _layer, split, routed)

        out_ref, grads_ref = _run(layer, layer, hidden, rest, kwargs)
        out_split, grads_split = _run(layer, split_layer, hidden, rest, kwargs)
        moe_layers += split_layer.moe
        torch.testing.assert_close(out_split, out_ref, atol=1e-5, rtol=1e-5)
        for g_ref, g_split in zip(grads_ref, grads_split):
            assert (g_ref is None) == (g_split is None)
            if g_ref is not None:
                torch.testing.assert_close(g_split, g_ref, atol=1e-5, rtol=1e-4)
    assert moe_layers > 0, "the tiny config has no MoE layer"


def test_dense_layer_has_no_expert_half():
    patch = next(p for p in PATCHES if p.family == "Qwen2-MoE")  # its tiny config makes layer 0 dense
    model = build_tiny_model(patch)
    layer = decoder_layers(patch, model)[0]
    hidden = torch.randn(1, 3, model.config.hidden_size)
    with pytest.raises(ValueError, match="dense layer"):
        expert_half(patch, layer, hidden[0], torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_family_without_anatomy_says_so():
    from dataclasses import replace

    patch = replace(PATCHES[0], anatomy=None)
    with pytest.raises(ValueError, match="no layer anatomy"):
        decoder_layers(patch, torch.nn.Linear(2, 2))
