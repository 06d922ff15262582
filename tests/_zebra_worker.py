"""One rank of a CPU (gloo) zebra job for tests/test_runtime.py, and the single-process reference trainer.

    python tests/_zebra_worker.py job.json              # a rank (RANK/WORLD_SIZE/MASTER_* set by the test)
    python tests/_zebra_worker.py job.json --reference  # every case, one process, plain training

job.json: {"model": dir, "seq_len": S, "seed": s, "out": dir, "timeout_s": t,
           "cases": [{"name": str, "plan": plan.json, "steps": n, "lr": f, "max_grad_norm": f | null,
                      "resume_at": k | null, "save_pretrained_at": k | null, "kill": [rank, step] | null,
                      "pad": bool}]}
Data: the same deterministic token batches in both modes. Each step takes the next G = (sum of the plan's
attention-rank sequences) sequences; attention rank i takes its slice in rank order and splits it into R
micro-batches. The reference weights each micro-batch loss as the engine does (its share of the global batch).
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


def shares(plan: Plan) -> list[tuple[int, int]]:
    """(global rank, sequences) of each attention rank, in rank order."""
    return [(r["rank"], r.get("sequences", plan.sequences_per_attention_rank)) for r in plan.ranks
            if r["role"] == "attention"]


def data(job: dict, case: dict, plan: Plan, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(job["seed"])
    total = sum(s for _, s in shares(plan)) * case["steps"]
    return torch.randint(0, vocab, (total, job["seq_len"]), generator=g)


def batch_of(tokens: torch.Tensor, start: int, stop: int, pad: bool) -> dict[str, torch.Tensor]:
    """Rows start..stop of the data; with ``pad``, global row j ends in j % 4 padding tokens (mask 0, label -100),
    so every micro-batch mixes padded and full sequences."""
    ids = tokens[start:stop]
    if not pad:
        return {"input_ids": ids, "labels": ids}
    mask = torch.ones_like(ids)
    for i, j in enumerate(range(start, stop)):
        if j % 4:
            mask[i, -(j % 4):] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def load(job: dict):
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    return hetermoe.prepare(model)


def reference(job: dict, case: dict) -> None:
    plan = Plan.load(case["plan"])
    model = load(job)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=case["lr"])
    tokens = data(job, case, plan, model.config.vocab_size)
    parts = shares(plan)
    G, R = sum(s for _, s in parts), plan.micro_batches
    losses = []
    for step in range(case["steps"]):
        off, step_loss = 0, 0.0
        for _, s in parts:
            n = s // R
            for m in range(R):
                row = step * G + off + m * n
                loss = model(**batch_of(tokens, row, row + n, case.get("pad", False))).loss
                (loss * (s / (G * R))).backward()
                step_loss += float(loss.detach()) * s / (G * R)
            off += s
        if case.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    out = os.path.join(job["out"], case["name"])
    os.makedirs(out, exist_ok=True)
    json.dump({"losses": losses}, open(os.path.join(out, "reference.json"), "w"))
    model.save_pretrained(os.path.join(out, "reference_model"))


def run_steps(engine, job, case, plan, tokens, start, stop, rank):
    parts = shares(plan)
    G = sum(s for _, s in parts)
    offsets, off = {}, 0
    for r, s in parts:
        offsets[r] = (off, s)
        off += s
    out = os.path.join(job["out"], case["name"])
    losses = []
    for step in range(start, stop):
        if case.get("kill") == [rank, step]:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = None
        if rank in offsets:
            o, s = offsets[rank]
            batch = batch_of(tokens, step * G + o, step * G + o + s, case.get("pad", False))
        losses.append(engine.train_step(batch).loss)
        if case.get("resume_at") == step + 1:
            engine.save_state(os.path.join(out, "state"))
        if case.get("save_pretrained_at") == step + 1:
            engine.save_pretrained(os.path.join(out, "checkpoint"))
    return losses


def rank_case(job: dict, case: dict) -> None:
    plan = Plan.load(case["plan"])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ["RANK"])

    def engine_for():
        model = load(job)
        return hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=case["lr"]),
                                   max_grad_norm=case.get("max_grad_norm"), timeout_s=job.get("timeout_s", 60)), model

    engine, model = engine_for()
    out = os.path.join(job["out"], case["name"])
    os.makedirs(out, exist_ok=True)
    held = [n for n, p in model.named_parameters() if not p.is_meta]
    json.dump({"role": plan.ranks[rank]["role"], "held": held}, open(os.path.join(out, f"held{rank}.json"), "w"))
    tokens = data(job, case, plan, model.config.vocab_size)
    losses = run_steps(engine, job, case, plan, tokens, 0, case["steps"], rank)
    engine.save_pretrained(os.path.join(out, "model"))
    result = {"losses": losses}
    if case.get("resume_at"):
        resumed, _ = engine_for()
        resumed.load_state(os.path.join(out, "state"))
        result["resumed_from"] = resumed.step
        result["resumed_losses"] = run_steps(resumed, job, {**case, "resume_at": None}, plan, tokens, resumed.step,
                                             case["steps"], rank)
        resumed.close()
    engine.close()
    if rank == 0:
        json.dump(result, open(os.path.join(out, "zebra.json"), "w"))


if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    for case in job["cases"]:
        (reference if "--reference" in sys.argv else rank_case)(job, case)
