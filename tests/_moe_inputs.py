"""Random experts-layer inputs for every weight layout (shared by the kernel tests)."""

from __future__ import annotations

import torch

from hf_hetermoe.kernels import ExpertLayout

LAYOUTS = {
    "mixtral": ExpertLayout(),
    "gpt_oss": ExpertLayout(is_transposed=True, is_concatenated=False, has_bias=True, activation="swiglu_oai"),
    "no_gate_relu2_bias": ExpertLayout(has_gate=False, has_bias=True, activation="relu2"),
    "transposed_gelu_tanh": ExpertLayout(is_transposed=True, activation="gelu_tanh"),
    "interleaved_gelu": ExpertLayout(is_concatenated=False, activation="gelu"),
    # DeepSeek-V4 / HY-V4; the limit is low enough that both clamps bite on these random inputs.
    "silu_clamped": ExpertLayout(activation="silu_clamped", limit=0.5),
    # Step-3.7: the gate clamped after its activation.
    "silu_clamped_after": ExpertLayout(activation="silu_clamped_after", limit=0.3),
    # Inkling2: soft caps (gate 0.8, up 0.5) that bend these random inputs' pre-activations.
    "silu_softcapped": ExpertLayout(activation="silu_softcapped", alpha=0.8, limit=0.5),
}


def make_inputs(T, H, I, E, k, layout: ExpertLayout, dtype, device, routing="random", limit=None):
    """x [T,H], top_k_index [T,k], top_k_weights [T,k] fp32, and weights as transformers stores them."""
    n1 = 2 * I if layout.has_gate else I
    x = torch.randn(T, H, device=device).to(dtype)
    if routing == "random":
        index = torch.rand(T, E, device=device).topk(k, dim=-1).indices
    elif routing == "one_expert":  # every token to expert E // 2 (k must be 1)
        index = torch.full((T, k), E // 2, device=device, dtype=torch.long)
    else:
        raise ValueError(routing)
    weights = torch.softmax(torch.randn(T, k, device=device), dim=-1)
    w1 = torch.randn(E, n1, H, device=device) / H**0.5
    w2 = torch.randn(E, H, I, device=device) / I**0.5
    if layout.is_transposed:
        w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    b1 = b2 = None
    if layout.has_bias:
        b1 = 0.1 * torch.randn(E, n1, device=device)
        b2 = 0.1 * torch.randn(E, H, device=device)
    return x, index, weights, *(None if t is None else t.to(dtype) for t in (w1, w2, b1, b2))
