"""Layer anatomy: one decoder layer as an attention half and an expert half (for the disaggregated runtime).

The split reuses the family's own layer code instead of re-implementing it. ``attention_half`` runs
``layer(...)`` with the routed experts *captured*: the call that would compute them records its inputs
``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` and returns zeros. Everything else (norms,
attention, residuals, router, shared experts, per-layer biases) runs as usual, so the layer returns
``partial``: its output with the routed contribution left out. In every registered family the routed output
enters the layer output additively (``residual + [shared +] routed``, possibly scaled or dropped out), so

    layer(...) == finish(partial, routed) == partial + post(layer, routed.view(B, S, H))

with ``post`` the family's map from the routed sum to its contribution (identity, Granite's
``residual_multiplier``, the residual dropout of DBRX / Switch / NLLB). Gradients flow through both terms:
``partial`` back to attention and shared experts, ``routed`` through the expert half to ``hidden`` and
``top_k_weights`` and from there to the norm and the router. ``tests/test_anatomy.py`` checks every family.

Where the capture happens:

* experts-interface families: the experts module itself (``module(hidden, top_k_index, top_k_weights)``);
  its ``forward`` is swapped on the instance for the duration of ``attention_half``;
* instance-patched families: their patched forward computes the routed sum through ``common.routed``, which
  defers to a hook set on the module; ``LayerAnatomy.expert_fn`` computes it on the expert side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .common import ROUTED_HOOK_ATTR


@dataclass(frozen=True)
class LayerAnatomy:
    """Per-family data of the split.

    Attributes:
        layer_classes: names of the family's decoder-layer classes (in the patch's ``modeling_module``); every
            layer of these classes can be split, dense layers included (their ``LayerSplit.hidden`` is None).
        expert_fn: instance-patched families only: ``expert_fn(module, hidden [T, H], top_k_index [T, k],
            top_k_weights [T, k]) -> [T, H]`` computes the routed sum of the patched ``module``.
        post: maps the routed sum viewed as ``[B, S, H]`` to its contribution to the layer output
            (default: identity). Called as ``post(layer, routed)``.
        notes: what the split keeps on which side, where it differs from the common pattern.
    """

    layer_classes: tuple[str, ...]
    expert_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    post: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    notes: str = ""


@dataclass
class LayerSplit:
    """State between the halves of one layer.

    Attributes:
        hidden: ``[T, H]`` input of the routed experts (None for a dense layer).
        top_k_index: ``[T, k]`` expert ids (None for a dense layer).
        top_k_weights: ``[T, k]`` routing weights, in the router's dtype (None for a dense layer).
        partial: the layer's output with the routed contribution left out (a tensor, or the family's tuple).
    """

    hidden: torch.Tensor | None
    top_k_index: torch.Tensor | None
    top_k_weights: torch.Tensor | None
    partial: object = None
    captured: list = field(default_factory=list, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.hidden is not None


def moe_module(patch, layer: nn.Module) -> nn.Module | None:
    """The layer's ``patch.experts_class`` module (the capture point), or None for a dense layer."""
    experts_type = patch.experts_type()
    found = [m for m in layer.modules() if isinstance(m, experts_type)]
    if len(found) > 1:
        raise ValueError(f"{type(layer).__name__} holds {len(found)} {patch.experts_class} modules; expected one")
    return found[0] if found else None


def decoder_layers(patch, model: nn.Module) -> list[nn.Module]:
    """Every layer of ``model`` that ``patch.anatomy`` can split, in module order."""
    names = set(_anatomy(patch).layer_classes)
    return [m for m in model.modules() if type(m).__name__ in names]


def attention_half(patch, layer: nn.Module, *args, **kwargs) -> LayerSplit:
    """Run ``layer(*args, **kwargs)`` except its routed experts. Returns the split state (see ``LayerSplit``)."""
    anatomy = _anatomy(patch)
    module = moe_module(patch, layer)
    split = LayerSplit(None, None, None)
    if module is None:
        split.partial = layer(*args, **kwargs)
        return split

    def capture(hidden, top_k_index, top_k_weights, *rest, **more):
        if split.captured:
            raise RuntimeError(f"{type(module).__name__} ran its routed experts twice in one layer call")
        split.captured.append((hidden, top_k_index, top_k_weights))
        return torch.zeros_like(hidden)

    attr = "forward" if anatomy.expert_fn is None else ROUTED_HOOK_ATTR
    previous = module.__dict__.get(attr)
    module.__dict__[attr] = capture
    try:
        split.partial = layer(*args, **kwargs)
    finally:
        if previous is None:
            module.__dict__.pop(attr, None)
        else:
            module.__dict__[attr] = previous
    if not split.captured:
        raise RuntimeError(f"{type(layer).__name__} did not call its routed experts; cannot split it")
    split.hidden, split.top_k_index, split.top_k_weights = split.captured.pop()
    return split


def expert_half(
    patch, layer: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The routed experts of ``layer`` on ``hidden [T, H]`` -> ``[T, H]`` (the hidden dtype)."""
    anatomy = _anatomy(patch)
    module = moe_module(patch, layer)
    if module is None:
        raise ValueError(f"{type(layer).__name__} is a dense layer: it has no expert half")
    if anatomy.expert_fn is None:
        return module(hidden, top_k_index, top_k_weights)
    return anatomy.expert_fn(module, hidden, top_k_index, top_k_weights)


def finish(patch, layer: nn.Module, split: LayerSplit, routed: torch.Tensor | None):
    """Add the routed contribution to the partial output: returns what ``layer(...)`` returns."""
    if not split.is_moe:
        return split.partial
    anatomy = _anatomy(patch)
    first = split.partial[0] if isinstance(split.partial, tuple) else split.partial
    contribution = routed.view(first.shape)
    if anatomy.post is not None:
        contribution = anatomy.post(layer, contribution)
    out = first + contribution.to(first.dtype)
    return (out, *split.partial[1:]) if isinstance(split.partial, tuple) else out


def _anatomy(patch) -> LayerAnatomy:
    if patch.anatomy is None:
        raise ValueError(f"{patch.family} has no layer anatomy (see MODEL_COMPATIBILITY.md for the reason)")
    return patch.anatomy
