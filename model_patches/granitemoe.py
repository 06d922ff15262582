"""GraniteMoE and GraniteMoE-Shared: softmax over the top-k logits, gated experts, residual_multiplier.

GraniteMoE-Shared adds a dense shared MLP next to the routed experts (it stays in the attention half).
"""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch

_QUIRK_517 = (
    "transformers 5.17 (fixed by 5.23): a training step with `output_router_logits=True` and labels raises "
    "`AttributeError: 'int' object has no attribute 'to'` in the unprepared model too (the model records no router "
    "logits); train with `output_router_logits=False` there or upgrade transformers."
)


def _scaled(layer, routed):
    # The layer adds `moe_output * residual_multiplier` to the residual.
    return routed * layer.residual_multiplier


def tiny_config():
    from transformers import GraniteMoeConfig

    return GraniteMoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=256,
        residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.1, logits_scaling=2.0,
        router_aux_loss_coef=0.02,
    )


def tiny_shared_config():
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(
        vocab_size=128, hidden_size=48, intermediate_size=32, shared_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2,
        max_position_embeddings=256, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.1,
        logits_scaling=2.0, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="GraniteMoE",
        model_types=("granitemoe",),
        modeling_module="transformers.models.granitemoe.modeling_granitemoe",
        experts_class="GraniteMoeExperts",
        tiny_config=tiny_config,
        anatomy=LayerAnatomy(layer_classes=("GraniteMoeDecoderLayer",), post=_scaled),
        notes="softmax over the top-k logits; output x residual_multiplier; `gate_up_proj [E,2I,H]`, SiLU",
        quirks=(_QUIRK_517,),
    )
)

SHARED_PATCH = register_model_patch(
    ModelPatch(
        family="GraniteMoE-Shared",
        model_types=("granitemoeshared",),
        modeling_module="transformers.models.granitemoeshared.modeling_granitemoeshared",
        experts_class="GraniteMoeSharedExperts",
        tiny_config=tiny_shared_config,
        anatomy=LayerAnatomy(layer_classes=("GraniteMoeSharedDecoderLayer",), post=_scaled),
        notes="as GraniteMoE plus a dense shared MLP (attention half)",
        quirks=(_QUIRK_517,),
    )
)
