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
``logits_to_keep``, a custom ``loss_function`` and a replaced or non-``nn.Linear`` head (PEFT on ``lm_head``) take
the untouched path. Logit scaling and final-logit soft-capping (``c * tanh(s * z / c)``) are computed inside the
fused loss; before it is installed, the family's own forward is run once on a few random hidden states (its base
model stood in for) and must turn the head's outputs (or their first columns, where a padded vocabulary is cut off:
the fused loss then uses the head's first rows) into exactly those logits, or the model keeps its unfused loss (with
a warning). ``HeterMoEConfig(fused_cross_entropy=False)`` turns it off.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .experts import full_parameters
from .model_patches.common import InstanceMethod, ModuleRef

# Families that transform the head's logits before the loss: the factor their forward applies.
_LOGIT_SCALE = {
    "granitemoe": lambda model: 1.0 / model.config.logits_scaling,
    "granitemoeshared": lambda model: 1.0 / model.config.logits_scaling,
    "cohere2_moe": lambda model: float(model.logit_scale),
    "muse_spark": lambda model: float(model.config.get_text_config().output_multiplier),  # then soft-capped
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
    vocab: int | None  # the first columns of the head's output the forward keeps as logits (Inkling); None: all
    backend: str
    signature: inspect.Signature  # of the class forward, to find ``labels`` however it was passed
    request: _Request | None = None
    loss: torch.Tensor | None = None
    placeholder: torch.Tensor | None = None
    relay: _Relay | None = None  # ZeRO-3 only: the loss's gradient goes back through the head's output


class _Relay:
    """The loss's incoming gradient, from where the forward returns the loss to where the head made it."""

    grad: torch.Tensor | None = None


class _RelayOut(torch.autograd.Function):
    """loss -> the head's empty ``[B, S, 0]`` stand-in output, in the graph after the loss. Its backward hands the loss
    the gradient that ``_RelayBack`` kept."""

    @staticmethod
    def forward(ctx, loss, relay, like):
        ctx.relay = relay
        return like.new_empty(*like.shape[:-1], 0)

    @staticmethod
    def backward(ctx, _grad):
        grad, ctx.relay.grad = ctx.relay.grad, None
        if grad is None:
            raise RuntimeError(
                "hetermoe fused cross-entropy under ZeRO-3: the loss was not backpropagated through the value the "
                "model's forward returned; backpropagate outputs.loss, or turn the fused loss off "
                "(HeterMoEConfig(fused_cross_entropy=False))"
            )
        return grad, None, None


class _RelayBack(torch.autograd.Function):
    """(the logits the forward made of that stand-in, the loss's value) -> the loss, in the graph after the
    stand-in: the loss's gradient takes the way back through the head's output, as the logits' would."""

    @staticmethod
    def forward(ctx, logits, value, relay):
        ctx.relay, ctx.shape, ctx.dtype = relay, logits.shape, logits.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.relay.grad = grad
        return grad.new_zeros(ctx.shape, dtype=ctx.dtype), None, None


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
    weight, bias = head.weight, head.bias
    if state.vocab is not None:  # rows of the padded vocabulary that the family's logits drop
        weight, bias = weight[: state.vocab], (bias[: state.vocab] if bias is not None else None)
    state.loss = linear_cross_entropy(
        hidden,
        weight,
        labels.to(hidden.device),
        bias=bias,
        ignore_index=request.ignore_index,
        num_items_in_batch=request.num_items_in_batch,
        logit_scale=state.logit_scale,
        softcap=state.softcap,
        backend=state.backend,
    )
    if hasattr(head.weight, "ds_id"):
        # DeepSpeed ZeRO-3 gathers a module's weights for its backward when the gradient reaches the module's
        # outputs, and partitions them again after the forward: the loss's gradient must pass the head's output
        # before the loss's own backward adds the weight's gradient (full-size) to the weight.
        state.relay = _Relay()
        state.placeholder = _RelayOut.apply(state.loss, state.relay, hidden)
    else:
        state.placeholder = hidden.new_empty(*hidden.shape[:-1], 0)
    return state.placeholder


def _loss_function(lm: nn.Module, *args, **kwargs) -> torch.Tensor:
    from transformers.loss.loss_utils import ForCausalLMLoss

    state: _State = lm.__dict__[STATE_ATTR]
    if state.loss is not None:
        loss, state.loss = state.loss, None
        relay, state.relay = state.relay, None
        logits = kwargs["logits"] if "logits" in kwargs else (args[0] if args else None)
        if relay is not None and torch.is_tensor(logits) and logits.requires_grad:
            return _RelayBack.apply(logits, loss.detach(), relay)
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
        state.request = state.loss = state.relay = None
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


class HiddenOnly:
    """A base model's output that holds only hidden states: ``[0]`` and ``.last_hidden_state``; any other field the
    family's forward reads (router logits, a vision-language model's ``image_outputs``, ``cache``, ...) is None."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, index):
        if index in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise IndexError(index)

    def __getattr__(self, name: str):  # only for attributes not set above
        return None


class BaseStandIn(nn.Module):
    """Stands in for a causal LM's base model inside the family's forward: returns fixed hidden states (the logits
    check below; the zebra runtime's head, on the final-normed hidden states)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return HiddenOnly(self.hidden)


def _logits_as_fused(
    lm: nn.Module, head: nn.Linear, scale: float, softcap: float | None
) -> tuple[str | None, int | None]:
    """``(None, vocab)`` when ``lm``'s own forward turns ``head``'s outputs ``z`` into
    ``softcap * tanh(scale * z[..., :vocab] / softcap)`` (the fused loss's logits: what the forward does to the head's
    input is seen by the fused head too; ``vocab`` None: every column), checked on four random hidden states with the
    base model stood in for; otherwise ``(why not, None)``. A ZeRO-3 partitioned head is gathered for the check."""
    with full_parameters([head.weight]) as full:
        if full and head.weight.numel() == head.in_features * head.out_features:
            return _check_logits(lm, head, scale, softcap)
    # Not materialised here (meta, or sharded: FSDP2, tensor parallelism): the known transforms are trusted, and a
    # padded vocabulary is read off the config.
    vocab = getattr(lm.config.get_text_config(), "unpadded_vocab_size", None)
    return None, (vocab if vocab is not None and vocab < head.out_features else None)


def _check_logits(
    lm: nn.Module, head: nn.Linear, scale: float, softcap: float | None
) -> tuple[str | None, int | None]:
    weight = head.weight
    # The forward calls ``self.model`` (Llama4ForCausalLM's base_model_prefix names another attribute).
    names = ("model", getattr(lm, "base_model_prefix", ""))
    prefix = next((name for name in names if isinstance(getattr(lm, name, None), nn.Module)), None)
    if prefix is None:
        return "no base model at .model", None
    base = getattr(lm, prefix)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 4, head.in_features, generator=gen).to(weight.device, weight.dtype)
    ids = torch.zeros(1, 4, dtype=torch.long, device=weight.device)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    setattr(lm, prefix, BaseStandIn(hidden))
    try:  # in the model's own mode (nothing between the base model and the loss is random)
        with torch.no_grad():
            out = type(lm).forward(lm, input_ids=ids, output_router_logits=False, use_cache=False)
    except Exception as err:  # noqa: BLE001 -- any failure means: do not fuse
        return f"its forward did not run on stand-in hidden states ({type(err).__name__}: {err})", None
    finally:
        hook.remove()
        setattr(lm, prefix, base)
    logits = getattr(out, "logits", None)
    if len(seen) != 1 or logits is None or logits.shape[:-1] != seen[0].shape[:-1] or (
        logits.shape[-1] > seen[0].shape[-1]
    ):
        return "its forward does not return the head's output (one call, its shape) as the logits", None
    vocab = logits.shape[-1] if logits.shape[-1] < seen[0].shape[-1] else None  # a padded vocabulary cut off
    want = seen[0][..., : logits.shape[-1]].float() * scale
    if softcap:
        want = softcap * torch.tanh(want / softcap)
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    worst = (logits.float() - want).abs().max().item()
    if worst > tol * max(want.abs().max().item(), 1e-6):
        return (f"its forward transforms the head's outputs otherwise (max difference {worst:.3g} from "
                f"{softcap or 'no'} soft cap and scale {scale:g})"), None
    return None, vocab


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
    scale = scale(lm) if scale else 1.0
    softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None) or None
    why, vocab = _logits_as_fused(lm, head, scale, softcap)
    if why is not None:
        warnings.warn(
            f"hetermoe: the fused cross-entropy is left off for {type(lm).__name__}: {why}. Its loss runs unfused "
            "(correct, with the full logits in memory); please open an issue with the model type.",
            stacklevel=3,
        )
        return None
    state = _State(head, scale, softcap, vocab, _BACKENDS[backend], inspect.signature(type(lm).forward))
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
