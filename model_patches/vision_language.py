"""Vision-language families whose text stack is an experts-interface MoE with transformers' default layout.

``prepare`` runs on the whole ``*ForConditionalGeneration`` model: only the text stack's experts change, the vision
tower and the projector are left as they are. The tiny models (tests, ``MODEL_COMPATIBILITY.md``) are built with
``AutoModelForImageTextToText`` and verified on text-only batches, which run the same decoder layers and experts as
image-and-text ones (the image features only replace some input embeddings).
"""

from __future__ import annotations

from functools import partial

from .registry import ModelPatch, register_model_patch
from .standard import _LATENT_ATTENTION, _MROPE, _TINY, _layer_anatomy, _modeling, _tiny_vl_config

# (family, model types (the tiny model is built from the last), modeling package, experts class, decoder layer class
# (None: no layer anatomy), text-config sizes beyond the shared ones, notes)
_FAMILIES = (
    ("Qwen3-VL-MoE", ("qwen3_vl_moe",), "qwen3_vl_moe", "Qwen3VLMoeTextExperts", "Qwen3VLMoeTextDecoderLayer", {},
     "Qwen3-MoE text stack (softmax top-k); DeepStack visual features added to the first layers' inputs"),
    ("GLM4V-MoE", ("glm4v_moe",), "glm4v_moe", "Glm4vMoeTextExperts", "Glm4vMoeTextDecoderLayer",
     # No attention biases: with half the head rotary, the unrotated half of the key bias gets no gradient (softmax
     # ignores it), and AdamW turns that zero's round-off into full steps that two correct runs do not share.
     dict(rope_parameters={**_MROPE, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 1]}, attention_bias=False),
     "GLM-4.5V / 4.6V: GLM4-MoE text stack (sigmoid group-limited top-k, shared experts, dense first layers)"),
    ("Aria", ("aria",), "aria", "AriaExperts", "AriaTextDecoderLayer", {},
     "softmax top-k; shared experts"),
    ("Mistral-Large-4", ("mistral_large4",), "mistral_large4", "MistralLarge4TextExperts", None,
     dict(_LATENT_ATTENTION, final_logit_softcapping=0.1),
     "DeepSeek-V3-style text stack: latent attention, group-limited top-k, shared experts; each layer hands its "
     "sparse-attention top-k to the next (no layer anatomy)"),
    ("ERNIE-4.5-VL", ("ernie4_5_vl_moe",), "ernie4_5_vl_moe", "Ernie4_5_VLMoeMoeExperts", None,
     dict(moe_intermediate_size=[16, 16], mlp_layer_types=["dense", "sparse"], moe_num_shared_experts=1,
          rope_parameters={**_MROPE, "rope_theta": 500000.0}),
     "modality-isolated experts: a text and a vision experts module per layer (both prepared; text-only batches "
     "verify the text one; no layer anatomy); ERNIE-4.5 routing; shared experts; dense first layers"),
    ("Qwen4-Exp", ("qwen4_exp",), "qwen4_exp", "Qwen4ExpTextExperts", None,
     dict(layer_types=["linear_attention", "indexed_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
          linear_key_head_dim=12, linear_value_head_dim=12, shared_expert_intermediate_size=32,
          indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=12, indexer_budget=8, indexer_compress_ratio=2,
          ngram_vocab_size_base=256, make_ngram_vocab_size_divisible_by=8, heads_per_ngram=2),
     "hybrid Gated DeltaNet / sparse (QSA-indexed) attention layers; n-gram embeddings; shared expert; its layers "
     "take more than the generic split passes (no layer anatomy, not investigated)"),
    ("Unlimited-OCR", ("unlimited_ocr",), "unlimited_ocr", "UnlimitedOcrTextExperts", "UnlimitedOcrTextDecoderLayer",
     dict(num_key_value_heads=4), "document OCR model with a DeepSeek-V2-style MoE text stack"),
    ("DeepSeek-OCR-2", ("deepseek_ocr2",), "deepseek_ocr2", "DeepseekOcr2TextExperts", "DeepseekOcr2TextDecoderLayer",
     dict(num_key_value_heads=4, mlp_layer_types=["dense", "sparse"]),
     "document OCR model with a DeepSeek-V2-style MoE text stack; dense first layers"),
    ("Dots3-Note", ("dots3_note",), "dots3_note", "Dots3NoteExperts", "Dots3NoteTextDecoderLayer",
     dict(_LATENT_ATTENTION, num_key_value_heads=4, mlp_layer_types=["dense", "sparse"],
          layer_types=["sliding_attention", "indexed_attention"], sliding_window=16, index_topk=8, index_head_dim=8,
          index_n_heads=2,
          # The sliding-window layers' own attention sizes.
          per_layer_config={0: dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                                    head_dim=12, qk_nope_head_dim=8, v_head_dim=12, qk_rope_head_dim=4)}),
     "vision and audio in; DeepSeek-V3-style text stack (latent attention, sliding-window and indexed sparse "
     "attention layers, shared expert, dense first layers); the vision tower's MoE layers use the same experts "
     "class and are prepared too"),
    ("MuseSpark", ("muse_spark",), "muse_spark", "MuseSparkExperts", None,
     dict(moe_hidden_size=32, mlp_layer_types=["dense", "sparse"]),
     "vision and audio in; experts on a projected width (projections in and out around them); a norm on each "
     "expert's output before the routing weight (applied around the kernels); sigmoid top-k with a score-correction "
     "bias; gated residuals and post-block norms (no layer anatomy)"),
)
# Qwen3-Omni-MoE's thinker (text, image, audio and video in; text out): what is fine-tuned of Qwen3-Omni. The whole
# Omni model (``qwen3_omni_moe``, thinker and talker) is not registered. The thinker's config has no
# ``vision_start_token_id``, which its ``generate`` reads (upstream): the tiny config sets one so generate runs.
QWEN3_OMNI_THINKER = register_model_patch(
    ModelPatch(
        family="Qwen3-Omni-MoE (thinker)",
        model_types=("qwen3_omni_moe_thinker",),
        modeling_module=_modeling("qwen3_omni_moe"),
        experts_class="Qwen3OmniMoeThinkerTextExperts",
        tiny_config=partial(_tiny_vl_config, "qwen3_omni_moe_thinker", vision_start_token_id=_TINY["vocab_size"] - 1),
        anatomy=_layer_anatomy("Qwen3OmniMoeThinkerTextDecoderLayer"),
        task="image_text_to_text",
        notes="Qwen3-MoE text stack (softmax top-k) under vision and audio encoders; the thinker only (the talker "
        "is not registered)",
    )
)

# What the shared small sizes do not reach (``_tiny_vl_config``'s ``vision``, ``audio`` and top-level arguments):
# vision towers with sub-towers of their own, Dots3-Note's adapters (its default layer tables name layers a tiny tower
# lacks), MuseSpark's audio stages and projector.
_EXTRA = {
    "unlimited_ocr": dict(
        vision=dict(
            sam_config=dict(
                hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, global_attn_indexes=[0]
            ),
            encoder_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        ),
    ),
    "dots3_note": dict(
        vision=dict(per_layer_config={}, adapter_in_dim=16, adapter_out_dim=_TINY["hidden_size"],
                    mlp_layer_types=["dense"]),
        audio=dict(per_layer_config={}, hidden_size=16, adapter_input_size=16, adapter_out_dim=_TINY["hidden_size"],
                   num_attention_heads=2, intermediate_size=32, downsample_hidden_size=8),
    ),
    "muse_spark": dict(audio=dict(hidden_sizes=[8, 8, 8, 16], depths=[1, 1, 1, 1]), projector_hidden_size=32),
}
_EXTRA["deepseek_ocr2"] = _EXTRA["unlimited_ocr"]  # the same SAM and encoder towers

PATCHES = [
    register_model_patch(
        ModelPatch(
            family=family,
            model_types=model_types,
            modeling_module=_modeling(package),
            experts_class=experts,
            tiny_config=partial(_tiny_vl_config, model_types[-1], text=text, **_EXTRA.get(model_types[-1], {})),
            anatomy=_layer_anatomy(layer),
            task="image_text_to_text",
            notes=notes,
        )
    )
    for family, model_types, package, experts, layer, text, notes in _FAMILIES
]
