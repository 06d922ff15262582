"""Fine-tune an MoE model with hf-hetermoe, end to end; by default a small Mixtral-style one, without the Hub.

    python examples/finetune.py                      # built-in corpus, a few minutes on CPU
    accelerate launch examples/finetune.py --steps 200 --corpus my_text.txt
    accelerate launch examples/finetune.py --model path/or/hub-id --corpus my_text.txt --seq-len 2048 \
        --batch-size 4 --lr 1e-5 --gradient-checkpointing --push-to-hub me/my-moe-finetune
    accelerate launch --use_deepspeed --zero_stage 3 --zero3_init_flag true --zero3_save_16bit_model true \
        examples/finetune.py --model path/or/hub-id --gradient-accumulation-steps 8 --save-state-every 100
    # after an interruption, the same command with --resume continues from the last saved state

What it does (see hf_hetermoe/demo.py): trains a BPE tokenizer on the corpus, loads the corpus through
`datasets`, builds a Mixtral-style model from a config, calls `hetermoe.prepare(model)`, fine-tunes it with
AdamW under accelerate (progress bar with loss and tokens/s), saves a standard checkpoint atomically, then
reloads it with plain transformers and checks that the logits match.

With `--model` the model and its tokenizer come from `from_pretrained` (any family `hetermoe check` lists), and
`--push-to-hub` uploads the checkpoint folder once its reload has been checked. In your own script the only
hf-hetermoe line is `prepare`:

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B", dtype=torch.bfloat16)
    model = hetermoe.prepare(model)
"""

import sys

from hf_hetermoe.demo import main

if __name__ == "__main__":
    sys.exit(main())
