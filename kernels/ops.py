"""The experts operator: routing, dispatch to Triton or the reference, autograd, torch.compile.

``moe_experts`` is the one entry point. Its forward and backward are two ``torch.library`` custom ops
(``hetermoe::experts_forward`` / ``hetermoe::experts_backward``) with fake implementations, so
``torch.compile(fullgraph=True)`` traces a model that uses them; ``MoEExpertsFunction`` ties them together
for autograd. Routing metadata is built with plain device ops outside the custom ops, so the compiler
sees (and may fuse) it too.
"""

from __future__ import annotations

import importlib

import torch

from .. import env
from ..errors import DeviceMismatchError
from .layout import ExpertLayout, w1_logical
from .routing import _INTERPRET, _TRITON_INSTALLED, Routing, block_m_for, build_routing

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of hidden states, expert weights and routing weights

BACKENDS = ("auto", "triton", "reference")


# Read once at import (as routing.py reads whether triton is installed and TRITON_INTERPRET): torch.compile
# cannot trace environment look-ups inside a compiled region,
# and TRITON_INTERPRET only works when set before the jit decorators run anyway.
_BACKEND_OVERRIDE = env.backend_override()


def triton_available() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(
    requested: str, device: torch.device, *, interpret: bool | None = None, override: str | None = None
) -> str:
    """'triton' or 'reference' for tensors on ``device``.

    ``HETERMOE_BACKEND`` (read at import, or ``override``) wins over ``requested``; ``interpret`` defaults to
    ``TRITON_INTERPRET`` as it was at import.
    """
    requested = override or _BACKEND_OVERRIDE or requested
    interpret = _INTERPRET if interpret is None else interpret
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is not one of {BACKENDS} (check HETERMOE_BACKEND)")
    if requested == "reference":
        return "reference"
    usable = _TRITON_INSTALLED and (device.type == "cuda" or interpret)
    if requested == "auto":
        return "triton" if usable and device.type == "cuda" else "reference"
    if not usable:
        raise RuntimeError(
            f"backend='triton' needs the triton package and CUDA tensors (got {device.type} tensors, "
            f"triton {'installed' if _TRITON_INSTALLED else 'missing'}); on CPU set TRITON_INTERPRET=1 before "
            "importing hf_hetermoe, or use backend='auto'"
        )
    return "triton"


def _impl(backend: str):
    if backend == "triton":
        return importlib.import_module(".triton_ops", __package__)
    return importlib.import_module(".reference", __package__)


def _block_m(backend: str, device: torch.device) -> int:
    # No import here: this runs inside torch.compile'd regions, which cannot trace importlib.
    return block_m_for(device) if backend == "triton" else 16


def _layout(has_gate, is_transposed, is_concatenated, activation, alpha, limit) -> ExpertLayout:
    return ExpertLayout(has_gate, is_transposed, is_concatenated, False, activation, alpha, limit)


def _layout_flags(layout: ExpertLayout) -> tuple:
    """The custom ops' layout arguments (``_layout``'s parameters, in order)."""
    return (
        layout.has_gate, layout.is_transposed, layout.is_concatenated, layout.activation, layout.alpha, layout.limit,
    )


@torch.library.custom_op("hetermoe::experts_forward", mutates_args=())
def experts_forward_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k_weights: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    expert: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    has_gate: bool,
    is_transposed: bool,
    is_concatenated: bool,
    activation: str,
    alpha: float,
    limit: float,
    block_m: int,
    backend: str,
    keep_gu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    routing = Routing(order, inverse, expert, offsets, tile_expert, tile_start)
    layout = _layout(has_gate, is_transposed, is_concatenated, activation, alpha, limit)
    return _forward(x, w1, w2, b1, b2, top_k_weights, routing, layout, block_m, backend, keep_gu)


def _forward(
    x, w1, w2, b1, b2, top_k_weights, routing: Routing, layout: ExpertLayout, block_m: int, backend: str, keep_gu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, gu)``; without ``keep_gu`` (no backward will run) ``gu`` is an empty ``[0, N1]`` tensor and the Triton
    backend never writes the pre-activations."""
    if backend == "triton":
        out, gu = _impl(backend).experts_forward(
            x, w1, w2, b1, b2, top_k_weights, routing, layout, block_m, keep_gu=keep_gu
        )
    else:
        out, gu = _impl(backend).experts_forward(x, w1, w2, b1, b2, top_k_weights, routing, layout)
    if not keep_gu:
        gu = x.new_empty(0, w1_logical(w1, layout).shape[1])
    return out, gu


@experts_forward_op.register_fake
def _(
    x,
    w1,
    w2,
    b1,
    b2,
    top_k_weights,
    order,
    inverse,
    expert,
    offsets,
    tile_expert,
    tile_start,
    has_gate,
    is_transposed,
    is_concatenated,
    activation,
    alpha,
    limit,
    block_m,
    backend,
    keep_gu,
):
    n1 = w1.shape[2] if is_transposed else w1.shape[1]
    return x.new_empty(x.shape), x.new_empty(order.shape[0] if keep_gu else 0, n1)


# The Triton backward overwrites the saved pre-activations ``gu`` with their gradient (declared, so that
# torch.compile's functionalisation and autograd's version counter know): one [S, N1] buffer fewer at the peak.
@torch.library.custom_op("hetermoe::experts_backward", mutates_args=("gu",))
def experts_backward_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k_weights: torch.Tensor,
    gu: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    expert: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    has_gate: bool,
    is_transposed: bool,
    is_concatenated: bool,
    activation: str,
    alpha: float,
    limit: float,
    block_m: int,
    backend: str,
    weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    routing = Routing(order, inverse, expert, offsets, tile_expert, tile_start)
    layout = _layout(has_gate, is_transposed, is_concatenated, activation, alpha, limit)
    grads = _backward(dout, x, w1, w2, b1, b2, top_k_weights, gu, routing, layout, block_m, backend, weight_grads)
    # Custom ops cannot return None (nor one tensor twice): absent gradients travel as distinct empty tensors.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _backward(
    dout, x, w1, w2, b1, b2, top_k_weights, gu, routing, layout, block_m, backend, weight_grads, release_gu=False
):
    """``(dx, d top_k_weights, dw1, dw2, db1, db2)``; without ``weight_grads`` (frozen experts) the last four are
    ``None`` and never computed: half the backward's matmuls."""
    impl = _impl(backend)
    if gu.shape[0] != routing.order.shape[0]:  # the forward saved none (recompute=True): the gate/up matmul again
        top_k = top_k_weights.shape[-1]
        if backend == "triton":
            num_pairs = routing.order.shape[0]
            rows = impl.recompute_chunk_rows(num_pairs, w1, w2, layout, env.recompute_chunks())
            if rows < num_pairs:  # in chunks: no [S, N1] tensor at all
                return impl.experts_backward_recompute(
                    dout, x, w1, w2, b1, b2, top_k_weights, routing, layout, block_m, rows, weight_grads
                )
        block = (block_m,) if backend == "triton" else ()
        gu = impl.pre_activations(x, w1, b1, routing, top_k, layout, *block)
        release_gu = True  # a buffer of our own, read by nothing else
    extra = (block_m, release_gu) if backend == "triton" else ()
    return impl.experts_backward(
        dout, x, w1, w2, b1, b2, top_k_weights, routing, gu, layout, *extra, weight_grads=weight_grads
    )


@experts_backward_op.register_fake
def _(dout, x, w1, w2, b1, b2, top_k_weights, *args):
    weight_grads = args[-1]

    def like(t):
        return torch.empty_like(t) if t is not None and weight_grads else x.new_empty(0)

    return torch.empty_like(x), torch.empty_like(top_k_weights), like(w1), like(w2), like(b1), like(b2)


class MoEExpertsFunction(torch.autograd.Function):
    """Autograd over the two custom ops. Saves ``x``, the weights, the routing and the pre-activations
    ``gu [S, N1]``; ``h`` and every ``[S, H]`` intermediate are recomputed or transient. With ``recompute`` it saves
    no ``gu`` (an empty tensor stands in) and the backward runs the gate/up matmul again.

    The backward reuses ``gu``'s storage for its gradient, so one graph can be backpropagated once: a second
    backward (``retain_graph=True``) raises instead of returning wrong gradients."""

    @staticmethod
    def forward(
        ctx, x, w1, w2, b1, b2, top_k_weights, routing: Routing, layout: ExpertLayout, block_m, backend, recompute
    ):
        flags = (*_layout_flags(layout), block_m, backend)
        keep_gu = not recompute
        if torch.compiler.is_compiling():
            out, gu = experts_forward_op(x, w1, w2, b1, b2, top_k_weights, *routing, *flags, keep_gu)
        else:  # eager: the same function without the custom op's dispatch (~20 us of host time per call)
            out, gu = _forward(x, w1, w2, b1, b2, top_k_weights, routing, layout, block_m, backend, keep_gu)
        ctx.save_for_backward(x, w1, w2, b1, b2, top_k_weights, gu, *routing)
        ctx.flags = flags
        ctx.mark_non_differentiable(gu)
        # gu never receives a gradient: without this autograd would allocate (and zero) an [S, N1] tensor for it.
        ctx.set_materialize_grads(False)
        return out, gu

    @staticmethod
    def backward(ctx, dout, _dgu):
        if dout is None:  # no gradient reached the output (gu never has one)
            return (None,) * 11
        try:
            x, w1, w2, b1, b2, top_k_weights, gu, *routing = ctx.saved_tensors
        except RuntimeError as err:
            if "inplace" not in str(err):
                raise
            raise RuntimeError(
                "hetermoe experts: a saved tensor was modified; most likely this graph was already backpropagated "
                "once (the first backward reuses the saved pre-activations' memory for their gradient): run the "
                "forward again instead of using retain_graph=True"
            ) from err
        # Frozen experts (e.g. LoRA on attention only): no weight or bias gradient is computed at all.
        weight_grads = any(ctx.needs_input_grad[1:5])
        if torch.compiler.is_compiling():
            dx, dweights, dw1, dw2, db1, db2 = experts_backward_op(
                dout, x, w1, w2, b1, b2, top_k_weights, gu, *routing, *ctx.flags, weight_grads
            )
        else:
            *layout_flags, block_m, backend = ctx.flags
            routing, layout = Routing(*routing), _layout(*layout_flags)
            args = (dout, x, w1, w2, b1, b2, top_k_weights, gu, routing, layout, block_m, backend, weight_grads)
            # release_gu: gu's storage may be freed inside, as this saved tensor is never read again.
            dx, dweights, dw1, dw2, db1, db2 = _backward(*args, release_gu=True)
            # What the custom op's declared mutation does for us under compile: a second backward sees the change.
            torch.autograd.graph.increment_version(gu)
        return (
            dx,
            dw1 if weight_grads else None,
            dw2 if weight_grads else None,
            db1 if b1 is not None and weight_grads else None,
            db2 if b2 is not None and weight_grads else None,
            dweights,
            None,
            None,
            None,
            None,
            None,
        )


def _check_inputs(x, top_k_index, top_k_weights, w1, w2, b1, b2, layout: ExpertLayout) -> None:
    tensors = {"hidden_states": x, "top_k_index": top_k_index, "top_k_weights": top_k_weights, "w1": w1, "w2": w2}
    if b1 is not None:
        tensors.update(b1=b1, b2=b2)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise DeviceMismatchError(
            f"MoE experts inputs are on different devices ({listing}); move the model and its inputs to one "
            "device (e.g. model.to(device) and inputs.to(device))"
        )
    odd = {name: t.dtype for name, t in tensors.items() if name != "top_k_index" and t.dtype not in DTYPES}
    if odd:
        listing = ", ".join(f"{name} {dtype}" for name, dtype in odd.items())
        raise ValueError(
            f"MoE experts take fp32, bf16 or fp16 hidden states, weights and routing weights; got {listing} (a "
            "quantized weight cast without its scales would compute something else: dequantize it first)"
        )
    if x.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected hidden_states [T, H], top_k_index [T, k] and top_k_weights [T, k]; got "
            f"{tuple(x.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}"
        )
    if w1_logical(w1, layout).shape[2] != x.shape[1]:
        raise ValueError(f"expert weights {tuple(w1.shape)} do not match hidden size {x.shape[1]} ({layout})")
    if layout.has_bias != (b1 is not None and b2 is not None):
        raise ValueError(
            f"layout.has_bias={layout.has_bias} but biases given: b1={b1 is not None}, b2={b2 is not None}"
        )


def moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    layout: ExpertLayout = ExpertLayout(),
    backend: str = "auto",
    recompute: bool = False,
) -> torch.Tensor:
    """Routed experts of one MoE layer: ``out[t] = sum_j w[t, j] * FFN_{idx[t, j]}(x[t])``.

    Args:
        x: [T, H] hidden states (fp32, fp16 or bf16).
        top_k_index: [T, k] expert ids in ``[0, E)``.
        top_k_weights: [T, k] routing weights (any float dtype; its gradient comes back in that dtype).
        w1: ``gate_up_proj`` (or ``up_proj``) as stored by transformers, e.g. ``[E, 2I, H]``.
        w2: ``down_proj`` as stored, e.g. ``[E, H, I]``.
        b1, b2: biases ``[E, N1]`` and ``[E, H]`` when ``layout.has_bias``.
        layout: how the weights are laid out and which activation applies.
        backend: 'auto', 'triton' or 'reference'.
        recompute: save no gate/up pre-activations for the backward (``T * k * N1`` elements per layer) and run the
            gate/up matmul again there instead (4/18 more expert FLOPs). Same results.

    Returns:
        [T, H] in ``x.dtype``. Weights of another dtype (e.g. fp32 masters under autocast) are cast to ``x.dtype``.
    """
    _check_inputs(x, top_k_index, top_k_weights, w1, w2, b1, b2, layout)
    if w1.dtype != x.dtype:
        w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
        b1 = b1.to(x.dtype) if b1 is not None else None
        b2 = b2.to(x.dtype) if b2 is not None else None
    chosen = resolve_backend(backend, x.device)
    block_m = _block_m(chosen, x.device)
    routing = build_routing(top_k_index, w1.shape[0], block_m)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, w2, b1, b2, top_k_weights)):
        out, _ = MoEExpertsFunction.apply(
            x, w1, w2, b1, b2, top_k_weights, routing, layout, block_m, chosen, recompute
        )
        return out
    # No backward can follow (inference, evaluation, generation): nothing saved, the pre-activations never written.
    if torch.compiler.is_compiling():
        flags = _layout_flags(layout)
        out, _ = experts_forward_op(x, w1, w2, b1, b2, top_k_weights, *routing, *flags, block_m, chosen, False)
    else:
        out, _ = _forward(x, w1, w2, b1, b2, top_k_weights, routing, layout, block_m, chosen, False)
    return out
