#!/usr/bin/env python3
"""Loads kiln's outputs with the Python stack its users come from, and checks them:

1. the merged model (`output_dir/merged`) with transformers' AutoModelForCausalLM, greedy
   answer to a question through the tokenizer's chat template;
2. the LoRA adapter (`output_dir`) with PEFT's PeftModel.from_pretrained on top of a base model
   in HF layout: every adapter tensor must load (no missing or unexpected keys) with the values
   in adapter_model.safetensors.

    pip install torch transformers peft
    python3 scripts/check-transformers.py outputs/quickstart BASE_MODEL_DIR

BASE_MODEL_DIR is any HF-layout model of the same architecture (for loadability; the values
checked are the adapter's own).
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

if len(sys.argv) != 3:
    sys.exit(__doc__)
out, base_dir = sys.argv[1], sys.argv[2]

merged = f"{out}/merged"
tok = AutoTokenizer.from_pretrained(merged)
model = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32)
msgs = [{"role": "user", "content": "What is the capital of France?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
gen = model.generate(ids, max_new_tokens=24, do_sample=False)
answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
print(f"merged model (transformers): {answer!r}")

base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
peft = PeftModel.from_pretrained(base, out)
state = peft.state_dict()
saved = load_file(f"{out}/adapter_model.safetensors")
missing = []
for name, t in saved.items():
    # PEFT names loaded weights with the adapter name inserted: ...lora_A.default.weight
    key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")
    if key not in state:
        missing.append(name)
    elif not torch.equal(state[key], t):
        sys.exit(f"FAIL: {name} loaded with different values")
if missing:
    sys.exit(f"FAIL: {len(missing)} adapter tensors not loaded, e.g. {missing[:3]}")
print(f"adapter (PEFT): {len(saved)} tensors loaded with their saved values")
