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
