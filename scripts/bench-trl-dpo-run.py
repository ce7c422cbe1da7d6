#!/usr/bin/env python3
"""One end-to-end TRL DPO run for scripts/bench-dpo-sweep.sh: loads the model, tokenizes the
pairs (TRL's own string path), trains MAX_STEPS steps of LoRA r16 alpha 32 on every linear layer
with beta BETA (batch 1, AdamW, lr 5e-4 constant, clip 1.0, 2 threads; the reference is the base
with the adapter disabled, scored inside each step as TRL trains by default), saves the adapter.
Prints the wall time of the whole run.

    pip install torch transformers peft trl datasets gguf
    python3 scripts/bench-trl-dpo-run.py MODEL.gguf PAIRS.jsonl BETA MAX_STEPS OUT_DIR
"""
import os, sys, time

t0 = time.time()
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

if len(sys.argv) != 6:
    sys.exit(__doc__)
gguf, pairs, beta, steps, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(2)
d, f = os.path.split(os.path.abspath(gguf))
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
# transformers dequantizes a GGUF to f32 when it loads it, but keeps it marked as quantized,
# which its Trainer refuses to train: the weights are plain f32 tensors, so drop the mark.
m.hf_quantizer = None
m.is_quantized = False
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
cfg = DPOConfig(
    output_dir=out, per_device_train_batch_size=1, max_steps=steps, learning_rate=5e-4, beta=beta,
    max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    dataloader_num_workers=0, max_length=256, lr_scheduler_type="constant", warmup_steps=0,
)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
trainer = DPOTrainer(model=m, args=cfg, train_dataset=load_dataset("json", data_files=pairs, split="train"),
                     processing_class=tok, peft_config=peft)
t1 = time.time()
trainer.train()
t2 = time.time()
trainer.save_model(out)
print(f"trl dpo run beta={beta}: {time.time() - t0:.1f} s end to end, {t2 - t1:.1f} s in trainer.train()")
