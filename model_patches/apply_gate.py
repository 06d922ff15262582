"""Families whose experts override ``_apply_gate`` (most with a clamped SwiGLU), on the weight layout their
``@use_experts_implementation`` declares (``gate_up_proj [E, 2I, H]``, gate rows first, unless said otherwise):

- DeepSeek-V4, HY-V4, HY-V4-VL, GLM5-Next: ``silu(min(gate, limit)) * clamp(up, -limit, limit)``
  (``"silu_clamped"``);
- Step-3.7, Ling-Hybrid: ``min(silu(gate), limit) * clamp(up, -limit, limit)`` (``"silu_clamped_after"``), a limit
  per layer (none: plain SiLU);
- Beam: ``act(gate) * up`` in fp32, cast back, which is what the kernels compute anyway (``"silu"``);
- MiniMax-M3-VL: GPT-OSS's SwiGLU, ``(clamp(up) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``, on
  concatenated rather than interleaved gate/up (``"swiglu_oai"``);
- OpenAI-Privacy-Filter: the same, transposed and with biases;
- Inkling2, Inkling2-Loop: a soft-capped SwiGLU, ``c_g tanh(gate / c_g) * sigmoid(gate) * c_u tanh(up / c_u)``
  (``"silu_softcapped"``, the caps as the layout's ``alpha`` and ``limit``).

The layout is declared per family and checked against the module's own ``_apply_gate`` before ``prepare`` changes
anything: the kernels' reference activation runs next to it on values that cross both clamps. A subclass, or a later
transformers, that computes something else is refused with a clear error instead of training with the wrong
activation.
"""

from __future__ import annotations

import importlib
from functools import partial
from operator import attrgetter

import torch
from torch import nn

from ..errors import UnsupportedLayoutError
from ..kernels import reference
from ..kernels.layout import ExpertLayout, split_gate_up
from .common import activation_name, check_experts_module
from .registry import ModelPatch, register_model_patch
from .standard import _LATENT_ATTENTION, _MROPE, _TINY, _layer_anatomy, _modeling, _tiny_config, _tiny_vl_config


def _probe(limit: float, width: int = 64) -> torch.Tensor:
    """``[4, 2 * width]`` fp32 gate/up values from ``-3 * limit`` to ``3 * limit``: both clamps and the open range
    between them, in a fixed (seeded) order so the check is deterministic."""
    values = torch.linspace(-3 * limit, 3 * limit, 8 * width)
    perm = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))
    return values[perm].reshape(4, 2 * width)


def checked_layout(
    experts: nn.Module, *, modeling_module: str, experts_class: str, activation: str, limit_attr: str | None = None,
    alpha_attr: str | None = None,
) -> ExpertLayout:
    """The family's layout with ``activation`` (``"<act>_clamped"`` takes ``<act>`` from ``experts.act_fn``, SiLU
    without one), ``limit`` (and ``alpha``) read off the module (dotted attribute paths); checked against its
    ``_apply_gate``."""
    cls = getattr(importlib.import_module(modeling_module), experts_class)
    name = type(experts).__name__
    if type(experts)._apply_gate is not cls._apply_gate:
        raise UnsupportedLayoutError(
            f"{name} overrides {experts_class}._apply_gate; hetermoe's kernels implement only {experts_class}'s "
            "gated activation. Use experts_implementation='grouped_mm' for this model."
        )
    check_experts_module(experts)
    limit = attrgetter(limit_attr)(experts) if limit_attr else None
    suffix = activation[activation.index("_clamped"):] if "_clamped" in activation else ""
    if suffix:
        plain = activation_name(experts.act_fn) if hasattr(experts, "act_fn") else "silu"
        # A layer without a limit (Step-3.7's per-layer limits of 0 or None) applies the plain activation.
        activation = plain + suffix if limit is not None else plain
    layout = ExpertLayout(
        has_gate=True, is_transposed=getattr(experts, "is_transposed", False),
        is_concatenated=getattr(experts, "is_concatenated", True), has_bias=getattr(experts, "has_bias", False),
        activation=activation, **({"limit": float(limit)} if limit is not None else {}),
        **({"alpha": float(attrgetter(alpha_attr)(experts))} if alpha_attr else {}),
    )
    # Values that cross the clamps, or reach well into both soft caps' saturation.
    span = layout.limit if limit is not None else 10.0
    gate_up = _probe(max(layout.limit, layout.alpha) if activation == "silu_softcapped" else span)
    with torch.no_grad():
        got = experts._apply_gate(gate_up)
        want = reference.glu_forward(*split_gate_up(gate_up, -1, layout), layout)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise UnsupportedLayoutError(
            f"{name}._apply_gate does not compute {layout.activation} (limit {layout.limit}, alpha {layout.alpha}), "
            "the activation hetermoe's kernels would apply: this transformers version changed it. Use "
            "experts_implementation='grouped_mm' for this model, or open an issue."
        )
    return layout


def _register(family, model_types, package, experts_class, tiny_config, notes, *, task="causal_lm", layer=None,
              **layout):
    modeling = _modeling(package)
    return register_model_patch(
        ModelPatch(
            family=family,
            model_types=model_types,
            modeling_module=modeling,
            experts_class=experts_class,
            tiny_config=tiny_config,
            layout=partial(checked_layout, modeling_module=modeling, experts_class=experts_class, **layout),
            anatomy=_layer_anatomy(layer),
            task=task,
            notes=notes,
        )
    )


# The tiny models' swiglu_limit is far below the real 10.0 (7.0 for MiniMax-M3), near the median |gate| of their
# freshly initialised experts, so that both clamps bite. DeepSeek-V4's first layers route by a token-id table
# (``hash_moe``) that a fresh model holds as zeros: every token would pick expert 0 k times and the router's weight
# would get no gradient at all, so the tiny model's layers use the learned top-k router (the experts run the same).
PATCHES = [
    _register(
        "DeepSeek-V4", ("deepseek_v4",), "deepseek_v4", "DeepseekV4Experts",
        partial(_tiny_config, "deepseek_v4", swiglu_limit=0.1, mlp_layer_types=["moe", "moe"]),
        "sigmoid-family top-k or token-id hash routing; clamped SwiGLU; hyper-connections (several residual streams "
        "per layer: no layer anatomy); shared experts",
        activation="silu_clamped", limit_attr="limit",
    ),
    _register(
        "HY-V4", ("hy_v4",), "hy_v4", "HYV4Experts", partial(_tiny_config, "hy_v4", swiglu_limit=0.02),
        "clamped SwiGLU; hyper-connections and sparse-attention indices handed from layer to layer (no layer "
        "anatomy); shared experts",
        activation="silu_clamped", limit_attr="swiglu_limit",
    ),
    _register(
        "HY-V4-VL", ("hy_v4_vl",), "hy_v4_vl", "HYV4VLExperts",
        partial(
            _tiny_vl_config, "hy_v4_vl", text=dict(swiglu_limit=0.02, rope_parameters=_MROPE, qk_rope_head_dim=12)
        ),
        "vision-language; its text stack as HY-V4's (clamped SwiGLU, hyper-connections: no layer anatomy)",
        task="image_text_to_text", activation="silu_clamped", limit_attr="swiglu_limit",
    ),
    _register(
        "Ling-Hybrid", ("bailing_hybrid",), "bailing_hybrid", "BailingHybridExperts",
        partial(_tiny_config, "bailing_hybrid", **_LATENT_ATTENTION, num_experts_per_token=2,
                mlp_layer_types=["sparse", "sparse"], layer_types=["linear_attention", "full_attention"],
                linear_head_dim=12, linear_num_heads=4, num_expert_group=1, topk_group=1, first_k_dense_replace=0,
                expert_swiglu_limit_list=[0, 0.02], layer_group_size=2),
        "the gate clamped after its activation, a limit per layer (the tiny model's first has none); hybrid linear "
        "/ latent attention layers; group-limited top-k; shared expert",
        layer="BailingHybridDecoderLayer", activation="silu_clamped_after", limit_attr="limit",
    ),
    _register(
        "Beam", ("beam",), "beam", "BeamExperts",
        partial(_tiny_config, "beam", mlp_layer_types=["dense", "sparse"], n_group=1, topk_group=1,
                layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                final_logit_softcapping=0.1),  # near the tiny model's logits, so that the cap bends them
        "the activation computed in fp32 (as the kernels always do); the routed sum scaled after the experts and "
        "depth-scaled residuals (no layer anatomy); dense first layers",
        activation="silu",
    ),
    _register(
        "GLM5-Next", ("glm5_next",), "glm5_next", "Glm5NextTextExperts",
        partial(_tiny_vl_config, "glm5_next",
                text=dict(_LATENT_ATTENTION, qk_rope_head_dim=0, mlp_layer_types=["dense", "sparse"],
                          swiglu_limit=0.05, layer_types=["linear_attention", "indexed_attention"],
                          linear_head_dim=12, linear_num_heads=4, index_head_dim=8, index_n_heads=2, index_topk=8,
                          index_kpool=4),
                vision=dict(projection_intermediate_size=32)),
        "vision-language; clamped SwiGLU; group-limited top-k; shared experts; dense first layers; "
        "hyper-connections (no layer anatomy)",
        task="image_text_to_text", activation="silu_clamped",
        limit_attr="swiglu_limit",
    ),
    _register(
        "Step-3.7", ("step3p7",), "step3p7", "Step3p7Experts",
        partial(_tiny_vl_config, "step3p7",
                text=dict(mlp_layer_types=["sparse", "sparse"], share_expert_dim=32, swiglu_limits=[0, 0.02],
                          layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                          num_sliding_attention_heads=4)),
        "vision-language; the gate clamped after its activation, a limit per layer (the tiny model's first has none); "
        "shared expert; dense first layers",
        task="image_text_to_text", layer="Step3p7DecoderLayer", activation="silu_clamped_after", limit_attr="limit",
    ),
    _register(
        "MiniMax-M3-VL", ("minimax_m3_vl_text", "minimax_m3_vl"), "minimax_m3_vl", "MiniMaxM3VLExperts",
        partial(_tiny_vl_config, "minimax_m3_vl", text=dict(swiglu_limit=0.1)),
        "vision-language (and its text-only causal LM); GPT-OSS's clamped SwiGLU on concatenated gate/up; the routed "
        "sum scaled after the experts (no layer anatomy); shared experts",
        task="image_text_to_text", activation="swiglu_oai",
        limit_attr="swiglu_limit", alpha_attr="swiglu_alpha",
    ),
    _register(
        "OpenAI-Privacy-Filter", ("openai_privacy_filter",), "openai_privacy_filter", "OpenAIPrivacyFilterExperts",
        partial(_tiny_config, "openai_privacy_filter", swiglu_limit=0.1),
        "a bidirectional token classifier (PII spans); GPT-OSS's clamped SwiGLU on concatenated gate/up, transposed "
        "weights with biases (the experts computed in fp32 upstream); softmax over the top-k logits; encoder layers "
        "(no layer anatomy: the zebra runtime trains causal LMs)",
        task="token_classification", activation="swiglu_oai", limit_attr="limit", alpha_attr="alpha",
    ),
    *(
        _register(
            family, (f"{package}_text", package), package, experts_class,
            # Caps near the tiny model's pre-activations (the real ones are 4 and 25), so that both bend them; the
            # LM head's width (unpadded_vocab_size) is the tiny vocabulary.
            partial(_tiny_vl_config, package, text=dict(
                mlp_gate_softcap=0.1, mlp_up_softcap=0.08, final_logit_softcapping=0.1,
                unpadded_vocab_size=_TINY["vocab_size"], **loop,
            )),
            "vision-language (and its text-only causal LM); a soft-capped SwiGLU; sigmoid top-k with a score-"
            "correction bias; attention over earlier blocks' outputs as the residual (no layer anatomy); soft-capped "
            "logits" + extra,
            task="image_text_to_text", activation="silu_softcapped", alpha_attr="act_fn.gate_softcap.softcap",
            limit_attr="act_fn.up_softcap.softcap",
        )
        for family, package, experts_class, extra, loop in (
            ("Inkling2", "inkling2", "Inkling2Experts", "", {}),
            # The tiny model's second layer runs twice (one attention-residual block per layer).
            ("Inkling2-Loop", "inkling2_loop", "Inkling2LoopExperts", "; looped (weight-shared) layers",
             dict(n_layers_per_attn_res_block=1, loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2)),
        )
    ),
]
