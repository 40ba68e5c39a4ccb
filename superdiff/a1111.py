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

Prompt syntax: A1111 splits a prompt at the word ``AND`` (upper case) into sub-prompts,
each with an optional ``:weight`` suffix, and *averages* their noise predictions
(Composable Diffusion). `split_and_prompt` maps such a prompt to our experts (one per part,
weights as given); the caller must name the method explicitly, since SuperDiff's AND is not
an average (`expand_prompt_syntax`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

__all__ = ["infotext", "split_and_prompt", "expand_prompt_syntax", "SAMPLER_LABELS", "join_and_prompt"]

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
        m = _WEIGHT.match(part)
        text, w = (m.group(1), m.group(2)) if m else (part, None)
        text = text.strip()
        if not text:
            raise ValueError(f"prompts: an empty part in {prompt!r}; write 'first prompt AND second prompt'")
        prompts.append(text)
        weights.append(None if w is None else float(w))
    return prompts, weights


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
    if all(w is None for w in out_w):
        return out_p, None if weights is None else list(weights)
    if weights is not None:
        raise ValueError("weights: give weights either as ':weight' in the prompt or separately, not both")
    if operator not in ("or", "average"):
        raise ValueError(f"weights: ':weight' parts are OR mixture weights or average weights; operator "
                         f"{operator!r} takes none (remove the ':weight' suffixes or use or / average)")
    return out_p, [1.0 if w is None else w for w in out_w]


def join_and_prompt(prompts: Sequence[str], weights: Sequence[float] | None = None) -> str:
    """The inverse of split_and_prompt: 'a circle AND something red:0.7'."""
    if weights is None or len(weights) != len(prompts):
        return " AND ".join(prompts)
    return " AND ".join(f"{p}:{_num(w)}" for p, w in zip(prompts, weights))


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _value(v: Any) -> str:
    """A value as A1111 writes it: plain, or a JSON string when it holds , : or \"."""
    s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else \
        _num(v) if isinstance(v, (int, float)) else str(v)
    return json.dumps(s) if any(ch in s for ch in ',:"\n') else s


def infotext(record: Any, size: tuple[int, int] | None = None, version: str = "") -> str:
    """The A1111 "parameters" text for a Composition (see the module docstring)."""
    from .compose import Composition

    c: Composition = record
    weights = c.weights if c.operator in ("or", "average") and c.prompts else None
    lines = [join_and_prompt(c.prompts, weights) if c.prompts else ""]
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
    pairs.append(("SuperDiff operator", c.operator))
    if c.extra_models:
        pairs.append(("Extra models", " | ".join(c.extra_models)))
    if c.weights is not None and weights is None:
        pairs.append(("Weights", c.weights))
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
