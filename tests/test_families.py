"""Every registered family: a prepared tiny model computes what the unprepared one does.

Per family (fp32, CPU, reference backend): logits, loss with router aux / z losses, every parameter gradient,
state-dict keys and shapes, save_pretrained -> plain from_pretrained round trip, greedy generate
(``model_patches.verify``). Plus the registry's own contracts and the instance-patch fallbacks.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import hf_hetermoe as hetermoe
from hf_hetermoe.errors import UnsupportedLayoutError, UnsupportedModelError
from hf_hetermoe.model_patches import (
    MODEL_PATCHES,
    get_model_patch,
    model_patches,
    register_model_patch,
    supported_models_markdown,
)
from hf_hetermoe.model_patches.verify import build_tiny_model, tiny_inputs, verify_family

PATCHES = model_patches()
REQUIRED = {
    "Mixtral", "Qwen2-MoE", "Qwen3-MoE", "OLMoE", "DeepSeek-V2", "DeepSeek-V3", "GLM4-MoE", "ERNIE-4.5-MoE",
    "GPT-OSS", "PhiMoE", "GraniteMoE", "GraniteMoE-Shared", "Llama4", "JetMoE", "DBRX", "Switch Transformers",
    "NLLB-MoE",
}


def _skip_unavailable(patch):
    if not patch.available():
        pytest.skip(f"{patch.family} is not in this transformers version")


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.family)
def test_prepared_model_matches_unprepared(patch):
    _skip_unavailable(patch)
    report = verify_family(patch, backend="reference")
    assert report.passed, f"{patch.family}: {report.failures()}"
    assert report.generate_same or (not patch.generative and report.generate_same is None)


@pytest.mark.parametrize("patch", [p for p in PATCHES if p.dispatch == "instance_patch"], ids=lambda p: p.family)
def test_instance_patch_leaves_class_alone_and_undoes(patch):
    _skip_unavailable(patch)
    model = build_tiny_model(patch)
    cls = patch.experts_type()
    class_forward = cls.forward
    hetermoe.prepare(model)
    modules = [m for m in model.modules() if isinstance(m, cls)]
    assert modules and all("forward" in m.__dict__ for m in modules)
    assert cls.forward is class_forward
    hetermoe.unprepare(model)
    assert all("forward" not in m.__dict__ for m in modules)


def test_every_required_family_is_registered():
    assert REQUIRED <= {p.family for p in PATCHES}


def test_supported_models_markdown_lists_every_family():
    table = supported_models_markdown()
    for patch in PATCHES:
        assert f"| {patch.family} |" in table
        for model_type in patch.model_types:
            assert f"`{model_type}`" in table


def test_unsupported_model_error_lists_registry():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError) as err:
        hetermoe.prepare(model)
    for model_type in MODEL_PATCHES:
        assert model_type in str(err.value)


def test_register_rejects_inconsistent_patches():
    mixtral = get_model_patch("mixtral")
    with pytest.raises(ValueError, match="already registered"):
        register_model_patch(mixtral)
    with pytest.raises(ValueError, match="patch_instance is required"):
        register_model_patch(replace(mixtral, model_types=("x_test",), dispatch="instance_patch"))
    with pytest.raises(ValueError, match="task="):
        register_model_patch(replace(mixtral, model_types=("x_test",), task="vision"))
    llama4 = get_model_patch("llama4_text")
    with pytest.raises(ValueError, match="expert_fn"):
        register_model_patch(replace(mixtral, model_types=("x_test",), anatomy=llama4.anatomy))
    assert "x_test" not in MODEL_PATCHES


def test_missing_experts_class_is_a_typed_error():
    patch = replace(get_model_patch("mixtral"), experts_class="NoSuchExperts")
    assert not patch.available()
    with pytest.raises(UnsupportedModelError, match="NoSuchExperts"):
        patch.experts_type()


def test_gpt_oss_with_another_gate_is_refused():
    patch = get_model_patch("gpt_oss")
    model = build_tiny_model(patch)
    experts = next(m for m in model.modules() if isinstance(m, patch.experts_type()))

    class OtherGate(type(experts)):
        def _apply_gate(self, gate_up):
            return gate_up[..., ::2] * gate_up[..., 1::2]

    experts.__class__ = OtherGate
    with pytest.raises(UnsupportedLayoutError, match="_apply_gate"):
        hetermoe.prepare(model)


@pytest.mark.parametrize("model_type", ["deepseek_v4", "minimax_m3_vl", "inkling2"])
def test_declared_gates_are_checked_against_apply_gate(model_type, monkeypatch):
    """Families whose experts override ``_apply_gate`` (apply_gate.py): a subclass with another gate is refused, and
    so is a class whose own ``_apply_gate`` no longer computes the declared activation (a later transformers), before
    ``prepare`` changes anything."""
    patch = get_model_patch(model_type)
    if not patch.available():
        pytest.skip(f"{patch.family} is not in this transformers")
    model = build_tiny_model(patch)
    experts = next(m for m in model.modules() if isinstance(m, patch.experts_type()))
    assert patch.layout(experts).activation in ("silu_clamped", "swiglu_oai", "silu_softcapped")

    class OtherGate(type(experts)):
        def _apply_gate(self, gate_up):
            return gate_up.chunk(2, dim=-1)[0]

    experts.__class__ = OtherGate
    with pytest.raises(UnsupportedLayoutError, match="overrides"):
        hetermoe.prepare(model)
    experts.__class__ = patch.experts_type()

    def unclamped(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    monkeypatch.setattr(patch.experts_type(), "_apply_gate", unclamped)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedLayoutError, match="does not compute"):
        hetermoe.prepare(model)
    assert "hetermoe" not in str(model.config._experts_implementation)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_nllb_eval_token_dropout_scaling_is_exact():
    patch = get_model_patch("nllb-moe")
    ref = build_tiny_model(patch)
    ref.config.moe_token_dropout = 0.2
    for m in ref.modules():
        if isinstance(m, patch.experts_type()):
            m.moe_token_dropout = 0.2
    prep = hetermoe.prepare(copy.deepcopy(ref), hetermoe.HeterMoEConfig(backend="reference"))
    inputs = tiny_inputs(patch, ref)
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
              "decoder_input_ids": inputs["input_ids"][:, :4]}
    torch.testing.assert_close(_logits(prep.eval(), inputs), _logits(ref.eval(), inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["switch_transformers", "nllb-moe"])
def test_expert_dropout_in_training_falls_back_with_a_warning(model_type):
    patch = get_model_patch(model_type)
    ref = build_tiny_model(patch)
    for m in ref.modules():
        if type(m).__name__.endswith("DenseActDense"):
            m.dropout.p = 0.3
    prep = hetermoe.prepare(copy.deepcopy(ref), hetermoe.HeterMoEConfig(backend="reference"))
    inputs = tiny_inputs(patch, ref)
    ref.train()
    prep.train()
    torch.manual_seed(0)
    loss_ref = ref(**inputs).loss
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="dropout"):
        loss_prep = prep(**inputs).loss
    torch.testing.assert_close(loss_prep, loss_ref)


SPECIAL_LAYOUTS = [
    "dbrx", "llama4_text", "jetmoe", "switch_transformers", "nllb-moe", "gpt_oss", "nemotron_h",
    "inkling2",  # the soft-capped SwiGLU
    "muse_spark",  # a norm on each expert's output
]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("model_type", SPECIAL_LAYOUTS)
def test_triton_backend_on_special_layouts(model_type):
    """The Triton kernels on the families with views, stacks, biases, no gate, clamped or soft-capped SwiGLU, or a
    post-expert norm (CUDA, or CPU under TRITON_INTERPRET=1, which tests/conftest.py sets on CPU)."""
    import os

    from hf_hetermoe.kernels import triton_available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available() or (device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 on CPU")
    patch = get_model_patch(model_type)
    _skip_unavailable(patch)
    report = verify_family(patch, backend="triton", device=device)
    assert report.passed, report.failures()


@pytest.mark.parametrize("model_type,seed", [("flex_olmo", 1), ("dbrx", 0)])
def test_low_precision_is_as_close_to_fp32_as_transformers(model_type, seed):
    """bf16 (reference backend: CPU bf16 is exact there, unlike the Triton interpreter's): the prepared model's
    distance to an fp32 truth is judged against transformers' own bf16 paths. FlexOlmo seed 1 is a case where a
    router near-tie after its post-MLP norm puts eager bf16 ~0.1 away from fp32 in the logits."""
    patch = get_model_patch(model_type)
    _skip_unavailable(patch)
    report = verify_family(patch, backend="reference", dtype=torch.bfloat16, seed=seed)
    assert report.passed, report.failures()
    assert {"logits", "loss", "grad"} <= set(report.vs_fp32)
    assert ("grouped_mm" in report.vs_fp32["logits"]) == (patch.dispatch == "experts_interface")


def test_low_precision_criterion_rejects_a_worse_prepared_model():
    from hf_hetermoe.model_patches.verify import FamilyReport

    report = FamilyReport("X", "bfloat16", "cpu", logits_scale=1.0, state_dict_same=True, saved_same=True,
                          round_trip_delta=0.0)
    report.vs_fp32["logits"] = {"hetermoe": 0.01, "eager": 0.004, "grouped_mm": 0.006, "scale": 1.0}
    assert report.passed  # 0.01 <= 2 * 0.006 + 2^-8
    report.vs_fp32["grad"] = {"hetermoe": 0.05, "eager": 0.004, "scale": 1.0}
    assert [f for f in report.failures() if f.startswith("grad ")]


def test_upstream_error_must_be_reproduced():
    from hf_hetermoe.model_patches.verify import FamilyReport

    report = FamilyReport("X", "float32", "cpu", logits_delta=0.0, logits_scale=1.0, loss_delta=0.0, grad_delta=0.0,
                          grad_scale=1.0, state_dict_same=True, saved_same=True, round_trip_delta=0.0,
                          upstream_error="E: boom", upstream_error_reproduced=True)
    assert report.passed
    report.upstream_error_reproduced = False
    assert "did not" in report.failures()[0]


@pytest.mark.parametrize("act_fn, name", [
    (torch.nn.SiLU(), "silu"), (torch.nn.functional.silu, "silu"), (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
    (torch.nn.functional.gelu, "gelu"), (torch.nn.ReLU(), "relu"), (torch.nn.functional.relu, "relu"),
])
def test_activation_name_takes_modules_and_plain_functions(act_fn, name):
    """LFM2-MoE stores ``F.silu`` itself as its experts' ``act_fn``; the kernels read it as the module's math."""
    from hf_hetermoe.model_patches import activation_name

    assert activation_name(act_fn) == name


def test_activation_name_refuses_what_the_kernels_lack():
    from hf_hetermoe.model_patches import activation_name

    with pytest.raises(UnsupportedLayoutError, match="activation tanh is not covered"):
        activation_name(torch.tanh)
