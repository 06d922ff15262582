"""Qwen3-MoE: softmax top-k router (optionally renormalised), gated SiLU experts, dense layers allowed."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=7, num_experts_per_tok=3,
        norm_topk_prob=True, max_position_embeddings=256, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="Qwen3-MoE",
        model_types=("qwen3_moe",),
        modeling_module="transformers.models.qwen3_moe.modeling_qwen3_moe",
        experts_class="Qwen3MoeExperts",
        tiny_config=tiny_config,
        notes="softmax top-k (norm_topk_prob); `gate_up_proj [E,2I,H]`, SiLU; mlp_only_layers dense",
        anatomy=LayerAnatomy(layer_classes=("Qwen3MoeDecoderLayer",)),
    )
)
