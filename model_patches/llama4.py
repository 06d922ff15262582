"""Llama 4: sigmoid of the top-k router logits *scales the expert input*; transposed gate/up; shared expert.

transformers' ``Llama4TextMoe`` runs every expert on every token (non-selected ones get a zero input) and does
not use the experts interface, so the MoE block is patched per instance: the router and the shared expert run
as modules, the routed experts run sparse on the kernels. Routing weights keep Llama 4's meaning:
``out[t] = sum_j FFN_{idx[t, j]}(x[t] * w[t, j])`` (the kernels see ``k`` pre-scaled rows per token, weight 1).
"""

import torch
from torch import nn

from ..kernels.layout import ExpertLayout
from .anatomy import LayerAnatomy
from .common import activation_name, module_layout, rebind_forward, routed, run_kernels
from .registry import ModelPatch, register_model_patch


def layout(moe: nn.Module) -> ExpertLayout:
    """``gate_up_proj [E, H, 2I]`` (gate then up), ``down_proj [E, I, H]``: transposed, concatenated."""
    return ExpertLayout(has_gate=True, is_transposed=True, is_concatenated=True,
                        activation=activation_name(moe.experts.act_fn))


def routed_experts(
    moe: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``hidden [T, H]``, ``top_k_index [T, k]``, input scales ``top_k_weights [T, k]`` -> ``[T, H]``."""
    tokens, top_k = top_k_index.shape
    scaled = (hidden.unsqueeze(1) * top_k_weights.to(hidden.dtype).unsqueeze(-1)).reshape(tokens * top_k, -1)
    ones = scaled.new_ones(tokens * top_k, 1)
    out = run_kernels(
        moe, module_layout(moe, layout), scaled, top_k_index.reshape(-1, 1), ones,
        moe.experts.gate_up_proj, moe.experts.down_proj,
    )
    return out.view(tokens, top_k, -1).sum(1) if top_k > 1 else out


def _forward(self, hidden_states: torch.Tensor):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)  # [T, E]: sigmoid(top-k logits), 0 elsewhere
    # The router's own top-k (same op on the same logits), to read the selected scores.
    top_k_index = torch.topk(router_logits, self.top_k, dim=1).indices
    top_k_weights = router_scores.gather(1, top_k_index)
    routed_out = routed(self, hidden_states, top_k_index, top_k_weights, routed_experts)
    out = self.shared_expert(hidden_states)
    out.add_(routed_out)
    return out, router_logits


def patch_instance(moe: nn.Module, layout: ExpertLayout, backend: str):
    return rebind_forward(moe, _forward)


def probe(moe: nn.Module, gen: torch.Generator) -> tuple:
    """``Llama4TextMoe.forward``'s input: ``[1, 8, H]`` hidden states (it routes them itself)."""
    return (torch.randn(1, 8, moe.hidden_dim, generator=gen),)


def tiny_config():
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        vocab_size=128, hidden_size=48, intermediate_size=24, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=5, num_experts_per_tok=2,
        interleave_moe_layer_step=1, max_position_embeddings=256, attention_chunk_size=16,
        pad_token_id=0,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="Llama4",
        model_types=("llama4_text", "llama4"),
        modeling_module="transformers.models.llama4.modeling_llama4",
        experts_class="Llama4TextMoe",
        tiny_config=tiny_config,
        dispatch="instance_patch",
        layout=layout,
        patch_instance=patch_instance,
        probe=probe,
        anatomy=LayerAnatomy(
            layer_classes=("Llama4TextDecoderLayer",), expert_fn=routed_experts,
            notes="top_k_weights are input scales (sigmoid of the top-k logits), not output weights",
        ),
        notes="sigmoid(top-k logits) scales the expert input; transposed `gate_up_proj [E,H,2I]`; shared expert",
        quirks=(
            "Llama 4 upstream runs all E experts densely on every token (zero input for non-selected ones); the "
            "prepared model runs only the selected experts, which is the same function (FFN(0) = 0, no biases).",
            "Llama4ForCausalLM returns no aux loss (router logits only).",
        ),
    )
)
