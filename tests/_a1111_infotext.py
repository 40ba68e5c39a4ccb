"""A reader of Automatic1111's PNG "parameters" text, written to A1111's documented format
(the one its PNG Info tab and "Send to txt2img" read), independent of superdiff's writer:

    <prompt, any number of lines>
    Negative prompt: <negative prompt, any number of lines>
    Key: value, Key: value, ...          <- the last line, when it holds at least 3 pairs

A value is either plain text up to the next comma or a double-quoted JSON string; a value
of the form WxH (e.g. Size: 512x768) is split into "Key-1" and "Key-2".
"""

from __future__ import annotations

import json
import re

PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_parameters(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        value = value.strip()
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        m = IMAGE_SIZE.match(value)
        if m:
            out[f"{key}-1"], out[f"{key}-2"] = m.group(1), m.group(2)
        else:
            out[key] = value
    return out


# what A1111 does with a prompt line before sampling: its extra networks (<lora:...>, any
# <name:args>) are taken out first (modules/extra_networks.py), then the rest is split at AND
# and each part's ':weight' read (modules/prompt_parser.py, get_multicond_prompt_list)
EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
AND = re.compile(r"\bAND\b")
WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def a1111_subprompts(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) of each AND part of a prompt as A1111 samples it (text stripped)."""
    out = []
    for part in AND.split(EXTRA_NET.sub("", prompt)):
        m = WEIGHT.search(part)
        text, w = m.groups() if m is not None else (part, None)
        out.append((" ".join(text.split()), 1.0 if w is None else float(w)))
    return out
