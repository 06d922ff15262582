"""One rank of a CPU (gloo) zebra job for tests/test_runtime.py; also the reference trainer.

    python tests/_zebra_worker.py job.json            # a rank (RANK/WORLD_SIZE/MASTER_* in the environment)
    python tests/_zebra_worker.py job.json --reference

job.json: {"model": dir, "plan": plan.json, "steps": n, "lr": f, "out": dir, "seed": s, "sequences": [...],
           "seq_len": S, "save_state_at": k | null, "resume_from": dir | null, "kill_rank_at": [rank, step] | null,
           "max_grad_norm": f | null, "accum": n}
Data: the same deterministic token batches in both modes; step s gives global sequences [s*G, (s+1)*G) where G is
the sum of the plan's per-attention-rank sequences, in attention-rank order.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from transformers import AutoModelForCausalLM

import hf_hetermoe as hetermoe
from hf_hetermoe.planner.plan import Plan


def batches(job: dict, vocab: int):
    g = torch.Generator().manual_seed(job["seed"])
    total = sum(job["sequences"]) * job.get("accum", 1) * job["steps"]
    return torch.randint(0, vocab, (total, job["seq_len"]), generator=g)


def load(job: dict):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32)
    return hetermoe.prepare(model)


def reference(job: dict) -> None:
    model = load(job)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=job["lr"])
    data = batches(job, model.config.vocab_size)
    seqs, R, accum = job["sequences"], job["micro_batches"], job.get("accum", 1)
    G = sum(seqs)
    losses, pos = [], 0
    for _step in range(job["steps"]):
        step_loss = 0.0
        for _a in range(accum):
            chunk = data[pos:pos + G]
            pos += G
            off = 0
            for s in seqs:
                part = chunk[off:off + s]
                off += s
                n = s // R
                for m in range(R):
                    ids = part[m * n:(m + 1) * n]
                    out = model(input_ids=ids, labels=ids)
                    w = s / (G * R * accum)
                    (out.loss * w).backward()
                    step_loss += float(out.loss) * w * accum
        if job.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), job["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss / accum)
    os.makedirs(job["out"], exist_ok=True)
    json.dump({"losses": losses}, open(os.path.join(job["out"], "reference.json"), "w"))
    model.save_pretrained(os.path.join(job["out"], "reference_model"))


def rank_main(job: dict) -> None:
    plan = Plan.load(job["plan"])
    model = load(job)
    engine = hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=job["lr"]),
                                 max_grad_norm=job.get("max_grad_norm"),
                                 gradient_accumulation_steps=job.get("accum", 1),
                                 timeout_s=job.get("timeout_s", 60), activation_checkpointing=job.get("ckpt", False))
    rank = torch.distributed.get_rank()
    data = batches(job, model.config.vocab_size)
    G = sum(job["sequences"])
    attn = [r["rank"] for r in plan.ranks if r["role"] == "attention"]
    offsets = {}
    off = 0
    for r, s in zip(attn, job["sequences"]):
        offsets[r] = (off, s)
        off += s
    start = 0
    if job.get("resume_from"):
        engine.load_state(job["resume_from"])
        start = engine.step
    losses = []
    accum = job.get("accum", 1)
    for step in range(start, job["steps"]):
        if job.get("kill_rank_at") and job["kill_rank_at"] == [rank, step]:
            os.kill(os.getpid(), signal.SIGKILL)
        for a in range(accum):
            base = (step * accum + a) * G
            batch = None
            if rank in offsets:
                o, s = offsets[rank]
                ids = data[base + o: base + o + s]
                batch = {"input_ids": ids, "labels": ids}
            res = engine.train_step(batch)
        losses.append(res.loss)
        if job.get("save_state_at") == step + 1:
            engine.save_state(os.path.join(job["out"], "state"))
        if job.get("save_pretrained_at") == step + 1:
            engine.save_pretrained(os.path.join(job["out"], "checkpoint"))
    engine.save_pretrained(os.path.join(job["out"], "model"))
    if rank == 0:
        json.dump({"losses": losses, "busy": res.busy_s, "tokens_per_s": res.tokens_per_s},
                  open(os.path.join(job["out"], "zebra.json"), "w"))
    engine.close()


if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    reference(job) if "--reference" in sys.argv else rank_main(job)
