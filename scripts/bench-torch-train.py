#!/usr/bin/env python3
"""PyTorch + PEFT reference for `kiln bench train`: the same steps (LoRA r16 alpha 32 on
q,k,v,o,gate,up,down, or full fine-tuning; batch 1 of random ids; AdamW; clip 1.0; 2 threads),
timed over 3 steps after one warm-up step.

    pip install torch transformers peft
    python3 scripts/bench-torch-train.py MODEL_DIR 256 lora   # or: 512 lora, 256 full
    python3 scripts/bench-torch-train.py MODEL_DIR 256 lora ckpt   # with gradient checkpointing

MODEL_DIR is an HF-layout model (config.json + model.safetensors), e.g. kiln's merged output.
Figures depend on the machine: run it beside `kiln bench train` on the same one.
"""
import sys, time, resource, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
torch.set_num_threads(2)
if len(sys.argv) not in (4, 5) or sys.argv[3] not in ("lora", "full") or sys.argv[4:] not in ([], ["ckpt"]):
    sys.exit(__doc__)
d, seq, full, ckpt = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "full", sys.argv[4:] == ["ckpt"]
m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
if ckpt:
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.enable_input_require_grads()
if not full:
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]))
m.train()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
g = torch.Generator().manual_seed(11)
ids = torch.randint(0, m.config.vocab_size, (1, seq), generator=g)
times = []
for step in range(4):
    t = time.time()
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
    opt.step(); opt.zero_grad()
    if step: times.append(time.time() - t)
s = sum(times) / len(times)
print(f"torch {'full' if full else 'lora'}-{seq}: {seq/s:.1f} tokens/s, {s:.2f} s/step, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1048576:.2f} GiB")
