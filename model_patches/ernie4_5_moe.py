"""ERNIE-4.5-MoE: fp32 softmax router with moe_statics bias for the choice, renormalised, shared experts."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, moe_num_experts=6, moe_k=2, moe_num_shared_experts=1,
        moe_layer_start_index=1, moe_layer_interval=1, max_position_embeddings=256, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="ERNIE-4.5-MoE",
        model_types=("ernie4_5_moe",),
        modeling_module="transformers.models.ernie4_5_moe.modeling_ernie4_5_moe",
        experts_class="Ernie4_5_MoeExperts",
        tiny_config=tiny_config,
        anatomy=LayerAnatomy(layer_classes=("Ernie4_5_MoeDecoderLayer",)),
        notes="fp32 softmax, top-k on moe_statics-corrected scores, renormalised; shared experts; dense first layers",
    )
)
