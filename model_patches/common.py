"""Reading a transformers v5 experts module (weight layout flags, activation) and the helpers of instance patches."""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnsupportedLayoutError
from ..kernels.layout import ExpertLayout


def activation_name(act_fn: nn.Module | Callable) -> str:
    """Map a transformers/torch activation module to a kernel activation name."""
    from transformers import activations as A

    name = getattr(act_fn, "__name__", None) or type(act_fn).__name__
    # A plain function stored as act_fn (LFM2-MoE's F.silu): the same math as its module.
    for fn, kernel_name in ((nn.functional.silu, "silu"), (nn.functional.gelu, "gelu"), (nn.functional.relu, "relu")):
        if act_fn is fn:
            return kernel_name
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


def check_experts_module(experts: nn.Module) -> None:
    """Refuse what no experts-interface layout covers: transformers' expert-parallel shards. (A post-expert norm,
    ``has_post_expert_norm``, is applied by ``hetermoe_experts_forward`` around the kernels.)"""
    cls = type(experts).__name__
    if getattr(experts, "_is_expert_parallel", False):
        raise UnsupportedLayoutError(
            f"{cls} is sharded by transformers' expert parallelism; hetermoe distributes experts itself "
            "(hetermoe.distribute), so load the model without tp_plan/expert parallelism"
        )


def default_layout(experts: nn.Module) -> ExpertLayout:
    """Layout of an experts class decorated with transformers' ``@use_experts_implementation``."""
    from transformers.integrations.moe import _default_apply_gate

    cls = type(experts).__name__
    check_experts_module(experts)
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


# ----------------------------------------------------------------------------- instance patches

# Set (only) by anatomy.attention_half on an instance-patched module: replaces its routed-experts computation.
ROUTED_HOOK_ATTR = "_hetermoe_routed_hook"


def warn_once(module: nn.Module, message: str) -> None:
    """Warn about ``module`` once per instance (a layer's forward runs every step)."""
    import warnings

    if not module.__dict__.get("_hetermoe_warned"):
        module.__dict__["_hetermoe_warned"] = True
        warnings.warn(f"{type(module).__name__}: {message}", stacklevel=3)


class ModuleRef:
    """A weak reference to a module that deep-copies and pickles as a reference to the module's copy.

    What a module keeps about itself in its own attributes (its patched forward, the undo of a patch) goes through
    one of these: a strong reference there would be a reference cycle, and ``del model`` would then leave the model's
    memory (its GPU weights) allocated until Python's cyclic garbage collector happens to run."""

    def __init__(self, module: nn.Module):
        self._ref = weakref.ref(module)

    def __call__(self) -> nn.Module:
        module = self._ref()
        if module is None:
            raise ReferenceError("this hf-hetermoe patch belongs to a module that no longer exists")
        return module

    def __deepcopy__(self, memo: dict) -> ModuleRef:
        return ModuleRef(copy.deepcopy(self(), memo))  # the copy of the module (already in memo mid-copy)

    def __reduce__(self):
        return ModuleRef, (self(),)


class InstanceMethod:
    """``fn`` bound to one module as an instance attribute (``module.forward = InstanceMethod(module, fn)``).

    Unlike a bound closure it goes with the module through ``copy.deepcopy`` (rebound to the copy: a TRL reference
    model, an EMA copy) and through pickling (``torch.save(model)``) when ``fn`` is a module-level function or a
    ``functools.partial`` of one. ``inspect.signature`` shows the class attribute's (through ``__wrapped__``), and
    ``__func__`` lets wrappers such as accelerate's mixed-precision forward re-bind it as they do a method. It holds
    its module weakly (``ModuleRef``): the module owns it, and a deleted model is freed at once.
    """

    def __init__(self, module: nn.Module, fn: Callable[..., object], name: str = "forward"):
        self._module = ModuleRef(module)
        self.name = name
        original = getattr(type(module), name)
        if inspect.isfunction(original):  # wrappers of __func__ then keep the class method's signature too
            fn = functools.update_wrapper(functools.partial(fn), original)
        self.__func__ = fn

    @property
    def __self__(self) -> nn.Module:
        return self._module()

    @property
    def __wrapped__(self):
        return getattr(type(self.__self__), self.name).__get__(self.__self__)

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)


def restore_attribute(module: nn.Module, name: str, previous: object | None) -> None:
    """Undo an instance attribute set over ``previous`` (``None``: there was none)."""
    if previous is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = previous


def rebind_forward(module: nn.Module, forward: Callable[..., object]) -> Callable[[], None]:
    """Bind ``forward(module, ...)`` as this one instance's forward (the class is untouched). Returns the undo
    function (picklable, as the bound forward is when ``forward`` is a module-level function or a partial)."""
    previous = module.__dict__.get("forward")
    module.forward = InstanceMethod(module, forward)
    return functools.partial(restore_attribute, module, "forward", previous)


def routed(
    owner: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    compute: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The routed experts of an instance-patched ``owner``: ``compute(owner, hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, unless the layer anatomy has hooked it (then the hook answers)."""
    hook = owner.__dict__.get(ROUTED_HOOK_ATTR)
    if hook is not None:
        return hook(hidden, top_k_index, top_k_weights)
    return compute(owner, hidden, top_k_index, top_k_weights)


def module_layout(module: nn.Module, read: Callable[[nn.Module], ExpertLayout]) -> ExpertLayout:
    """The layout ``prepare`` recorded on ``module``, else ``read(module)`` (anatomy on an unprepared model)."""
    from ..experts import LAYOUT_ATTR

    layout = getattr(module, LAYOUT_ATTR, None)
    return layout if layout is not None else read(module)


def run_kernels(
    module: nn.Module,
    layout: ExpertLayout,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``moe_experts`` on ``hidden [T, H]`` with the backend ``prepare`` chose for ``module`` -> ``[T, H]``."""
    from ..experts import BACKEND_ATTR, RECOMPUTE_ATTR
    from ..kernels import moe_experts

    out = moe_experts(
        hidden,
        top_k_index,
        top_k_weights,
        w1,
        w2,
        b1,
        b2,
        layout=layout,
        backend=getattr(module, BACKEND_ATTR, "auto"),
        recompute=getattr(module, RECOMPUTE_ATTR, False),
    )
    return out.to(hidden.dtype)


def hit_experts(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> tuple[list[int], torch.Tensor]:
    """Experts that some (token, slot) with a nonzero weight selects, and ``top_k_index`` renumbered over them.

    For families whose experts are separate modules (Switch, NLLB-MoE), upstream runs only those experts, so
    the others keep ``grad = None``; stacking just these reproduces that. Slots of experts that are not hit
    (weight 0: dropped tokens) map to position 0. Reading the hit list is one host sync per layer, as in
    upstream's own ``expert_hit`` loop.
    """
    selected = torch.zeros(num_experts, dtype=torch.bool, device=top_k_index.device)
    selected[top_k_index[top_k_weights != 0]] = True
    hit = selected.nonzero().flatten()
    lookup = torch.zeros(num_experts, dtype=top_k_index.dtype, device=top_k_index.device)
    lookup[hit] = torch.arange(hit.numel(), dtype=top_k_index.dtype, device=top_k_index.device)
    return hit.tolist(), lookup[top_k_index]
