#!/usr/bin/env python3
"""How PyYAML (what Axolotl loads configs with) reads each YAML file under a directory, as JSON:
{"relative/path.yml": {"value": ...}} (or {"error": "..."}). kiln's YAML reader is tested
against it (tests/thirdparty.rs). Non-JSON values are written as JSON can: dict keys as strings
(booleans lower-case), NaN/inf as {"float": repr}, dates and other objects as str().

    python3 scripts/pyyaml-reference.py DIR > reference.json
"""
import glob, json, math, os, sys

import yaml

def fix(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return {"float": repr(x)}
    if isinstance(x, dict):
        return {(str(k).lower() if isinstance(k, bool) else str(k)): fix(v) for k, v in x.items()}
    if isinstance(x, list):
        return [fix(i) for i in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)

root = sys.argv[1]
out = {}
for f in sorted(glob.glob(os.path.join(root, "**", "*.y*ml"), recursive=True)):
    rel = os.path.relpath(f, root)
    try:
        with open(f, encoding="utf-8") as fh:
            out[rel] = {"value": fix(yaml.safe_load(fh))}
    except Exception as e:  # noqa: BLE001 - the reference records what PyYAML refuses
        out[rel] = {"error": str(e).split("\n")[0]}
json.dump(out, sys.stdout, sort_keys=True)
