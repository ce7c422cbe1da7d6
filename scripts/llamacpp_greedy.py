#!/usr/bin/env python3
"""Greedy continuation of a prompt by llama.cpp (llama-cpp-python): prints the generated token
ids as JSON. Used by kiln's llama.cpp compatibility test (scripts/check-llamacpp.sh)."""
import json
import sys

from llama_cpp import Llama

path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False)
ids = m.tokenize(prompt.encode(), add_bos=False, special=True)
out = []
for tok in m.generate(ids, temp=0.0, top_k=1):
    if len(out) >= n or tok == m.token_eos():
        break
    out.append(tok)
print(json.dumps({"prompt_ids": ids, "generated": out}))
