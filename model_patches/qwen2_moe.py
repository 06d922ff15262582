"""Qwen2-MoE: softmax top-k router, gated SiLU experts, one shared expert behind a sigmoid gate."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=256,
        router_aux_loss_coef=0.02, mlp_only_layers=[0],
    )


PATCH = register_model_patch(
    ModelPatch(
        family="Qwen2-MoE",
        model_types=("qwen2_moe",),
        modeling_module="transformers.models.qwen2_moe.modeling_qwen2_moe",
        experts_class="Qwen2MoeExperts",
        tiny_config=tiny_config,
        anatomy=LayerAnatomy(layer_classes=("Qwen2MoeDecoderLayer",)),
        notes="softmax top-k; shared expert x sigmoid gate (attention half); `gate_up_proj [E,2I,H]`, SiLU",
    )
)
