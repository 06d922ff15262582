"""The ``"hetermoe"`` experts implementation that transformers dispatches to.

transformers v5 routes every decorated experts module's forward through
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation](self, hidden_states, top_k_index, top_k_weights)``.
Registering here (on ``import hf_hetermoe``) also makes ``from_pretrained(..., experts_implementation="hetermoe")``
work without calling ``prepare``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .kernels import moe_experts
from .kernels.layout import ExpertLayout, w1_logical

IMPLEMENTATION_NAME = "hetermoe"
LAYOUT_ATTR = "_hetermoe_layout"
BACKEND_ATTR = "_hetermoe_backend"
RECOMPUTE_ATTR = "_hetermoe_recompute"  # HeterMoEConfig.recompute_gate_up, set by prepare


def experts_layout(experts: nn.Module) -> ExpertLayout:
    """The module's layout: set by ``prepare``; otherwise (``experts_implementation="hetermoe"`` chosen by name)
    read by the family's model patch, or generically for an unregistered class, and cached on the module."""
    layout = getattr(experts, LAYOUT_ATTR, None)
    if layout is None:
        from .model_patches import MODEL_PATCHES, default_layout

        cls = type(experts)
        key = (cls.__module__, cls.__name__)
        patch = next((p for p in MODEL_PATCHES.values() if (p.modeling_module, p.experts_class) == key), None)
        layout = (patch.layout if patch is not None else default_layout)(experts)
        setattr(experts, LAYOUT_ATTR, layout)
    return layout


def hetermoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``hidden_states [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, H]`` in the hidden dtype."""
    return _experts_forward(
        self, hidden_states, top_k_index, top_k_weights, experts_layout(self), getattr(self, BACKEND_ATTR, "auto")
    )


def _experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    layout: ExpertLayout, backend: str,
) -> torch.Tensor:
    w1 = self.gate_up_proj if layout.has_gate else self.up_proj
    b1 = b2 = None
    if layout.has_bias:
        b1 = self.gate_up_proj_bias if layout.has_gate else self.up_proj_bias
        b2 = self.down_proj_bias
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    index = top_k_index.reshape(-1, top_k_index.shape[-1])
    weights = top_k_weights.reshape(-1, top_k_weights.shape[-1])
    post_norm = getattr(self, "has_post_expert_norm", False)
    if post_norm:
        # The norm applies to each expert's own output, before the routing weight and the sum over the k experts:
        # run every (token, expert) pair as a token routed to one expert with weight 1, then norm, weight and sum
        # here (in fp32, as transformers' grouped_mm path). The matmuls are the same; the cost is a [T * k, H] copy
        # of the inputs and of the outputs.
        T, k = index.shape
        x = x.unsqueeze(1).expand(T, k, x.shape[-1]).reshape(T * k, x.shape[-1])
        index = index.reshape(T * k, 1)
        routed, weights = weights, torch.ones(T * k, 1, dtype=weights.dtype, device=weights.device)
    out = moe_experts(
        x, index, weights, w1, self.down_proj, b1, b2,
        layout=layout,
        backend=backend,
        recompute=getattr(self, RECOMPUTE_ATTR, False),
    )
    if post_norm:
        out = self.post_expert_norm(out).view(T, k, -1).float().mul(routed.unsqueeze(-1).float()).sum(1)
    return out.to(hidden_states.dtype).view(shape)


def check_against_eager(experts: nn.Module, layout: ExpertLayout) -> None:
    """Refuse an experts module whose class computes something else than the kernels would with ``layout``: its own
    eager forward (the one ``@use_experts_implementation`` wraps) and the kernels' reference run on eight random
    tokens, two experts each, with the module's weights. Catches what a layout cannot say (an unknown activation or
    norm, a transformers version that changed the class). Skipped where there is nothing to compare: weights not
    materialised here, or an eager forward that needs more than ``(hidden_states, top_k_index, top_k_weights)``.
    ZeRO-3 partitioned weights are gathered for the check (a collective: every rank prepares the same model).

    Raises:
        UnsupportedLayoutError: the outputs differ beyond the dtype's round-off.
    """
    eager = getattr(type(experts).forward, "__wrapped__", None)
    if eager is None:
        return
    with full_parameters(list(experts.parameters())) as full:
        if full:
            _check_against_eager(experts, layout, eager)


def _check_against_eager(experts: nn.Module, layout: ExpertLayout, eager) -> None:
    from .errors import UnsupportedLayoutError

    w1 = experts.gate_up_proj if layout.has_gate else experts.up_proj
    num_experts, hidden = w1.shape[0], w1_logical(w1, layout).shape[2]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, hidden, generator=gen).to(w1.device, w1.dtype)
    k = min(2, num_experts)  # distinct experts per token, and a sum over them
    index = torch.rand(8, num_experts, generator=gen).topk(k, dim=-1).indices.to(w1.device)
    weights = torch.rand(8, k, generator=gen).add_(0.5).to(w1.device)  # not 1: a norm after the weight shows
    with _evaluating(experts), torch.no_grad():
        try:
            want = eager(experts, x, index, weights)
        except Exception:  # noqa: BLE001 -- its forward takes other inputs: nothing to compare
            return
        got = _experts_forward(experts, x, index, weights, layout, "reference")  # sets nothing on the module
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return
    differs = _difference(got, want, w1.dtype)
    if differs:
        raise UnsupportedLayoutError(
            f"{type(experts).__name__}: on random tokens hetermoe's experts differ from the module's own forward "
            f"{differs} with {layout}: this class (or this transformers version) computes something the kernels do "
            "not. Use experts_implementation='grouped_mm' for this model, or open an issue with the model type."
        )


def check_instance_patch(module: nn.Module, patch, layout: ExpertLayout) -> None:
    """``check_against_eager`` for an instance-patched family: the class's own forward and the rebound one (on the
    kernels' reference) run on the family's ``probe`` inputs; the module is left as it was.

    Raises:
        UnsupportedLayoutError: the outputs differ beyond the dtype's round-off.
    """
    params = list(module.parameters())
    if patch.probe is None or not params:
        return
    with full_parameters(params) as full:
        if full:
            _check_instance_patch(module, patch, layout, params[0])


def _check_instance_patch(module: nn.Module, patch, layout: ExpertLayout, ref: torch.Tensor) -> None:
    from .errors import UnsupportedLayoutError

    args = tuple(a.to(ref.device, ref.dtype) if a.is_floating_point() else a.to(ref.device)
                 for a in patch.probe(module, torch.Generator().manual_seed(0)))
    # Eval mode: no dropout (the rebound forward hands training-mode expert dropout back to the class's).
    with _evaluating(module), torch.no_grad():
        undo = patch.patch_instance(module, layout, "reference")
        module.__dict__.update({LAYOUT_ATTR: layout, BACKEND_ATTR: "reference"})
        try:
            got = module.forward(*args)
        finally:
            undo()
            for attr in (LAYOUT_ATTR, BACKEND_ATTR):
                module.__dict__.pop(attr, None)
        want = type(module).forward(module, *args)
    want, got = (out[0] if isinstance(out, tuple) else out for out in (want, got))
    differs = _difference(got, want, ref.dtype)
    if differs:
        raise UnsupportedLayoutError(
            f"{type(module).__name__}: on random inputs hetermoe's forward differs from the module's own {differs}: "
            f"this transformers version changed {patch.family}'s experts. Use experts_implementation='eager' for "
            "this model, or open an issue with the model type."
        )


@contextlib.contextmanager
def full_parameters(params: list[nn.Parameter]):
    """Yields whether ``params`` hold their full values in this process for the block: False for meta tensors and
    sharded ones (a DTensor of FSDP2 or tensor parallelism). DeepSpeed ZeRO-3's partitioned parameters
    (``from_pretrained`` under ``zero.Init``) are gathered for the block, on every rank (a collective), and
    partitioned again after it."""
    if any(p.is_meta or type(p.data) is not torch.Tensor for p in params):
        yield False
        return
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield True
        return
    import deepspeed  # only reached for parameters DeepSpeed made

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield True


@contextlib.contextmanager
def _evaluating(module: nn.Module):
    """``module`` and its submodules in eval mode, each back in its own mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _difference(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None within ``dtype``'s round-off (fp32 1e-4, else 5e-2 of the largest expected value), else by how much."""
    scale = want.float().abs().max().item()
    worst = (got.float() - want.float()).abs().max().item()
    if worst <= (1e-4 if dtype == torch.float32 else 5e-2) * max(scale, 1e-6):
        return None
    return f"by {worst:.3g} (its outputs reach {scale:.3g})"


def register(name: str = IMPLEMENTATION_NAME) -> None:
    """Add the hetermoe experts function to transformers' ``ALL_EXPERTS_FUNCTIONS`` under ``name``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(name) is not hetermoe_experts_forward:
        ALL_EXPERTS_FUNCTIONS[name] = hetermoe_experts_forward
