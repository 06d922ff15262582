"""JetMoE: softmax over the top-k logits, gated experts in two ``JetMoeParallelExperts`` ([E, 2I, H], [E, H, I]),
a per-layer output bias. The MoE MLP ignores the experts interface, so it is patched per instance.

The router (``JetMoeTopKGating``) still runs as a module and returns its outputs sorted by expert; the patch maps
them back to token order. Its ``expert_size.tolist()`` host sync is upstream's and stays. The mixture of
attention heads (``JetMoeMoA``) is attention, not routed FFN experts, and is left as is.
"""

import torch
from torch import nn

from ..kernels.layout import ExpertLayout
from .anatomy import LayerAnatomy
from .common import activation_name, module_layout, rebind_forward, routed, run_kernels
from .registry import ModelPatch, register_model_patch


def layout(moe: nn.Module) -> ExpertLayout:
    """``input_linear.weight [E, 2I, H]`` (gate then up), ``output_linear.weight [E, H, I]``."""
    return ExpertLayout(has_gate=True, activation=activation_name(moe.activation))


def routed_experts(
    moe: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``hidden [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, H]`` (without the bias)."""
    return run_kernels(
        moe, module_layout(moe, layout), hidden, top_k_index, top_k_weights,
        moe.input_linear.weight, moe.output_linear.weight,
    )


def _forward(self, layer_input: torch.Tensor) -> torch.Tensor:
    bsz, length, emb_size = layer_input.size()
    hidden = layer_input.reshape(-1, emb_size)
    index_sorted_experts, _, batch_gates, _, router_logits = self.router(hidden)
    top_k = self.router.top_k
    # batch_gates[i] is the gate of slot index_sorted_experts[i] (slot = token * k + j): undo the sort.
    inverse = torch.empty_like(index_sorted_experts)
    inverse[index_sorted_experts] = torch.arange(index_sorted_experts.numel(), device=inverse.device)
    top_k_weights = batch_gates[inverse].view(-1, top_k)
    top_k_index = router_logits.topk(top_k, dim=1).indices  # the router's own top-k, same op on the same logits
    out = routed(self, hidden, top_k_index, top_k_weights, routed_experts)
    return out.view(bsz, length, self.input_size) + self.bias


def patch_instance(moe: nn.Module, layout: ExpertLayout, backend: str):
    return rebind_forward(moe, _forward)


def probe(moe: nn.Module, gen: torch.Generator) -> tuple:
    """``JetMoeMoE.forward``'s input: ``[1, 8, H]`` hidden states (it routes them itself)."""
    return (torch.randn(1, 8, moe.input_size, generator=gen),)


def tiny_config():
    from transformers import JetMoeConfig

    return JetMoeConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=2, num_key_value_heads=2, kv_channels=12,
        intermediate_size=32, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=256,
        aux_loss_coef=0.02, pad_token_id=0,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="JetMoE",
        model_types=("jetmoe",),
        modeling_module="transformers.models.jetmoe.modeling_jetmoe",
        experts_class="JetMoeMoE",
        tiny_config=tiny_config,
        dispatch="instance_patch",
        layout=layout,
        patch_instance=patch_instance,
        probe=probe,
        anatomy=LayerAnatomy(layer_classes=("JetMoeDecoderLayer",), expert_fn=routed_experts,
                             notes="the per-layer bias and the attention experts (MoA) stay in the attention half"),
        notes="softmax over top-k logits; `input_linear [E,2I,H]`, `output_linear [E,H,I]`, output bias; MoA kept",
        quirks=(
            "JetMoE's router syncs with the host every layer (`expert_size.tolist()`); it stays, the patched "
            "experts add no sync of their own.",
        ),
    )
)
