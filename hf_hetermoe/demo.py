"""The fine-tuning script (``hetermoe demo`` / ``python examples/finetune.py``).

By default end to end with no Hub access: train a byte-level BPE tokenizer on a text corpus (the small one shipped
in the package), load the corpus through ``datasets``, build a small Mixtral-style model from a config,
``hetermoe.prepare`` it, fine-tune with AdamW under ``accelerate``, save a standard checkpoint atomically, reload it
with plain transformers and check the logits match. With ``--model`` (a checkpoint directory or a Hub id) the model
and its tokenizer come from ``from_pretrained`` instead, for any supported MoE family; ``--push-to-hub`` uploads the
saved and checked checkpoint folder.

Under ``accelerate launch`` (DDP, DeepSpeed ZeRO-1/2/3, FSDP) every rank takes part in gathering the checkpoint and
in the reload check; ``--gradient-accumulation-steps`` uses accelerate's accumulation, and ``--save-state-every`` /
``--resume`` save and continue the whole training state (a resumed run repeats an uninterrupted one's losses).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import atomic_save_pretrained, swap_in
from .config import HeterMoEConfig
from .files import write_json
from .prepare import prepare


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch, in each process")
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=1,
        help="batches whose gradients make one optimizer step (accelerate's accumulation; DeepSpeed's too)",
    )
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warm-up, cosine decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus", type=Path, default=None, help="text file, one document per line (default: built-in)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/hetermoe-demo"), help="checkpoint folder")
    parser.add_argument(
        "--save-state-every", type=int, default=0, metavar="STEPS",
        help="save the whole training state (weights, optimizer, scheduler, RNG, data position) every STEPS optimizer "
        "steps into --state-dir, atomically (0: never)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None,
        help="training-state folder for --save-state-every and --resume (default: the output folder's name + -state)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from --state-dir's training state: the same losses as a run that was never stopped",
    )
    parser.add_argument(
        "--model", default=None,
        help="fine-tune this causal LM (checkpoint directory or Hub id, with its tokenizer) instead of building the "
        "small Mixtral; the size options below are then ignored",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing per layer")
    parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID",
        help="after saving and checking the checkpoint, upload its folder to this Hub repository",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "triton", "reference"),
        default="auto",
        help="expert operators: auto = Triton on CUDA, reference elsewhere",
    )
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary trained on the corpus")
    parser.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        default="auto",
        help="auto = what `accelerate launch --mixed_precision` (or its config) chose, else bf16 on a CUDA GPU that "
        "supports it, else no",
    )
    return parser


def default_corpus() -> Path:
    return Path(str(resources.files("hf_hetermoe") / "data" / "tiny_corpus.txt"))


def build_tokenizer(corpus: Path, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_dataset(corpus: Path, tokenizer, seq_len: int):
    """The corpus through ``datasets``: tokenized, joined with EOS, cut into blocks of ``seq_len`` tokens."""
    from datasets import load_dataset

    raw = load_dataset("text", data_files=str(corpus), split="train")
    raw = raw.filter(lambda row: row["text"].strip() != "")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": [tokenizer(text)["input_ids"] + [eos] for text in batch["text"]]}

    def group(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        usable = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    blocks = tokenized.map(group, batched=True, batch_size=10_000, remove_columns=["ids"])
    if len(blocks) == 0:
        raise ValueError(
            f"{corpus} holds fewer than --seq-len={seq_len} tokens; give a longer corpus or a smaller --seq-len"
        )
    return blocks.with_format("torch")


def build_model(args, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4 * args.seq_len,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config)


def active_params(model) -> int:
    """Parameters one token touches: everything but the routed experts, plus k / E of them."""
    from .planner.model_dims import model_dims

    dims = model_dims(model.config)
    expert = sum(_numel(p) for n, p in model.named_parameters() if ".experts." in n)
    return sum(_numel(p) for p in model.parameters()) - expert + expert * dims.top_k // dims.num_experts


def _numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter: DeepSpeed ZeRO-3 keeps a slice in each rank and the full size in ``ds_numel``
    (FSDP2's DTensors report their full size themselves)."""
    return getattr(param, "ds_numel", None) or param.numel()


PROGRESS = "progress.json"  # beside accelerate's files in a training-state folder: the losses and the data position


def save_training_state(accelerator, state_dir: Path, progress: dict) -> None:
    """``accelerator.save_state`` into ``state_dir`` plus the loop's ``progress``, atomically: every rank writes its
    part into a staging folder (a shared filesystem, as accelerate assumes), then the main process swaps it in, so a
    crash or a full disk mid-save leaves the previous state whole."""
    staging = state_dir.with_name(f".{state_dir.name}.saving")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed save's leftovers
        state_dir.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(staging / PROGRESS, progress)
            swap_in(staging, state_dir)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()


def _check_joined(accelerator) -> None:
    """Refuse a launch whose processes accelerate left unjoined: each would train alone and all would write the same
    checkpoint folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"{launched} processes were launched, but accelerate joined them into no process group (it chose "
            f"{accelerator.distributed_type.value} on {accelerator.device}), so each would train and save alone. "
            "Without GPUs: `accelerate launch --cpu` for data parallelism, or `accelerate launch --use_deepspeed` "
            "with DS_ACCELERATOR=cpu; accelerate runs FSDP on GPUs only."
        )


def _check_can_save(accelerator) -> None:
    """Refuse, before training, a DeepSpeed ZeRO-3 run whose weights could not be gathered for the checkpoint."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") not in (True, "true"):
        raise ValueError(
            "DeepSpeed ZeRO-3 leaves each rank a slice of every weight, and this config does not gather them for "
            "saving: the run would train and then fail to write its checkpoint. Set `zero3_save_16bit_model: true` "
            "in the accelerate config (`--zero3_save_16bit_model true`), or `stage3_gather_16bit_weights_on_model_save"
            ": true` under `zero_optimization` in the DeepSpeed config."
        )


def _process_group_kwargs() -> list:
    """accelerate starts DeepSpeed's process group on a GPU backend only: without CUDA (``accelerate launch
    --use_deepspeed`` on CPUs, with ``DS_ACCELERATOR=cpu``) it would run every rank as a lone process. Name gloo."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def load_pretrained(name: str):
    """``(model, tokenizer)`` of a causal LM checkpoint (directory or Hub id), the model in fp32 (the optimizer's
    master weights; ``--mixed-precision`` runs the forward in bf16 / fp16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {name}: its tokenizer has no eos token, which separates the corpus's documents")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, tokenizer


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, as Trainer's ``gradient_checkpointing=True``:
    ``activation_checkpointing_enable`` from transformers 5.2x, the deprecated older name before."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def finetune(args: argparse.Namespace) -> dict:
    """Run the demo; returns a summary dict. Raises if the reloaded checkpoint's logits differ."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient-accumulation-steps must be at least 1 (got {args.gradient_accumulation_steps})")
    if args.save_state_every < 0:
        raise ValueError(f"--save-state-every must be 0 (never) or a number of steps (got {args.save_state_every})")
    state_dir = Path(args.state_dir or args.output_dir.with_name(args.output_dir.name + "-state"))
    if args.resume and not (state_dir / PROGRESS).is_file():
        raise FileNotFoundError(
            f"--resume: {state_dir} holds no training state (no {PROGRESS}); save one with --save-state-every, or "
            "name its folder with --state-dir"
        )
    # The seedable sampler: each epoch's order follows from the seed and the epoch alone, so a resumed run can find
    # its place in it.
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=args.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              kwargs_handlers=_process_group_kwargs())
    _check_joined(accelerator)
    _check_can_save(accelerator)
    logger = get_logger("hf_hetermoe.demo")
    set_seed(args.seed)
    corpus = args.corpus or default_corpus()
    if not Path(corpus).is_file():
        raise FileNotFoundError(f"--corpus {corpus} does not exist")

    if args.model:
        model, tokenizer = load_pretrained(args.model)
    else:
        tokenizer = build_tokenizer(corpus, args.vocab_size)
        model = build_model(args, len(tokenizer))
    dataset = build_dataset(corpus, tokenizer, args.seq_len)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    prepare(model, HeterMoEConfig(backend=args.backend))

    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # accelerate steps a prepared scheduler once per process at each optimizer step (it counts the steps of one
    # process's batches), so the schedule is laid out in those units.
    scale = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 10) * scale, args.steps * scale)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    flops_per_token = 6 * active_params(accelerator.unwrap_model(model))
    losses, tokens_seen, batches_seen = [], 0, 0
    if args.resume:
        accelerator.load_state(state_dir)  # weights, optimizer, scheduler, RNG, accumulation counter
        progress = json.loads((state_dir / PROGRESS).read_text())
        losses, tokens_seen, batches_seen = progress["losses"], progress["tokens_seen"], progress["batches_seen"]
        if len(losses) >= args.steps:
            raise ValueError(f"--resume: {state_dir} is at step {len(losses)} already; ask for more --steps")
    resumed_from, tokens_before = len(losses), tokens_seen
    started = time.perf_counter()
    micro_losses, step_tokens, step_start = [], 0, time.perf_counter()
    bar = tqdm(total=args.steps, initial=resumed_from, desc="fine-tuning",
               disable=not accelerator.is_local_main_process)
    model.train()
    epoch, skip = divmod(batches_seen, len(loader))
    while len(losses) < args.steps:
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            if len(losses) == args.steps:
                break
            ids = batch["input_ids"]
            with accelerator.accumulate(model):  # the gradients of --gradient-accumulation-steps batches, one step
                out = model(input_ids=ids, labels=ids)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(out.loss.detach())
            step_tokens += ids.numel() * accelerator.num_processes
            batches_seen += 1
            if not accelerator.sync_gradients:
                continue
            loss = torch.stack(micro_losses).float().mean().item()  # once per optimizer step, for the progress bar
            losses.append(loss)
            tokens_seen += step_tokens
            tok_s = step_tokens / (time.perf_counter() - step_start)
            micro_losses, step_tokens = [], 0
            aux = getattr(out, "aux_loss", None)
            bar.set_postfix(loss=f"{loss:.3f}", **({"aux": f"{aux.item():.3f}"} if aux is not None else {}),
                            tok_s=f"{tok_s:,.0f}")
            bar.update()
            if len(losses) % 10 == 0 or len(losses) == args.steps:
                mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
                logger.info(
                    f"step {len(losses)} loss {loss:.4f} tok/s {tok_s:,.0f} "
                    f"TFLOP/s {flops_per_token * tok_s / 1e12:.3f} mem {mem:.2f} GiB"
                )
            if args.save_state_every and len(losses) % args.save_state_every == 0 and len(losses) < args.steps:
                save_training_state(accelerator, state_dir, dict(losses=losses, tokens_seen=tokens_seen,
                                                                 batches_seen=batches_seen))
            step_start = time.perf_counter()
        epoch, skip = epoch + 1, 0
    bar.close()
    elapsed = time.perf_counter() - started

    accelerator.wait_for_everyone()
    # keep_fp32_wrapper=False: drop accelerate's autocast wrapper so the reload check compares fp32 to fp32.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    summary = {
        "steps": len(losses),
        "losses": losses,
        "resumed_from_step": resumed_from,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "tokens_per_s": (tokens_seen - tokens_before) / elapsed,
        "backend": _backend_used(unwrapped),
        "mixed_precision": accelerator.mixed_precision,
        "final_lr": scheduler.get_last_lr()[0],
    }
    summary.update(_save_and_check(args, accelerator, model, unwrapped, tokenizer, dataset, summary["backend"]))
    return summary


def _save_and_check(args, accelerator, model, unwrapped, tokenizer, dataset, backend: str) -> dict:
    """Save the trained model as a standard checkpoint, reload it in plain transformers and compare logits (and push
    the checked folder with --push-to-hub). Every rank calls it; the main process returns what it found."""
    from transformers import AutoModelForCausalLM

    found = {}
    # Every rank takes part in both: under DeepSpeed ZeRO-3 or FSDP each holds a slice of every weight, so gathering
    # the state dict and running the trained model are collectives (ZeRO-3's state dict comes back on the main
    # process only; accelerate raises there unless the config saves 16-bit weights, and says so).
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        path = atomic_save_pretrained(unwrapped, args.output_dir, tokenizer, state_dict=state_dict)
    sample = dataset[: min(4, len(dataset))]["input_ids"].to(accelerator.device)
    want, dtype = _trained_logits(accelerator, model, unwrapped, sample)
    if accelerator.is_main_process:
        with _without_zero3_init():  # this process alone: not partitioned across the ranks
            plain = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager")
        plain.to(accelerator.device)
        with torch.no_grad():  # in the precision the trained model ran in
            got = plain.to(dtype)(sample).logits.float()
        found.update(checkpoint=str(path), max_abs_logit_diff=(want - got).abs().max().item())
        tolerance = _RELOAD_TOLERANCE[dtype]
        if backend != "reference":  # the Triton kernels' tiles and bf16 products in every dtype
            tolerance = max(tolerance, 2e-2)
        found["reload_matches"] = found["max_abs_logit_diff"] <= tolerance * max(1.0, want.abs().max().item())
        if args.push_to_hub and found["reload_matches"]:
            from huggingface_hub import create_repo, upload_folder

            # The folder that was saved and checked, as it is (no second save that could differ from it).
            create_repo(args.push_to_hub, exist_ok=True)
            commit = upload_folder(repo_id=args.push_to_hub, folder_path=str(path),
                                   commit_message=f"hf-hetermoe fine-tune: {args.steps} steps")
            found["pushed"] = str(getattr(commit, "commit_url", commit))
    return found


# Largest |logit difference| / max(1, |logit|) between the trained model and its reloaded checkpoint, by the dtype both
# ran in: the prepared experts and transformers' eager ones sum in different orders.
_RELOAD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _trained_logits(accelerator, model, unwrapped, sample: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """The trained model's logits on ``sample`` (as fp32), computed on every rank, and the dtype they were computed
    in. Under DeepSpeed or FSDP the wrapped model runs as it trained, gathering its slices, in its weights' dtype
    (16-bit where DeepSpeed's bf16 / fp16 mode holds them so); otherwise the unwrapped model is cast to fp32 first."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    runner = model if sharded else unwrapped.float()
    runner.eval()
    with torch.no_grad():
        logits = runner(sample).logits
    dtype = next(unwrapped.parameters()).dtype
    if sharded and accelerator.mixed_precision in ("bf16", "fp16"):  # FSDP's mixed-precision policy, DeepSpeed's mode
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    return logits.float(), dtype


@contextlib.contextmanager
def _without_zero3_init():
    """``from_pretrained`` loads a whole model here even where accelerate's DeepSpeed ZeRO-3 plugin is active (which
    makes transformers partition every model it loads across the ranks: a collective only this rank would join)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _backend_used(model) -> str:
    from .kernels import resolve_backend

    state = getattr(model, "_hetermoe_state", None)
    return resolve_backend(state.config.backend if state else "auto", next(model.parameters()).device)


def main(argv: list[str] | None = None) -> int:
    parser = add_demo_arguments(argparse.ArgumentParser("hetermoe demo", description=__doc__))
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    summary = finetune(args)
    if "checkpoint" not in summary:  # not the main process
        return 0
    s = summary
    print(
        f"\nhf-hetermoe demo: {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} "
        f"(learning rate at the end {s['final_lr']:.1e}), "
        f"{s['tokens_per_s']:,.0f} tokens/s ({s['backend']} experts, mixed precision {s['mixed_precision']})\n"
        f"checkpoint: {summary['checkpoint']}\n"
        f"reloaded with plain transformers: max |logit diff| = {summary['max_abs_logit_diff']:.2e} "
        f"-> {'OK' if summary['reload_matches'] else 'MISMATCH'}"
    )
    if "pushed" in summary:
        print(f"pushed to the Hub: {summary['pushed']}")
    elif getattr(args, "push_to_hub", None):
        print("not pushed to the Hub: the reloaded checkpoint did not match")
    if not math.isfinite(summary["last_loss"]):
        print("training diverged (non-finite loss)")
        return 1
    return 0 if summary["reload_matches"] else 1
