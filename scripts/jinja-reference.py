#!/usr/bin/env python3
"""Python Jinja2's rendering of chat templates, the reference kiln's renderer is tested against.

Usage: jinja-reference.py TEMPLATES_DIR CONVERSATIONS.json > reference.json

Renders every TEMPLATES_DIR/*.jinja over every conversation of CONVERSATIONS.json
({"name": [{"role", "content"}, ...]}) the way Hugging Face's apply_chat_template sets Jinja2 up
(an immutable sandbox with trim_blocks, lstrip_blocks and loop controls; raise_exception,
strftime_now, a tojson that keeps non-ASCII), with add_generation_prompt false, bos_token "<s>"
and eos_token "</s>". A `{% generation %}` block (TRL's assistant-mask marker) is a real block
tag here; its output's span is reported in UTF-8 byte offsets. Prints
{"template": {"conversation": {"text": ..., "spans": [[start, end], ...]} | {"error": ...}}}.
"""

import datetime
import json
import pathlib
import sys

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

START, END = "\ue000", "\ue001"
# kiln's templates see this date through strftime_now (the tokenize key cannot see the clock).
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


class Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: its output, marked so its span can be found."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return START + caller() + END


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return TEMPLATE_DATE.strftime(fmt)


def render(source, messages):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    out = env.from_string(source).render(
        messages=messages, add_generation_prompt=False, bos_token="<s>", eos_token="</s>"
    )
    text, spans, start = "", [], None
    for ch in out:
        if ch == START:
            start = len(text.encode())
        elif ch == END:
            spans.append([start, len(text.encode())])
        else:
            text += ch
    return {"text": text, "spans": spans}


def main():
    templates = sorted(pathlib.Path(sys.argv[1]).glob("*.jinja"))
    conversations = json.loads(pathlib.Path(sys.argv[2]).read_text())
    out = {}
    for t in templates:
        source = t.read_text()
        out[t.name] = {}
        for name, messages in conversations.items():
            try:
                out[t.name][name] = render(source, messages)
            except Exception as e:  # the template's own raise_exception, or a Jinja error
                out[t.name][name] = {"error": f"{type(e).__name__}: {e}"}
    json.dump(out, sys.stdout, indent=1, sort_keys=True, ensure_ascii=False)


if __name__ == "__main__":
    main()
