"""Check that a prepared model of one family computes what the unprepared one does (tests, MODEL_COMPATIBILITY.md).

``verify_family(patch)`` builds the family's tiny model twice (transformers' eager experts as the truth, and a
prepared copy with the same weights), runs a training step on both with ``output_router_logits=True``, and
compares logits, loss, every aux / z loss, every parameter gradient, the state dict, a ``save_pretrained`` ->
plain ``from_pretrained`` round trip and greedy ``generate``.

In fp32 the prepared model must match the eager one to fp32 rounding. In bf16 / fp16 both sides carry rounding
error of the dtype's size, which the model can amplify: a norm after the experts (FlexOlmo) rescales the small
routed sum to order one and turns a near-tie in the next router into a different expert for a token, so that two
correct bf16 implementations differ by ~0.1 in the logits. A fixed tolerance on ``|prepared - eager|`` is then
both too loose (small gradients) and too tight (such layers). The criterion is the honest one: the prepared
low-precision model must be about as close to an fp32 truth (the same rounded weights, upcast, eager) as
transformers' own implementations in that dtype are (eager, and for experts-interface families also
``grouped_mm``, the default): ``err(prepared) <= LOW_PRECISION_FACTOR * max err(transformers) + eps(dtype) *
scale`` for logits, loss, aux losses and gradients (max |x - x_fp32| each).

Where the *unprepared* model itself raises in the training step with ``output_router_logits=True`` (an upstream
bug of that transformers version), the prepared model must raise the same error; the comparison then runs
without router logits and the report says so (``upstream_error``).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

# fp32: max |prepared - eager| <= atol + rtol * max |eager|.
FP32_TOLERANCE = (1e-4, 1e-4)
# bf16 / fp16: err(prepared vs fp32) <= LOW_PRECISION_FACTOR * max err(transformers vs fp32) + EPS[dtype] * scale.
LOW_PRECISION_FACTOR = 2.0
EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
# Round trip: the reloaded model (plain transformers, eager like the truth) against the truth, in its dtype.
ROUND_TRIP_TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 1e-2), "float16": (2e-3, 2e-3)}


@dataclass
class FamilyReport:
    """Outcome of ``verify_family``; every ``*_delta`` is a max absolute difference, prepared vs eager.

    ``vs_fp32`` (bf16 / fp16 only) maps "logits", "loss", "aux", "grad" to ``{"hetermoe": err, "eager": err,
    ["grouped_mm": err,] "scale": max |x_fp32|}``, each err a max |x - x_fp32| of that implementation in the
    low-precision dtype.
    """

    family: str
    dtype: str
    device: str
    logits_delta: float = float("nan")
    logits_scale: float = float("nan")
    loss_delta: float = float("nan")
    aux_delta: float | None = None
    grad_delta: float = float("nan")
    grad_scale: float = float("nan")
    grads_missing: list[str] = field(default_factory=list)
    vs_fp32: dict[str, dict[str, float]] = field(default_factory=dict)
    state_dict_same: bool = False
    saved_same: bool = False
    round_trip_delta: float = float("nan")
    generate_same: bool | None = None
    upstream_error: str | None = None
    upstream_error_reproduced: bool | None = None
    error: str | None = None

    def failures(self) -> list[str]:
        """Why this report is not a pass (empty when it is)."""
        if self.error:
            return [self.error]
        out = []
        if self.upstream_error and not self.upstream_error_reproduced:
            out.append(f"the unprepared model raised {self.upstream_error!r} but the prepared one did not")
        if self.dtype == "float32":
            atol, rtol = FP32_TOLERANCE
            if not self.logits_delta <= atol + rtol * self.logits_scale:
                out.append(f"logits differ by {self.logits_delta:.3g}")
            if not self.loss_delta <= atol + rtol:
                out.append(f"loss differs by {self.loss_delta:.3g}")
            if self.aux_delta is not None and not self.aux_delta <= atol + rtol:
                out.append(f"aux loss differs by {self.aux_delta:.3g}")
            if not self.grad_delta <= atol + rtol * self.grad_scale:
                out.append(f"gradients differ by {self.grad_delta:.3g}")
        else:
            for name, errs in self.vs_fp32.items():
                baseline = max(v for k, v in errs.items() if k not in ("hetermoe", "scale"))
                if not errs["hetermoe"] <= LOW_PRECISION_FACTOR * baseline + EPS[self.dtype] * errs["scale"]:
                    out.append(
                        f"{name} {errs['hetermoe']:.3g} from fp32, transformers {self.dtype} {baseline:.3g} "
                        f"(scale {errs['scale']:.3g})"
                    )
        if self.grads_missing:
            out.append(f"gradient present on one side only: {self.grads_missing[:3]}")
        if not self.state_dict_same:
            out.append("state dict keys or shapes changed")
        if not self.saved_same:
            out.append("save_pretrained output differs")
        atol, rtol = ROUND_TRIP_TOLERANCE[self.dtype]
        if not self.round_trip_delta <= atol + rtol * self.logits_scale:
            out.append(f"reloaded model's logits differ by {self.round_trip_delta:.3g}")
        if self.dtype == "float32" and self.generate_same is False:
            out.append("generate() returned other tokens")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "failures": self.failures()}


def _eager_kwargs(patch) -> dict:
    kwargs = {"attn_implementation": "eager"}
    if patch.dispatch == "experts_interface":
        kwargs["experts_implementation"] = "eager"
    return kwargs


def build_tiny_model(patch, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> nn.Module:
    """The family's tiny model with transformers' eager attention and eager experts (the ground truth)."""
    torch.manual_seed(seed)
    return patch.auto_class().from_config(patch.tiny_config(), dtype=dtype, **_eager_kwargs(patch)).to(device)


def tiny_inputs(patch, model: nn.Module, *, batch: int = 2, seq: int = 9, seed: int = 0) -> dict:
    """Random token ids with one right-padded row, labels (-100 on padding; class ids for a token classifier), on
    the model's device."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if patch.task == "seq2seq_lm":
        inputs["labels"] = torch.randint(3, vocab, (batch, seq - 2), generator=gen)
    elif patch.task == "token_classification":
        labels = torch.randint(0, model.config.num_labels, (batch, seq), generator=gen)
        inputs["labels"] = labels.masked_fill(mask == 0, -100)
    else:
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in inputs.items()}


def _step(model: nn.Module, inputs: dict, seed: int, router_logits: bool = True):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    out = model(**inputs, output_router_logits=router_logits)
    out.loss.backward()
    return out


def _aux_losses(out) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in out.items()
        if ("aux_loss" in k or "z_loss" in k) and isinstance(v, torch.Tensor)
    }


def _max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _generate(patch, model: nn.Module, inputs: dict) -> torch.Tensor:
    gen_inputs = {"input_ids": inputs["input_ids"][:1, :5], "attention_mask": inputs["attention_mask"][:1, :5]}
    pad = model.config.get_text_config().pad_token_id
    return model.generate(
        **gen_inputs, max_new_tokens=4, do_sample=False, pad_token_id=0 if pad is None else pad,
    )


def verify_family(
    patch, *, backend: str = "reference", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> FamilyReport:
    """Compare a prepared tiny model of ``patch``'s family with the unprepared one. Never raises on a mismatch:
    the returned report says what differs (``report.failures()``)."""
    import hf_hetermoe as hetermoe

    report = FamilyReport(patch.family, str(dtype).removeprefix("torch."), device)
    try:
        _verify(patch, report, hetermoe, backend, dtype, device, seed)
    except Exception as err:  # the matrix records the error a user would get
        report.error = f"{type(err).__name__}: {err}"
    return report


def _training_steps(report: FamilyReport, models: list[nn.Module], inputs: dict, seed: int) -> list:
    """One training step of each model (the unprepared one first) with router logits; where the unprepared model
    raises with them (an upstream bug), checks that the prepared one raises the same and steps without them."""
    try:
        first = _step(models[0], inputs, seed)
    except Exception as err:
        report.upstream_error = f"{type(err).__name__}: {err}"
        try:
            _step(models[1], inputs, seed)
        except Exception as err_prep:
            report.upstream_error_reproduced = f"{type(err_prep).__name__}: {err_prep}" == report.upstream_error
        else:
            report.upstream_error_reproduced = False
        return [_step(m, inputs, seed, router_logits=False) for m in models]
    return [first] + [_step(m, inputs, seed) for m in models[1:]]


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


def _grad_delta(a: dict, b: dict) -> float:
    return max((_max_delta(a[k], b[k]) for k in a if a[k] is not None and b[k] is not None), default=0.0)


def _grad_scale(grads: dict) -> float:
    return max((g.abs().max().item() for g in grads.values() if g is not None), default=0.0)


def _compare_with_fp32(report: FamilyReport, runs: dict[str, tuple]) -> None:
    """``report.vs_fp32`` from ``runs``: implementation name -> ``(output, aux losses, grads)``, "fp32" the truth."""
    out32, aux32, grads32 = runs.pop("fp32")
    report.vs_fp32["logits"] = {k: _max_delta(out.logits, out32.logits) for k, (out, _, _) in runs.items()}
    report.vs_fp32["logits"]["scale"] = out32.logits.abs().max().item()
    report.vs_fp32["loss"] = {k: _max_delta(out.loss, out32.loss) for k, (out, _, _) in runs.items()}
    report.vs_fp32["loss"]["scale"] = out32.loss.abs().item()
    if aux32:
        report.vs_fp32["aux"] = {
            k: max(_max_delta(aux[n], aux32[n]) for n in aux32) for k, (_, aux, _) in runs.items()
        }
        report.vs_fp32["aux"]["scale"] = max(v.abs().max().item() for v in aux32.values())
    report.vs_fp32["grad"] = {k: _grad_delta(grads, grads32) for k, (_, _, grads) in runs.items()}
    report.vs_fp32["grad"]["scale"] = _grad_scale(grads32)


def _verify(patch, report: FamilyReport, hetermoe, backend: str, dtype: torch.dtype, device: str, seed: int) -> None:
    ref = build_tiny_model(patch, dtype=dtype, device=device, seed=seed)
    prep = copy.deepcopy(ref)
    before = {k: (tuple(v.shape), v.dtype) for k, v in prep.state_dict().items()}
    # The experts are what is verified here, logits included: the fused loss (no logits) has tests/test_fused_loss.py.
    hetermoe.prepare(prep, hetermoe.HeterMoEConfig(backend=backend, fused_cross_entropy=False))
    report.state_dict_same = before == {k: (tuple(v.shape), v.dtype) for k, v in prep.state_dict().items()}
    # A low-precision run also steps transformers' fp32 truth (the same rounded weights, upcast) and, for
    # experts-interface families, transformers' default grouped_mm in the low-precision dtype.
    baselines = {}
    if dtype != torch.float32:
        baselines["fp32"] = copy.deepcopy(ref).to(torch.float32)
        if patch.dispatch == "experts_interface":
            baselines["grouped_mm"] = copy.deepcopy(ref)
            baselines["grouped_mm"].set_experts_implementation("grouped_mm")
    models = [ref, prep, *baselines.values()]

    inputs = tiny_inputs(patch, ref, seed=seed)
    for m in models:
        m.train()
    outs = _training_steps(report, models, inputs, seed)
    out_ref, out_prep = outs[0], outs[1]
    report.logits_delta = _max_delta(out_ref.logits, out_prep.logits)
    report.logits_scale = out_ref.logits.abs().max().item()
    report.loss_delta = abs(out_ref.loss.item() - out_prep.loss.item())
    aux = [_aux_losses(out) for out in outs]
    if aux[0] or aux[1]:
        if set(aux[0]) != set(aux[1]):
            raise AssertionError(f"aux losses {sorted(aux[0])} vs {sorted(aux[1])}")
        report.aux_delta = max(_max_delta(aux[0][k], aux[1][k]) for k in aux[0])

    grads = [_grads(m) for m in models]
    report.grads_missing = [k for k in grads[0] if (grads[0][k] is None) != (grads[1][k] is None)]
    report.grad_delta = _grad_delta(grads[0], grads[1])
    report.grad_scale = _grad_scale(grads[0])
    if baselines:
        _compare_with_fp32(report, dict(zip(["eager", "hetermoe", *baselines], zip(outs, aux, grads))))

    ref.eval()
    prep.eval()
    plain_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if patch.task == "seq2seq_lm":
        plain_inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    with torch.no_grad():
        logits_ref = ref(**plain_inputs).logits
    with tempfile.TemporaryDirectory() as tmp_prep, tempfile.TemporaryDirectory() as tmp_ref:
        prep.save_pretrained(tmp_prep)
        ref.save_pretrained(tmp_ref)
        report.saved_same = _same_saved(tmp_ref, tmp_prep)
        # Plain transformers, with the truth's eager attention and experts so the reload is compared like for like.
        reloaded = patch.auto_class().from_pretrained(tmp_prep, dtype=dtype, **_eager_kwargs(patch))
        reloaded = reloaded.to(device).eval()
        with torch.no_grad():
            report.round_trip_delta = _max_delta(reloaded(**plain_inputs).logits, logits_ref)

    if patch.generative:
        with torch.no_grad():
            report.generate_same = bool(torch.equal(_generate(patch, ref, inputs), _generate(patch, prep, inputs)))


def _same_saved(dir_a: str, dir_b: str) -> bool:
    from pathlib import Path

    from safetensors.torch import load_file

    def load(d: str) -> dict:
        tensors = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        return tensors

    a, b = load(dir_a), load(dir_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class AnatomyReport:
    """Outcome of ``verify_anatomy``: max |delta| of layer outputs and of gradients (input and parameters)."""

    family: str
    layers: int = 0
    moe_layers: int = 0
    output_delta: float = 0.0
    grad_delta: float = 0.0
    grads_missing: int = 0
    error: str | None = None

    def failures(self, atol: float = 1e-5) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.moe_layers == 0:
            out.append("no MoE layer was split")
        if self.output_delta > atol or self.grad_delta > 10 * atol:
            out.append(f"halves differ from the layer: output {self.output_delta:.3g}, grad {self.grad_delta:.3g}")
        if self.grads_missing:
            out.append(f"{self.grads_missing} gradients present on one side only")
        return out


def layer_calls(patch, model: nn.Module, inputs: dict) -> list[tuple[nn.Module, tuple, dict]]:
    """``(layer, args, kwargs)`` of every splittable layer during one forward of ``model`` (no KV cache)."""
    from .anatomy import decoder_layers

    calls = []

    def record(module, args, kwargs):
        calls.append((module, args, dict(kwargs)))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in decoder_layers(patch, model)]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def split_call(patch, layer: nn.Module, *args, **kwargs):
    """``layer(*args, **kwargs)`` computed as attention half -> expert half -> finish."""
    from .anatomy import attention_half, expert_half, finish

    split = attention_half(patch, layer, *args, **kwargs)
    routed = None
    if split.is_moe:
        routed = expert_half(patch, layer, split.hidden, split.top_k_index, split.top_k_weights)
    return finish(patch, layer, split, routed)


def _layer_step(layer: nn.Module, fn, hidden: torch.Tensor, args: tuple, kwargs: dict, seed: int):
    params = [p for p in layer.parameters() if p.requires_grad]
    hidden = hidden.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = fn(hidden, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    return out.detach(), torch.autograd.grad(out, [hidden, *params], cotangent, allow_unused=True)


def verify_anatomy(
    patch, *, backend: str = "reference", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> AnatomyReport:
    """Run every splittable layer of a prepared tiny model whole and as its two halves; compare forward and
    backward (gradients of the layer input and of every layer parameter)."""
    import hf_hetermoe as hetermoe

    from .anatomy import moe_module

    report = AnatomyReport(patch.family)
    try:
        model = build_tiny_model(patch, dtype=dtype, device=device, seed=seed)
        hetermoe.prepare(model, hetermoe.HeterMoEConfig(backend=backend))
        model.train()
        inputs = tiny_inputs(patch, model, seed=seed)
        inputs.pop("labels")
        if patch.task == "seq2seq_lm":
            inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
        for layer, args, kwargs in layer_calls(patch, model, inputs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            whole = _layer_step(layer, layer, hidden, args[1:], kwargs, seed)
            halves = _layer_step(
                layer, lambda *a, _l=layer, **k: split_call(patch, _l, *a, **k), hidden, args[1:], kwargs, seed
            )
            report.layers += 1
            report.moe_layers += moe_module(patch, layer) is not None
            report.output_delta = max(report.output_delta, _max_delta(whole[0], halves[0]))
            for g_whole, g_halves in zip(whole[1], halves[1]):
                if (g_whole is None) != (g_halves is None):
                    report.grads_missing += 1
                elif g_whole is not None:
                    report.grad_delta = max(report.grad_delta, _max_delta(g_whole, g_halves))
    except Exception as err:
        report.error = f"{type(err).__name__}: {err}"
    return report
