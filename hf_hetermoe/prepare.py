"""``hetermoe.prepare(model)``: swap a transformers MoE model's routed experts onto hf-hetermoe's kernels.

It acts on the instance: it selects the registered ``"hetermoe"`` experts implementation on the
configs of the model's experts modules and records each module's weight layout. No parameter, buffer,
router or hook changes, so the state dict, ``save_pretrained``, PEFT ``target_parameters`` and
``output_router_logits`` behave exactly as before. Two more instance-level swaps, each one ``HeterMoEConfig``
switch: on a causal LM, the fused linear cross-entropy (``fused_loss.py``: in training mode with labels the loss
comes without logits), and RMSNorm modules on a fused kernel (``model_patches/norms.py``; transformers' Hub
kernelization, which would rebind them at every ``train()``/``eval()``, is turned off first:
``model_patches/hub_kernels.py``). Outside the instance it changes one thing: backward passes started from the
calling thread run on that thread (``HeterMoEConfig.backward_on_calling_thread``, a thread-local autograd mode).
``unprepare`` undoes all of it.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import env, fused_loss
from .config import HeterMoEConfig
from .errors import UnsupportedLayoutError, UnsupportedModelError
from .experts import BACKEND_ATTR, LAYOUT_ATTR, RECOMPUTE_ATTR, check_against_eager, check_instance_patch, register
from .kernels.ops import DTYPES
from .model_patches import MODEL_PATCHES, ModelPatch, get_model_patch, supported_model_types
from .model_patches.hub_kernels import turn_off_hub_kernels
from .model_patches.norms import patch_rms_norms

STATE_ATTR = "_hetermoe_state"

# How many prepared models on this thread hold autograd's calling-thread mode (HeterMoEConfig.
# backward_on_calling_thread): the mode goes back to PyTorch's default when the last of them is unprepared, not the
# first (a policy and a reference model prepared side by side).
_CALLING_THREAD = threading.local()


@dataclass
class _PreparedState:
    config: HeterMoEConfig
    patch: ModelPatch
    experts: list[nn.Module]
    # (config object, the raw `_experts_implementation` it had) for every config prepare touched
    previous: list[tuple[object, str | None]]
    # undo functions of instance-patched experts modules (families outside transformers' experts interface)
    undo: list


def _model_types(model: nn.Module) -> list[str]:
    """The model's ``model_type`` and those of its sub-configs (multimodal wrappers keep the MoE in one)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    types = [getattr(config, "model_type", None)]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        types.append(getattr(sub, "model_type", None))
    return [t for t in types if t]


def _find_patch(model: nn.Module) -> ModelPatch:
    types = _model_types(model)
    for model_type in types:
        if model_type in MODEL_PATCHES:
            return get_model_patch(model_type)
    shown = ", ".join(repr(t) for t in types) or f"a {type(model).__name__} without a transformers config"
    raise UnsupportedModelError(
        f"hetermoe.prepare supports transformers MoE models of types {', '.join(supported_model_types())}; got {shown}"
    )


def _matched_type(model: nn.Module, patch: ModelPatch) -> str:
    return next(t for t in _model_types(model) if t in patch.model_types)


def _raw_impl(config) -> str | None:
    return config.__dict__.get("_experts_implementation_internal", getattr(config, "_experts_implementation", None))


def _set_raw_impl(config, value: str | None) -> None:
    # The internal attribute sets only this config; the public property would recurse into sub-configs.
    if "_experts_implementation_internal" in config.__dict__ or hasattr(type(config), "_experts_implementation"):
        config.__dict__["_experts_implementation_internal"] = value
    else:
        config._experts_implementation = value


def _quantization_method(model: nn.Module) -> str | None:
    """The ``quant_method`` of a model loaded with a ``quantization_config`` (fp8, bitsandbytes, ...), else None."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or type(quant).__name__)


def _check_weight_dtypes(experts: nn.Module) -> None:
    """Refuse expert weights the kernels would have to cast without their scales (float8, packed integers)."""
    for name, param in experts.named_parameters(recurse=False):
        if param.dtype not in DTYPES:
            raise UnsupportedLayoutError(
                f"{type(experts).__name__}.{name} is {param.dtype}: hetermoe's kernels take bf16, fp16 or fp32 "
                "expert weights (a quantized weight would lose its scales). Load the model dequantized, or in one of "
                "those dtypes (from_pretrained(..., dtype=torch.bfloat16))"
            )


def is_prepared(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def prepare(model: nn.Module, config: HeterMoEConfig | None = None) -> nn.Module:
    """Run ``model``'s routed experts on hf-hetermoe's operators. Returns the same model object.

    Idempotent (a second call warns and changes nothing); undone by ``unprepare``.

    Raises:
        UnsupportedModelError: the model's family is not supported, or it has no MoE experts module.
        UnsupportedLayoutError: an experts module uses a layout or activation the kernels do not cover.
    """
    config = config if config is not None else HeterMoEConfig()
    if env.disabled():
        warnings.warn("HETERMOE_DISABLE=1: hetermoe.prepare left the model unchanged", stacklevel=2)
        return model
    if is_prepared(model):
        warnings.warn("hetermoe.prepare was already called on this model; nothing changed", stacklevel=2)
        return model

    patch = _find_patch(model)
    if not config.autotune:
        from .kernels.tuning import set_autotune

        set_autotune(False)  # process-wide, like HETERMOE_AUTOTUNE=0
    experts_type = patch.experts_type()
    experts = [m for m in model.modules() if isinstance(m, experts_type)]
    if not experts:
        method = _quantization_method(model)
        if method is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({patch.family}) is quantized ({method}): its experts were replaced by "
                f"quantized modules, not {patch.experts_class}. hetermoe trains bf16, fp16 or fp32 experts: load the "
                "model dequantized (e.g. from_pretrained(..., quantization_config=FineGrainedFP8Config(dequantize="
                "True)) for an FP8 checkpoint) or without a quantization_config"
            )
        raise UnsupportedModelError(
            f"{type(model).__name__} ({patch.family}) has no {patch.experts_class} module: nothing for "
            "hetermoe to accelerate (is every layer dense, e.g. mlp_only_layers covers them all?)"
        )
    for module in experts:
        _check_weight_dtypes(module)
    layouts = [patch.layout(m) for m in experts]  # validate every module before changing any
    checked = set()
    for module, layout in zip(experts, layouts):  # one module per class and layout: same code, same answer
        if (type(module), layout) not in checked:
            checked.add((type(module), layout))
            if patch.dispatch == "experts_interface":
                check_against_eager(module, layout)
            else:
                check_instance_patch(module, patch, layout)

    calling_thread = env.calling_thread_backward(config.backward_on_calling_thread)  # a bad value raises here
    undo = []
    if config.fused_cross_entropy:
        restore = fused_loss.enable(model, _matched_type(model, patch), config.backend)
        if restore is not None:
            undo.append(restore)
    if config.fused_rms_norm:
        # First: turning Hub kernelization off resets the kernel layers' forwards, the RMSNorms among them.
        hub_undo = turn_off_hub_kernels(
            model,
            "hetermoe.prepare runs the RMSNorms on its fused kernel, and transformers would undo that at every "
            "train()/eval(); HeterMoEConfig(fused_rms_norm=False) keeps the Hub kernels, hetermoe.unprepare turns "
            "them back on",
        )
        undo.append(patch_rms_norms(model, backend=config.backend)[1])
        if hub_undo is not None:
            undo.append(hub_undo)  # after the norms' undo: unprepare unbinds them, then kernelizes again
    if patch.dispatch == "instance_patch":
        for module, layout in zip(experts, layouts):
            setattr(module, LAYOUT_ATTR, layout)
            setattr(module, BACKEND_ATTR, config.backend)
            setattr(module, RECOMPUTE_ATTR, config.recompute_gate_up)
            undo.append(patch.patch_instance(module, layout, config.backend))
        _finish(model, _PreparedState(config, patch, experts, [], undo), calling_thread)
        return model

    register(config.implementation_name)
    configs: list[object] = []
    for cfg in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in experts]:
        if cfg is not None and all(cfg is not c for c in configs):
            configs.append(cfg)
    previous = [(cfg, _raw_impl(cfg)) for cfg in configs]
    for cfg in configs:
        _set_raw_impl(cfg, config.implementation_name)
    for module, layout in zip(experts, layouts):
        setattr(module, LAYOUT_ATTR, layout)
        setattr(module, BACKEND_ATTR, config.backend)
        setattr(module, RECOMPUTE_ATTR, config.recompute_gate_up)
    _finish(model, _PreparedState(config, patch, experts, previous, undo), calling_thread)
    return model


def _finish(model: nn.Module, state: _PreparedState, calling_thread: bool) -> None:
    """Last step of ``prepare``, once nothing else can fail: backward passes started from this thread run on it
    (when asked, and not so already), and the model records its state."""
    if calling_thread:
        # Thread-local: the thread that prepares the model is the one whose loop calls backward (Trainer,
        # accelerate scripts). Called as a function it sets the mode at once. The undo is a module-level function,
        # not a closure: prepared models are deep-copied and pickled whole.
        taken = torch._C._is_multithreading_enabled()
        if taken:
            torch.autograd.set_multithreading_enabled(False)
        # Earlier holders are moot once someone turned the mode back off; with none and the mode found off, the user
        # set it themselves: theirs to keep, nothing to undo.
        holders = 0 if taken else getattr(_CALLING_THREAD, "holders", 0)
        if taken or holders:
            _CALLING_THREAD.holders = holders + 1
            state.undo.append(_release_calling_thread)
    setattr(model, STATE_ATTR, state)


def _release_calling_thread() -> None:
    """Undo of the calling-thread mode for one prepared model: PyTorch's default comes back with the last one. A
    copy's undo after its original's (deepcopy, pickle), or an undo on another thread, finds nothing to release."""
    holders = getattr(_CALLING_THREAD, "holders", 0)
    if holders <= 0:
        return
    _CALLING_THREAD.holders = holders - 1
    if holders == 1:
        torch.autograd.set_multithreading_enabled(True)


def unprepare(model: nn.Module) -> nn.Module:
    """Undo ``prepare``: restore each config's previous experts implementation. Returns the same model."""
    state: _PreparedState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        warnings.warn("hetermoe.unprepare called on a model that was not prepared; nothing changed", stacklevel=2)
        return model
    for cfg, value in state.previous:
        _set_raw_impl(cfg, value)
    for restore in state.undo:
        restore()
    for module in state.experts:
        for attr in (LAYOUT_ATTR, BACKEND_ATTR, RECOMPUTE_ATTR):
            if attr in module.__dict__:
                delattr(module, attr)
    delattr(model, STATE_ATTR)
    return model
