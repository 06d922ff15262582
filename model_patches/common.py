"""Reading a transformers v5 experts module: its weight layout flags and its activation."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedLayoutError
from ..kernels.layout import ExpertLayout


def activation_name(act_fn: nn.Module) -> str:
    """Map a transformers/torch activation module to a kernel activation name."""
    from transformers import activations as A

    name = type(act_fn).__name__
    if isinstance(act_fn, (A.SiLUActivation, nn.SiLU)):
        return "silu"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    if isinstance(act_fn, A.GELUActivation) and type(act_fn) is A.GELUActivation:
        return "gelu"  # nn.functional.gelu or its python erf twin: the same function
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):
        return "gelu_tanh"
    if isinstance(act_fn, nn.ReLU):
        return "relu"
    if name == "ReLUSquaredActivation":
        return "relu2"
    raise UnsupportedLayoutError(
        f"activation {name} is not covered by the hetermoe kernels; supported: SiLU, GELU (erf or tanh), ReLU, "
        "ReLU^2. Use experts_implementation='grouped_mm' for this model or open an issue."
    )


def default_layout(experts: nn.Module) -> ExpertLayout:
    """Layout of an experts class decorated with transformers' ``@use_experts_implementation``."""
    from transformers.integrations.moe import _default_apply_gate

    cls = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedLayoutError(f"{cls} applies a post-expert norm, which the hetermoe kernels do not fuse yet")
    if getattr(experts, "_is_expert_parallel", False):
        raise UnsupportedLayoutError(
            f"{cls} is sharded by transformers' expert parallelism; hetermoe distributes experts itself "
            "(hetermoe.distribute), so load the model without tp_plan/expert parallelism"
        )
    has_gate = getattr(experts, "has_gate", True)
    if has_gate and getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        raise UnsupportedLayoutError(
            f"{cls} overrides _apply_gate; its model patch must declare the gated activation explicitly"
        )
    return ExpertLayout(
        has_gate=has_gate,
        is_transposed=getattr(experts, "is_transposed", False),
        is_concatenated=getattr(experts, "is_concatenated", True),
        has_bias=getattr(experts, "has_bias", False),
        activation=activation_name(experts.act_fn),
    )
