"""The zebra runtime: disaggregated attention / expert training on torch.distributed (issue 6).

    import hf_hetermoe as hetermoe
    model = hetermoe.prepare(AutoModelForCausalLM.from_pretrained(path))
    engine = hetermoe.distribute(model, "plan.json", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5))
    for batch in engine.dataloader(dataset, collate_fn=collate):
        out = engine.train_step(batch)          # expert ranks get batch=None from the same loop
    engine.save_pretrained("out")               # one standard transformers checkpoint, written by rank 0

``hetermoe launch --cluster cluster.yaml ... script.py`` starts the processes through ``accelerate launch`` and
passes the plan in ``HETERMOE_PLAN``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.planner.plan import Plan

from .comm import RankLostError
from .engine import StepResult, ZebraEngine
from .plans import dp_plan, ep_plan, plan_from_layout, speed_shares, zebra_plan

PLAN_ENV = "HETERMOE_PLAN"

__all__ = ["PLAN_ENV", "RankLostError", "StepResult", "ZebraEngine", "distribute", "dp_plan", "ep_plan",
           "plan_from_layout", "speed_shares", "zebra_plan"]


def _rank_device(device: str | torch.device | None) -> torch.device:
    """This process's device: ``device`` if given, else the CUDA device of its ``LOCAL_RANK`` when CUDA is available,
    else the CPU. A CUDA device this machine does not have is a :class:`ConfigError` that says what to change."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        count = torch.cuda.device_count()
        if index >= count:
            local = f" (LOCAL_RANK={os.environ['LOCAL_RANK']})" if "LOCAL_RANK" in os.environ else ""
            raise ConfigError(
                f"rank {os.environ.get('RANK', 0)} would use cuda:{index}{local} "
                f"but this machine shows {count} CUDA device(s): start at most {count} process(es) per node, or "
                "run every rank on the CPU (CUDA_VISIBLE_DEVICES= or distribute(..., device='cpu'), gloo)"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ConfigError(f"distribute(device={str(device)!r}): use a CUDA device or 'cpu'")
    return device


def _init_distributed(timeout_s: float, device: torch.device) -> None:
    """The default process group, if none exists yet: NCCL for CUDA ranks, gloo for CPU ones. An existing NCCL group
    cannot carry CPU ranks' tensors, which is an error here rather than inside the first collective."""
    if dist.is_initialized():
        if device.type == "cpu" and dist.get_backend() == "nccl":
            raise ConfigError(
                "distribute(device='cpu') in a process whose process group uses NCCL: initialise it with gloo (or "
                "leave it to distribute), or keep the ranks on their GPUs"
            )
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return
    with socket.socket() as s:  # a single process outside any launcher: a world of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s))


def _load_plan(plan: Plan | str | os.PathLike | None) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if plan is None:
        plan = os.environ.get(PLAN_ENV)
        if not plan:
            raise ConfigError(f"no plan: pass plan= (a Plan or plan.json path) or launch with `hetermoe launch`, "
                              f"which sets {PLAN_ENV}")
    return Plan.load(Path(plan))


def _emulation(plan: Plan, rank: int, device: torch.device):
    """The emulation preset the plan names for this rank's device (``"<gpu> [emulated <preset>]"``), entered."""
    match = re.search(r"\[emulated ([^\]]+)\]", plan.ranks[rank]["device"])
    if match is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        warnings.warn(f"rank {rank}: plan asks for emulation preset {match.group(1)!r}, which needs a CUDA GPU; "
                      "running without it", stacklevel=3)
        return contextlib.nullcontext()
    from hf_hetermoe.emulate import emulate

    return emulate(match.group(1), device=device.index)


def distribute(
    model: nn.Module,
    plan: Plan | str | os.PathLike | None = None,
    optimizer: Callable | None = None,
    *,
    lr_scheduler: Callable | None = None,
    max_grad_norm: float | None = None,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    activation_checkpointing: bool = False,
    timeout_s: float = 300.0,
    watchdog: bool = True,
    record_timeline: bool = False,
    device: str | torch.device | None = None,
) -> ZebraEngine:
    """Split ``model`` over the job's ranks as ``plan`` says and return this rank's :class:`ZebraEngine`.

    Call on every rank of a ``torch.distributed`` job (started by ``hetermoe launch`` / ``accelerate launch`` /
    torchrun; initialised here if needed: NCCL on GPUs, gloo on CPU). Each rank keeps only its part: attention
    ranks the embeddings, attention halves, routers, shared experts, LM head and any experts Asym-EA gave them;
    expert ranks their routed experts. The rest of ``model`` becomes meta tensors.

    Args:
        model: a ``*ForCausalLM`` of a family with a layer anatomy (loaded on CPU; ``hetermoe.prepare`` it first
            for the Triton expert kernels).
        plan: a :class:`~hf_hetermoe.planner.Plan`, a ``plan.json`` path, or None for ``$HETERMOE_PLAN``.
        optimizer: ``callable(params) -> torch.optim.Optimizer`` over this rank's parameters.
        lr_scheduler: ``callable(optimizer) -> scheduler``, stepped after each optimizer step.
        max_grad_norm: clip by the global gradient norm over all ranks (each replica counted once).
        gradient_accumulation_steps: optimizer step every this many ``train_step`` calls.
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast; parameters and optimizer state keep their dtype).
        activation_checkpointing: recompute each attention half in its backward.
        timeout_s: collective timeout, and how long a silent rank may stay silent before every other rank exits
            with a message naming it.
        watchdog: run the heartbeat watchdog (``timeout_s``) in a background thread.
        record_timeline: return each rank's action timeline (CUDA events on GPUs) in ``StepResult.timeline``.
        device: this rank's device; default its ``LOCAL_RANK``'s GPU when CUDA is available, else the CPU.
            ``"cpu"`` runs the rank on the CPU over gloo even where GPUs exist (debugging, tests).
    """
    plan = _load_plan(plan)
    device = _rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds each rank to the current device
    _init_distributed(timeout_s, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    plan.check_world(world)
    engine = ZebraEngine(model, plan, optimizer=optimizer, lr_scheduler=lr_scheduler, max_grad_norm=max_grad_norm,
                         gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision,
                         activation_checkpointing=activation_checkpointing, device=device, timeout_s=timeout_s,
                         watchdog=watchdog, record_timeline=record_timeline)
    # Emulation last: every NCCL communicator exists by now (engine.__init__ warms each group), so none is set up
    # from inside the emulation; from here this rank's kernels go to its green-context stream.
    stack = contextlib.ExitStack()
    stack.enter_context(_emulation(plan, rank, device))
    engine._exit_stack = stack
    atexit.register(stack.close)
    return engine
