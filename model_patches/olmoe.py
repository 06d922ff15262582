"""OLMoE: softmax top-k router (not renormalised), gated SiLU experts, QK-norm attention."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, max_position_embeddings=256,
        router_aux_loss_coef=0.02, pad_token_id=0, eos_token_id=1,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="OLMoE",
        model_types=("olmoe",),
        modeling_module="transformers.models.olmoe.modeling_olmoe",
        experts_class="OlmoeExperts",
        tiny_config=tiny_config,
        notes="softmax top-k (not renormalised); `gate_up_proj [E,2I,H]`, SiLU",
        anatomy=LayerAnatomy(layer_classes=("OlmoeDecoderLayer",)),
    )
)
