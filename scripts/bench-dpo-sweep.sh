#!/usr/bin/env bash
# A 4-variant DPO beta sweep end to end: `kiln run` on one sweep config (data prepared once, the
# reference scored once by the refscore stage, four trainings) against four independent TRL
# DPOTrainer runs on the same pairs and steps (scripts/bench-trl-dpo-run.py), measured on this
# machine in the same run, kiln first then TRL. Prints both wall times and their ratio.
#
#   scripts/bench-dpo-sweep.sh MODEL.gguf PYTHON [PAIRS] [STEPS]
#
# MODEL.gguf: e.g. SmolLM2-135M-Instruct.Q4_1.gguf (TRL widens it with transformers' GGUF
# loader, as kiln does); PYTHON has torch, transformers, peft, trl, datasets and gguf; PAIRS
# (default 8) synthetic pairs, STEPS (default 8) steps per variant; KILN (default
# target/release/kiln or $CARGO_TARGET_DIR's) is the binary.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="$(realpath "$1")"; python="$2"; n="${3:-8}"; steps="${4:-8}"
kiln="${KILN:-${CARGO_TARGET_DIR:-$root/target}/release/kiln}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
"$python" - "$work/pairs.jsonl" "$n" <<'PY'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({
            "prompt": f"<|im_start|>user\nWhat is {i} plus {i}? Explain the steps briefly.<|im_end|>\n<|im_start|>assistant\n",
            "chosen": f"Adding {i} and {i} gives {2 * i}, because {i} + {i} = {2 * i}.<|im_end|>",
            "rejected": f"It is {2 * i + 7}, I think, but I am not sure about it.<|im_end|>",
        }) + "\n")
PY
cat > "$work/sweep.yml" <<EOF
base_model: $model
datasets:
  - path: pairs.jsonl
rl: dpo
adapter: lora
lora_r: 16
lora_alpha: 32
lora_target_linear: true
learning_rate: 5e-4
lr_scheduler: constant
max_steps: $steps
micro_batch_size: 1
sequence_len: 256
cache_dir: cache
sweep:
  rl_beta: [0.05, 0.1, 0.2, 0.4]
EOF
cd "$work"
t0=$(date +%s.%N)
KILN_NUM_THREADS=2 "$kiln" run sweep.yml > kiln.log 2>&1 || { cat kiln.log; exit 1; }
t1=$(date +%s.%N)
# What kiln built (four trainings, one refscore), and the TRL runs' step counts, for the record.
grep -E "^  built|^built" kiln.log || true
for beta in 0.05 0.1 0.2 0.4; do
  "$python" "$root/scripts/bench-trl-dpo-run.py" "$model" pairs.jsonl "$beta" "$steps" "trl-$beta" > "trl-$beta.log" 2>&1 \
    || { tail -20 "trl-$beta.log"; exit 1; }
done
t2=$(date +%s.%N)
grep -h "end to end" trl-*.log || true
kiln_train=$(grep -E "^  built  (train|refscore)" kiln.log | awk '{s += $3} END {print s + 0}')
trl_train=$(grep -h "end to end" trl-*.log | sed -E 's/.* ([0-9.]+) s in trainer.train.*/\1/' | awk '{s += $1} END {print s + 0}')
"$python" - "$t0" "$t1" "$t2" "$n" "$steps" "$kiln_train" "$trl_train" <<'PY'
import sys
t0, t1, t2, n, steps, kt, tt = map(float, sys.argv[1:])
k, t = t1 - t0, t2 - t1
print(f"4-variant DPO beta sweep, {int(n)} pairs, {int(steps)} steps each, LoRA r16, 2 threads:")
print(f"  kiln run (one sweep config)        {k:8.1f} s end to end, {kt:.1f} s in refscore + the 4 trains")
print(f"  TRL DPOTrainer, 4 separate runs    {t:8.1f} s end to end, {tt:.1f} s in trainer.train()")
print(f"  kiln / TRL                         {k / t:8.2f} end to end, {kt / tt:.2f} training alone")
PY
