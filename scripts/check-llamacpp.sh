#!/usr/bin/env bash
# Checks kiln's GGUF exports in the real llama.cpp: installs llama-cpp-python (built from source
# by pip the first time, ~15 min on 2 cores; the wheel is cached after), then runs the ignored
# `exported_gguf_runs_in_llama_cpp` test, which exports SmolLM2 as q8_0 and q4_k_m and compares
# llama.cpp's tokenization and greedy tokens with kiln's.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-data.sh
if ! python3 -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python3 -m pip install --quiet llama-cpp-python==0.3.36 numpy typing_extensions diskcache jinja2
fi
cargo test --release --features thirdparty-tests --test thirdparty -- --ignored exported_gguf_runs_in_llama_cpp --nocapture
