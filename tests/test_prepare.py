"""hetermoe.prepare on tiny models of each supported family: same function, same state dict, reversible."""

import copy
import json
import pickle
import warnings

import pytest
import torch
from conftest import DEVICE, enable_checkpointing, rel_err
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

import hf_hetermoe as hetermoe
from hf_hetermoe.model_patches import MODEL_PATCHES

FAMILIES = ["mixtral", "qwen3_moe", "olmoe"]


def tiny_model(model_type: str, **overrides):
    config = MODEL_PATCHES[model_type].tiny_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config, experts_implementation="eager").float()


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prepared_matches_unprepared(model_type, backend):
    base = tiny_model(model_type).to(DEVICE)
    config = hetermoe.HeterMoEConfig(backend=backend, fused_cross_entropy=False)  # keeps the logits to compare
    prepared = hetermoe.prepare(copy.deepcopy(base), config)
    ids = torch.randint(0, base.config.vocab_size, (2, 11), device=DEVICE)
    want, want_grads = _forward_backward(base, ids)
    got, got_grads = _forward_backward(prepared, ids)
    assert prepared.config._experts_implementation == "hetermoe"
    assert rel_err(got.logits, want.logits) < 1e-5
    assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert want.aux_loss is not None and torch.allclose(got.aux_loss, want.aux_loss, rtol=1e-5)
    assert len(got.router_logits) == len(want.router_logits) > 0
    assert set(got_grads) == set(want_grads) == {n for n, _ in base.named_parameters()}
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-4, name


@pytest.mark.parametrize("model_type", ["qwen3_moe", "jetmoe"])  # experts interface; instance patch
def test_recompute_gate_up_gives_the_same_gradients(model_type):
    """``recompute_gate_up`` saves no gate/up pre-activations and recomputes them in the backward: the same loss and
    gradients as the default, on both dispatch paths; ``unprepare`` removes the setting with the rest."""
    from hf_hetermoe.experts import RECOMPUTE_ATTR

    base = tiny_model(model_type).to(DEVICE)
    default = hetermoe.prepare(copy.deepcopy(base), hetermoe.HeterMoEConfig(fused_cross_entropy=False))
    config = hetermoe.HeterMoEConfig(fused_cross_entropy=False, recompute_gate_up=True)
    recompute = hetermoe.prepare(copy.deepcopy(base), config)
    ids = torch.randint(0, base.config.vocab_size, (2, 11), device=DEVICE)
    want, want_grads = _forward_backward(default, ids)
    got, got_grads = _forward_backward(recompute, ids)
    assert torch.equal(got.loss, want.loss)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-6, name
    flagged = [m for m in recompute.modules() if getattr(m, RECOMPUTE_ATTR, False)]
    assert flagged
    hetermoe.unprepare(recompute)
    assert not any(RECOMPUTE_ATTR in m.__dict__ for m in flagged)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "jetmoe"])  # experts interface; instance patch
def test_frozen_experts_train_the_rest_as_before(model_type):
    """Experts frozen (``requires_grad_(False)``, as with LoRA on attention only): every other parameter gets the same
    gradient as with the experts trainable, and the experts get none."""
    base = hetermoe.prepare(tiny_model(model_type).to(DEVICE), hetermoe.HeterMoEConfig(fused_cross_entropy=False))
    ids = torch.randint(0, base.config.vocab_size, (2, 11), device=DEVICE)
    _, want = _forward_backward(base, ids)
    experts = {n for n, p in base.named_parameters() if ".experts." in n}
    assert experts
    for name, p in base.named_parameters():
        p.requires_grad_(name not in experts)
    _, got = _forward_backward(base, ids)
    assert set(got) == set(want) - experts
    for name, grad in got.items():
        assert rel_err(grad, want[name]) < 1e-6, name


@pytest.mark.parametrize("model_type", FAMILIES)
def test_state_dict_unchanged(model_type):
    model = tiny_model(model_type)
    before = {k: (v.shape, v.dtype, v.data_ptr()) for k, v in model.state_dict().items()}
    hetermoe.prepare(model)
    after = {k: (v.shape, v.dtype, v.data_ptr()) for k, v in model.state_dict().items()}
    assert before == after
    assert [n for n, _ in model.named_modules()] == [n for n, _ in tiny_model(model_type).named_modules()]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_pretrained_reloads_in_plain_transformers(model_type, tmp_path):
    model = hetermoe.prepare(tiny_model(model_type))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "hetermoe" not in json.dumps(saved)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert plain.config._experts_implementation == "eager"
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, logits, atol=1e-5, rtol=1e-5)


def test_from_pretrained_can_select_hetermoe_by_name(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="hetermoe")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert rel_err(model(ids).logits, plain(ids).logits) < 1e-5


def test_second_prepare_warns_and_changes_nothing():
    model = hetermoe.prepare(tiny_model("mixtral"))
    state = model._hetermoe_state
    with pytest.warns(UserWarning, match="already called"):
        assert hetermoe.prepare(model) is model
    assert model._hetermoe_state is state


def test_unprepare_restores_previous_implementation():
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("grouped_mm")
    hetermoe.prepare(model)
    assert hetermoe.is_prepared(model)
    experts = [m for m in model.modules() if hasattr(m, "_hetermoe_layout")]
    assert experts
    hetermoe.unprepare(model)
    assert not hetermoe.is_prepared(model)
    assert model.config._experts_implementation == "grouped_mm"
    assert not any(hasattr(m, "_hetermoe_layout") for m in experts)
    with pytest.warns(UserWarning, match="not prepared"):
        hetermoe.unprepare(model)


def test_dense_model_is_rejected_with_supported_types():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(hetermoe.UnsupportedModelError) as err:
        hetermoe.prepare(model)
    assert isinstance(err.value, ValueError)
    for model_type in FAMILIES:
        assert model_type in str(err.value)
    assert "'llama'" in str(err.value)


def test_experts_checked_against_their_own_forward():
    """``prepare`` runs each experts class's own eager forward next to the kernels' reference on random tokens and
    refuses, before changing anything, a module that computes something its layout does not say: here MuseSpark's
    experts with their post-expert norm hidden from hetermoe (as before hetermoe applied it)."""
    from hf_hetermoe.errors import UnsupportedLayoutError
    from hf_hetermoe.model_patches.verify import build_tiny_model

    patch = MODEL_PATCHES["muse_spark"]
    if not patch.available():
        pytest.skip("MuseSpark is not in this transformers")
    model = build_tiny_model(patch)
    for module in model.modules():
        if isinstance(module, patch.experts_type()):
            module.has_post_expert_norm = False  # hetermoe's path then skips the norm the class's forward applies
    with pytest.raises(UnsupportedLayoutError, match="differ from the module's own forward"):
        hetermoe.prepare(model)
    assert not hetermoe.is_prepared(model)


@pytest.mark.parametrize("model_type", ["dbrx", "jetmoe", "llama4_text", "switch_transformers", "nllb-moe"])
def test_instance_patched_experts_checked_against_their_own_forward(model_type):
    """Instance-patched families: the class's forward and the rebound one run on the family's probe inputs; the
    right layout passes and leaves the module as it was, a wrong activation is refused."""
    from dataclasses import replace

    from hf_hetermoe.errors import UnsupportedLayoutError
    from hf_hetermoe.experts import check_instance_patch
    from hf_hetermoe.model_patches.verify import build_tiny_model

    patch = MODEL_PATCHES[model_type]
    model = build_tiny_model(patch)
    module = next(m for m in model.modules() if isinstance(m, patch.experts_type()))
    before = dict(module.__dict__)
    layout = patch.layout(module)
    check_instance_patch(module, patch, layout)
    assert module.__dict__.keys() == before.keys() and "forward" not in module.__dict__
    wrong = replace(layout, activation="gelu" if layout.activation != "gelu" else "relu")
    with pytest.raises(UnsupportedLayoutError, match="differs from the module's own"):
        check_instance_patch(module, patch, wrong)
    assert "forward" not in module.__dict__


def test_plain_module_is_rejected():
    with pytest.raises(hetermoe.UnsupportedModelError, match="without a transformers config"):
        hetermoe.prepare(torch.nn.Linear(3, 3))


def test_family_without_moe_layers_is_rejected():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(hetermoe.UnsupportedModelError, match="no Qwen3MoeExperts"):
        hetermoe.prepare(model)


def test_tensors_on_the_wrong_device_name_both_devices():
    model = hetermoe.prepare(tiny_model("mixtral"))
    experts = next(m for m in model.modules() if hasattr(m, "_hetermoe_layout"))
    x = torch.randn(4, model.config.hidden_size, device="meta")
    index = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(hetermoe.DeviceMismatchError, match="hidden_states on meta"):
        experts(x, index, torch.ones(4, 2))


@pytest.mark.parametrize("env_value, config_value, expect_calling", [
    (None, True, True), (None, False, False), ("0", True, False), ("1", False, True),
])
def test_backward_on_calling_thread_is_set_and_undone(monkeypatch, env_value, config_value, expect_calling):
    if env_value is None:
        monkeypatch.delenv("HETERMOE_CALLING_THREAD_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("HETERMOE_CALLING_THREAD_BACKWARD", env_value)
    torch.autograd.set_multithreading_enabled(True)
    model = hetermoe.prepare(tiny_model("qwen3_moe"), hetermoe.HeterMoEConfig(backward_on_calling_thread=config_value))
    assert torch._C._is_multithreading_enabled() is not expect_calling
    copied = pickle.loads(pickle.dumps(model))  # whole prepared models are saved and copied (TRL, torch.save)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    _forward_backward(model, ids)  # a training step runs either way
    hetermoe.unprepare(model)
    assert torch._C._is_multithreading_enabled()
    hetermoe.unprepare(copied)
    assert torch._C._is_multithreading_enabled()


def test_calling_thread_mode_lasts_until_the_last_prepared_model_is_unprepared(monkeypatch):
    """A policy and a reference model prepared side by side (DPO, GRPO): unpreparing one leaves the other's mode."""
    monkeypatch.delenv("HETERMOE_CALLING_THREAD_BACKWARD", raising=False)
    torch.autograd.set_multithreading_enabled(True)
    policy, reference = hetermoe.prepare(tiny_model("qwen3_moe")), hetermoe.prepare(tiny_model("qwen3_moe"))
    copied = copy.deepcopy(policy)
    hetermoe.unprepare(policy)
    assert not torch._C._is_multithreading_enabled()  # the reference model is still prepared
    hetermoe.unprepare(reference)
    assert torch._C._is_multithreading_enabled()
    hetermoe.unprepare(copied)  # a copy's undo finds nothing left to release
    assert torch._C._is_multithreading_enabled()
    # Turned back on by hand while a model held it: the next prepare takes it again, and its unprepare gives it back.
    held = hetermoe.prepare(tiny_model("qwen3_moe"))
    torch.autograd.set_multithreading_enabled(True)
    again = hetermoe.prepare(tiny_model("qwen3_moe"))
    assert not torch._C._is_multithreading_enabled()
    hetermoe.unprepare(again)
    assert torch._C._is_multithreading_enabled()
    hetermoe.unprepare(held)
    assert torch._C._is_multithreading_enabled()


def test_calling_thread_mode_set_by_the_user_is_kept(monkeypatch):
    assert hetermoe.HeterMoEConfig().backward_on_calling_thread  # on by default since NOTES v2.29
    torch.autograd.set_multithreading_enabled(False)
    model = hetermoe.prepare(tiny_model("qwen3_moe"), hetermoe.HeterMoEConfig(backward_on_calling_thread=True))
    hetermoe.unprepare(model)
    assert not torch._C._is_multithreading_enabled()  # prepare found it off and had nothing to undo
    monkeypatch.setenv("HETERMOE_CALLING_THREAD_BACKWARD", "maybe")
    with pytest.raises(ValueError, match="HETERMOE_CALLING_THREAD_BACKWARD='maybe' is not a boolean"):
        hetermoe.prepare(tiny_model("qwen3_moe"))
    assert not torch._C._is_multithreading_enabled()  # the failed prepare changed nothing


def test_disable_env_leaves_model_untouched(monkeypatch):
    monkeypatch.setenv("HETERMOE_DISABLE", "1")
    model = tiny_model("mixtral")
    with pytest.warns(UserWarning, match="HETERMOE_DISABLE"):
        hetermoe.prepare(model)
    assert not hetermoe.is_prepared(model) and model.config._experts_implementation == "eager"


def test_config_validation_and_round_trip():
    config = hetermoe.HeterMoEConfig(backend="reference", autotune=False)
    assert hetermoe.HeterMoEConfig.from_json(config.to_json()) == config
    with pytest.raises(hetermoe.ConfigError, match="backend='cuda' is not one of"):
        hetermoe.HeterMoEConfig(backend="cuda")
    with pytest.raises(hetermoe.ConfigError, match="Unknown HeterMoEConfig keys"):
        hetermoe.HeterMoEConfig.from_dict({"backnd": "auto"})


def test_triton_backend_on_cpu_without_interpreter_explains():
    from hf_hetermoe.kernels import resolve_backend

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"), interpret=False)
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="HETERMOE_BACKEND"):
        resolve_backend("auto", torch.device("cpu"), override="cuda")


def test_generate_on_prepared_model():
    model = hetermoe.prepare(tiny_model("mixtral")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        base = hetermoe.unprepare(model).generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, base)


def test_mixtral_in_bf16_reference_close_to_eager():
    config = MixtralConfig(**MODEL_PATCHES["mixtral"].tiny_config().to_dict())
    base = AutoModelForCausalLM.from_config(config, experts_implementation="eager").to(torch.bfloat16)
    prepared = hetermoe.prepare(copy.deepcopy(base))
    ids = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        assert rel_err(prepared(ids).logits, base(ids).logits) < 2e-2


def test_rms_norms_are_swapped_and_restored():
    model = tiny_model("qwen3_moe")
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeRMSNorm"]
    hetermoe.prepare(model)
    assert norms and all("forward" in m.__dict__ for m in norms)
    hetermoe.unprepare(model)
    assert not any("forward" in m.__dict__ for m in norms)
    hetermoe.prepare(model, hetermoe.HeterMoEConfig(fused_rms_norm=False))
    assert not any("forward" in m.__dict__ for m in norms)


def test_rms_norms_survive_train_and_eval_of_a_from_pretrained_model(tmp_path):
    """From transformers 5.25 (with the `kernels` package it then requires) ``from_pretrained`` turns Hub
    kernelization on, and each ``train()``/``eval()`` re-kernelizes, dropping instance forwards: ``prepare`` turns
    it off before swapping the norms, and ``unprepare`` turns it back on."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    hub = bool(getattr(model, "use_kernels", False))
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeRMSNorm"]
    hetermoe.prepare(model, hetermoe.HeterMoEConfig(fused_cross_entropy=False))
    assert not getattr(model, "use_kernels", False)
    for mode in (True, False, True):  # what Trainer and evaluation loops do
        model.train(mode)
        assert norms and all("forward" in m.__dict__ for m in norms), mode
    plain.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    got, want = model(ids, labels=ids), plain(ids, labels=ids)
    assert rel_err(got.logits, want.logits) < 1e-5 and torch.allclose(got.loss, want.loss, rtol=1e-5)
    hetermoe.unprepare(model)
    assert bool(getattr(model, "use_kernels", False)) == hub
    assert not any("forward" in m.__dict__ for m in norms)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "jetmoe"])  # experts interface + fused loss; instance patch
def test_deleted_prepared_model_is_freed_without_the_cycle_collector(model_type):
    """What prepare attaches to a model refers back to it weakly: ``del model`` frees it (and its GPU memory) at once,
    as for an unprepared model, not whenever Python's cyclic collector next runs. The same holds for copies."""
    import gc
    import pickle
    import weakref

    model = hetermoe.prepare(tiny_model(model_type))
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    refs = [weakref.ref(m) for m in (model, *copies)]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del model, copies
        assert [r() for r in refs] == [None, None, None]
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("model_type", ["mixtral", "jetmoe"])
def test_prepared_model_survives_deepcopy_and_pickle(model_type):
    """Instance patches are bound objects, not closures: a copy (TRL's reference model) or a torch.save'd whole
    model runs on its own weights, with everything prepare installed."""
    model = hetermoe.prepare(tiny_model(model_type)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    want = model(ids, labels=ids).loss
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.forward.__self__ is other
        torch.testing.assert_close(other(ids, labels=ids).loss, want)
        hetermoe.unprepare(other)
        assert "forward" not in other.__dict__


@pytest.mark.parametrize(
    "use_reentrant, offload",
    [(False, False), (True, False), (False, True)],
    ids=["non_reentrant", "reentrant", "offload"],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_activation_checkpointing_matches_unprepared(backend, use_reentrant, offload):
    """Activation checkpointing (Trainer's ``gradient_checkpointing=True``): the layers' forwards run again in the
    backward, and the experts' backward consumes the recomputed pre-activations. The prepared model's loss and
    gradients equal the unprepared one's in each checkpoint mode, over two steps."""
    base = tiny_model("qwen3_moe").to(DEVICE)
    prepared = hetermoe.prepare(copy.deepcopy(base), hetermoe.HeterMoEConfig(backend=backend))
    for model in (base, prepared):
        model.train()
        enable_checkpointing(model, use_reentrant, offload)
    for step in range(2):
        ids = torch.randint(0, base.config.vocab_size, (2, 9), device=DEVICE)
        want, want_grads = _forward_backward(base, ids)
        got, got_grads = _forward_backward(prepared, ids)
        assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6), step
        assert set(got_grads) == set(want_grads) == {n for n, _ in base.named_parameters()}
        for name, grad in want_grads.items():
            assert rel_err(got_grads[name], grad) < 1e-4, (step, name)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft -> transformers
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_peft_lora_on_expert_parameters_matches_unprepared(backend):
    """PEFT LoRA with ``target_parameters`` on the experts' 3-D weights (and ``target_modules`` on attention),
    prepared after ``get_peft_model``: the experts run through hetermoe on the LoRA-merged weights, and the loss and
    every LoRA gradient equal the unprepared PEFT model's."""
    peft = pytest.importorskip("peft")
    base = tiny_model("qwen3_moe").to(DEVICE)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    want_model = peft.get_peft_model(base, lora)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters matter
        for name, p in want_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    got_model = hetermoe.prepare(copy.deepcopy(want_model), hetermoe.HeterMoEConfig(backend=backend))
    assert got_model.base_model.model.config._experts_implementation == "hetermoe"
    ids = torch.randint(0, base.config.vocab_size, (2, 9), device=DEVICE)
    results = []
    for model in (want_model, got_model):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want, want_grads), (got, got_grads) = results
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads) and any("experts" in n for n in want_grads)
    for name, grad in want_grads.items():
        assert grad is not None and got_grads[name] is not None, name
        assert rel_err(got_grads[name], grad) < 1e-4, name


def test_quantized_experts_are_refused_with_what_to_do():
    """Float8 (or packed integer) expert weights would be cast without their scales: refused, as is a model whose
    experts a quantizer replaced (an FP8 checkpoint loaded with its quantization_config; this needs a GPU to load,
    so the replacement is done here by hand)."""
    from transformers import FineGrainedFP8Config

    model = tiny_model("mixtral")
    experts = model.model.layers[1].mlp.experts
    experts.down_proj.data = experts.down_proj.data.to(torch.float8_e4m3fn)
    with pytest.raises(hetermoe.UnsupportedLayoutError, match=r"down_proj is torch.float8_e4m3fn.*dequantized"):
        hetermoe.prepare(model)
    assert not hetermoe.is_prepared(model)
    with pytest.raises(ValueError, match="w2 torch.float8_e4m3fn"):  # the kernels' entry point refuses it too
        x, index = torch.randn(4, experts.gate_up_proj.shape[2]), torch.zeros(4, 2, dtype=torch.long)
        hetermoe.kernels.moe_experts(x, index, torch.ones(4, 2), experts.gate_up_proj, experts.down_proj)

    model = tiny_model("mixtral")
    model.config.quantization_config = FineGrainedFP8Config()
    for layer in model.model.layers:
        layer.mlp.experts = torch.nn.Module()  # what the quantizer's FP8Experts is to hetermoe: another class
    with pytest.raises(hetermoe.UnsupportedModelError, match=r"is quantized \(fp8\).*dequantize=True"):
        hetermoe.prepare(model)
