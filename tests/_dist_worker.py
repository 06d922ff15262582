"""One rank of a data-parallel fine-tuning job on a prepared model (``tests/test_distributed.py``), on CPU over gloo.

    python _dist_worker.py MODE MODEL_DIR OUT_DIR

MODE ``ddp``: launched by ``accelerate launch --multi_gpu`` (MULTI_CPU), the model wrapped by ``Accelerator.prepare``
(DistributedDataParallel). MODE ``fsdp2``: one process per rank with the ``torch.distributed`` environment set by the
test, each decoder layer and then the whole model wrapped by ``fully_shard`` (what accelerate's FSDP2 plugin does on
GPUs; accelerate runs no FSDP on CPU); ``fsdp2-checkpointing`` with non-reentrant activation checkpointing too.
MODE ``zero2`` / ``zero3``: DeepSpeed ZeRO stage 2 / 3 through ``deepspeed.initialize`` (its CPU accelerator over
gloo; accelerate hands DeepSpeed no CPU job), with transformers' ``HfDeepSpeedConfig`` so that ZeRO-3 partitions the
weights while ``from_pretrained`` loads them (``zero.Init``), as accelerate and Trainer do on GPUs;
``zero3-checkpointing`` with non-reentrant activation checkpointing too (the recomputed forwards gather again).
Every mode: ``hetermoe.prepare`` first (fused loss and RMSNorm included), then ``STEPS`` AdamW steps, rank ``r``
training on ``batches(r)``. Rank 0 writes the losses and the full parameters. With ``HETERMOE_TEST_DEVICE=cuda``
each rank runs on its GPU (``LOCAL_RANK``) over NCCL, the experts on the Triton kernels.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

# A rank that hangs (a collective the other rank never joins, a rendezvous that never completes) prints every
# thread's stack and exits after this many seconds, so that the test can say where; a normal run takes ~15 s.
DEADLINE_S = float(os.environ.get("HETERMOE_TEST_WORKER_DEADLINE_S", "180"))
DEADLINE_MARK = "Timeout ("  # how faulthandler's report starts
if __name__ == "__main__":
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

STEPS = 3
LR = 1e-3
DEVICE = os.environ.get("HETERMOE_TEST_DEVICE", "cpu")
MODES = ("ddp", "fsdp2", "fsdp2-checkpointing", "zero2", "zero3", "zero3-checkpointing")


def batches(rank: int, vocab: int, steps: int = STEPS) -> list[torch.Tensor]:
    """The token ids rank ``rank`` trains on at each step (the single-process reference uses them too)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(3, vocab, (2, 12), generator=gen) for _ in range(steps)]


def main(mode: str, model_dir: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    import hf_hetermoe as hetermoe

    zero_stage = {"zero2": 2, "zero3": 3, "zero3-checkpointing": 3}.get(mode)
    backend = "gloo"
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    if zero_stage is not None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend=backend)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": zero_stage},
                     "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0; the one-process reference does not
                     "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}}}
        zero_init = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive: from_pretrained reads it)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    if zero_stage == 3:  # partitioned while loading (onto this rank's device): each rank holds a slice of every weight
        assert model.lm_head.weight.numel() == 0 and hasattr(model.lm_head.weight, "ds_id")
    else:
        model.to(DEVICE)
    hetermoe.prepare(model)
    model.train()
    if mode.endswith("-checkpointing"):  # before wrapping, as Trainer does
        from hf_hetermoe.demo import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    norms_fused = all("forward" in m.__dict__ for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    if zero_stage is not None:
        model, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                      model_parameters=model.parameters())
        rank, world = model.global_rank, model.world_size
        kind = f"ZeRO-{zero_stage}"
        backward = model.backward
    elif mode == "ddp":
        from accelerate import Accelerator

        accelerator = Accelerator()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        model, optimizer = accelerator.prepare(model, optimizer)
        rank, world = accelerator.process_index, accelerator.num_processes
        kind = accelerator.distributed_type.value
        backward = accelerator.backward
    elif mode in ("fsdp2", "fsdp2-checkpointing"):
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        kind = type(model.model.layers[0].mlp.experts.gate_up_proj).__name__
        backward = torch.Tensor.backward
    else:
        raise SystemExit(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    losses, fused = [], []
    for ids in batches(rank, vocab):
        ids = ids.to(DEVICE)
        out = model(input_ids=ids, labels=ids)
        backward(out.loss)
        if zero_stage is not None:
            model.step()  # the engine steps its optimizer and zeroes the gradients
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        fused.append(out.logits is None)  # the fused cross-entropy built no logits
    params = {}
    for name, param in model.named_parameters():  # full tensors on every rank (collectives), kept on rank 0
        if hasattr(param, "ds_id"):  # ZeRO-3: copied while gathered, before it is partitioned again
            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach().clone()
        elif hasattr(param, "full_tensor"):  # FSDP2's DTensor: all-gathered into a new tensor
            full = param.full_tensor().detach()
        else:
            full = param.detach().clone()
        params[name.removeprefix("module.")] = full.cpu()
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    if rank == 0:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        torch.save(params, out_path / "params.pt")
        (out_path / "result.json").write_text(json.dumps({"kind": kind, "world": world, "losses": gathered,
                                                             "fused_loss": all(fused),
                                                             "fused_rms_norm": norms_fused}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
