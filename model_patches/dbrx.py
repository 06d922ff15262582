"""DBRX: softmax top-k with p-norm renormalisation; per-expert weights flattened as ``w1, v1, w2 [E*I, H]``.

``DbrxExperts`` ignores the experts interface, so its forward is patched per instance. ``w1`` (gate) and ``v1``
(up) are two parameters, so the kernels get their concatenation ``[E, 2I, H]`` (one copy per forward; the
gradient flows back to both through autograd); ``w2`` is passed as the view ``[E, H, I]`` of ``[E, I, H]``.
"""

import torch
from torch import nn

from ..kernels.layout import ExpertLayout
from .anatomy import LayerAnatomy
from .common import activation_name, module_layout, rebind_forward, routed, run_kernels
from .registry import ModelPatch, register_model_patch


def layout(experts: nn.Module) -> ExpertLayout:
    return ExpertLayout(has_gate=True, activation=activation_name(experts.mlp.activation_fn))


def routed_experts(
    experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``hidden [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, H]``."""
    mlp = experts.mlp
    shape = (experts.num_experts, experts.ffn_hidden_size, experts.hidden_size)
    gate_up = torch.cat([mlp.w1.view(shape), mlp.v1.view(shape)], dim=1)  # [E, 2I, H]: copy (two parameters)
    down = mlp.w2.view(shape).transpose(1, 2)  # [E, H, I]: view
    return run_kernels(experts, module_layout(experts, layout), hidden, top_k_index, top_k_weights, gate_up, down)


def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    batch_size = hidden_states.shape[0]
    hidden = hidden_states.reshape(-1, self.hidden_size)
    out = routed(self, hidden, top_k_index, top_k_weights, routed_experts)
    return out.view(batch_size, -1, self.hidden_size)


def patch_instance(experts: nn.Module, layout: ExpertLayout, backend: str):
    return rebind_forward(experts, _forward)


def probe(experts: nn.Module, gen: torch.Generator) -> tuple:
    """``DbrxExperts.forward``'s inputs: ``[1, 8, H]`` hidden states, two experts per token, weights not 1."""
    index = torch.rand(8, experts.num_experts, generator=gen).topk(2, dim=-1).indices
    return torch.randn(1, 8, experts.hidden_size, generator=gen), index, torch.rand(8, 2, generator=gen) + 0.5


def _residual_dropout(block: nn.Module, routed_out: torch.Tensor) -> torch.Tensor:
    return nn.functional.dropout(routed_out, p=block.resid_pdrop, training=block.training)


def tiny_config():
    from transformers import DbrxConfig

    return DbrxConfig(
        d_model=48, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=128, pad_token_id=0,
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 5, "moe_top_k": 2, "moe_loss_weight": 0.02},
    )


PATCH = register_model_patch(
    ModelPatch(
        family="DBRX",
        model_types=("dbrx",),
        modeling_module="transformers.models.dbrx.modeling_dbrx",
        experts_class="DbrxExperts",
        tiny_config=tiny_config,
        dispatch="instance_patch",
        layout=layout,
        patch_instance=patch_instance,
        probe=probe,
        anatomy=LayerAnatomy(layer_classes=("DbrxBlock",), expert_fn=routed_experts, post=_residual_dropout),
        notes="softmax top-k, p-norm renormalised; `w1`/`v1`/`w2 [E*I,H]` (gate/up concatenated per forward: a copy)",
        quirks=(
            "DBRX's default config does not run: it needs `attn_config.rope_theta` and `clip_qkv`.",
            "transformers 5.17 (fixed by 5.23): a training step with `output_router_logits=True` and labels raises "
            "`AttributeError: 'int' object has no attribute 'to'` in the unprepared model too (DbrxModel records no "
            "router logits); train with `output_router_logits=False` there or upgrade transformers.",
        ),
    )
)
