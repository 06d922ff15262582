"""GPT-OSS: softmax over the top-k logits (router with bias); transposed, interleaved gate/up with biases and
the clamped SwiGLU of ``GptOssExperts._apply_gate`` (``activation="swiglu_oai"`` in the kernels)."""

from torch import nn

from ..errors import UnsupportedLayoutError
from ..kernels.layout import ExpertLayout
from .anatomy import LayerAnatomy
from .registry import ModelPatch, register_model_patch

MODELING = "transformers.models.gpt_oss.modeling_gpt_oss"


def layout(experts: nn.Module) -> ExpertLayout:
    """``gate_up_proj [E, H, 2I]`` (gate/up interleaved) + bias, ``down_proj [E, I, H]`` + bias, clamped SwiGLU."""
    import importlib

    cls = getattr(importlib.import_module(MODELING), "GptOssExperts")
    if type(experts)._apply_gate is not cls._apply_gate:
        raise UnsupportedLayoutError(
            f"{type(experts).__name__} overrides GptOssExperts._apply_gate; hetermoe's kernels implement only "
            "GPT-OSS's clamped SwiGLU. Use experts_implementation='grouped_mm' for this model."
        )
    if getattr(experts, "_is_expert_parallel", False):
        raise UnsupportedLayoutError(
            "GptOssExperts is sharded by transformers' expert parallelism; load the model without tp_plan"
        )
    return ExpertLayout(
        has_gate=True, is_transposed=experts.is_transposed, is_concatenated=experts.is_concatenated,
        has_bias=experts.has_bias, activation="swiglu_oai", alpha=float(experts.alpha), limit=float(experts.limit),
    )


def tiny_config():
    from transformers import GptOssConfig

    # swiglu_limit is far below the real 7.0 so that the tiny model's activations hit both clamps.
    return GptOssConfig(
        vocab_size=128, hidden_size=48, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, num_local_experts=5, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=256, swiglu_limit=0.1, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="GPT-OSS",
        model_types=("gpt_oss",),
        modeling_module=MODELING,
        experts_class="GptOssExperts",
        tiny_config=tiny_config,
        layout=layout,
        anatomy=LayerAnatomy(layer_classes=("GptOssDecoderLayer",)),
        notes="softmax over top-k logits (router bias); transposed, interleaved gate/up, biases, clamped SwiGLU",
    )
)
