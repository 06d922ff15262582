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


# Qwen3-Next and Qwen3.5-MoE: Gated DeltaNet widths and the shared expert's.
_GATED_DELTANET = dict(
    layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
    linear_key_head_dim=12, linear_value_head_dim=12, shared_expert_intermediate_size=32,
)
# Multi-head latent attention (DeepSeek-V3.2 and its kin): as many key/value heads as query heads, small ranks.
_LATENT_ATTENTION = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
)
# Per-family sizes the shared ones do not cover (Nemotron-H's Mamba2 mixer and shared expert default to 8192 and
# 7688 wide, which makes its CPU chunk scan take ~10 s a step).
_TINY_EXTRA = {
    "nemotron_h": dict(
        mamba_num_heads=4, mamba_head_dim=12, ssm_state_size=16, n_groups=1, chunk_size=16,
        moe_shared_expert_intermediate_size=32,
    ),
    # Hybrid stacks: one linear-attention and one attention layer (with linear layers only, generate's cache has no
    # attention layer to size its mask from).
    "qwen3_next": _GATED_DELTANET,
    "qwen3_5_moe_text": _GATED_DELTANET,
    "kimi_linear": dict(num_key_value_heads=4, layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=0, expert_layer_period=1),
    # Latent attention; one dense layer, then a MoE one.
    "deepseek_v32": dict(_LATENT_ATTENTION, first_k_dense_replace=1, n_group=2, topk_group=1),
    "glm_moe_dsa": dict(_LATENT_ATTENTION, first_k_dense_replace=1, n_group=1, topk_group=1),
    "glm4_moe_lite": dict(num_key_value_heads=4),
    "dots1": dict(first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "zaya": dict(num_experts_per_tok=1),  # ZAYA routes each token to one expert only
    # LongCat-Flash: latent attention (its rope part is head_dim); the router picks among 6 experts and 2 identity
    # ("zero") experts.
    "longcat_flash": dict(_LATENT_ATTENTION, head_dim=4, zero_expert_num=2),
    "axk2": _LATENT_ATTENTION,
    "axk1": dict(_LATENT_ATTENTION, head_dim=4, n_group=1, topk_group=1, mlp_layer_types=["dense", "sparse"]),
    # Kolibri1.1: NVFP4-rounded keys and values need head_dim % 16 == 0; sliding and indexed attention only.
    "kolibri1_1": dict(head_dim=16, index_num_heads=2, mlp_only_layers=[0], shared_expert_intermediate_size=32,
                       layer_types=["sliding_attention", "indexed_attention"], sliding_window=16),
    "flint": dict(mlp_only_layers=[0], shared_expert_intermediate_size=32,
                  layer_types=["full_attention", "sliding_attention"], sliding_window=16),
    # Mamba2 widths: mamba_n_heads * mamba_d_head = mamba_expand (2) * hidden_size.
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=24, mamba_d_state=16, mamba_chunk_size=16,
                             layer_types=["linear_attention", "full_attention"], shared_intermediate_size=32),
    # Gemma4's text stack has experts only with enable_moe_block; its per-layer input embeddings default to 262,144.
    "gemma4_text": dict(
        enable_moe_block=True, top_k_experts=2, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16, global_head_dim=12,
    ),
}


def _has_field(config, name: str) -> bool:
    try:
        return hasattr(config, name)
    except Exception:  # noqa: BLE001  (Gemma4's per-layer fields refuse attribute access on the whole config)
        return name in config.to_dict()


def _tiny_config(model_type: str, **overrides):
    """A small ``model_type`` config: the shared sizes, then ``_TINY_EXTRA``'s and ``overrides``, each set only where
    the config has that field."""
    from transformers import CONFIG_MAPPING, AutoConfig

    known = CONFIG_MAPPING[model_type]()
    sizes = {**_TINY, **_TINY_EXTRA.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if _has_field(known, k)})


# A vision tower of one small layer whose output width is the tiny text stack's (vision-language families; the fields
# a vision config lacks are skipped).
_TINY_VISION = dict(
    depth=1, num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_heads=2, num_attention_heads=2,
    num_key_value_heads=2, out_hidden_size=_TINY["hidden_size"], text_hidden_size=_TINY["hidden_size"],
    deepstack_visual_indexes=[0],
    num_position_embeddings=16,
)
# Multimodal rotary sections (temporal, height, width) that fit the tiny head_dim of 12: 6 = 2 + 2 + 2 rotary pairs.
_MROPE = {"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 2, 2]}


# An audio encoder of one small layer (Qwen3-Omni's thinker).
_TINY_AUDIO = dict(
    encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=_TINY["hidden_size"],
    out_hidden_size=_TINY["hidden_size"],
    downsample_hidden_size=8,
)


def _tiny_vl_config(
    model_type: str, text: dict | None = None, vision: dict | None = None, audio: dict | None = None, **top
):
    """A small vision-language config: the shared text sizes (and ``text``) on its text config, ``_TINY_VISION`` (and
    ``vision``) on its vision config, ``_TINY_AUDIO`` (and ``audio``) on an audio config, each set only where that
    config has the field; ``top`` on the config itself."""
    from transformers import CONFIG_MAPPING, AutoConfig

    known = CONFIG_MAPPING[model_type]()
    text_sizes = {**_TINY, **(text or {})}
    parts = {"text_config": {k: v for k, v in text_sizes.items() if _has_field(known.get_text_config(), k)}}
    for name, sizes in (("vision_config", {**_TINY_VISION, **(vision or {})}),
                        ("audio_config", {**_TINY_AUDIO, **(audio or {})})):
        if getattr(known, name, None) is not None:
            parts[name] = {k: v for k, v in sizes.items() if _has_field(getattr(known, name), k)}
    return AutoConfig.for_model(model_type, **parts, **top)


# (family, model_type or types (the tiny model is built from the last), modeling package, experts class, decoder
# layer class(es) or None when not splittable, notes). The families after AFMoE were added on transformers 5.25
# (benchmarks/NOTES.md v2.29); on an older transformers they are unavailable, as said above.
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
    ("Qwen3-Next", "qwen3_next", "qwen3_next", "Qwen3NextExperts", "Qwen3NextDecoderLayer",
     "hybrid Gated DeltaNet / attention layers; shared expert"),
    ("Qwen3.5-MoE", ("qwen3_5_moe", "qwen3_5_moe_text"), "qwen3_5_moe", "Qwen3_5MoeExperts", "Qwen3_5MoeDecoderLayer",
     "hybrid Gated DeltaNet / attention layers; shared expert; the vision-language model's text stack too"),
    ("DeepSeek-V3.2", "deepseek_v32", "deepseek_v32", "DeepseekV32Experts", "DeepseekV32DecoderLayer",
     "DeepSeek-V3 routing; sparse (indexer) attention; shared experts; dense first layers"),
    ("GLM-MoE-DSA", "glm_moe_dsa", "glm_moe_dsa", "GlmMoeDsaExperts", None,
     "DeepSeek-V3-style routing; sparse attention whose top-k indices each layer hands to the next (no layer "
     "anatomy); shared experts; dense first layers"),
    ("GLM4-MoE-Lite", "glm4_moe_lite", "glm4_moe_lite", "Glm4MoeLiteExperts", "Glm4MoeLiteDecoderLayer",
     "DeepSeek-V3-style routing; latent attention; shared experts"),
    ("Kimi-Linear", "kimi_linear", "kimi_linear", "KimiLinearExperts", "KimiLinearDecoderLayer",
     "hybrid linear / latent attention layers; DeepSeek-V3-style routing; shared experts"),
    ("Jamba", "jamba", "jamba", "JambaExperts", ("JambaAttentionDecoderLayer", "JambaMambaDecoderLayer"),
     "hybrid Mamba / attention layers; softmax top-k; experts every `expert_layer_period` layers"),
    ("dots1", "dots1", "dots1", "Dots1Experts", "Dots1DecoderLayer",
     "DeepSeek-V3-style routing; shared experts; dense first layers"),
    ("MiMo-V2-Flash", "mimo_v2_flash", "mimo_v2_flash", "MiMoV2FlashExperts", "MiMoV2FlashDecoderLayer",
     "sigmoid group-limited top-k; sliding-window and full attention layers"),
    ("MiniCPM5-MoE", "minicpm5_moe", "minicpm5_moe", "MiniCPM5MoeExperts", "MiniCPM5MoeDecoderLayer",
     "sigmoid group-limited top-k; shared experts"),
    ("GraniteMoE-SWA", "granitemoe_swa", "granitemoe_swa", "GraniteMoeSWAExperts", "GraniteMoeSWADecoderLayer",
     "GraniteMoE with sliding-window attention layers"),
    ("HY-V3", "hy_v3", "hy_v3", "HYV3Experts", "HYV3DecoderLayer", "score-correction bias top-k; shared experts"),
    ("Kolibri1", "kolibri1", "kolibri1", "Kolibri1Experts", None,
     "shared experts; post-MLP RMSNorm (no layer anatomy)"),
    ("Kolibri1.1", "kolibri1_1", "kolibri1_1", "Kolibri1_1Experts", None,
     "shared experts; sliding-window and indexed sparse attention; the split layer differs from the whole one "
     "(no layer anatomy, not investigated)"),
    ("Laguna", "laguna", "laguna", "LagunaExperts", "LagunaDecoderLayer", "shared experts; gated attention"),
    ("Lara-Mini", "lara_mini", "lara_mini", "LaraMiniExperts", "LaraMiniDecoderLayer",
     "hybrid Gated DeltaNet / attention layers"),
    ("Mellum", "mellum", "mellum", "MellumExperts", "MellumDecoderLayer",
     "dense and sparse layers (`mlp_layer_types`)"),
    ("LFM2-MoE", "lfm2_moe", "lfm2_moe", "Lfm2MoeExperts", "Lfm2MoeDecoderLayer",
     "hybrid short-convolution / attention layers; dense first layers (`num_dense_layers`)"),
    ("Gemma4 (MoE)", "gemma4_text", "gemma4", "Gemma4TextExperts", None,
     "the text stack's experts (`enable_moe_block`, loaded with AutoModelForCausalLM); a dense MLP beside them and "
     "post-feed-forward norms (no layer anatomy)"),
    ("LongCat-Flash", "longcat_flash", "longcat_flash", "LongcatFlashExperts", "LongcatFlashDecoderLayer",
     "latent attention; identity (\"zero\") experts among the router's choices, added outside the experts"),
    ("A.X-K1", "axk1", "axk1", "AXK1Experts", None,
     "latent attention; group-limited top-k; shared experts; a norm after the MoE block (no layer anatomy); dense "
     "and sparse layers"),
    ("A.X-K2", "axk2", "axk2", "AXK2Experts", "AXK2DecoderLayer",
     "latent attention with a sparse-attention indexer; optional group-limited top-k; dense and sparse layers"),
    ("Flint", "flint", "flint", "FlintExperts", "FlintDecoderLayer",
     "softmax top-k; shared expert; sliding-window and full attention; dense first layers (`mlp_only_layers`)"),
    ("GraniteMoE-Hybrid", "granitemoehybrid", "granitemoehybrid", "GraniteMoeHybridExperts",
     "GraniteMoeHybridDecoderLayer", "hybrid Mamba2 / attention layers; GraniteMoE routing; shared MLP"),
    ("Ergo", "ergo", "ergo", "ErgoExpertProjections", None,
     "one route per row into `up_proj` only (ReLU^2, transposed), each route's own RMSNorm after the experts (kept "
     "upstream; no layer anatomy); an fp32-output LM head (the model computes its own loss); shared expert"),
    ("Inkling", "inkling_text", "inkling", "InklingExperts", None,
     "sigmoid top-k; shared experts scaled per token by the router; short convolutions after attention and after "
     "the MoE block (no layer anatomy)"),
    ("ZAYA", "zaya", "zaya", "ZayaExperts", None,
     "top-1 routing; no layer anatomy (the split layer's gradients differ from the whole layer's by 1.8e-3, "
     "not investigated)"),
)


def _modeling(package: str) -> str:
    """A model package's transformers module: ``"mixtral"`` -> ``transformers.models.mixtral.modeling_mixtral``."""
    return f"transformers.models.{package}.modeling_{package}"


def _layer_anatomy(layer):
    """The generic anatomy for a decoder-layer class name (or names); None for a family without one."""
    if layer is None:
        return None
    return LayerAnatomy(layer_classes=(layer,) if isinstance(layer, str) else tuple(layer))


PATCHES = [
    register_model_patch(
        ModelPatch(
            family=family,
            model_types=(model_type,) if isinstance(model_type, str) else model_type,
            modeling_module=_modeling(package),
            experts_class=experts,
            tiny_config=partial(_tiny_config, model_type if isinstance(model_type, str) else model_type[-1]),
            anatomy=_layer_anatomy(layer),
            notes=notes,
        )
    )
    for family, model_type, package, experts, layer, notes in _FAMILIES
]

# Mistral-Small-4 (``mistral4``): a decoder-only causal LM, which transformers maps under AutoModelForImageTextToText
# (not AutoModelForCausalLM).
MISTRAL4 = register_model_patch(
    ModelPatch(
        family="Mistral4",
        model_types=("mistral4",),
        modeling_module=_modeling("mistral4"),
        experts_class="Mistral4Experts",
        tiny_config=partial(_tiny_config, "mistral4", **_LATENT_ATTENTION, first_k_dense_replace=1),
        anatomy=_layer_anatomy("Mistral4DecoderLayer"),
        auto_class_name="AutoModelForImageTextToText",
        notes="DeepSeek-V3-style: latent attention, group-limited top-k, shared experts, dense first layers; "
        "built by AutoModelForImageTextToText",
    )
)
