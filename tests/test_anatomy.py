"""Layer anatomy: attention half -> expert half -> finish equals the decoder layer, forward and backward.

Parametrised over every registered family with an anatomy; tiny fp32 models on CPU, reference backend
(``model_patches.verify.verify_anatomy`` runs every splittable layer whole and split and compares the outputs
and the gradients of the layer input and of every layer parameter).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_hetermoe.model_patches import decoder_layers, expert_half, get_model_patch, model_patches
from hf_hetermoe.model_patches.verify import build_tiny_model, verify_anatomy

PATCHES = [p for p in model_patches() if p.anatomy is not None]


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.family)
def test_halves_equal_layer(patch):
    if not patch.available():
        pytest.skip(f"{patch.family} is not in this transformers version")
    report = verify_anatomy(patch)
    assert not report.failures(), f"{patch.family}: {report.failures()}"
    assert report.moe_layers > 0


def test_a_wrong_post_map_is_caught():
    # Granite scales the routed output by residual_multiplier; dropping that must fail the check.
    patch = get_model_patch("granitemoe")
    broken = dataclasses.replace(patch, anatomy=dataclasses.replace(patch.anatomy, post=None))
    assert verify_anatomy(broken).failures()


def test_dense_layer_has_no_expert_half():
    patch = get_model_patch("qwen2_moe")  # its tiny config makes layer 0 dense
    model = build_tiny_model(patch)
    layer = decoder_layers(patch, model)[0]
    hidden = torch.randn(3, model.config.hidden_size)
    with pytest.raises(ValueError, match="dense layer"):
        expert_half(patch, layer, hidden, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_family_without_anatomy_says_so():
    patch = dataclasses.replace(PATCHES[0], anatomy=None)
    with pytest.raises(ValueError, match="no layer anatomy"):
        decoder_layers(patch, torch.nn.Linear(2, 2))
