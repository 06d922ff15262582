"""Mixtral: softmax top-k router (renormalised), gated SiLU experts, concatenated gate/up."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=128, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=256,
        router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="Mixtral",
        model_types=("mixtral",),
        modeling_module="transformers.models.mixtral.modeling_mixtral",
        experts_class="MixtralExperts",
        tiny_config=tiny_config,
        notes="softmax top-k, renormalised; `gate_up_proj [E,2I,H]`, SiLU",
        anatomy=LayerAnatomy(layer_classes=("MixtralDecoderLayer",)),
    )
)
