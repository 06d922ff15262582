"""One rank of transformers' ``Trainer`` with DeepSpeed ZeRO-3 (``tests/test_distributed.py``), on CPU over gloo.

    python _trainer_worker.py OUT_DIR PREPARED

What Trainer and TRL's SFTTrainer do with ``deepspeed=...`` on GPUs: ``TrainingArguments`` keeps a DeepSpeed config
alive, so the model built after it is partitioned as it is made (``zero.Init``); ``prepare`` (when PREPARED is 1)
then runs on the partitioned model; Trainer wraps it in DeepSpeed's engine, accumulates two micro-batches a step
and saves the model gathered from the ranks. accelerate starts DeepSpeed's process group on GPU backends only, so the
state is configured here first, on gloo (``use_configured_state``). Rank 0 writes the logged losses, whether the
fused loss ran, and the saved model under OUT_DIR.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys

from _dist_worker import DEADLINE_S

if __name__ == "__main__":
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)

import torch  # noqa: E402

VOCAB = 96


def main(out_dir: str, prepared: bool) -> None:
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, MixtralConfig, Trainer, TrainingArguments, default_data_collator

    import hf_hetermoe as hetermoe

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
    ds_config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    args = TrainingArguments(
        output_dir=out_dir, accelerator_config={"use_configured_state": True}, deepspeed=ds_config,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to=[], seed=0, save_strategy="no",
        disable_tqdm=True,
    )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (16, 16), generator=gen).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.02)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight.numel() == 0 and hasattr(model.lm_head.weight, "ds_id")  # partitioned as made
    if prepared:
        hetermoe.prepare(model)
    fused = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            fused.append(outputs.logits is None)  # the fused cross-entropy built no logits
            return (loss, outputs) if return_outputs else loss

    trainer = Recording(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "final"))  # gathers ZeRO-3's slices (16-bit weights on save)
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"losses": losses, "fused": fused, "world": trainer.args.world_size}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
