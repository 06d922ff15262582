"""The built-in demo end to end (few steps), and atomic checkpoint writes."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_hetermoe.checkpoint import atomic_save_pretrained
from hf_hetermoe.demo import add_demo_arguments, default_corpus, finetune, main


def _args(tmp_path, **overrides):
    import argparse

    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        ["--steps", "4", "--hidden-size", "32", "--layers", "1", "--experts", "4", "--vocab-size", "300",
         "--seq-len", "32", "--output-dir", str(tmp_path / "ckpt")]
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_demo_trains_saves_and_reloads_in_plain_transformers(tmp_path):
    summary = finetune(_args(tmp_path))
    assert summary["steps"] == 4 and all(map(lambda v: v == v, (summary["first_loss"], summary["last_loss"])))
    assert summary["reload_matches"], summary
    ckpt = tmp_path / "ckpt"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "hetermoe" not in json.dumps(config)
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".ckpt.*")), "staging folders left behind"


def test_finetunes_a_pretrained_checkpoint_and_pushes_the_checked_folder(tmp_path, monkeypatch):
    """``--model``: a saved Qwen3-MoE checkpoint with its tokenizer, fine-tuned with activation checkpointing, saved,
    reloaded and checked; ``--push-to-hub`` then uploads exactly that folder (the Hub calls are recorded here: the
    machine has no Hub access)."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    from hf_hetermoe.demo import build_tokenizer
    from hf_hetermoe.model_patches import MODEL_PATCHES

    source = tmp_path / "pretrained"
    tokenizer = build_tokenizer(default_corpus(), 300)
    config = MODEL_PATCHES["qwen3_moe"].tiny_config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])) or "commit-url")
    summary = finetune(_args(tmp_path, model=str(source), gradient_checkpointing=True, push_to_hub="me/tiny-moe"))
    assert summary["reload_matches"] and summary["last_loss"] == summary["last_loss"]
    ckpt = tmp_path / "ckpt"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert calls == [("create", "me/tiny-moe"), ("upload", "me/tiny-moe", str(ckpt))]
    assert summary["pushed"] == "commit-url"


def test_demo_main_exit_code(tmp_path, capsys):
    code = main(["--steps", "2", "--hidden-size", "32", "--layers", "1", "--experts", "3", "--vocab-size", "300",
                 "--seq-len", "32", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert "reloaded with plain transformers" in capsys.readouterr().out


def test_demo_refuses_processes_that_accelerate_left_unjoined(tmp_path, monkeypatch):
    """Two launched processes that accelerate joined into no process group (FSDP asked for without GPUs, say) would
    each train alone and race to write one checkpoint folder: refused before anything is built or written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="joined them into no process group"):
        finetune(_args(tmp_path))
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture
def fresh_accelerate():
    """accelerate's state is one per process: a test that sets it differently starts it afresh, and leaves it so."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_demo_mixed_precision_follows_accelerate_launch(tmp_path, monkeypatch, fresh_accelerate):
    """``--mixed-precision auto`` takes what ``accelerate launch --mixed_precision`` chose (its environment)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    summary = finetune(_args(tmp_path, steps=2))
    assert summary["mixed_precision"] == "bf16" and summary["reload_matches"], summary


def test_demo_gradient_accumulation(tmp_path, fresh_accelerate):
    """Two batches of 4 per optimizer step see the same sequences as one batch of 8 (the sampler's order does not
    depend on the batch size): the same first loss, averaged over the micro-batches, up to the router's aux loss
    (computed per forward); the cosine schedule ends at zero after --steps optimizer steps either way."""
    whole = finetune(_args(tmp_path / "whole", batch_size=8, steps=3))
    accumulated = finetune(_args(tmp_path / "accumulated", batch_size=4, gradient_accumulation_steps=2, steps=3))
    assert accumulated["steps"] == 3 and accumulated["reload_matches"], accumulated
    assert accumulated["first_loss"] == pytest.approx(whole["first_loss"], rel=1e-4)  # 4 sequences alone: 2e-3 off
    assert accumulated["final_lr"] == whole["final_lr"] == 0.0
    with pytest.raises(ValueError, match="--gradient-accumulation-steps must be at least 1"):
        finetune(_args(tmp_path, gradient_accumulation_steps=0))


def test_demo_resumes_where_it_stopped(tmp_path, monkeypatch, fresh_accelerate):
    """A run stopped right after saving its training state at step 3, then resumed with --resume, trains on as the
    run that never stopped: the same loss at every step and the same final weights, bit for bit. Batches of 32 take
    the corpus's 155 sequences in 5 batches an epoch (the last one short), so the resumed run skips the first 3 of
    its epoch and then crosses into the next."""
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file

    import hf_hetermoe.demo as demo

    kw = dict(batch_size=32, steps=7)
    whole = finetune(_args(tmp_path / "whole", **kw))

    class Stopped(Exception):
        pass

    save = demo.save_training_state

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise Stopped

    monkeypatch.setattr(demo, "save_training_state", save_then_stop)
    with pytest.raises(Stopped):
        finetune(_args(tmp_path / "run", save_state_every=3, **kw))
    monkeypatch.setattr(demo, "save_training_state", save)
    state = tmp_path / "run" / "ckpt-state"
    assert json.loads((state / "progress.json").read_text())["losses"] == whole["losses"][:3]
    assert not (tmp_path / "run" / "ckpt").exists() and not list((tmp_path / "run").glob(".*saving*"))

    AcceleratorState._reset_state(reset_partial_state=True)  # a new process, as after a crash
    GradientState._reset_state()
    resumed = finetune(_args(tmp_path / "run", resume=True, **kw))
    assert resumed["resumed_from_step"] == 3 and resumed["reload_matches"], resumed
    assert resumed["losses"] == whole["losses"]
    want, got = load_file(tmp_path / "whole" / "ckpt" / "model.safetensors"), load_file(
        tmp_path / "run" / "ckpt" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_demo_resume_needs_a_saved_state(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no training state"):
        finetune(_args(tmp_path, resume=True))
    with pytest.raises(ValueError, match="--save-state-every"):
        finetune(_args(tmp_path, save_state_every=-1))


def test_training_state_save_is_atomic(tmp_path, fresh_accelerate):
    """A save that fails midway leaves the previous training state whole and no staging folder behind."""
    from accelerate import Accelerator

    from hf_hetermoe.demo import save_training_state

    accelerator = Accelerator()
    state = tmp_path / "state"
    save_training_state(accelerator, state, {"losses": [1.0]})
    before = sorted(p.name for p in state.iterdir())

    def broken(output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        Path(output_dir, "half-written.bin").write_bytes(b"x")
        raise OSError("No space left on device")

    accelerator.save_state = broken
    with pytest.raises(OSError, match="No space"):
        save_training_state(accelerator, state, {"losses": [1.0, 2.0]})
    assert sorted(p.name for p in state.iterdir()) == before
    assert json.loads((state / "progress.json").read_text()) == {"losses": [1.0]}
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_demo_rejects_missing_or_short_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="--corpus"):
        finetune(_args(tmp_path, corpus=tmp_path / "nope.txt"))
    short = tmp_path / "short.txt"
    short.write_text("only a few words\n" * 3)
    with pytest.raises(ValueError, match="fewer than --seq-len"):
        finetune(_args(tmp_path, corpus=short, seq_len=512, vocab_size=280))


def test_default_corpus_ships_with_the_package():
    assert default_corpus().is_file() and default_corpus().stat().st_size > 1000


class _Saver:
    def __init__(self, payload: str, fail: bool = False):
        self.payload, self.fail = payload, fail

    def save_pretrained(self, path, **kwargs):
        (path / "weights.bin").write_text(self.payload)
        if self.fail:
            raise OSError("disk full")
        (path / "config.json").write_text("{}")


def test_atomic_save_replaces_whole_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    atomic_save_pretrained(_Saver("v1"), target)
    atomic_save_pretrained(_Saver("v2"), target)
    assert (target / "weights.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_keeps_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "ckpt"
    atomic_save_pretrained(_Saver("good"), target)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_pretrained(_Saver("half", fail=True), target)
    assert (target / "weights.bin").read_text() == "good" and (target / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "staging folder left behind"


def test_atomic_save_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    with pytest.raises(FileExistsError, match="not a directory"):
        atomic_save_pretrained(SimpleNamespace(save_pretrained=lambda p: None), tmp_path / "ckpt")


def test_active_params_counts_k_of_e_experts():
    from hf_hetermoe.demo import active_params, build_model

    model = build_model(SimpleNamespace(hidden_size=32, layers=1, experts=4, top_k=2, seq_len=16), 100)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert active_params(model) == total - expert // 2
    assert torch.is_tensor(next(model.parameters()))
