#!/usr/bin/env python3
"""TRL DPOTrainer reference for `kiln bench train --case dpo-256 --against torch`: the same step
as kiln's (LoRA r16 alpha 32 on q,k,v,o,gate,up,down; DPO sigmoid loss, beta 0.1; one pair of
random ids per step: a SEQ/2-token prompt, SEQ/2-token chosen and rejected completions; AdamW;
clip 1.0; 2 threads), timed over 3 steps after one warm-up step. TRL scores the reference model
inside each step (the adapter disabled), as it trains by default.

    pip install torch transformers peft trl
    python3 scripts/bench-trl-dpo.py MODEL_DIR 256
    python3 scripts/bench-trl-dpo.py MODEL_DIR 256 ckpt   # with gradient checkpointing

MODEL_DIR is an HF-layout model with its tokenizer. Figures depend on the machine: run it beside
`kiln bench train` on the same one.
"""
import os, sys, time, resource, tempfile, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

torch.set_num_threads(2)
if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["ckpt"]):
    sys.exit(__doc__)
d, seq, ckpt = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["ckpt"]
half = seq // 2
tok = AutoTokenizer.from_pretrained(d)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
g = torch.Generator().manual_seed(11)
rand = lambda n: torch.randint(0, m.config.vocab_size, (n,), generator=g).tolist()
rows = [{"prompt_ids": rand(half), "chosen_ids": rand(seq - half), "rejected_ids": rand(seq - half)} for _ in range(4)]


class Pretokenized(DPOTrainer):
    """The rows are already ids: TRL's collator reads prompt_ids/chosen_ids/rejected_ids."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset


class Timer(TrainerCallback):
    def __init__(self):
        self.t, self.times = 0.0, []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.time()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.time() - self.t)


timer = Timer()
with tempfile.TemporaryDirectory() as out:
    cfg = DPOConfig(
        output_dir=out, per_device_train_batch_size=1, max_steps=4, learning_rate=1e-5,
        beta=0.1, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, max_length=None, remove_unused_columns=False,
        lr_scheduler_type="constant", warmup_steps=0, gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = Pretokenized(model=m, args=cfg, train_dataset=Dataset.from_list(rows),
                           processing_class=tok, peft_config=peft, callbacks=[timer])
    trainer.train()
s = sum(timer.times[1:]) / len(timer.times[1:])
print(f"trl dpo-{seq}: {2 * seq / s:.1f} tokens/s, {s:.2f} s/step, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1048576:.2f} GiB")
