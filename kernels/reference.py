"""Plain-PyTorch twin of every expert operator: the truth the Triton kernels are tested against,
and the implementation that runs on CPU or where Triton is missing.

The forward/backward pair here follows the same decomposition as the kernels (same rounding points),
so the reference backend and the Triton backend agree to accumulation-order noise:

    forward    gu[r]  = x[tok(r)] @ w1[e(r)]^T (+ b1)          sorted pairs r, stored in the input dtype
               h[r]   = glu(gu[r])                              gated activation, rounded to the input dtype
               y[r]   = h[r] @ w2[e(r)]^T (+ b2)
               out[t] = sum_j w[t, j] * y[inverse[t*k + j]]     fp32 sum, deterministic
    backward   g[r]   = dout[tok(r)] @ w2[e(r)]                 unweighted
               dw     = <g[r], h[r]> (+ <dout[tok(r)], b2[e(r)]>)
               dgu    = glu'(gu[r]) * (w[r] * g[r])
               dx[t]  = sum_j (dgu @ w1[e])[inverse[t*k + j]]
               dw1[e] = dgu_e^T x_e,  dw2[e] = (w * dout)_e^T h_e,  db1[e] = sum dgu_e,  db2[e] = sum (w * dout)_e

``experts_eager`` is a third, independent formulation (transformers' eager loop over experts) used by
the tests as ground truth through autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import ExpertLayout, split_gate_up, w1_logical, w2_logical
from .routing import Routing


def routing_reference(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive routing on the host: (order, inverse, offsets) as int64, for testing ``build_routing``."""
    flat = top_k_index.reshape(-1).tolist()  # host copy on purpose: a naive twin for tests, never in a model
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    inverse = [0] * len(flat)
    for pos, i in enumerate(order):
        inverse[i] = pos
    offsets = [0]
    for e in range(num_experts):
        offsets.append(offsets[-1] + sum(1 for v in flat if v == e))
    return torch.tensor(order), torch.tensor(inverse), torch.tensor(offsets)


# ----------------------------------------------------------------------------- activations


def act_forward(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    raise ValueError(f"no plain activation named {name!r}")


def act_derivative(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "relu2":
        return 2 * F.relu(x)
    raise ValueError(f"no plain activation named {name!r}")


def glu_forward(gate: torch.Tensor | None, up: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """h from the (fp32) pre-activations; ``gate`` is None for non-gated layouts."""
    if not layout.has_gate:
        return act_forward(up, layout.activation)
    if layout.activation == "swiglu_oai":
        g = gate.clamp(max=layout.limit)
        u = up.clamp(-layout.limit, layout.limit)
        return (u + 1) * g * torch.sigmoid(g * layout.alpha)
    if layout.activation == "silu_softcapped":
        cg, cu = layout.alpha, layout.limit
        return cg * torch.tanh(gate / cg) * torch.sigmoid(gate) * (cu * torch.tanh(up / cu))
    if layout.clamp == "before":
        limit = layout.limit
        return act_forward(gate.clamp(max=limit), layout.plain_activation) * up.clamp(-limit, limit)
    if layout.clamp == "after":
        limit = layout.limit
        return act_forward(gate, layout.plain_activation).clamp(max=limit) * up.clamp(-limit, limit)
    return act_forward(gate, layout.activation) * up


def glu_backward(
    gate: torch.Tensor | None, up: torch.Tensor, dh: torch.Tensor, layout: ExpertLayout
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(d gate, d up) given d h; all fp32."""
    if not layout.has_gate:
        return None, dh * act_derivative(up, layout.activation)
    if layout.activation == "swiglu_oai":
        limit, alpha = layout.limit, layout.alpha
        g = gate.clamp(max=limit)
        u = up.clamp(-limit, limit)
        s = torch.sigmoid(g * alpha)
        dg = dh * (u + 1) * (s + alpha * g * s * (1 - s)) * (gate <= limit)
        du = dh * g * s * ((up >= -limit) & (up <= limit))
        return dg, du
    if layout.activation == "silu_softcapped":
        cg, cu = layout.alpha, layout.limit
        tg, tu, s = torch.tanh(gate / cg), torch.tanh(up / cu), torch.sigmoid(gate)
        return dh * cu * tu * s * ((1 - tg * tg) + cg * tg * (1 - s)), dh * cg * tg * s * (1 - tu * tu)
    if layout.clamp is not None:
        limit, name = layout.limit, layout.plain_activation
        u = up.clamp(-limit, limit)
        du_mask = (up >= -limit) & (up <= limit)
        if layout.clamp == "before":
            g = gate.clamp(max=limit)
            return dh * u * act_derivative(g, name) * (gate <= limit), dh * act_forward(g, name) * du_mask
        a = act_forward(gate, name)
        return dh * u * act_derivative(gate, name) * (a <= limit), dh * a.clamp(max=limit) * du_mask
    return dh * up * act_derivative(gate, layout.activation), dh * act_forward(gate, layout.activation)


def _split(t: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor | None, torch.Tensor]:
    if layout.has_gate:
        return split_gate_up(t, -1, layout)
    return None, t


# ----------------------------------------------------------------------------- forward / backward


def _runs(routing: Routing) -> list[tuple[int, int, int]]:
    # The reference loops over experts on the host; reading the offsets is its one host sync.
    offsets = routing.offsets.tolist()  # the reference's one host sync (see comment above)
    return [(e, offsets[e], offsets[e + 1]) for e in range(len(offsets) - 1) if offsets[e + 1] > offsets[e]]


def pre_activations(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, routing: Routing, top_k: int, layout: ExpertLayout
) -> torch.Tensor:
    """``gu [S, N1]``: the gate/up products of ``x``'s rows in sorted pair order, as ``experts_forward`` saves them
    (the backward's recomputation when the forward saved none)."""
    order = routing.order.long()
    w1l = w1_logical(w1, layout)
    gu = x.new_empty(order.numel(), w1l.shape[1])
    for e, start, end in _runs(routing):
        gu[start:end] = x[order[start:end] // top_k] @ w1l[e].T + (b1[e] if b1 is not None else 0)
    return gu


def experts_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k_weights: torch.Tensor,
    routing: Routing,
    layout: ExpertLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out [T, H]`` (x.dtype) and ``gu [S, N1]`` (pre-activations in sorted order, saved for backward)."""
    num_tokens, hidden = x.shape
    top_k = top_k_weights.shape[-1]
    order = routing.order.long()
    w1l, w2l = w1_logical(w1, layout), w2_logical(w2, layout)
    gu = x.new_empty(order.numel(), w1l.shape[1])
    y = x.new_empty(order.numel(), hidden)
    for e, start, end in _runs(routing):
        rows = x[order[start:end] // top_k]
        gu[start:end] = rows @ w1l[e].T + (b1[e] if b1 is not None else 0)
        gate, up = _split(gu[start:end].float(), layout)
        h = glu_forward(gate, up, layout).to(x.dtype)
        y[start:end] = h @ w2l[e].T + (b2[e] if b2 is not None else 0)
    weighted = y[routing.inverse.long()].float() * top_k_weights.reshape(-1, 1).float()
    out = weighted.view(num_tokens, top_k, hidden).sum(1)
    return out.to(x.dtype), gu


def experts_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k_weights: torch.Tensor,
    routing: Routing,
    gu: torch.Tensor,
    layout: ExpertLayout,
    weight_grads: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, d top_k_weights, dw1, dw2, db1, db2)``, each in the layout and dtype of its input; without
    ``weight_grads`` the last four are ``None``."""
    num_tokens, hidden = x.shape
    top_k = top_k_weights.shape[-1]
    order = routing.order.long()
    w_sorted = top_k_weights.reshape(-1)[order].float()
    w1l, w2l = w1_logical(w1, layout), w2_logical(w2, layout)
    dw1 = dw2 = dw1l = dw2l = None
    if weight_grads:
        dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)
        dw1l, dw2l = w1_logical(dw1, layout), w2_logical(dw2, layout)
    db1 = torch.zeros_like(b1) if b1 is not None and weight_grads else None
    db2 = torch.zeros_like(b2) if b2 is not None and weight_grads else None
    dw_sorted = torch.zeros(order.numel(), dtype=torch.float32, device=x.device)
    dx_sorted = x.new_zeros(order.numel(), hidden)
    for e, start, end in _runs(routing):
        tok = order[start:end] // top_k
        scale = w_sorted[start:end, None]
        g = (dout[tok] @ w2l[e]).float()
        gate, up = _split(gu[start:end].float(), layout)
        h = glu_forward(gate, up, layout).to(x.dtype)
        dw_e = (g * h.float()).sum(-1)
        if b2 is not None:
            dw_e = dw_e + (dout[tok].float() * b2[e].float()).sum(-1)
        dw_sorted[start:end] = dw_e
        dgate, dup = glu_backward(gate, up, scale * g, layout)
        dgu = torch.empty_like(gu[start:end])
        dgate_view, dup_view = _split(dgu, layout)
        dup_view.copy_(dup)
        if dgate is not None:
            dgate_view.copy_(dgate)
        dx_sorted[start:end] = dgu @ w1l[e]
        if not weight_grads:
            continue
        dw1l[e] = (dgu.T @ x[tok]).to(dw1.dtype)
        dy = (dout[tok].float() * scale).to(x.dtype)
        dw2l[e] = (dy.T @ h).to(dw2.dtype)
        if db1 is not None:
            db1[e] = dgu.float().sum(0).to(db1.dtype)
        if db2 is not None:
            db2[e] = dy.float().sum(0).to(db2.dtype)
    inverse = routing.inverse.long()
    dx = dx_sorted[inverse].float().view(num_tokens, top_k, hidden).sum(1).to(x.dtype)
    dweights = dw_sorted[inverse].view_as(top_k_weights).to(top_k_weights.dtype)
    if not weight_grads:
        return dx, dweights, None, None, None, None
    return dx, dweights, dw1, dw2, db1, db2


# ----------------------------------------------------------------------------- ground truth


def experts_eager(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    layout: ExpertLayout,
) -> torch.Tensor:
    """transformers' eager formulation (loop over experts, index_add back), differentiable by autograd."""
    out = torch.zeros_like(x)
    w1l, w2l = w1_logical(w1, layout), w2_logical(w2, layout)
    for e in range(w1l.shape[0]):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        pre = x[token_idx] @ w1l[e].T + (b1[e] if b1 is not None else 0)
        gate, up = _split(pre, layout)
        h = glu_forward(gate, up, layout)
        y = h @ w2l[e].T + (b2[e] if b2 is not None else 0)
        out = out.index_add(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(x.dtype))
    return out
