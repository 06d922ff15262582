"""A prepared model under transformers' ``Trainer`` (what TRL's SFTTrainer builds on): gradient accumulation with
``num_items_in_batch`` (Trainer counts the label tokens of the accumulated micro-batches and hands the count to the
model's loss), padded labels, the router's aux loss, and evaluation. It must train exactly as the unprepared model:
the same logged losses, the same weights after the optimizer steps, the same evaluation loss."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, MixtralConfig, Trainer, TrainingArguments, default_data_collator

import hf_hetermoe as hetermoe

VOCAB = 96


def _dataset(rows: int, seed: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, 16), generator=gen)
    labels = ids.clone()
    lengths = torch.randint(6, 17, (rows,), generator=gen)  # right padding of varied length: ignored labels
    labels[torch.arange(16)[None, :] >= lengths[:, None]] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


class _Recording(Trainer):
    """Records, per training micro-batch, whether the loss came without logits (the fused loss ran) and whether
    Trainer handed the model the accumulated batches' token count."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused, self.counted = [], []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.fused.append(outputs.logits is None)
            self.counted.append(num_items_in_batch is not None)
        return (loss, outputs) if return_outputs else loss


def _train(tmp_path, prepared: bool) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.02)
    model = AutoModelForCausalLM.from_config(config)
    if prepared:
        hetermoe.prepare(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / ("prepared" if prepared else "plain")), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", per_device_eval_batch_size=4,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = _Recording(model=model, args=args, train_dataset=_dataset(12, 1), eval_dataset=_dataset(8, 2),
                      data_collator=default_data_collator)
    trainer.train()
    assert trainer.counted == [True] * 6  # 3 steps x 2 accumulated micro-batches
    assert trainer.fused == [prepared] * 6
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    eval_loss = trainer.evaluate()["eval_loss"]
    return losses, eval_loss, {k: v.detach().clone() for k, v in model.named_parameters()}


def test_trainer_with_gradient_accumulation_matches_unprepared(tmp_path):
    want_losses, want_eval, want_params = _train(tmp_path, prepared=False)
    got_losses, got_eval, got_params = _train(tmp_path, prepared=True)
    assert len(got_losses) == 3
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    assert got_eval == pytest.approx(want_eval, rel=1e-5)
    for name, want in want_params.items():
        err = float((got_params[name].double() - want.double()).norm() / want.double().norm())
        assert err <= 1e-4, f"{name} differs by {err:.2e} relative after Trainer's steps"
