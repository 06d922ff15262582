"""Further experts-interface families with transformers' default layout, grouped: hetermoe treats them alike.

Each is a ``@use_experts_implementation`` experts class read by ``common.default_layout`` (gated SiLU
``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``; Nemotron-H: ``up_proj`` with ReLU^2, no gate) inside a
decoder layer that adds the routed output to the residual, so the generic layer anatomy applies, except where
``anatomy`` is None (a norm after the MLP: the routed sum is normalised together with the rest, which the
additive split cannot express; those layers run whole on one side).

These ship in recent transformers only; on an older one ``ModelPatch.available()`` is False and ``prepare``
raises ``UnsupportedModelError`` naming the missing class.
"""

from __future__ import annotations

from functools import partial

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch

_TINY = dict(
    vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=6, n_routed_experts=6,
    num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=256, router_aux_loss_coef=0.02,
    pad_token_id=0,
)


# Per-family sizes the shared ones do not cover (Nemotron-H's Mamba2 mixer and shared expert default to 8192 and
# 7688 wide, which makes its CPU chunk scan take ~10 s a step).
_TINY_EXTRA = {
    "nemotron_h": dict(
        mamba_num_heads=4, mamba_head_dim=12, ssm_state_size=16, n_groups=1, chunk_size=16,
        moe_shared_expert_intermediate_size=32,
    ),
}


def _tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    known = CONFIG_MAPPING[model_type]()
    sizes = {**_TINY, **_TINY_EXTRA.get(model_type, {})}
    return AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if hasattr(known, k)})


# (family, model_type, modeling package, experts class, decoder layer class or None when not splittable, notes)
_FAMILIES = (
    ("MiniMax", "minimax", "minimax", "MiniMaxExperts", "MiniMaxDecoderLayer",
     "softmax top-k; lightning (linear) + softmax attention layers"),
    ("MiniMax-M2", "minimax_m2", "minimax_m2", "MiniMaxM2Experts", "MiniMaxM2DecoderLayer",
     "sigmoid + score-correction bias top-k"),
    ("Hunyuan-V1-MoE", "hunyuan_v1_moe", "hunyuan_v1_moe", "HunYuanMoEV1Experts", "HunYuanMoEV1DecoderLayer",
     "softmax top-k; shared MLP"),
    ("EXAONE-MoE", "exaone_moe", "exaone_moe", "ExaoneMoeExperts", "ExaoneMoeDecoderLayer",
     "sigmoid group-limited top-k; shared experts; dense first layers"),
    ("Solar-Open", "solar_open", "solar_open", "SolarOpenExperts", "SolarOpenDecoderLayer",
     "sigmoid group-limited top-k; shared experts"),
    ("Cohere2-MoE", "cohere2_moe", "cohere2_moe", "Cohere2MoeExperts", "Cohere2MoeDecoderLayer",
     "softmax top-k; parallel attention + MoE block"),
    ("Nemotron-H", "nemotron_h", "nemotron_h", "NemotronHExperts", "NemotronHBlock",
     "hybrid Mamba2 / attention / MoE blocks; `up_proj` only, ReLU^2 (no gate); shared expert"),
    ("FlexOlmo", "flex_olmo", "flex_olmo", "FlexOlmoExperts", None,
     "softmax top-k; post-feed-forward RMSNorm (no layer anatomy)"),
    ("AFMoE", "afmoe", "afmoe", "AfmoeExperts", None,
     "sigmoid / softmax top-k; post-MLP RMSNorm (no layer anatomy)"),
)

PATCHES = [
    register_model_patch(
        ModelPatch(
            family=family,
            model_types=(model_type,),
            modeling_module=f"transformers.models.{package}.modeling_{package}",
            experts_class=experts,
            tiny_config=partial(_tiny_config, model_type),
            anatomy=LayerAnatomy(layer_classes=(layer,)) if layer else None,
            notes=notes,
        )
    )
    for family, model_type, package, experts, layer, notes in _FAMILIES
]
