"""Disaggregated (HeterMoE zebra) fine-tuning of a transformers MoE model, launched through accelerate.

    hetermoe launch --cluster examples/cluster.yaml --model ./my-moe examples/finetune_hetero.py --model ./my-moe \
        --data corpus.txt --steps 100 --output out/

    # no GPU, no files: a tiny Mixtral, a generated corpus, 1 attention + 2 expert processes over gloo
    python -c "from hf_hetermoe.runtime import zebra_plan; from transformers import MixtralConfig; \
        zebra_plan(MixtralConfig(...), 1, 2).save('plan.json')"
    hetermoe launch --plan plan.json examples/finetune_hetero.py --output out/

from_pretrained (a local directory) -> hetermoe.prepare -> hetermoe.distribute (plan from ``hetermoe launch``)
-> fine-tune on a ``datasets`` corpus (text or jsonl with a "text" field; a tokenizer from the model directory
if it has one, else bytes) with a progress bar on the main process -> engine.save_pretrained -> reload the
result in plain transformers and evaluate it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import load_dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

import hf_hetermoe as hetermoe
from hf_hetermoe.files import write_text


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model directory (default: a tiny Mixtral written to OUTPUT/base)")
    p.add_argument("--data", help="text or .jsonl file (default: a generated corpus in OUTPUT/corpus.txt)")
    p.add_argument("--output", default="finetune_hetero_out", help="output directory")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (at most one epoch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a silent rank is declared lost")
    return p.parse_args()


def tiny_model(path: Path) -> None:
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512, output_router_logits=True, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def write_corpus(path: Path, lines: int = 400) -> None:
    words = "the expert layers run on older gpus while attention runs on newer ones and zebra keeps both busy".split()
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(words[i] for i in torch.randint(0, len(words), (24,), generator=g).tolist())
                     for _ in range(lines))
    write_text(path, text + "\n")


def tokenized_blocks(data: str, model_dir: str, vocab: int, seq_len: int):
    """``datasets`` corpus -> fixed blocks of ``seq_len`` token ids (packed; no padding)."""
    kind = "json" if data.endswith((".json", ".jsonl")) else "text"
    ds = load_dataset(kind, data_files=data, split="train")
    tok = None
    if any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(batch):
        if tok is not None:
            ids = tok(batch["text"])["input_ids"]
        else:
            ids = [[b % vocab for b in t.encode()] for t in batch["text"]]
        flat = [i for seq in ids for i in seq]
        n = len(flat) // seq_len
        return {"input_ids": [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)]}

    return ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names).with_format("torch")


def collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    args = parse_args()
    state = PartialState(cpu=not torch.cuda.is_available())  # no GPU: accelerate's MULTI_CPU (gloo)
    out = Path(args.output)
    model_dir = args.model or str(out / "base")
    data = args.data or str(out / "corpus.txt")
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if args.model is None and not (out / "base" / "config.json").exists():
            tiny_model(out / "base")
        if args.data is None and not Path(data).exists():
            write_corpus(Path(data))
    state.wait_for_everyone()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = hetermoe.prepare(model)
    vocab = model.config.vocab_size
    engine = hetermoe.distribute(
        model, optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3)),
        max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        activation_checkpointing=args.activation_checkpointing, timeout_s=args.timeout)
    blocks = tokenized_blocks(data, model_dir, vocab, engine.plan.seq_len)
    loader = engine.dataloader(blocks, collate_fn=collate)
    steps = min(args.steps, len(loader))
    bar = tqdm(total=steps, disable=not state.is_main_process, desc="zebra fine-tune")
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        res = engine.train_step(batch)
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.4f}", tok_s=f"{res.tokens_per_s:.0f}",
                        util=f"{min(res.utilisation):.0%}-{max(res.utilisation):.0%}")
    bar.close()
    if state.is_main_process:  # the last step's per-rank busy time: `hetermoe launch ... --feedback` re-plans from it
        from hf_hetermoe.planner.feedback import save_measurement

        save_measurement(out / "step.json", engine.plan, res.busy_s, res.seconds)
    final = out / "final"
    engine.save_pretrained(final)
    engine.close()
    if state.is_main_process:
        reloaded = AutoModelForCausalLM.from_pretrained(final)  # plain transformers: no hetermoe needed
        batch = collate([blocks[i] for i in range(min(2, len(blocks)))])
        with torch.no_grad():
            loss = reloaded(**batch).loss.item()
        print(f"saved {final}; reloaded in plain transformers: loss {loss:.4f} (ppl {math.exp(loss):.1f}) "
              f"after {steps} steps, last train loss {res.loss:.4f}")


if __name__ == "__main__":
    main()
