"""Fused linear cross-entropy for a prepared ``*ForCausalLM``: the training loss without the ``[B, S, V]`` logits.

A causal LM's training forward builds logits for every position (``B*S*V`` values: 5 GB in bf16 at 16K tokens over
Qwen3's 152K vocabulary), upcasts them to float for ``ForCausalLMLoss`` and keeps both for the backward. Here the
model's own ``forward`` still runs from start to end, with two instance-level substitutions active only in
training mode with ``labels``:

* ``lm_head``'s forward computes the loss of its input directly (``kernels.linear_ce``, chunk by chunk, inside the
  head's own call so that FSDP / ZeRO-3 gathered weights are in place) and returns an empty ``[B, S, 0]`` tensor;
* ``model.loss_function`` hands that loss back where the forward asks for it, so everything the family adds
  afterwards (router aux loss and its coefficient) happens exactly as before.

The returned output has ``logits=None`` (as with Liger's fused loss). Evaluation mode, calls without labels,
``logits_to_keep``, a custom ``loss_function``, a replaced or non-``nn.Linear`` head (PEFT on ``lm_head``) and
final-logit soft-capping all take the untouched path. ``HeterMoEConfig(fused_cross_entropy=False)`` turns it off.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .model_patches.common import InstanceMethod, ModuleRef

# Families that transform the head's logits before the loss: the factor their forward applies.
_LOGIT_SCALE = {
    "granitemoe": lambda model: 1.0 / model.config.logits_scaling,
    "granitemoeshared": lambda model: 1.0 / model.config.logits_scaling,
    "cohere2_moe": lambda model: float(model.logit_scale),
}


STATE_ATTR = "_hetermoe_fused_loss"
# HeterMoEConfig.backend -> linear_cross_entropy's backend
_BACKENDS = {"auto": "auto", "triton": "triton", "reference": "torch"}


@dataclass
class _Request:
    labels: torch.Tensor
    shift_labels: torch.Tensor | None
    num_items_in_batch: torch.Tensor | int | None
    ignore_index: int


@dataclass
class _State:
    """Lives on the causal LM and its head (so ``copy.deepcopy`` of a prepared model carries its own)."""

    head: nn.Linear
    logit_scale: float
    softcap: float | None  # the config's final_logit_softcapping: c * tanh(logits / c) (Gemma, Mistral-Large-4)
    backend: str
    signature: inspect.Signature  # of the class forward, to find ``labels`` however it was passed
    request: _Request | None = None
    loss: torch.Tensor | None = None
    placeholder: torch.Tensor | None = None


def causal_lm_with_head(model: nn.Module) -> nn.Module | None:
    """The ``*ForCausalLM`` module (``model`` or a wrapped one, e.g. under PEFT) with an ``nn.Linear`` head, or a
    decoder-only ``*ForConditionalGeneration`` one (a vision-language model; never an encoder-decoder)."""
    for module in model.modules():
        name = type(module).__name__
        causal = name.endswith("ForCausalLM") or (
            name.endswith("ForConditionalGeneration")
            and not getattr(getattr(module, "config", None), "is_encoder_decoder", True)
        )
        if causal and type(getattr(module, "lm_head", None)) is nn.Linear:
            return module
    return None


def _standard_loss(model: nn.Module) -> bool:
    """Whether ``model`` computes transformers' standard causal-LM loss (no user-set ``loss_function``)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return "_loss_function" not in model.__dict__ and type(model).loss_function.fget(model) is ForCausalLMLoss


def _fused_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    from .kernels.linear_ce import linear_cross_entropy

    state: _State = head.__dict__[STATE_ATTR]
    request = state.request
    if request is None or state.loss is not None:
        return type(head).forward(head, hidden)
    labels = request.shift_labels
    if labels is None:  # tokens < n predict n, as ForCausalLMLoss shifts them
        labels = nn.functional.pad(request.labels, (0, 1), value=request.ignore_index)[..., 1:]
    state.loss = linear_cross_entropy(
        hidden,
        head.weight,
        labels.to(hidden.device),
        bias=head.bias,
        ignore_index=request.ignore_index,
        num_items_in_batch=request.num_items_in_batch,
        logit_scale=state.logit_scale,
        softcap=state.softcap,
        backend=state.backend,
    )
    state.placeholder = hidden.new_empty(*hidden.shape[:-1], 0)
    return state.placeholder


def _loss_function(lm: nn.Module, *args, **kwargs) -> torch.Tensor:
    from transformers.loss.loss_utils import ForCausalLMLoss

    state: _State = lm.__dict__[STATE_ATTR]
    if state.loss is not None:
        loss, state.loss = state.loss, None
        return loss
    return ForCausalLMLoss(*args, **kwargs)


def _fused_forward(lm: nn.Module, *args, **kwargs):
    from transformers.utils import ModelOutput

    state: _State = lm.__dict__[STATE_ATTR]
    original = type(lm).forward
    if not lm.training or state.request is not None or lm.lm_head is not state.head:
        return original(lm, *args, **kwargs)
    arguments = state.signature.bind_partial(lm, *args, **kwargs).arguments
    labels = arguments.get("labels")
    if labels is None or arguments.get("logits_to_keep") not in (None, 0):
        return original(lm, *args, **kwargs)
    state.request = _Request(
        labels=labels,
        shift_labels=kwargs.get("shift_labels"),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        ignore_index=kwargs.get("ignore_index", -100),
    )
    try:
        out = original(lm, *args, **kwargs)
    finally:
        state.request = state.loss = None
    # The head's empty [B, S, 0] stand-in, possibly scaled or upcast by the family's forward, is not returned.
    placeholder, state.placeholder = state.placeholder, None
    if placeholder is None:  # the forward never reached the head (nothing was substituted)
        return out
    empty = placeholder.shape
    if isinstance(out, ModelOutput):
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    if isinstance(out, tuple):
        return tuple(v for v in out if not (torch.is_tensor(v) and v.shape == empty))
    return out


def enable(model: nn.Module, model_type: str, backend: str = "auto"):
    """Install the fused loss on ``model``'s causal LM; returns an undo function, or ``None`` when the model is
    not a causal LM this applies to (then nothing changed)."""
    lm = causal_lm_with_head(model)
    if lm is None or not _standard_loss(lm):
        return None
    head = lm.lm_head
    if "forward" in lm.__dict__ or "forward" in head.__dict__:
        return None  # already instance-patched by someone else: do not stack on it
    scale = _LOGIT_SCALE.get(model_type)
    softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None) or None
    state = _State(
        head, scale(lm) if scale else 1.0, softcap, _BACKENDS[backend], inspect.signature(type(lm).forward)
    )
    for module in (lm, head):
        module.__dict__[STATE_ATTR] = state
    # Bound to their instances without closures: copies and pickles of the model carry their own (common.py).
    lm.forward = InstanceMethod(lm, _fused_forward)
    head.forward = InstanceMethod(head, _fused_head)
    lm.loss_function = InstanceMethod(lm, _loss_function, "loss_function")
    # The undo is kept on the model itself (prepare's state): weak references, or the model would be a cycle.
    return functools.partial(_disable, ModuleRef(lm), ModuleRef(head))


def _disable(lm: ModuleRef, head: ModuleRef) -> None:
    for module in (lm(), head()):
        for name in ("forward", "_loss_function", STATE_ATTR):
            module.__dict__.pop(name, None)
