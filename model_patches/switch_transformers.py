"""Switch Transformers: top-1 router with expert capacity; experts are ``nn.Linear`` pairs (``wi``, ``wo``), no gate.

``SwitchTransformersExperts`` (a ``ModuleDict``) ignores the experts interface, so its forward is patched per
instance. The router's capacity-masked one-hot becomes ``top_k_index [T, 1]`` and a routing weight of 0 for a
dropped token (which then passes through the residual, as upstream). The experts' ``wi``/``wo`` weights are
stacked to ``[E, I, H]`` / ``[E, H, I]`` per forward (only the experts that get tokens;
a copy, gradients flow back to each ``nn.Linear``).
"""


import torch
from torch import nn

from ..kernels.layout import ExpertLayout
from .anatomy import LayerAnatomy
from .common import activation_name, hit_experts, module_layout, rebind_forward, routed, run_kernels, warn_once
from .registry import ModelPatch, register_model_patch

_DROPOUT_MESSAGE = (
    "dropout inside the experts (config.dropout_rate > 0) is not fused by the "
    "hetermoe kernels, so this layer runs transformers' own experts loop in training. Set "
    "model.config.dropout_rate = 0 before loading to train on the kernels."
)


def _experts(module: nn.Module) -> list[nn.Module]:
    return [module[f"expert_{i}"] for i in range(module.num_experts)]


def layout(experts: nn.Module) -> ExpertLayout:
    return ExpertLayout(has_gate=False, activation=activation_name(_experts(experts)[0].act))


def routed_experts(
    experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``hidden [T, H]``, ``top_k_index [T, 1]``, ``top_k_weights [T, 1]`` (0 for dropped tokens) -> ``[T, H]``."""
    hit, index = hit_experts(top_k_index, top_k_weights, experts.num_experts)
    members = [experts[f"expert_{e}"] for e in hit]  # experts without tokens keep grad None, as upstream
    up = torch.stack([e.wi.weight for e in members])  # [E_hit, I, H]
    down = torch.stack([e.wo.weight for e in members])  # [E_hit, H, I]
    return run_kernels(experts, module_layout(experts, layout), hidden, index, top_k_weights, up, down)


def _forward(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor):
    if self.training and any(e.dropout.p > 0 for e in _experts(self)):
        warn_once(self, _DROPOUT_MESSAGE)
        return type(self).forward(self, hidden_states, selected_experts, routing_weights)
    mask = selected_experts.reshape(hidden_states.shape[0], -1)  # [T, E] one-hot, all zero for a dropped token
    top_k_index = mask.argmax(-1, keepdim=True)
    top_k_weights = routing_weights * mask.sum(-1, keepdim=True).to(routing_weights.dtype)
    return routed(self, hidden_states, top_k_index, top_k_weights, routed_experts)




def patch_instance(experts: nn.Module, layout: ExpertLayout, backend: str):
    return rebind_forward(experts, _forward)


def probe(experts: nn.Module, gen: torch.Generator) -> tuple:
    """``SwitchTransformersExperts.forward``'s inputs as the sparse MLP passes them: hidden states ``[8, H]``, a
    one-hot ``[8, 1, E]`` choice with one token dropped (all zero), the top-1 probabilities ``[8, 1]``."""
    num = experts.num_experts
    chosen = torch.nn.functional.one_hot(torch.randint(0, num, (8,), generator=gen), num).unsqueeze(1)
    chosen[3] = 0
    hidden = torch.randn(8, _experts(experts)[0].wi.weight.shape[1], generator=gen)
    return hidden, chosen, torch.rand(8, 1, generator=gen) + 0.5


def _ff_dropout(block: nn.Module, routed_out: torch.Tensor) -> torch.Tensor:
    return block.layer[-1].dropout(routed_out)


def tiny_config():
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, num_heads=4, num_experts=4, expert_capacity=6, router_jitter_noise=0.01,
        dropout_rate=0.0, router_z_loss_coef=0.01, router_aux_loss_coef=0.02, decoder_start_token_id=0,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="Switch Transformers",
        model_types=("switch_transformers",),
        modeling_module="transformers.models.switch_transformers.modeling_switch_transformers",
        experts_class="SwitchTransformersExperts",
        tiny_config=tiny_config,
        dispatch="instance_patch",
        layout=layout,
        patch_instance=patch_instance,
        probe=probe,
        anatomy=LayerAnatomy(
            layer_classes=("SwitchTransformersBlock",), expert_fn=routed_experts, post=_ff_dropout,
            notes="encoder and decoder blocks; needs config.dropout_rate == 0 in training",
        ),
        task="seq2seq_lm",
        notes="top-1 with expert capacity (dropped tokens: weight 0, residual only); `wi`/`wo` per expert, ReLU",
        quirks=(
            "Switch computes its router z-loss and balancing loss only when `*_sparse_step > 1`; with every layer "
            "sparse they are 0.",
            "Dropout inside the experts (`dropout_rate > 0`, training) is not fused: those layers fall back to the "
            "upstream loop with a warning.",
            "The experts' `wi`/`wo` are stacked per forward (one weight copy per layer).",
            "transformers 5.17 (fixed by 5.23): with `*_sparse_step > 1`, a forward with `output_router_logits=True` "
            "raises `ValueError: torch.cat(): expected a non-empty list of Tensors` in the unprepared model too.",
        ),
    )
)
