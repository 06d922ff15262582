"""NLLB-MoE: top-2 router with expert capacity; experts are ``nn.Linear`` pairs with biases (``fc1``, ``fc2``).

transformers' ``NllbMoeExperts.forward`` one-hot encodes the router's ``top_1_mask`` (already a 0/1 ``[T, E]``
mask), so its loop sees "expert ids" 0 and 1 only: expert 0 runs every token weighted by the router
probabilities of its non-top-1 columns, expert 1 every token weighted by its kept top-1 probability; experts
2..E-1 never run. The patch reproduces that function exactly (``top_k_index = [0, 1]`` for every token) and lists
it as an upstream quirk rather than fixing it. Eval-mode ``moe_token_dropout`` scaling is folded into the
weights; training with token or activation dropout falls back to the upstream loop with a warning.
"""


import torch
from torch import nn

from ..kernels.layout import ExpertLayout
from .anatomy import LayerAnatomy
from .common import activation_name, hit_experts, module_layout, rebind_forward, routed, run_kernels, warn_once
from .registry import ModelPatch, register_model_patch

_DROPOUT_MESSAGE = (
    "moe_token_dropout / activation_dropout > 0 in training is not fused by the "
    "hetermoe kernels, so this layer runs transformers' own experts loop. Set config.moe_token_dropout = 0 "
    "and config.activation_dropout = 0 before loading to train on the kernels."
)


def layout(experts: nn.Module) -> ExpertLayout:
    return ExpertLayout(has_gate=False, has_bias=True, activation=activation_name(experts["expert_0"].act))


def routed_experts(
    experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``hidden [T, H]``, ``top_k_index [T, 2]`` (ids 0 and 1), ``top_k_weights [T, 2]`` -> ``[T, H]``."""
    # Experts 0 and 1 are the only ones upstream's dispatch reaches; one that gets no weight keeps grad None.
    hit, index = hit_experts(top_k_index, top_k_weights, 2)
    members = [experts[f"expert_{e}"] for e in hit]
    w1 = torch.stack([e.fc1.weight for e in members])  # [2, I, H]
    b1 = torch.stack([e.fc1.bias for e in members])
    w2 = torch.stack([e.fc2.weight for e in members])  # [2, H, I]
    b2 = torch.stack([e.fc2.bias for e in members])
    return run_kernels(experts, module_layout(experts, layout), hidden, index, top_k_weights, w1, w2, b1, b2)


def _forward(self, hidden_states: torch.Tensor, router_mask: torch.Tensor, router_probs: torch.Tensor):
    if self.training and (self.moe_token_dropout > 0 or self["expert_0"].dropout.p > 0):
        warn_once(self, _DROPOUT_MESSAGE)
        return type(self).forward(self, hidden_states, router_mask, router_probs)
    top_1 = router_mask.to(router_probs.dtype)  # [T, E] 0/1: upstream treats these values as expert ids
    top_k_weights = torch.stack([(router_probs * (1 - top_1)).sum(-1), (router_probs * top_1).sum(-1)], dim=-1)
    if self.moe_token_dropout > 0:  # eval: upstream scales each expert output by 1 - p
        top_k_weights = top_k_weights * (1 - self.moe_token_dropout)
    top_k_index = torch.tensor([0, 1], device=hidden_states.device).expand(hidden_states.shape[0], 2)
    return routed(self, hidden_states, top_k_index, top_k_weights, routed_experts)




def patch_instance(experts: nn.Module, layout: ExpertLayout, backend: str):
    return rebind_forward(experts, _forward)


def probe(experts: nn.Module, gen: torch.Generator) -> tuple:
    """``NllbMoeExperts.forward``'s inputs as the sparse MLP passes them: hidden states ``[8, H]``, a 0/1 top-1 mask
    ``[8, E]`` (read upstream as expert ids) and the router's probabilities ``[8, E]``."""
    num = experts.num_experts
    mask = torch.nn.functional.one_hot(torch.randint(0, num, (8,), generator=gen), num)
    hidden = torch.randn(8, experts["expert_0"].fc1.weight.shape[1], generator=gen)
    return hidden, mask, torch.softmax(torch.randn(8, num, generator=gen), dim=-1)


def _ff_dropout(layer: nn.Module, routed_out: torch.Tensor) -> torch.Tensor:
    return layer.ff_dropout(routed_out)


def tiny_config():
    from transformers import NllbMoeConfig

    return NllbMoeConfig(
        vocab_size=128, max_position_embeddings=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=24,
        decoder_ffn_dim=24, encoder_attention_heads=4, decoder_attention_heads=4, d_model=32, num_experts=4,
        expert_capacity=6, encoder_sparse_step=2, decoder_sparse_step=2, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, moe_token_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        router_z_loss_coef=0.01, router_aux_loss_coef=0.02,
    )


PATCH = register_model_patch(
    ModelPatch(
        family="NLLB-MoE",
        model_types=("nllb-moe",),
        modeling_module="transformers.models.nllb_moe.modeling_nllb_moe",
        experts_class="NllbMoeExperts",
        tiny_config=tiny_config,
        dispatch="instance_patch",
        layout=layout,
        patch_instance=patch_instance,
        probe=probe,
        anatomy=LayerAnatomy(
            layer_classes=("NllbMoeEncoderLayer", "NllbMoeDecoderLayer"), expert_fn=routed_experts, post=_ff_dropout,
            notes="encoder and decoder layers; needs moe_token_dropout == activation_dropout == 0 in training",
        ),
        task="seq2seq_lm",
        notes="top-2 with expert capacity; `fc1`/`fc2` (+ biases) per expert, ReLU",
        quirks=(
            "NLLB-MoE's experts dispatch only ever runs experts 0 and 1 (it one-hot encodes the 0/1 top-1 mask): "
            "reproduced, experts 2..E-1 get no gradient.",
            "moe_token_dropout / activation_dropout > 0 in training: not fused, falls back to the upstream loop "
            "with a warning (eval-mode token-dropout scaling is exact).",
        ),
    )
)
