"""The zebra engine: one rank's part of the model, executing the plan's schedule for each optimizer step.

Each action of ``plan.schedule.actions[local_rank]`` maps to one method below. The pieces of one layer's
autograd graph are kept apart so that the schedule, not autograd, decides when each backward runs:

    attention rank, layer l, micro-batch m
      attn_fwd      h_l (leaf) --attention half--> partial, x_send = x[tok], w_send = w[pairs], router logits
      dispatch_fwd  x_send, (expert id, w_send) --all-to-all--> expert holders
      combine_fwd   expert outputs per pair --all-to-all--> recv (leaf)
      (finish)      h_{l+1} = finish(partial (leaf), index_add(tok, recv)); h_{l+1} detached = next leaf
      dispatch_bwd  backward of finish -> d recv --all-to-all--> holders
      combine_bwd   holders' d x_send, d w_send --all-to-all--> here
      attn_bwd      backward of the attention half from (d partial, d x_send, d w_send, d logits) -> d h_l

Dispatch sends one row per routed (token, expert) pair, grouped by destination rank, with the expert's index
among the holder's experts and the routing weight; the holder runs its experts as a top-1 call of the family's
own experts module (sliced to its experts), so kernels, layouts and activations are the ones ``prepare`` set.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hf_hetermoe.errors import ConfigError, HeterMoEError
from hf_hetermoe.model_patches.anatomy import LayerSplit, expert_half, finish
from hf_hetermoe.model_patches.hub_kernels import turn_off_hub_kernels
from hf_hetermoe.planner.plan import Plan
from hf_hetermoe.planner.schedule import Action, Schedule

from .comm import Groups, RankLostError, Watchdog, all_reduce_grads, all_to_all, build_groups, exchange_counts
from .engine_io import EngineIO
from .model_parts import ModelParts, aux_loss, head_loss, layer_inputs, model_parts, run_attention

COMPUTE = ("attn_fwd", "expert_fwd", "head", "expert_bwd", "attn_bwd")
FORWARD = ("attn_fwd", "dispatch_fwd", "expert_fwd", "combine_fwd", "head")


@dataclass
class StepResult:
    """What ``train_step`` / ``eval_step`` return (identical on every rank).

    loss: mean causal-LM loss over every token of the step (router aux loss included when the model's config
        sets ``output_router_logits``, as in ``*ForCausalLM.forward``); aux_loss: the load-balancing loss alone.
    """

    loss: float
    aux_loss: float | None
    tokens: int
    seconds: float
    tokens_per_s: float
    busy_s: list[float]  # per global rank: time in compute actions (the union of their intervals)
    optimizer_stepped: bool
    grad_norm: float | None = None
    timeline: list[dict] | None = None  # this rank's actions with start/end (when ``record_timeline``)

    @property
    def utilisation(self) -> list[float]:
        return [b / self.seconds if self.seconds else 0.0 for b in self.busy_s]


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: overlapping, nested or repeated ones count once.

    A rank's busy time is this over its compute actions rather than the sum of their durations, so it cannot exceed
    the span they cover (utilisation <= 1) should two actions' intervals ever overlap (e.g. timed on two streams).
    """
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, max(start, end)])
    return sum(end - start for start, end in merged)


@dataclass
class _Fwd:
    partial: torch.Tensor
    partial_leaf: torch.Tensor
    x_send: torch.Tensor
    w_send: torch.Tensor
    meta: torch.Tensor
    tok: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor | None


@dataclass
class _Step:
    """Tensors alive during one step, keyed by (layer, micro-batch)."""

    batches: list[dict[str, torch.Tensor]]
    layer_args: dict[int, list] = field(default_factory=dict)
    inp: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    fwd: dict[tuple[int, int], _Fwd] = field(default_factory=dict)
    dense_out: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    splits: dict[tuple[int, int], tuple[list[int], list[int]]] = field(default_factory=dict)
    pending: dict[tuple[str, int, int], tuple[Any, ...]] = field(default_factory=dict)
    fin: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    experts: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (x leaf, w leaf, out | None)
    rl_grad: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    keep: list = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    auxes: list[float] = field(default_factory=list)
    events: list = field(default_factory=list)  # (action, start, end): CUDA events, or host seconds on CPU
    train: bool = True


def _factory(obj, what: str):
    if obj is None or callable(obj):
        return obj
    raise ConfigError(f"{what} must be a callable (e.g. lambda params: torch.optim.AdamW(params, lr=1e-4)), "
                      f"got {type(obj).__name__}")


class ZebraEngine(EngineIO):
    """One rank of a disaggregated (attention / expert) training job. Build it with :func:`hetermoe.distribute`."""

    def __init__(self, model: nn.Module, plan: Plan, *, optimizer: Callable | None, lr_scheduler: Callable | None,
                 max_grad_norm: float | None, gradient_accumulation_steps: int, mixed_precision: str,
                 activation_checkpointing: bool, device: torch.device, timeout_s: float, watchdog: bool,
                 record_timeline: bool = False) -> None:
        if gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be >= 1")
        if mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision={mixed_precision!r}: use 'no' or 'bf16' (fp16 needs a loss scaler, "
                              "which the zebra runtime does not implement)")
        self.plan, self.device, self.timeout_s = plan, device, timeout_s
        self.accum, self.max_grad_norm = gradient_accumulation_steps, max_grad_norm
        self.mixed_precision, self.checkpointing = mixed_precision, activation_checkpointing
        self.record_timeline = record_timeline
        self.parts: ModelParts = model_parts(model)
        self._check_model(plan)
        self.schedule: Schedule = plan.get_schedule()
        self.groups: Groups = build_groups(plan, timeout_s)
        self.watchdog = Watchdog(timeout_s) if watchdog and dist.get_world_size() > 1 else None
        g = self.groups
        self.local = g.local_rank
        self.is_attention = self.local in self.schedule.attention_ranks
        self.actions = self.schedule.actions[self.local]
        seqs = {r["rank"]: r.get("sequences", plan.sequences_per_attention_rank) for r in plan.ranks
                if r["role"] == "attention"}
        self.sequences = seqs.get(g.rank, 0)
        self.total_sequences = sum(seqs.values())
        self.attention_ranks_global = sorted(seqs)
        self.R = plan.micro_batches
        if self.is_attention and self.sequences % self.R:
            raise ConfigError(f"rank {g.rank}: {self.sequences} sequences per step do not split into R={self.R} "
                              "micro-batches; re-plan")
        self._full_keys = list(model.state_dict().keys())
        self._shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        # While every parameter is still real: kernelization (at each train()/eval()) reads the model's device.
        turn_off_hub_kernels(
            model,
            "the zebra runtime keeps the layers a rank does not run on the meta device, where transformers cannot "
            "kernelize them, and every rank must compute what plain training does",
        )
        self._place_parameters(model)
        # What this rank trains, by name (fixed from here on: load_state copies into these tensors).
        self._attn_params = self._find_attention_params()
        self._exp_params = self._find_expert_params()
        self.act_dtype = next(iter(self._local_params().values())).dtype
        params = list({id(p): p for p in self._local_params().values()}.values())
        make_opt = _factory(optimizer, "optimizer")
        self.optimizer = make_opt(params) if make_opt is not None else None
        make_sched = _factory(lr_scheduler, "lr_scheduler")
        self.lr_scheduler = make_sched(self.optimizer) if make_sched is not None and self.optimizer else None
        self.step = 0  # optimizer steps taken
        self._micro = 0  # train_step calls since the last optimizer step

    # ------------------------------------------------------------------ setup
    def _check_model(self, plan: Plan) -> None:
        p = self.parts
        want = plan.model
        if want.get("num_layers") != p.num_layers or want.get("num_experts") != p.num_experts:
            raise ConfigError(
                f"plan.json is for a model with {want.get('num_layers')} layers and {want.get('num_experts')} "
                f"experts, this model has {p.num_layers} and {p.num_experts}; re-run `hetermoe plan` with this "
                "model's config"
            )
        sched_moe = [bool(d) for d in plan.placement]
        model_moe = [p.is_moe(li) for li in range(p.num_layers)]
        if sched_moe != model_moe:
            raise ConfigError(f"plan's MoE layers {sched_moe} differ from the model's {model_moe}; re-plan")

    def _place_parameters(self, model: nn.Module) -> None:
        """Keep this rank's parameters on its device; replace the others by meta tensors of the same shape."""
        p, dev = self.parts, self.device
        self.owner: list[torch.Tensor | None] = []
        self.local_id: list[torch.Tensor | None] = []
        self.my_experts: list[tuple[int, ...]] = []
        expert_modules = {id(m) for m in p.experts if m is not None}
        for li in range(p.num_layers):
            module = p.experts[li]
            if module is None:
                self.owner.append(None)
                self.local_id.append(None)
                self.my_experts.append(())
                continue
            owner = torch.full((p.num_experts,), -1, dtype=torch.long)
            local_id = torch.zeros(p.num_experts, dtype=torch.long)
            for r, ids in self.schedule.placement[li].items():
                # all_to_all_single orders its splits by rank in the group (sorted global ranks), not by local rank
                owner[list(ids)] = self.groups.group_index(r)
                local_id[list(ids)] = torch.arange(len(ids))
            self.owner.append(owner.to(dev))
            self.local_id.append(local_id.to(dev))
            ids = tuple(self.schedule.placement[li].get(self.local, ()))
            self.my_experts.append(ids)
            for name, param in list(module.named_parameters(recurse=False)):
                if param.shape[0] != p.num_experts:
                    raise HeterMoEError(f"{p.expert_names[li]}.{name} has shape {tuple(param.shape)}: expected "
                                        f"{p.num_experts} experts in dim 0")
                if ids:
                    data = param.detach()[list(ids)].clone().to(dev)
                else:
                    data = torch.empty(param.shape, dtype=param.dtype, device="meta")
                setattr(module, name, nn.Parameter(data, requires_grad=param.requires_grad))
            if hasattr(module, "num_experts"):
                module.num_experts = len(ids) if ids else p.num_experts
        for module in model.modules():
            if id(module) in expert_modules:
                continue
            for name, param in list(module.named_parameters(recurse=False)):
                data = param.detach().to(dev) if self.is_attention else torch.empty(
                    param.shape, dtype=param.dtype, device="meta")
                setattr(module, name, nn.Parameter(data, requires_grad=param.requires_grad))
            for name, buf in list(module.named_buffers(recurse=False)):
                if self.is_attention:
                    module._buffers[name] = buf.to(dev)
        if self.is_attention and hasattr(model, "tie_weights") and getattr(model.config, "tie_word_embeddings", False):
            model.lm_head.weight = p.base.embed_tokens.weight

    def _local_params(self) -> dict[str, nn.Parameter]:
        """name -> parameter this rank trains (expert parameters are this rank's slice)."""
        return {**self._attn_params, **self._exp_params}

    def _find_attention_params(self) -> dict[str, nn.Parameter]:
        if not self.is_attention:
            return {}
        skip = {n for n in self.parts.expert_names if n}
        return {n: q for n, q in self.parts.model.named_parameters()
                if not any(n.startswith(s + ".") for s in skip)}

    def _find_expert_params(self) -> dict[str, nn.Parameter]:
        out = {}
        for li, ids in enumerate(self.my_experts):
            if ids:
                for n, q in self.parts.experts[li].named_parameters(recurse=False):
                    out[f"{self.parts.expert_names[li]}.{n}"] = q
        return out

    # ------------------------------------------------------------------ step
    def _autocast(self):
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _split_batch(self, batch: dict[str, torch.Tensor] | None, train: bool) -> list[dict[str, torch.Tensor]]:
        if not self.is_attention:
            return []
        if batch is None or "input_ids" not in batch:
            raise ConfigError(f"rank {self.groups.rank} runs attention: train_step/eval_step need a batch with "
                              "'input_ids' (and optionally 'labels') on this rank")
        ids = batch["input_ids"]
        if train and ids.shape[0] != self.sequences:
            raise ConfigError(
                f"rank {self.groups.rank}: the batch has {ids.shape[0]} sequences but the plan gives this attention "
                f"rank {self.sequences} per step; use engine.dataloader(...) or a per-rank batch of {self.sequences}"
            )
        if ids.shape[0] % self.R:
            raise ConfigError(f"batch of {ids.shape[0]} sequences does not split into R={self.R} micro-batches")
        mask = batch.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ConfigError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; "
                              "give one 0/1 entry per token")
        if mask is not None and bool(mask.all()):
            mask = None  # packed: the family's causal mask alone, as without a mask
        labels = batch.get("labels")
        if labels is None:  # language modelling on the inputs; padding is not a target
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        n = ids.shape[0] // self.R
        dev = self.device
        out = []
        for i in range(self.R):
            mb = {"input_ids": ids[i * n:(i + 1) * n].to(dev), "labels": labels[i * n:(i + 1) * n].to(dev)}
            if mask is not None:
                mb["attention_mask"] = mask[i * n:(i + 1) * n].to(dev)
            out.append(mb)
        return out

    def train_step(self, batch: dict[str, torch.Tensor] | None) -> StepResult:
        """One step of R micro-batches in the plan's zebra order; the optimizer steps every
        ``gradient_accumulation_steps`` calls. Expert ranks may pass ``None``."""
        batches = self._split_batch(batch, True)  # a bad batch raises before anything counts
        self._micro += 1
        return self._run(batches, train=True, boundary=self._micro == self.accum)

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor] | None) -> StepResult:
        """Forward only (same placement and collectives, no backward): the loss of ``batch``."""
        return self._run(self._split_batch(batch, False), train=False, boundary=False)

    def _run(self, batches, train: bool, boundary: bool) -> StepResult:
        st = _Step(batches, train=train)
        self.parts.model.train(train)
        acts = self.actions if train else [a for a in self.actions if a.kind in FORWARD]
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        current: Action | None = None
        grad_norm = None
        try:
            for act in acts:
                current = act
                if act.kind == "grad_sync":
                    if boundary:
                        params = self._attn_params if act.group == "attn_dp" else self._exp_params
                        group = self.groups.attn_dp if act.group == "attn_dp" else self.groups.expert_dp
                        all_reduce_grads(list(params.values()), group)
                    continue
                if act.kind in COMPUTE:
                    self._timed(act, st)
                else:
                    getattr(self, "_" + act.kind)(act, st)
            current = None
            if boundary:
                grad_norm = self._optimizer_step()
            metrics = self._metrics(st, sync, t0)
        except (RuntimeError, dist.DistBackendError) as err:
            if isinstance(err, (HeterMoEError, torch.OutOfMemoryError)) or not _is_comm_error(err):
                raise  # not a lost peer: fail now (the peers' watchdogs see this rank's exit within timeout_s)
            lost = self.watchdog.diagnose(10.0) if self.watchdog else []
            where = current.label() if current is not None else "the end of the step"
            if lost:
                raise RankLostError(f"rank {self.groups.rank}: lost rank(s) {lost} during {where}: {err}") from err
            raise
        finally:
            st.keep.clear()
        if boundary:
            self._micro = 0
        loss, aux, tokens, seconds, busy = metrics
        return StepResult(loss, aux, tokens, seconds, tokens / seconds if seconds else 0.0, busy, boundary, grad_norm,
                          st.events if self.record_timeline else None)

    def _timed(self, act: Action, st: _Step) -> None:
        fn = getattr(self, "_" + act.kind)
        self._wait_inputs(act, st)  # waiting for a collective is not busy time
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(act, st)
            end.record()
            st.events.append((act, start, end))
        else:
            t = time.perf_counter()
            fn(act, st)
            st.events.append((act, t, time.perf_counter()))

    def _wait_inputs(self, act: Action, st: _Step) -> None:
        """Make the compute stream (gloo: the host) wait for the collectives ``act`` consumes."""
        li, m = act.layer, act.mb
        keys = {"expert_fwd": [("dispatch_fwd", li, m)], "expert_bwd": [("dispatch_bwd", li, m)],
                "attn_bwd": [("combine_bwd", li, m)], "attn_fwd": [("combine_fwd", li - 1, m)],
                "head": [("combine_fwd", self.parts.num_layers - 1, m)]}.get(act.kind, [])
        for key in keys:
            for w in st.pending.get(key, ((), ()))[1]:
                w.wait()

    def _metrics(self, st: _Step, sync: bool, t0: float):
        if sync:
            # The step's one host sync: after it every event has completed, so elapsed_time only reads timestamps.
            torch.cuda.synchronize(self.device)
            base = st.events[0][1] if st.events else None
            spans = [(a, base.elapsed_time(s), base.elapsed_time(e)) for a, s, e in st.events]
        else:
            spans = [(a, (s - t0) * 1e3, (e - t0) * 1e3) for a, s, e in st.events]
        busy = union_length((s, e) for _, s, e in spans) / 1e3
        if self.record_timeline:
            st.events = [{"action": a.label(), "kind": a.kind, "start_ms": s, "end_ms": e} for a, s, e in spans]
        seconds = time.perf_counter() - t0
        w = self.sequences / self.total_sequences / max(self.R, 1) if self.is_attention else 0.0
        tokens = sum(b["input_ids"].numel() for b in st.batches)
        vec = torch.tensor([sum(st.losses) * w, sum(st.auxes) * w, float(tokens), seconds, busy],
                           dtype=torch.float64, device=self.device)
        parts = [torch.zeros_like(vec) for _ in range(self.groups.world)]
        dist.all_gather(parts, vec)
        stacked = torch.stack(parts).cpu()
        aux = float(stacked[:, 1].sum()) if self.parts.aux_fn is not None else None
        return (float(stacked[:, 0].sum()), aux, int(stacked[:, 2].sum()), float(stacked[:, 3].max()),
                [float(b) for b in stacked[:, 4]])

    def _optimizer_step(self) -> float | None:
        params = list(self._local_params().values())
        norm = None
        if self.max_grad_norm is not None:
            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            if self.is_attention and self.groups.rank == self.attention_ranks_global[0]:
                sq += sum(q.grad.double().pow(2).sum() for q in self._attn_params.values() if q.grad is not None)
            if self.groups.zp_group == 0:
                sq += sum(q.grad.double().pow(2).sum() for q in self._exp_params.values() if q.grad is not None)
            dist.all_reduce(sq)
            norm = float(sq.sqrt())
            coef = min(self.max_grad_norm / (norm + 1e-6), 1.0)
            for q in params:
                if q.grad is not None:
                    q.grad.mul_(coef)
        if self.optimizer is not None:
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for q in params:
                q.grad = None
        self.step += 1
        return norm

    # ------------------------------------------------------------------ actions
    def _scale(self) -> float:
        return self.sequences / (self.total_sequences * self.R * self.accum)

    def _attn_fwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        with self._autocast():
            if li == 0:
                extra = {k: v for k, v in st.batches[m].items() if k == "attention_mask"}
                hidden, args = layer_inputs(self.parts, st.batches[m]["input_ids"], **extra)
                st.layer_args[m] = args
            else:
                hidden = self._layer_input(li, m, st)
            args, kwargs = st.layer_args[m][li]
            if not self.parts.is_moe(li):
                out = self._maybe_checkpoint(
                    lambda h: run_attention(self.parts, li, h, args, kwargs)[0].partial, hidden)
                st.dense_out[(li, m)] = out
                st.inp[(li + 1, m)] = out.detach().requires_grad_(st.train)
                return
            partial, x_send, w_send, logits, meta, tok, counts = self._maybe_checkpoint(
                lambda h: self._attention_and_route(li, h, args, kwargs), hidden)
        st.fwd[(li, m)] = _Fwd(partial, partial.detach().requires_grad_(st.train), x_send, w_send, meta, tok, counts,
                               logits)

    def _maybe_checkpoint(self, fn, hidden):
        if self.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, hidden, use_reentrant=False)
        return fn(hidden)

    def _attention_and_route(self, li: int, hidden, args, kwargs):
        split, logits = run_attention(self.parts, li, hidden, args, kwargs)
        x = split.hidden.reshape(-1, split.hidden.shape[-1])
        idx = split.top_k_index.reshape(x.shape[0], -1)
        w = split.top_k_weights.reshape(x.shape[0], -1)
        k = idx.shape[1]
        owner = self.owner[li][idx.reshape(-1)]
        order = torch.argsort(owner, stable=True)
        tok = torch.div(order, k, rounding_mode="floor")
        x_send = x[tok].to(self.act_dtype)
        w_send = w.reshape(-1)[order]
        meta = torch.stack([self.local_id[li][idx.reshape(-1)][order].to(torch.float32),
                            w_send.detach().to(torch.float32)], 1)
        # scatter_add, not bincount: bincount sizes its output from the data (a host sync on CUDA).
        counts = torch.zeros(self.groups.zp_world, dtype=torch.long, device=owner.device)
        counts.scatter_add_(0, owner, torch.ones_like(owner))
        return split.partial, x_send, w_send, logits, meta, tok, counts

    def _layer_input(self, li: int, m: int, st: _Step) -> torch.Tensor:
        """Input of layer ``li`` (or of the head when ``li == num_layers``) for micro-batch ``m``."""
        prev = li - 1
        if (li, m) not in st.inp:  # previous layer is MoE: add its routed output now
            f = st.fwd[(prev, m)]
            (outbuf,), _ = st.pending.pop(("combine_fwd", prev, m))  # waited for by _wait_inputs
            recv = outbuf.requires_grad_(st.train)
            H = recv.shape[-1]
            rows = f.partial.numel() // H
            routed = torch.zeros(rows, H, dtype=torch.float32, device=recv.device).index_add(0, f.tok, recv.float())
            split = LayerSplit(recv, None, None, partial=f.partial_leaf)  # a MoE split, as finish() expects
            out = finish(self.parts.patch, self.parts.layers[prev], split, routed.to(f.partial.dtype))
            st.fin[(prev, m)] = (out, recv)
            st.inp[(li, m)] = out.detach().requires_grad_(st.train)
        return st.inp[(li, m)]

    def _dispatch_fwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        group = self.groups.dispatch
        if self.is_attention:
            f = st.fwd[(li, m)]
            counts, x_send, meta = f.counts, f.x_send.detach(), f.meta
        else:
            H = self._hidden_size()
            counts = torch.zeros(self.groups.zp_world, dtype=torch.long, device=self.device)
            x_send = torch.empty(0, H, dtype=self.act_dtype, device=self.device)
            meta = torch.empty(0, 2, dtype=torch.float32, device=self.device)
        recv = exchange_counts(counts, group)
        send = counts.tolist()
        st.splits[(li, m)] = (send, recv)
        n = sum(recv)
        rx = torch.empty(n, x_send.shape[1], dtype=x_send.dtype, device=self.device)
        rm = torch.empty(n, 2, dtype=torch.float32, device=self.device)
        works = [all_to_all(rx, x_send, recv, send, group), all_to_all(rm, meta, recv, send, group)]
        st.keep.extend((x_send, meta))
        st.pending[("dispatch_fwd", li, m)] = ((rx, rm), works)

    def _hidden_size(self) -> int:
        return int(self.parts.model.config.get_text_config().hidden_size)

    def _expert_fwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        (rx, rm), _ = st.pending.pop(("dispatch_fwd", li, m))  # waited for by _wait_inputs
        x = rx.requires_grad_(st.train)
        w = rm[:, 1:2].clone().requires_grad_(st.train)
        idx = rm[:, 0:1].long()
        out = None
        if x.shape[0]:
            with self._autocast():
                out = expert_half(self.parts.patch, self.parts.layers[li], x, idx, w).to(self.act_dtype)
        st.experts[(li, m)] = (x, w, out)

    def _combine_fwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        send, recv = st.splits[(li, m)]
        H = self._hidden_size()
        held = st.experts.get((li, m))
        out = held[2] if held is not None and held[2] is not None else None
        inp = out.detach() if out is not None else torch.empty(0, H, dtype=self.act_dtype, device=self.device)
        if not st.train:
            st.experts.pop((li, m), None)
        buf = torch.empty(sum(send), H, dtype=self.act_dtype, device=self.device)
        st.keep.append(inp)
        st.pending[("combine_fwd", li, m)] = ((buf,), [all_to_all(buf, inp, send, recv, self.groups.combine)])

    def _head(self, act: Action, st: _Step) -> None:
        m, L = act.mb, self.parts.num_layers
        hidden = self._layer_input(L, m, st)
        with self._autocast():
            loss = head_loss(self.parts, hidden, st.batches[m]["labels"])
            total, aux = loss, None
            leaves: dict[int, torch.Tensor] = {}
            if self.parts.aux_fn is not None:
                leaves = {li: st.fwd[(li, m)].logits.detach().requires_grad_(st.train)
                          for li in range(L) if self.parts.is_moe(li)}
                aux = aux_loss(self.parts, list(leaves.values()), st.batches[m].get("attention_mask"))
                total = loss + self.parts.aux_coef * aux.to(loss.device)
        st.losses.append(float(total.detach()))
        if aux is not None:
            st.auxes.append(float(aux.detach()))
        if st.train:
            (total.float() * self._scale()).backward()
            for li, leaf in leaves.items():
                st.rl_grad[(li, m)] = leaf.grad
        else:
            for li in range(L):
                st.fwd.pop((li, m), None)
                st.fin.pop((li, m), None)

    def _dispatch_bwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        send, recv = st.splits[(li, m)]
        H = self._hidden_size()
        if self.is_attention:
            out, recv_leaf = st.fin.pop((li, m))
            grad = st.inp.pop((li + 1, m)).grad
            torch.autograd.backward(out, grad)
            g = recv_leaf.grad.to(self.act_dtype)
        else:
            g = torch.empty(0, H, dtype=self.act_dtype, device=self.device)
        buf = torch.empty(sum(recv), H, dtype=self.act_dtype, device=self.device)
        st.keep.append(g)
        st.pending[("dispatch_bwd", li, m)] = ((buf,), [all_to_all(buf, g, recv, send, self.groups.dispatch)])

    def _expert_bwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        (grad,), _ = st.pending.pop(("dispatch_bwd", li, m))  # waited for by _wait_inputs
        x, w, out = st.experts.pop((li, m))
        if out is not None:
            torch.autograd.backward(out, grad)
        st.experts[(li, m)] = (x, w, None)

    def _combine_bwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        send, recv = st.splits.pop((li, m))
        H = self._hidden_size()
        held = st.experts.pop((li, m), None)
        if held is not None and held[0].shape[0] and held[0].grad is not None:
            gx, gw = held[0].grad, held[1].grad.to(torch.float32)
        else:
            n = held[0].shape[0] if held is not None else 0
            gx = torch.zeros(n, H, dtype=self.act_dtype, device=self.device)
            gw = torch.zeros(n, 1, dtype=torch.float32, device=self.device)
        bx = torch.empty(sum(send), H, dtype=self.act_dtype, device=self.device)
        bw = torch.empty(sum(send), 1, dtype=torch.float32, device=self.device)
        st.keep.extend((gx, gw))
        group = self.groups.combine
        works = [all_to_all(bx, gx, send, recv, group), all_to_all(bw, gw, send, recv, group)]
        st.pending[("combine_bwd", li, m)] = ((bx, bw), works)

    def _attn_bwd(self, act: Action, st: _Step) -> None:
        li, m = act.layer, act.mb
        if not self.parts.is_moe(li):
            out = st.dense_out.pop((li, m))
            torch.autograd.backward(out, st.inp.pop((li + 1, m)).grad)
        else:
            (gx, gw), _ = st.pending.pop(("combine_bwd", li, m))  # waited for by _wait_inputs
            f = st.fwd.pop((li, m))
            outs = [f.partial, f.x_send, f.w_send]
            grads = [f.partial_leaf.grad, gx.to(f.x_send.dtype), gw.view(-1).to(f.w_send.dtype)]
            if (li, m) in st.rl_grad:
                outs.append(f.logits)
                grads.append(st.rl_grad.pop((li, m)))
            torch.autograd.backward(outs, grads)
        if li == 0:
            st.layer_args.pop(m, None)

    def close(self) -> None:
        """Wait for every rank, tell the watchdog this rank finished (so peers do not report it lost), and leave
        the rank's emulation (green context, SDPA restriction). Call once training is over."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        stack = getattr(self, "_exit_stack", None)
        if stack is not None:
            self._exit_stack = None
            try:
                stack.close()
            except RuntimeError as err:  # e.g. a CUDA context change under the green context
                warnings.warn(f"rank {self.groups.rank}: leaving the emulation failed ({err}); emulation may have "
                              "ended early in this process", stacklevel=2)


def _is_comm_error(err: BaseException) -> bool:
    """A failure of a collective (a peer died or hung), as opposed to this rank's own error."""
    if isinstance(err, dist.DistBackendError):
        return True
    text = str(err).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer"))
