#!/usr/bin/env python3
"""llama.cpp reference for `kiln bench generate`: prompt-processing and decode tokens/s of a GGUF
file in llama.cpp (llama-cpp-python), 2 threads, a ~200-token ChatML prompt and 128 greedy
tokens, median of 3 runs after a warm-up. The rates are llama.cpp's own timings
(llama_perf_context), so the Python loop around it does not count.

    pip install llama-cpp-python==0.3.36    # scripts/check-llamacpp.sh shows the build flags
    python3 scripts/bench-llamacpp.py FILE.gguf [FILE.gguf ...]

Export the files with kiln (`kiln export config.yml --format gguf --quant f32|q8_0|q4_k_m`) or
use the SmolLM2 q4_1 file that scripts/fetch-smollm2.sh fetches. The machine's memory bandwidth
moves from minute to minute when it is shared: run this beside `kiln bench generate`,
alternating, and compare runs made close together.
"""
import statistics
import sys

import llama_cpp
from llama_cpp import Llama

if len(sys.argv) < 2:
    sys.exit(__doc__)
words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every river stone").split()
user = " ".join(words[i % len(words)] for i in range(170))
prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          f"Summarize: {user}<|im_end|>\n<|im_start|>assistant\n")
for path in sys.argv[1:]:
    m = Llama(model_path=path, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    ids = m.tokenize(prompt.encode(), add_bos=False, special=True)
    prompt_rates, decode_rates = [], []
    for run in range(4):
        m.reset()
        llama_cpp.llama_perf_context_reset(m.ctx)
        m.eval(ids)
        for _ in range(128 if run else 8):
            m.eval([m.sample(top_k=1, temp=0.0)])
        d = llama_cpp.llama_perf_context(m.ctx)
        if run:
            prompt_rates.append(d.n_p_eval / (d.t_p_eval_ms / 1e3))
            decode_rates.append(d.n_eval / (d.t_eval_ms / 1e3))
    print(f"{path}: prompt ({len(ids)} tokens) {statistics.median(prompt_rates):.1f} tokens/s, "
          f"decode (128 tokens) {statistics.median(decode_rates):.1f} tokens/s")
    del m
