#!/usr/bin/env python3
"""Drives `kiln serve` with the real `openai` Python client (tests/serve.rs runs it).

Usage: openai-client-check.py HOST:PORT
Checks: a plain and a streamed answer agree; an answer that reaches the model's context ends with
finish_reason "length" in both forms (and the stream still ends cleanly); a prompt over the
context is a BadRequestError naming it; an over-limit body is a 413. Prints one JSON line with
what it saw; exits non-zero on the first failed check.
"""
import json
import sys

import openai

addr = sys.argv[1]
client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0, timeout=120)
seen = {"openai": openai.__version__}


def ask(content, max_tokens, stream):
    msgs = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model="kiln", messages=msgs, max_tokens=max_tokens)
        c = r.choices[0]
        return c.message.content, c.finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens
    text, finish = "", None
    with client.chat.completions.create(
        model="kiln", messages=msgs, max_tokens=max_tokens, stream=True
    ) as s:
        for chunk in s:
            d = chunk.choices[0]
            text += d.delta.content or ""
            finish = d.finish_reason or finish
    return text, finish, None, None


models = client.models.list()
assert [m.id for m in models.data], models
plain, finish, prompt, done = ask("the answer", 6, False)
streamed, sfinish, _, _ = ask("the answer", 6, True)
assert plain == streamed, (plain, streamed)
assert finish == sfinish, (finish, sfinish)
seen["short"] = [finish, done]

long = "x" * 1000
_, _, prompt, _ = ask(long, 1, False)
text, finish, _, done = ask(long, 500, False)
assert finish == "length", finish
assert prompt + done == 1024, (prompt, done)
stext, sfinish, _, _ = ask(long, 500, True)
assert sfinish == "length", sfinish
assert stext == text, (stext, text)
seen["context"] = [prompt, done, finish]

for stream in (False, True):
    try:
        ask("x" * 1100, 5, stream)
        raise AssertionError("a prompt over the context was answered")
    except openai.BadRequestError as e:
        assert "context of 1024 tokens" in str(e), str(e)
seen["over_context"] = "BadRequestError"

try:
    ask("y" * 5000, 5, False)
    raise AssertionError("an over-limit body was answered")
except openai.APIStatusError as e:
    assert e.status_code == 413, e.status_code
seen["too_large"] = 413
print(json.dumps(seen))
