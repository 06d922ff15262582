"""DeepSeek-V2: softmax scores, greedy or group-limited greedy top-k, routed_scaling_factor, shared experts."""

from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch


def tiny_config():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        max_position_embeddings=256, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="DeepSeek-V2",
        model_types=("deepseek_v2",),
        modeling_module="transformers.models.deepseek_v2.modeling_deepseek_v2",
        experts_class="DeepseekV2Experts",
        tiny_config=tiny_config,
        anatomy=LayerAnatomy(layer_classes=("DeepseekV2DecoderLayer",)),
        notes="softmax, (group-limited) greedy top-k x routed_scaling_factor; shared experts; first_k_dense_replace",
    )
)
