"""Automatic1111 conventions: the PNG "parameters" text and the `AND` prompt syntax.

Infotext (what A1111 writes into a PNG's ``parameters`` chunk and reads back in PNG Info)::

    <prompt, one or more lines>
    Negative prompt: <negative prompt, one or more lines>
    Steps: 25, Sampler: DDPM, CFG scale: 4.0, Seed: 3, Size: 64x64, Model: shapes-t2i, ...

The last line is comma-separated ``Key: value`` pairs; a value holding a comma, a colon or
a quote is written as a JSON string. `infotext` writes that layout for a Composition,
with our own keys (operator and its parameters) after A1111's. The ``superdiff`` JSON chunk
stays the source of truth; the infotext is for A1111's PNG Info, ComfyUI-side readers and
image browsers.

What the prompt line and our keys say, per kind of run:

* operator runs (and / or / average / single / joint / the LoRA methods): the prompts joined
  by ``AND``, ``:weight`` suffixes for OR / average weights, and ``SuperDiff operator: <op>``;
  a LoRA Switch run adds ``Switch every: <steps>``.
* formula runs (``compose``): the prompt line is the formula itself in canonical form,
  written with the symbols ``&`` ``|`` ``~`` (never an ``AND`` of all its prompts, and the
  unconditional prompt a ``~`` is relative to is not a part), and ``SuperDiff formula:
  <the formula as given>`` replaces ``SuperDiff operator``; ``AND mode: product`` when the
  formula's ``&`` is the product rather than SuperDiff's AND.
* any run with a corrector: ``Corrector: <spec>`` (a dict spec as JSON text).

LoRAs as A1111 writes them: each expert's prompt carries its adapter as ``<lora:name:scale>``
(one prompt row per adapter expert, joined by ``AND``; the weight-merge and LoRA Switch
methods, one expert with every adapter, write all tags in one prompt, which is what A1111
itself does with several tags), and ``Lora hashes: "name: hash, ..."`` names each file by
A1111's short LoRA hash (the first 12 hex digits of the sha256 of the safetensors file after
its header, the kohya / additional-networks hash A1111 and Civitai look LoRAs up by).
`adapters_from_infotext` reads them back.

Prompt syntax: A1111 splits a prompt at the word ``AND`` (upper case) into sub-prompts,
each with an optional ``:weight`` suffix (read once the prompt's ``<lora:...>`` tags are taken
out, so ``a circle:0.3 <lora:x:0.8>`` has weight 0.3), and adds up their guidance at those
weights, 1 each by default (Composable Diffusion). An average run without weights (1/M each)
therefore writes its weights on the prompt line. `split_and_prompt` maps such a prompt to our
experts (one per part, weights as given); the caller must name the method explicitly, since
SuperDiff's AND is not an average (`expand_prompt_syntax`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

__all__ = ["infotext", "split_and_prompt", "expand_prompt_syntax", "SAMPLER_LABELS", "join_and_prompt",
           "parse_prompt_rows", "lora_tag", "split_lora_tags", "lora_short_hash", "adapters_from_infotext"]

#: our samplers under the names A1111 users read (the values identify them uniquely)
SAMPLER_LABELS = {"sde": "Euler-Maruyama SDE", "ddpm": "DDPM", "ode": "ODE Euler", "euler": "Euler",
                  "heun": "Heun"}

_AND = re.compile(r"\bAND\b")
# A1111's own weight pattern: an optional ":number" at the end of a sub-prompt
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and_prompt(prompt: str) -> tuple[list[str], list[float | None]]:
    """'a circle AND something red:0.7' -> (['a circle', 'something red'], [None, 0.7])."""
    prompts, weights = [], []
    for part in _AND.split(prompt):
        text, w = _part_weight(part)
        if not text:
            raise ValueError(f"prompts: an empty part in {prompt!r}; write 'first prompt AND second prompt'")
        prompts.append(text)
        weights.append(None if w is None else float(w))
    return prompts, weights


def _part_weight(part: str) -> tuple[str, str | None]:
    """(text, weight or None) of one AND part as A1111 reads it: A1111 takes the <lora:...> tags
    out of a prompt before it reads the ':weight' suffixes, so 'a circle:0.3 <lora:x:0.8>' has
    weight 0.3 and 'a clock at 10:30 <lora:x:1>' weight 30. The tags stay in the text, after it."""
    tags = ROW_LORA_TAG.findall(part)
    rest = ROW_LORA_TAG.sub(" ", part) if tags else part
    m = _WEIGHT.match(rest)
    text, w = (m.group(1), m.group(2)) if m else (rest, None)
    text = " ".join([text.strip(), *(f"<lora:{t}>" for t in tags)]).strip()
    return text, w


def expand_prompt_syntax(prompts: Sequence[str], weights: Sequence[float] | None,
                         operator: str | None) -> tuple[list[str], list[float] | None]:
    """Prompts written in A1111's `AND` syntax, expanded into one expert per part.

    `operator` is the method the user named (None when they named none): A1111's AND
    averages the parts, SuperDiff's AND finds images all parts find likely, so a prompt with
    AND and no named method is refused. `:weight` parts set `weights` (OR mixture weights,
    average kappa); AND and single take no weights. Prompts without AND pass through.
    """
    prompts = list(prompts)
    if not any(_AND.search(p) for p in prompts):
        return prompts, None if weights is None else list(weights)
    if operator is None:
        raise ValueError("operator: the prompt uses A1111's 'AND' syntax; name the method explicitly "
                         "(operator and: SuperDiff AND; average: A1111's averaging; or: SuperDiff OR)")
    out_p: list[str] = []
    out_w: list[float | None] = []
    for p in prompts:
        ps, ws = split_and_prompt(p)
        out_p += ps
        out_w += ws
    if all(w is None for w in out_w) or (operator not in ("or", "average") and all(w in (None, 1.0) for w in out_w)):
        # (':1' is A1111's default weight: what join_and_prompt writes after a part ending in ':number')
        return out_p, None if weights is None else list(weights)
    if weights is not None:
        raise ValueError("weights: give weights either as ':weight' in the prompt or separately, not both")
    if operator not in ("or", "average"):
        raise ValueError(f"weights: ':weight' parts are OR mixture weights or average weights; operator "
                         f"{operator!r} takes none (remove the ':weight' suffixes or use or / average)")
    return out_p, [1.0 if w is None else w for w in out_w]


def join_and_prompt(prompts: Sequence[str], weights: Sequence[float] | None = None) -> str:
    """The inverse of split_and_prompt: 'a circle AND something red:0.7'. Of several parts
    without weights, one that ends in ':number' itself ('a clock at 10:30') is written with
    A1111's default weight ':1' ('a clock at 10:30:1'), so that it reads back whole, not as
    'a clock at 10' with weight 30 (expand_prompt_syntax takes all-':1' parts as no weights)."""
    if weights is None or len(weights) != len(prompts):
        if len(prompts) < 2:
            return " AND ".join(prompts)
        return " AND ".join(f"{p}:1" if ends_in_weight(p) else p for p in prompts)
    return " AND ".join(f"{p}:{_num(w)}" for p, w in zip(prompts, weights))


def ends_in_weight(prompt: str) -> bool:
    """Whether A1111 would read the end of `prompt` as a ':weight' suffix ('a clock at 10:30')."""
    return _part_weight(prompt)[1] is not None


def lora_tag(name: str, scale: float = 1.0) -> str:
    """'<lora:name:0.8>': the name as A1111 writes an alias (no ':' or ',')."""
    return f"<lora:{_alias(name)}:{_num(float(scale))}>"


def _alias(name: str) -> str:
    return str(name).replace(":", "").replace(",", "")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """'a circle <lora:orange:0.8>' -> ('a circle', [('orange', 0.8)]); A1111's longer forms
    <lora:NAME:TE:UNET> and <lora:NAME:unet=SCALE> give their UNet multiplier (`parse_lora`)."""
    from .compose import parse_lora

    tags = []
    for body in ROW_LORA_TAG.findall(prompt):
        a = parse_lora(body.strip())
        tags.append((a["path"].strip(), float(a["scale"])))
    return " ".join(ROW_LORA_TAG.sub(" ", prompt).split()), tags


#: a LoRA tag in a prompt row as the CLI and the studio take it: <lora:NAME_OR_PATH[:SCALE]>
#: (A1111 takes <lyco:...> as another name for it)
ROW_LORA_TAG = re.compile(r"<(?:lora|lyco):([^<>]+)>")
#: A1111's hypernetwork tag, which nothing here can run
_HYPERNET_TAG = re.compile(r"<hypernet:[^<>]*>")


def prompt_adapters(prompts: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(prompts without tags, adapters) of prompt rows with A1111 LoRA tags: a row "text
    <lora:NAME_OR_PATH[:SCALE]>" is the expert "the model with that adapter, under text"; once
    any row has a tag, a row without one is the base model under its text. No tags: the
    prompts as they are and no adapters."""
    from .compose import BASE_ADAPTER, parse_lora

    tags = [ROW_LORA_TAG.findall(p) for p in prompts]
    if not any(tags):
        return list(prompts), []
    clean, adapters = [], []
    for i, (p, t) in enumerate(zip(prompts, tags)):
        if len(t) > 1:
            raise ValueError(f"prompts: prompt {i + 1} names {len(t)} adapters ({', '.join(t)}); one adapter per "
                             "expert prompt (another prompt for the other adapter)")
        text = " ".join(ROW_LORA_TAG.sub(" ", p).split())
        if not text:
            raise ValueError(f"prompts: prompt {i + 1} has an adapter but no text; write e.g. "
                             "'a circle <lora:lora-orange:0.8>'")
        clean.append(text)
        adapters.append({**parse_lora(t[0].strip()), "prompt": text} if t else {"path": BASE_ADAPTER, "prompt": text})
    return list(dict.fromkeys(clean)), adapters


def parse_prompt_rows(prompts: Sequence[str], weights: Sequence[float] | None, operator: str | None
                      ) -> tuple[list[str], list[float] | None, list[dict[str, Any]]]:
    """(prompts, weights, adapters) of prompt rows as a user writes them (the CLI's --prompt,
    a job line, the studio's rows): A1111's AND syntax expanded first (`expand_prompt_syntax`,
    so a part "a circle <lora:x:0.8>" of "a circle <lora:x:0.8> AND something red" keeps its
    tag), then each part's LoRA tag made its adapter expert (`prompt_adapters`)."""
    for i, p in enumerate(prompts):
        tag = _HYPERNET_TAG.search(p)
        if tag:
            raise ValueError(f"prompts: prompt {i + 1} names the hypernetwork {tag.group(0)}; A1111 hypernetworks are "
                             "not supported (only LoRA adapters, <lora:NAME:SCALE>): remove the tag")
    prompts, weights = expand_prompt_syntax(prompts, weights, operator)
    prompts, adapters = prompt_adapters(prompts)
    return prompts, weights, adapters


def lora_short_hash(path: str | Any) -> str:
    """A1111's short LoRA hash of a safetensors file: sha256 of the bytes after the header
    (the 8-byte header length and the JSON header, which holds metadata that tools rewrite),
    first 12 hex digits."""
    from .pipelines.adapters import file_sha256

    return file_sha256(path, after_header=True)[:12]


def _adapter_hash(a: dict) -> str | None:
    """The short hash of a composition's adapter file, or None when the file is not here or
    is not the one recorded (sha256): a hash is written only for the file that was used."""
    from .pipelines.adapters import file_sha256, weight_file

    try:
        f = weight_file(a["path"], safetensors_only=True)
    except (ValueError, OSError):
        return None
    if a.get("sha256") and file_sha256(f) != a["sha256"]:
        return None
    return lora_short_hash(f)


def _expert_prompts(c: Any) -> tuple[list[str], dict[str, str]]:
    """The experts' prompts with their LoRA tags, and {alias: short hash} of the files."""
    from .compose import BASE_ADAPTER

    ads = [a for a in c.adapters if a["path"] != BASE_ADAPTER]
    hashes: dict[str, str] = {}
    for a in ads:
        h = _adapter_hash(a)
        if h:
            hashes.setdefault(_alias(_adapter_name(a)), h)
    if c.operator in ("merge", "switch"):  # one expert with every adapter, as A1111 runs several tags
        tags = " ".join(lora_tag(_adapter_name(a), a.get("scale", 1.0)) for a in ads)
        return [f"{p} {tags}" for p in ([ads[0].get("prompt") or c.prompts[0]] if ads else c.prompts)], hashes
    rows = []
    for a in c.adapters:
        for p in ([a["prompt"]] if a.get("prompt") else c.prompts):
            rows.append(p if a["path"] == BASE_ADAPTER else f"{p} {lora_tag(_adapter_name(a), a.get('scale', 1.0))}")
    return rows, hashes


def _adapter_name(a: dict) -> str:
    """The adapter's name: recorded once it ran, else as the pipeline will name it."""
    from pathlib import Path

    if a.get("name"):
        return a["name"]
    p = Path(a["path"])
    return p.parent.name if p.name.startswith("pytorch_lora_weights") else p.stem


def adapters_from_infotext(params: dict[str, str]) -> list[dict[str, Any]]:
    """The LoRAs of parsed infotext (its "Prompt" and "Lora hashes" values), one per tag in
    prompt order: {"name", "scale", "prompt" (the tag's prompt row without tags), "hash"
    (A1111's short hash, or None)}. An expert row with several tags (weight merge) gives
    one entry per tag, each with the same prompt."""
    if params.get("SuperDiff formula"):  # a formula takes no adapters; its prompt line is no AND of rows
        return []
    hashes = {}
    for item in (params.get("Lora hashes") or "").split(","):
        name, sep, h = item.partition(":")
        if sep:
            hashes[name.strip()] = h.strip()
    out = []
    prompt = params.get("Prompt") or ""
    for part in _AND.split(prompt) if prompt else []:
        text, tags = split_lora_tags(_part_weight(part)[0])
        out += [{"name": n, "scale": s, "prompt": text, "hash": hashes.get(n)} for n, s in tags]
    return out


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _value(v: Any) -> str:
    """A value as A1111 writes it: plain, or a JSON string when it holds , : or \" (its non-ASCII
    characters as they are, as A1111's json.dumps(..., ensure_ascii=False) writes them)."""
    if isinstance(v, str):
        s = v
    elif isinstance(v, (list, dict, bool)) or v is None:
        s = json.dumps(v, ensure_ascii=False)
    else:
        s = _num(v) if isinstance(v, (int, float)) else str(v)
    return json.dumps(s, ensure_ascii=False) if any(ch in s for ch in ',:"\n') else s


def _formula_prompt(text: str) -> str:
    """The prompt line of a formula run: the formula in canonical form, written with the
    symbols & | ~ (A1111 would read the words AND / OR / NOT as its own AND syntax), on one line."""
    from .formula import parse, unparse

    try:
        text = unparse(parse(text))
    except ValueError:
        pass
    return " ".join(text.split("\n"))


def infotext(record: Any, size: tuple[int, int] | None = None, version: str = "") -> str:
    """The A1111 "parameters" text for a Composition (see the module docstring)."""
    from .compose import Composition

    c: Composition = record
    formula = c.compose is not None
    prompts, lora_hashes = _expert_prompts(c) if c.adapters else (list(c.prompts), {})
    weights = c.weights if c.operator in ("or", "average") and prompts and not formula else None
    if weights is not None and len(weights) != len(prompts):
        weights = None
    if c.weights is None and c.operator in ("or", "average") and not formula and not c.extra_models \
            and len(prompts) > 1 and (c.operator == "average" or any(ends_in_weight(p) for p in prompts)):
        # the equal weights the operator uses without any (OR: equal mixture weights; average: 1/M
        # each, which A1111, whose AND sums the parts at weight 1 each, reads only when written),
        # and a part ending in ':number' needs a weight to read back whole
        weights = [1.0 if c.operator == "or" else 1.0 / len(prompts)] * len(prompts)
    if formula:  # the formula itself: its prompts are not an AND (nor an average) of them all
        lines = [_formula_prompt(c.compose)]
    else:
        lines = [join_and_prompt(prompts, weights) if prompts else ""]
    if c.negative_prompt:
        lines.append(f"Negative prompt: {c.negative_prompt}")
    w, h = size if size is not None else (c.width, c.height)
    pairs: list[tuple[str, Any]] = [("Steps", c.steps), ("Sampler", SAMPLER_LABELS.get(c.sampler, c.sampler))]
    if c.guidance_scale is not None:  # None: not run yet, the model's default scale is known once it loads
        pairs.append(("CFG scale", c.guidance_scale))
    pairs.append(("Seed", c.seed))
    if w and h:
        pairs.append(("Size", f"{w}x{h}"))
    pairs.append(("Model", c.model))
    if formula:  # the formula replaces the operator
        pairs.append(("SuperDiff formula", c.compose))
        if c.and_mode != "superdiff":
            pairs.append(("AND mode", c.and_mode))
    else:
        pairs.append(("SuperDiff operator", c.operator))
    if c.operator == "switch" and not formula:
        pairs.append(("Switch every", c.switch_every))
    if c.corrector is not None:
        pairs.append(("Corrector", c.corrector))
    if c.extra_models:
        pairs.append(("Extra models", " | ".join(c.extra_models)))
    if c.weights is not None and weights is None:
        pairs.append(("Weights", c.weights))
    if lora_hashes:
        pairs.append(("Lora hashes", ", ".join(f"{k}: {v}" for k, v in lora_hashes.items())))
    for key, val in (("Bias", c.bias), ("Temperature", c.temperature), ("Lift", c.lift),
                     ("Kappa clamp", c.kappa_clamp), ("Joint template", c.joint_template),
                     ("Estimator", c.estimator)):
        if val is not None:
            pairs.append((key, "inf" if isinstance(val, float) and val == float("inf") else val))
    if c.operator == "single":
        pairs.append(("Single expert", c.single_index + 1))
    if c.num_images != 1:
        pairs.append(("Batch size", c.num_images))
    if c.dtype != "float32":
        pairs.append(("Precision", c.dtype))
    if version:
        pairs.append(("Version", f"superdiff {version}"))
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in pairs))
    return "\n".join(lines)
