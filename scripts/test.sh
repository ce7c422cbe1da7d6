#!/usr/bin/env bash
# The test command: fetches the pinned third-party test data (and Chromium for the chat page
# test), then runs every test with it.
# Compute is pinned to one thread (rayon and candle pools spin-wait when cores are contended).
set -euo pipefail
cd "$(dirname "$0")/.."
export KILN_TESTDATA="${KILN_TESTDATA:-$HOME/.cache/kiln-testdata}"
export KILN_NUM_THREADS=1 RAYON_NUM_THREADS=1
scripts/fetch-test-data.sh >/dev/null
scripts/ensure-chromium.sh
cargo test --workspace --features kiln/thirdparty-tests "$@"
