"""How one experts module stores its weights, and which gated activation it applies.

Pure data: the kernels read weights through strided *views* built here, so every layout that
transformers uses (concatenated or interleaved gate/up, transposed or not, with or without biases,
with or without a gate) runs through the same kernels without copying or re-laying-out a parameter.

Logical views used everywhere in ``hf_hetermoe.kernels``:

- ``w1`` as ``[E, N1, H]`` (``out x in``), ``N1 = 2I`` when gated else ``I``;
- ``w2`` as ``[E, H, I]`` (``out x in``);
- the gate and up halves of anything indexed by ``N1`` (weights, biases, activations, gradients) are
  two strided views with identical strides (``split_gate_up``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Activation codes shared by the Triton kernels and the reference. Gated layouts compute
# act(gate) * up, except "swiglu_oai" (GPT-OSS) and "silu_softcapped" (Inkling2), which combine gate and up themselves.
_PLAIN = {
    "silu": 0,
    "gelu": 1,
    "gelu_tanh": 2,
    "relu": 3,
    "relu2": 4,
}
# "<act>_clamped" (DeepSeek-V4, HY-V4): act(min(gate, limit)) * clamp(up, -limit, limit); its code is the plain
# activation's plus CLAMPED. "<act>_clamped_after" (Step-3.7): min(act(gate), limit) * clamp(up, -limit, limit), the
# plain code plus CLAMPED_AFTER.
CLAMPED = 8
CLAMPED_AFTER = 16
_SUFFIXES = {"_clamped": CLAMPED, "_clamped_after": CLAMPED_AFTER}
ACTIVATIONS = {
    **_PLAIN,
    "swiglu_oai": 5,
    # c_g * tanh(gate / c_g) * sigmoid(gate) * c_u * tanh(up / c_u): SiLU whose linear factor and up are soft-capped
    # (the sigmoid sees the raw gate); c_g is the layout's ``alpha``, c_u its ``limit``.
    "silu_softcapped": 6,
    **{f"{name}{suffix}": code + offset for suffix, offset in _SUFFIXES.items() for name, code in _PLAIN.items()},
}
GATED_ONLY = {name for name in ACTIVATIONS if name not in _PLAIN}


@dataclass(frozen=True)
class ExpertLayout:
    """Weight layout and activation of one experts module.

    Attributes:
        has_gate: gated FFN (``gate_up_proj``) rather than a plain one (``up_proj``).
        is_transposed: weights stored ``in x out`` (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``).
        is_concatenated: gate rows first then up rows; False means interleaved ``[g0, u0, g1, u1, ...]``.
        has_bias: ``gate_up_proj_bias [E, N1]`` and ``down_proj_bias [E, H]`` exist.
        activation: one of ``ACTIVATIONS``.
        alpha: the sigmoid's scale of ``swiglu_oai``; the gate's soft cap of ``silu_softcapped`` (ignored otherwise).
        limit: the clamp of ``swiglu_oai`` and of the ``*_clamped`` activations; the up's soft cap of
            ``silu_softcapped`` (ignored otherwise).
    """

    has_gate: bool = True
    is_transposed: bool = False
    is_concatenated: bool = True
    has_bias: bool = False
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.activation in GATED_ONLY and not self.has_gate:
            raise ValueError(f"activation={self.activation!r} needs a gated layout (has_gate=True)")
        if self.activation == "silu_softcapped" and not (self.alpha > 0 and self.limit > 0):
            raise ValueError(
                f"silu_softcapped needs positive soft caps: alpha (the gate's) = {self.alpha}, limit (the up's) = "
                f"{self.limit}"
            )

    @property
    def act_code(self) -> int:
        return ACTIVATIONS[self.activation]

    @property
    def clamp(self) -> str | None:
        """``"before"`` the activation (``*_clamped``), ``"after"`` it (``*_clamped_after``), or None."""
        if self.activation.endswith("_clamped_after"):
            return "after"
        return "before" if self.activation.endswith("_clamped") else None

    @property
    def plain_activation(self) -> str:
        """The activation applied to the gate: ``"silu"`` for ``"silu_clamped"`` and ``"silu_clamped_after"``."""
        return self.activation.removesuffix("_after").removesuffix("_clamped")


def w1_logical(w1: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """``gate_up_proj`` (or ``up_proj``) as a ``[E, N1, H]`` view."""
    return w1.transpose(1, 2) if layout.is_transposed else w1


def w2_logical(w2: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """``down_proj`` as a ``[E, H, I]`` view."""
    return w2.transpose(1, 2) if layout.is_transposed else w2


def split_gate_up(t: torch.Tensor, dim: int, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves of ``t`` along ``dim`` (size ``2I``), as views with identical strides."""
    n = t.shape[dim]
    if n % 2:
        raise ValueError(f"gate/up dimension {dim} of shape {tuple(t.shape)} has odd size {n}")
    if layout.is_concatenated:
        return t.narrow(dim, 0, n // 2), t.narrow(dim, n // 2, n // 2)
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, 2)
    gate = t[tuple(index)]
    index[dim] = slice(1, None, 2)
    return gate, t[tuple(index)]
