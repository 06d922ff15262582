"""One rank's part of a transformers MoE causal LM, and the pieces of its forward the schedule runs separately.

The runtime never re-implements a model: it calls the family's own modules through the layer anatomy
(``model_patches/anatomy.py``). What it needs beyond the anatomy comes from the model itself:

* the arguments the model passes to each decoder layer (masks, rotary embeddings, position ids) and the
  embedding output: captured by running the base model once per micro-batch with its decoder layers and final
  norm replaced by recorders (attention and experts are skipped, so this costs one embedding lookup);
* the head: ``base.norm``, ``lm_head`` and ``model.loss_function``, exactly as ``*ForCausalLM.forward``;
* the router auxiliary loss: the family's own ``load_balancing_loss_func`` on the router logits, recorded with
  forward hooks on the class named in ``_can_record_outputs["router_logits"]`` (as transformers records them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_hetermoe.errors import UnsupportedModelError
from hf_hetermoe.fused_loss import BaseStandIn
from hf_hetermoe.model_patches import attention_half, decoder_layers
from hf_hetermoe.model_patches.anatomy import moe_module
from hf_hetermoe.planner.model_dims import model_dims

EXPERT_PARAM_PREFIXES = ("gate_up_proj", "down_proj", "up_proj")


# The base model's last norm, by family (LFM2-MoE's ``embedding_norm`` runs after the layers, despite its name).
FINAL_NORMS = ("norm", "norm_f", "final_layernorm", "embedding_norm")


@dataclass
class ModelParts:
    """Handles on the modules of a causal LM that the runtime calls."""

    model: nn.Module
    patch: Any
    base: nn.Module
    layers: list[nn.Module]
    experts: list[nn.Module | None]  # per layer: the routed-experts module, None for a dense layer
    expert_names: list[str | None]  # per layer: the experts module's qualified name in ``model``
    router_class: type | None
    router_index: int
    aux_fn: Callable | None
    aux_coef: float
    num_experts: int
    top_k: int
    layer_container: nn.ModuleList = field(repr=False, default=None)
    norm_name: str = "norm"  # the base model's final norm (Nemotron-H: ``norm_f``)
    stack: nn.Module | None = field(repr=False, default=None)  # ``model.model``: ``base``, or a VLM's wrapper of it

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def is_moe(self, layer: int) -> bool:
        return self.experts[layer] is not None


def _find_patch(model: nn.Module):
    from hf_hetermoe.prepare import _find_patch as find

    return find(model)


def model_parts(model: nn.Module) -> ModelParts:
    """Find the pieces of ``model`` (a ``*ForCausalLM`` of a family with a layer anatomy) the runtime runs.

    Raises:
        UnsupportedModelError: the family has no anatomy, patches instances (no experts interface), or its model
            is not laid out as ``model.model.layers`` + ``model.model.norm`` + ``model.lm_head``.
    """
    patch = _find_patch(model)
    if patch.anatomy is None or patch.anatomy.expert_fn is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({patch.family}): the zebra runtime supports families that use transformers' "
            "experts interface and have a layer anatomy (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, ...); "
            "train this one with hetermoe.prepare alone"
        )
    stack = getattr(model, "model", None)
    base = stack
    text = getattr(stack, "language_model", None)
    if getattr(stack, "layers", None) is None and isinstance(getattr(text, "layers", None), nn.ModuleList):
        base = text  # a vision-language model: its text stack (trained on text; the vision tower stays idle)
    container = getattr(base, "layers", None)
    norm_name = next((n for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    checks = (("model.model", base is not None), ("model.model.layers", isinstance(container, nn.ModuleList)),
              ("model.model.norm", norm_name is not None), ("model.lm_head", hasattr(model, "lm_head")))
    missing = [name for name, ok in checks if not ok]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} lacks {missing}: the zebra runtime needs a decoder-only *ForCausalLM, or a "
            "vision-language model whose model.model.language_model holds the layers (load the model with "
            "AutoModelForCausalLM or AutoModelForImageTextToText)"
        )
    layers = decoder_layers(patch, model)
    if list(container) != layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: model.model.layers holds modules the anatomy cannot split "
            f"({sorted({type(m).__name__ for m in container})} vs {patch.anatomy.layer_classes})"
        )
    experts = [moe_module(patch, layer) for layer in layers]
    names = {id(m): n for n, m in model.named_modules()}
    recorder = getattr(base, "_can_record_outputs", {}).get("router_logits")
    router_class = getattr(recorder, "target_class", recorder if isinstance(recorder, type) else None)
    router_index = getattr(recorder, "index", 0) or 0
    config = model.config.get_text_config()  # the config itself, or a vision-language model's text config
    module = sys.modules[type(model).__module__]
    aux_fn = getattr(module, "load_balancing_loss_func", None)
    router_out = getattr(model.config, "output_router_logits", False) or getattr(config, "output_router_logits", False)
    aux_on = bool(router_out) and aux_fn is not None and router_class is not None
    dims = model_dims(model.config)  # the planner's reading of the config (text config, field names per family)
    num_experts = getattr(model, "num_experts", None) or dims.num_experts
    top_k = getattr(model, "num_experts_per_tok", None) or dims.top_k
    return ModelParts(
        model=model, patch=patch, base=base, layers=layers, experts=experts,
        expert_names=[names[id(m)] if m is not None else None for m in experts],
        router_class=router_class, router_index=router_index, aux_fn=aux_fn if aux_on else None,
        aux_coef=float(getattr(model, "router_aux_loss_coef", getattr(config, "router_aux_loss_coef", 0.0)) or 0.0),
        num_experts=int(num_experts), top_k=int(top_k), layer_container=container, norm_name=norm_name,
        stack=stack,
    )


class _Recorder(nn.Module):
    """Stands in for one decoder layer: records the call and returns its input. Other attributes are the layer's
    (Nemotron-H's base model reads ``layer.block_type`` to pick each layer's mask)."""

    def __init__(self, sink: list, index: int, layer: nn.Module) -> None:
        super().__init__()
        self.sink, self.index = sink, index
        object.__setattr__(self, "_layer", layer)  # not a submodule: its parameters stay where they are

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink[self.index] = (hidden, args[1:], kwargs)
        return hidden


def layer_inputs(parts: ModelParts, input_ids: torch.Tensor, **model_kwargs) -> tuple[torch.Tensor, list]:
    """Embedding output ``[B, S, H]`` (with its autograd graph) and, per layer, ``(args, kwargs)`` the base model
    passes to it besides the hidden states. Runs the base model with layers and final norm stubbed out."""
    sink: list = [None] * parts.num_layers
    saved = list(parts.layer_container)
    norm = getattr(parts.base, parts.norm_name)
    try:
        for i in range(len(saved)):
            parts.layer_container[i] = _Recorder(sink, i, saved[i])
        setattr(parts.base, parts.norm_name, nn.Identity())
        parts.base(input_ids=input_ids, use_cache=False, **model_kwargs)
    finally:
        for i, layer in enumerate(saved):
            parts.layer_container[i] = layer
        setattr(parts.base, parts.norm_name, norm)
    if any(s is None for s in sink):
        raise UnsupportedModelError(f"{type(parts.base).__name__} did not call every decoder layer once")
    embeds = sink[0][0]
    return embeds, [(a, k) for _, a, k in sink]


def run_attention(parts: ModelParts, layer: int, hidden: torch.Tensor, args, kwargs):
    """The attention half of ``layer`` on ``hidden``, recording router logits. Returns ``(split, router_logits)``."""
    logits: list[torch.Tensor] = []
    handles = []
    if parts.router_class is not None and parts.is_moe(layer):
        def hook(_module, _inp, out):
            logits.append(out[parts.router_index] if isinstance(out, (tuple, list)) else out)

        handles = [m.register_forward_hook(hook) for m in parts.layers[layer].modules()
                   if isinstance(m, parts.router_class)]
    try:
        split = attention_half(parts.patch, parts.layers[layer], hidden, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if isinstance(split.partial, tuple):
        raise UnsupportedModelError(
            f"{type(parts.layers[layer]).__name__} returns a tuple; the zebra runtime needs decoder layers that "
            "return the hidden states (transformers v5 layout)"
        )
    return split, (logits[0] if logits else None)


def head_loss(parts: ModelParts, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Final norm, then the family's own ``*ForCausalLM.forward`` head (LM head, logit scaling or soft-capping,
    loss over the micro-batch's label tokens) with the base model replaced by the given hidden states."""
    model = parts.model
    model.model = BaseStandIn(getattr(parts.base, parts.norm_name)(hidden))
    try:
        out = model(input_ids=labels, labels=labels, output_router_logits=False, use_cache=False)
    finally:
        model.model = parts.stack
    return out.loss


def aux_loss(parts: ModelParts, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None):
    """The family's load-balancing loss over the MoE layers' router logits of one micro-batch; padding (mask 0)
    is left out of the expert statistics, as the family's own forward does."""
    return parts.aux_fn(tuple(router_logits), parts.num_experts, parts.top_k, attention_mask)
