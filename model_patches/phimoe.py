"""PhiMoE: sparsemixer router (always top-2), gated SiLU experts, LayerNorm decoder layers."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import PhimoeConfig

    return PhimoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=256,
        router_jitter_noise=0.01, input_jitter_noise=0.01, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="PhiMoE",
        model_types=("phimoe",),
        modeling_module="transformers.models.phimoe.modeling_phimoe",
        experts_class="PhimoeExperts",
        tiny_config=tiny_config,
        anatomy=LayerAnatomy(layer_classes=("PhimoeDecoderLayer",)),
        notes="sparsemixer (Gumbel sampling + Heun gradient in training), top-2; `gate_up_proj [E,2I,H]`, SiLU",
        quirks=(
            "PhiMoE always routes top-2: `sparsemixer` ignores `num_experts_per_tok`.",
            "PhiMoE applies input jitter twice in training (in the MoE block and again in the router) when "
            "`input_jitter_noise > 0`.",
        ),
    )
)
