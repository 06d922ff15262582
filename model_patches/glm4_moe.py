"""GLM-4-MoE: DeepSeek-V3-style sigmoid group-limited router, shared experts, partial RoPE attention."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
        use_qk_norm=True, max_position_embeddings=256, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="GLM4-MoE",
        model_types=("glm4_moe",),
        modeling_module="transformers.models.glm4_moe.modeling_glm4_moe",
        experts_class="Glm4MoeExperts",
        tiny_config=tiny_config,
        anatomy=LayerAnatomy(layer_classes=("Glm4MoeDecoderLayer",)),
        notes="sigmoid + e_score_correction_bias, group-limited top-k x routed_scaling_factor; shared experts",
    )
)
