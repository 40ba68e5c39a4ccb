"""The studio's form, free of gradio: form values <-> `Composition` (each prompt row with its
picked LoRA), the settings JSON import/export, and the messages that show an error next to the
form field it names. Used by `ui/app.py` through `ui/handlers.py`."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from superdiff.compose import (DEFAULT_COMPOSITION, DTYPES, ESTIMATOR_CHOICES, OPERATOR_CHOICES, OPERATOR_PARAMS,
                               PARAM_UNSET, SAMPLER_CHOICES, Composition, draw_seed, num_experts)
from superdiff.images import read_png_composition
from superdiff.model_loading import ModelCache

log = logging.getLogger("superdiff.ui")


#: the guidance slider's range (A1111's CFG scale goes to 30 as well)
GUIDANCE_MAX = 30.0

#: prompt rows the page holds (rows beyond the visible count are ignored)
MAX_PROMPTS = 6
MIN_PROMPTS = 1

#: the scalar form fields, in the order app.py passes their values (then the per-row lists
#: prompts, weights, biases, loras, lora_scales). lora_sha256 is a hidden field: the sha256
#: recorded for each adapter of an imported composition, as JSON {path: sha256}, so that
#: Generate checks the files against it (and the new PNGs record it). lora_names, hidden too:
#: the adapter names an imported composition gives its files, as JSON {path: name}, so that a
#: run from the studio keeps them (in its trace labels and the PNGs' <lora:name:scale> tags).
FORM_SCALARS: tuple[str, ...] = (
    "model", "extra_models", "rows", "operator", "temperature", "lift", "clamp_mode", "clamp_lo", "clamp_hi",
    "single_expert", "joint_template", "switch_every", "estimator", "sampler", "steps", "guidance_scale",
    "negative_prompt", "seed", "num_images", "height", "width", "dtype", "compose", "and_mode", "corrector",
    "lora_sha256", "lora_names",
)

#: the studio's scripted-API (gradio_client) input names, in form_from_values order
API_NAMES: tuple[str, ...] = (
    *("prompt_rows" if k == "rows" else k for k in FORM_SCALARS),
    *(f"prompt_{i + 1}" for i in range(MAX_PROMPTS)), *(f"weight_{i + 1}" for i in range(MAX_PROMPTS)),
    *(f"bias_{i + 1}" for i in range(MAX_PROMPTS)), *(f"lora_{i + 1}" for i in range(MAX_PROMPTS)),
    *(f"lora_scale_{i + 1}" for i in range(MAX_PROMPTS)))
#: the per-row lists after FORM_SCALARS, in order, and the blank value of each
ROW_FIELDS: tuple[tuple[str, Any], ...] = (("prompts", ""), ("weights", None), ("biases", None), ("loras", ""),
                                           ("lora_scales", 1.0))
#: the adapter picker's "no adapter" value (the row is the base model, or no adapters at all)
NO_LORA = ""

OPERATOR_LABELS: dict[str, str] = {
    "and": "AND (all prompts at once)",
    "or": "OR (one prompt or the other)",
    "average": "Average (fixed weights)",
    "joint": "Joint prompt (one prompt)",
    "single": "Single expert",
    "composite": "LoRA Composite (adapters)",
    "merge": "LoRA weight merge (adapters)",
    "switch": "LoRA Switch (adapters)",
}

#: the compare-methods mode: baselines first, then SuperDiff
COMPARE_METHODS: tuple[tuple[str, str], ...] = (
    ("joint", "joint prompt"), ("average", "average"), ("or", "OR"), ("and", "AND"))

#: UI names of the Composition fields, used in error messages
FIELD_LABELS: dict[str, str] = {
    "model": "Model", "prompts": "Prompts", "extra_models": "Extra models", "operator": "Operator",
    "weights": "Weights", "bias": "Bias", "temperature": "Temperature", "lift": "Lift",
    "kappa_clamp": "Kappa clamp", "single_index": "Single expert", "joint_template": "Joint template",
    "estimator": "Estimator", "sampler": "Sampler", "steps": "Steps", "guidance_scale": "Guidance scale",
    "negative_prompt": "Negative prompt", "seed": "Seed", "num_images": "Images", "height": "Height",
    "width": "Width", "dtype": "Precision", "settings": "Settings", "adapters": "LoRA adapters",
    "switch_every": "Switch every", "compose": "Formula", "and_mode": "& means", "corrector": "Corrector",
}

assert set(OPERATOR_LABELS) == set(OPERATOR_CHOICES) == set(OPERATOR_PARAMS)


# ---- form values <-> Composition --------------------------------------------------------------
def form_from_values(values: Sequence[Any]) -> dict[str, Any]:
    """The form dict from the flat component values app.py passes: FORM_SCALARS, then
    MAX_PROMPTS values of each per-row field (ROW_FIELDS: prompts, weights, biases, the
    rows' adapter pickers and their scales)."""
    n = len(FORM_SCALARS)
    want = n + len(ROW_FIELDS) * MAX_PROMPTS
    if len(values) != want:
        raise ValueError(f"settings: expected {want} form values, got {len(values)}")
    form = dict(zip(FORM_SCALARS, values[:n]))
    for k, (name, _) in enumerate(ROW_FIELDS):
        form[name] = list(values[n + k * MAX_PROMPTS: n + (k + 1) * MAX_PROMPTS])
    return form


def values_from_form(form: Mapping[str, Any]) -> list[Any]:
    """Inverse of form_from_values (lists padded to MAX_PROMPTS)."""
    def pad(v: Any, fill: Any) -> list[Any]:
        v = list(v or [])[:MAX_PROMPTS]
        return v + [fill] * (MAX_PROMPTS - len(v))

    out = [form.get(k) for k in FORM_SCALARS]
    for name, blank in ROW_FIELDS:
        out += pad(form.get(name), blank)
    return out


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _number(v: Any, name: str) -> float | None:
    if _blank(v):
        return None
    if isinstance(v, str):
        t = v.strip().lower()
        if t in ("inf", "+inf", "infinity", "\u221e"):
            return math.inf
        try:
            return float(t)
        except ValueError:
            raise ValueError(f"{name}: must be a number, got {v!r}") from None
    if isinstance(v, bool):
        raise ValueError(f"{name}: must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {v!r}") from None


def _int_or_none(v: Any, name: str) -> int | None:
    x = _number(v, name)
    if x is None:
        return None
    if not math.isfinite(x) or x != int(x):
        raise ValueError(f"{name}: must be a whole number, got {v!r}")
    return int(x)


def _str_list(v: Any) -> list[str]:
    if _blank(v):
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.replace("\n", ",").split(",") if s.strip()]
    return [str(s).strip() for s in v if not _blank(s)]


def _expert_rows(prompts_in: list[Any], n_extra: int) -> tuple[list[str], list[int]]:
    """(prompts, row of each expert). With prompts, the experts are the non-blank prompt rows
    then one blank row per extra model; without, the model and extra models take rows 0, 1, ..."""
    prompt_rows = [i for i, p in enumerate(prompts_in) if not _blank(p)]
    prompts = [str(prompts_in[i]).strip() for i in prompt_rows]
    if prompts:
        blank_rows = [i for i in range(len(prompts_in)) if i not in prompt_rows]
        return prompts, prompt_rows + blank_rows[:n_extra]
    return prompts, list(range(min(len(prompts_in), 1 + n_extra)))


def _row_values(raw: list[Any], rows: list[int], n_experts: int, what: str) -> list[float] | None:
    vals = [_number(raw[r], f"{what}") if r < len(raw) else None for r in rows]
    if all(v is None for v in vals):
        return None
    if len(vals) < n_experts or any(v is None for v in vals):
        raise ValueError(f"{what}: set a value in every expert's row ({n_experts} experts) or clear them all "
                         "for the default")
    return [float(v) for v in vals]  # type: ignore[arg-type]


def parse_form(form: Mapping[str, Any]) -> tuple[Composition, list[str]]:
    """The form as a validated Composition for its operator, plus notes on the parameters the
    operator does not use (they are dropped). Raises ValueError('field: message')."""
    from superdiff.a1111 import parse_prompt_rows

    rows = _int_or_none(form.get("rows"), "prompts")
    rows = max(MIN_PROMPTS, min(MAX_PROMPTS, 2 if rows is None else rows))  # blank: the page's two rows
    prompts_in = list(form.get("prompts") or [])[:rows]
    prompts_in += [""] * (rows - len(prompts_in))
    extras = _str_list(form.get("extra_models"))
    prompts, expert_rows = _expert_rows(prompts_in, len(extras))
    n_experts = len(prompts) + len(extras) if prompts else 1 + len(extras)
    weights = _row_values(list(form.get("weights") or []), expert_rows, n_experts, "weights")
    bias = _row_values(list(form.get("biases") or []), expert_rows, n_experts, "bias")
    operator = str(form.get("operator") or "and")
    picks = _row_picks(form, prompts_in, prompts, expert_rows)
    if any(_A1111_AND.search(p) for p in prompts):  # A1111's "a AND b:0.7": one expert per part
        if bias is not None or len(prompts) > 1:
            raise ValueError("prompts: write A1111's 'a AND b' in a single prompt row, without per-row "
                             "weights or biases (':weight' suffixes set the weights)")
        if any(pk is not None for pk in picks):
            raise ValueError("prompts: the row splits at AND into several experts, so its LoRA picker cannot say "
                             "which part it applies to; set the picker to none and write the tag in that part, "
                             "e.g. 'a circle <lora:lora-orange:0.8> AND something red'")
    # as the CLI reads --prompt (superdiff.a1111.parse_prompt_rows): AND parts first, then their tags
    prompts, weights, adapters = parse_prompt_rows(_tagged_rows(prompts, picks), weights, operator.lower().strip())
    adapters = _with_recorded(adapters, form)
    notes: list[str] = []
    hidden = [str(i + 1) for i, v in enumerate(list(form.get("prompts") or [])[rows:MAX_PROMPTS], rows) if not _blank(v)]
    if hidden:  # e.g. a scripted call that sets prompt_3 but leaves prompt_rows at 2
        notes.append(f"prompt {', '.join(hidden)} {'is' if len(hidden) == 1 else 'are'} beyond the {rows} prompt "
                     f"rows shown and {'was' if len(hidden) == 1 else 'were'} ignored (add rows; prompt_rows in a "
                     "scripted call)")
    seed, drawn = draw_seed(form.get("seed"))
    if drawn:
        notes.append(f"seed -1 drew seed {seed}")

    clamp_mode = str(form.get("clamp_mode") or "default").lower()
    if clamp_mode == "default":
        clamp: list[float] | bool | None = None
    elif clamp_mode == "off":
        clamp = False
    elif clamp_mode == "custom":
        lo, hi = _number(form.get("clamp_lo"), "kappa_clamp"), _number(form.get("clamp_hi"), "kappa_clamp")
        if lo is None or hi is None:
            raise ValueError("kappa_clamp: give both bounds (lo and hi) for a custom clamp, or choose default/off")
        clamp = [lo, hi]
    else:
        raise ValueError(f"kappa_clamp: unknown clamp mode {clamp_mode!r}; choose default, custom or off")

    single = _int_or_none(form.get("single_expert"), "single_index")
    single_index = 0 if single is None else single - 1
    if single_index < 0:
        raise ValueError(f"single_index: experts are numbered from 1, got {single}")
    estimator = form.get("estimator")
    estimator = None if _blank(estimator) or str(estimator).lower() == "auto" else str(estimator)
    joint_template = form.get("joint_template")
    steps = _int_or_none(form.get("steps"), "steps")
    seed = _int_or_none(seed, "seed")
    num_images = _int_or_none(form.get("num_images"), "num_images")
    switch_every = _int_or_none(form.get("switch_every"), "switch_every")
    guidance = _number(form.get("guidance_scale"), "guidance_scale")
    d: dict[str, Any] = {
        "model": str(form.get("model") or "").strip(),
        "prompts": prompts,
        "extra_models": extras,
        "operator": operator,
        "weights": weights,
        "bias": bias,
        "temperature": _number(form.get("temperature"), "temperature"),
        "lift": _number(form.get("lift"), "lift"),
        "kappa_clamp": clamp,
        "single_index": single_index,
        "joint_template": None if _blank(joint_template) else str(joint_template),
        "switch_every": 1 if switch_every is None else switch_every,
        "estimator": estimator,
        "sampler": str(form.get("sampler") or "sde"),
        "steps": DEFAULT_COMPOSITION.steps if steps is None else steps,
        "guidance_scale": DEFAULT_COMPOSITION.guidance_scale if guidance is None else guidance,
        "negative_prompt": None if _blank(form.get("negative_prompt")) else str(form.get("negative_prompt")),
        "seed": 0 if seed is None else seed,
        "num_images": 1 if num_images is None else num_images,
        "height": _int_or_none(form.get("height"), "height"),
        "width": _int_or_none(form.get("width"), "width"),
        "dtype": str(form.get("dtype") or "float32"),
    }
    if adapters:
        d["adapters"] = adapters
    _formula_fields(form, d, notes)
    full = Composition.from_dict(d)
    comp = for_operator(full, full.operator)
    notes += [f"{FIELD_LABELS[k].lower()} is not used by {comp.operator.upper()} and was ignored"
              for k in PARAM_UNSET if getattr(full, k) != getattr(comp, k) and k != "single_index"]
    return comp, notes


def _formula_fields(form: Mapping[str, Any], d: dict[str, Any], notes: list[str]) -> None:
    """The formula box (superdiff.formula: its prompts replace the prompt rows and it replaces
    the operator), the AND mode and the corrector (docs/correctors.md)."""
    d["and_mode"] = str(form.get("and_mode") or "superdiff")
    corr = form.get("corrector")
    d["corrector"] = None if _blank(corr) else str(corr).strip()
    if _blank(form.get("compose")):
        return
    d["compose"] = str(form.get("compose")).strip()
    if d["prompts"]:
        notes.append("the prompt rows are ignored: the formula names its own prompts")
    d.update(prompts=[], weights=None, bias=None, extra_models=[])


def formula_tree(text: Any, and_mode: Any = "superdiff") -> str:
    """The parsed tree of the formula box as Markdown (or where and why it does not parse)."""
    if _blank(text):
        return ""
    from superdiff.formula import compile_formula

    try:
        f = compile_formula(str(text), and_mode=str(and_mode or "superdiff"))
    except ValueError as e:
        return "```\n" + str(e) + "\n```"
    return "```\n" + f.show() + "\n```"


def composition_from_form(form: Mapping[str, Any]) -> Composition:
    """parse_form without the notes."""
    return parse_form(form)[0]


def for_operator(comp: Composition, operator: str) -> Composition:
    """`comp` run with `operator`, keeping only the parameters that operator uses; checks
    what the pipeline would reject later (scalar lift needs exactly two experts, the single
    expert must exist, joint prompts need prompts)."""
    op = str(operator).lower().strip()
    if op not in OPERATOR_PARAMS:
        raise ValueError(f"operator: unknown operator {operator!r}; choose one of {', '.join(OPERATOR_CHOICES)}")
    changes: dict[str, Any] = {k: unset for k, unset in PARAM_UNSET.items() if k not in OPERATOR_PARAMS[op]}
    c = comp.replace(operator=op, **changes)
    n = num_experts(c)
    if op == "and" and c.lift is not None and n != 2:
        raise ValueError(f"lift: the lift offsets log q_1 - log q_2 and needs exactly two experts, got {n}; "
                         "clear it or use two prompts")
    if op == "joint" and c.corrector is not None and c.compose is None:  # refused by the pipeline, after loading
        raise ValueError("corrector: the joint-prompt baseline takes no corrector; clear it or pick another operator")
    if op == "single" and c.single_index >= n:
        raise ValueError(f"single_index: expert {c.single_index + 1} does not exist ({n} experts); pick 1 to {n}")
    if op in ("or", "average") and c.weights is not None and len(c.weights) != n:
        raise ValueError(f"weights: {len(c.weights)} values for {n} experts")
    if op == "or" and c.weights is not None and any(w <= 0 for w in c.weights):
        raise ValueError(f"weights: OR mixture weights must be positive, got {c.weights}")
    if op == "or" and c.bias is not None and len(c.bias) != n:
        raise ValueError(f"bias: {len(c.bias)} values for {n} experts")
    return c


def form_from_composition(comp: Composition) -> dict[str, Any]:
    """The form that parse_form turns back into `comp` (used by settings import)."""
    comp = comp.validated()
    loras: list[str] = [NO_LORA] * MAX_PROMPTS
    lora_scales: list[float] = [1.0] * MAX_PROMPTS
    hashes: dict[str, str] = {}
    names = _names_by_path(comp.adapters)
    for a in comp.adapters:  # the recorded hashes, checked again when the form is run
        if a.get("sha256"):
            if hashes.setdefault(a["path"], a["sha256"]) != a["sha256"]:
                raise ValueError(f"adapters: {a['path']} is recorded with two different sha256 hashes; it cannot "
                                 "be the file of both experts")
    if comp.adapters:  # one row per adapter expert, its adapter in the row's picker
        from superdiff.compose import BASE_ADAPTER

        rows = [(p, a) for a in comp.adapters for p in ([a["prompt"]] if a.get("prompt") else comp.prompts)]
        if len(rows) > MAX_PROMPTS:
            raise ValueError(f"prompts: the studio holds {MAX_PROMPTS} expert rows; this composition has "
                             f"{len(rows)} adapter experts")
        for i, (_, a) in enumerate(rows):
            if a["path"] != BASE_ADAPTER:
                loras[i], lora_scales[i] = a["path"], float(a.get("scale", 1.0))
        comp = Composition(**{**comp.to_dict(), "prompts": [p for p, _ in rows], "adapters": []})
    if comp.guidance_scale is not None and not 0 <= comp.guidance_scale <= GUIDANCE_MAX:
        raise ValueError(f"guidance_scale: the studio's slider holds 0 to {GUIDANCE_MAX:g}, this composition has "
                         f"{comp.guidance_scale:g}; run it with `superdiff generate --config` instead")
    n_rows_needed = len(comp.prompts) + len(comp.extra_models) if comp.prompts else 1 + len(comp.extra_models)
    has_row_values = comp.weights is not None or comp.bias is not None
    rows = max(2, len(comp.prompts), n_rows_needed if has_row_values else 0)
    if rows > MAX_PROMPTS:
        raise ValueError(f"prompts: the studio holds {MAX_PROMPTS} prompt rows; this composition needs {rows}")
    prompts = list(comp.prompts) + [""] * (MAX_PROMPTS - len(comp.prompts))
    weights: list[float | None] = [None] * MAX_PROMPTS
    biases: list[float | None] = [None] * MAX_PROMPTS
    for values, out in ((comp.weights, weights), (comp.bias, biases)):
        for i, v in enumerate(values or []):
            out[i] = v
    if comp.kappa_clamp is None:
        clamp_mode, lo, hi = "default", -1.0, 2.0
    elif comp.kappa_clamp is False:
        clamp_mode, lo, hi = "off", -1.0, 2.0
    else:
        clamp_mode, (lo, hi) = "custom", comp.kappa_clamp  # type: ignore[misc]
    return {
        "model": comp.model, "extra_models": list(comp.extra_models), "rows": rows, "operator": comp.operator,
        "temperature": _fmt(comp.temperature), "lift": _fmt(comp.lift), "clamp_mode": clamp_mode,
        "clamp_lo": lo, "clamp_hi": hi, "single_expert": comp.single_index + 1,
        "joint_template": comp.joint_template or "", "switch_every": comp.switch_every,
        "estimator": comp.estimator or "auto",
        "sampler": comp.sampler, "steps": comp.steps, "guidance_scale": comp.guidance_scale,
        "negative_prompt": comp.negative_prompt or "", "seed": comp.seed, "num_images": comp.num_images,
        "height": _fmt(comp.height), "width": _fmt(comp.width), "dtype": comp.dtype,
        "prompts": prompts, "weights": [_fmt(w) for w in weights], "biases": [_fmt(b) for b in biases],
        "loras": loras, "lora_scales": lora_scales,
        "compose": comp.compose or "", "and_mode": comp.and_mode,
        "corrector": "" if comp.corrector is None else (comp.corrector if isinstance(comp.corrector, str)
                                                          else json.dumps(comp.corrector)),
        "lora_sha256": json.dumps(hashes, sort_keys=True) if hashes else "",
        "lora_names": json.dumps(names, sort_keys=True) if names else "",
    }


#: the hidden per-path fields: form field -> (adapter key, what its values are, for messages)
_PATH_FIELDS = {"lora_sha256": ("sha256", "hashes"), "lora_names": ("name", "names")}


def _recorded(form: Mapping[str, Any], field: str) -> dict[str, str]:
    """A hidden per-path field (lora_sha256, lora_names): JSON {adapter path: value}, or blank."""
    v = form.get(field)
    if _blank(v):
        return {}
    try:
        d = json.loads(v) if isinstance(v, str) else v
    except json.JSONDecodeError:
        d = None
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(x, str) and x.strip()
                                          for k, x in d.items()):
        key, what = _PATH_FIELDS[field]
        raise ValueError(f"adapters: the recorded LoRA {what} ({field}) must be JSON {{path: {key}}}, got "
                         f"{_first_line(str(v), 120)!r}")
    return {k.strip(): x.strip() for k, x in d.items()}


def _with_recorded(adapters: list[dict[str, Any]], form: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`adapters` with the sha256 and the name recorded for each one's path (an adapter picked
    since the import names another path: it is not held to the imported hash and takes its
    default name)."""
    for field, (key, _) in _PATH_FIELDS.items():
        rec = _recorded(form, field)
        adapters = [{**a, key: rec[a["path"].strip()]} if a["path"].strip() in rec else a for a in adapters]
    return adapters


def _names_by_path(adapters: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """{path: name} of the adapters that name themselves; a file that two experts name
    differently is left out (one name per picker path is all the form holds: those experts
    then take the default name, the folder or file name)."""
    names: dict[str, set[str]] = {}
    for a in adapters:
        if a.get("name"):
            names.setdefault(str(a["path"]).strip(), set()).add(str(a["name"]))
    return {p: next(iter(n)) for p, n in names.items() if len(n) == 1}


def _fmt(v: float | int | None) -> str:
    """A number for a text field: '' for None (the default), 'inf', or the shortest exact repr."""
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def compare_methods(comp: Composition) -> list[tuple[str, Composition]]:
    """(label, composition) for joint prompt, averaging, OR and AND on the same seed and
    settings. The joint prompt needs prompts (text-to-image) without LoRA rows or a corrector and
    is left out otherwise; a formula (which fixes its own method) is refused."""
    if comp.compose is not None:  # the formula is the method: the operator would be ignored by every run
        raise ValueError("compose: Compare methods runs the joint prompt, averaging, OR and AND over the prompt "
                         "rows, but a formula fixes its own method (each run would draw the formula again); clear "
                         "the formula and write its prompts in the rows to compare")
    if num_experts(comp) < 2:
        raise ValueError("prompts: comparing methods needs at least two experts (two prompts, a model plus "
                         "an extra model, or two LoRA rows)")
    out = []
    for op, label in COMPARE_METHODS:
        if op == "joint" and (not comp.prompts or comp.extra_models or comp.adapters or comp.corrector is not None):
            continue  # joint prompt: one text prompt on the base model; no meaning for checkpoints or LoRA rows,
            # and it takes no corrector
        try:
            out.append((label, for_operator(comp, op)))
        except ValueError as e:  # say that it is Compare's own run of `label` that refuses the form
            if comp.operator == op:
                raise
            m = _FIELD_RE.match(str(e))
            field, text = m.groups() if m else ("settings", str(e))
            raise ValueError(f"{field}: Compare methods also runs {label}, which refuses these settings: "
                             f"{text}") from None
    return out


def check_limits(comp: Composition, max_steps: int, max_images: int) -> None:
    """The studio's per-request bounds (the queue bounds how many run at once)."""
    if comp.steps > max_steps:
        raise ValueError(f"steps: at most {max_steps} in the studio, got {comp.steps}; use `superdiff generate` "
                         "for longer runs")
    if comp.num_images > max_images:
        raise ValueError(f"num_images: at most {max_images} per request in the studio, got {comp.num_images}; "
                         "use `superdiff batch` for more")


def check_model_fits(comp: Composition, kind: str | None) -> None:
    """What the pipeline would reject only after loading the model: prompts for an
    unconditional model, no prompts for a text-to-image one."""
    if kind == "unet2d" and comp.prompts:
        raise ValueError(f"prompts: {comp.model} is an unconditional model and takes no prompts; clear the prompt "
                         "rows (their weight/bias then belong to the model and its extra models, in order)")
    if kind == "unet2d" and comp.operator == "joint":
        raise ValueError("operator: the joint-prompt baseline needs a text-to-image model")
    if kind in ("sd", "sdxl", "sd3", "flux") and not comp.prompts:
        raise ValueError(f"prompts: {comp.model} is a text-to-image model; give at least one prompt")


# ---- settings JSON --------------------------------------------------------------------------
def settings_json(comp: Composition) -> str:
    """The composition as strict JSON (the format `superdiff generate --config` reads); an
    infinite OR temperature is written as the string "inf", which Composition accepts."""
    return comp.to_json(indent=2)


_MAX_SETTINGS_BYTES = 1_000_000


def settings_from_json(text: str) -> Composition:
    """A Composition from settings JSON (a composition object, or {"composition": {...}})."""
    if _blank(text):
        raise ValueError("settings: the JSON is empty; paste exported settings or import a .json / .png file")
    if len(text) > _MAX_SETTINGS_BYTES:
        raise ValueError(f"settings: the JSON is larger than {_MAX_SETTINGS_BYTES} bytes")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"settings: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(d, dict) and isinstance(d.get("composition"), dict):
        d = d["composition"]
    if isinstance(d, dict):
        d = {k: v for k, v in d.items() if k != "superdiff_version"}
    try:
        return Composition.from_dict(d)
    except TypeError as e:  # e.g. a wrong type that the dataclass constructor rejects
        raise ValueError(f"settings: {e}") from None


def check_adapter_files(comp: Composition, cache: ModelCache | None = None) -> Composition:
    """Refuse settings whose adapters record a sha256 that the file their name resolves to
    does not have: the check `superdiff generate --from-png` makes before it runs
    (superdiff.compose.resolve_adapters, with the cache's allowed roots), so a studio import
    refuses what the command line refuses, with the same message. Returns `comp`."""
    if any(a.get("sha256") for a in comp.adapters):
        from superdiff.compose import resolve_adapters

        resolve_adapters(comp, cache if cache is not None else ModelCache())
    return comp


def load_settings_file(path: str | os.PathLike, cache: ModelCache | None = None) -> Composition:
    """Settings from an uploaded .json file, or from a .png written by superdiff (its
    embedded parameters reproduce that image). Recorded LoRA hashes are checked against the
    files (check_adapter_files; `cache` gives the allowed roots)."""
    p = Path(path)
    if p.suffix.lower() == ".png":
        return check_adapter_files(read_png_composition(p), cache)
    if p.suffix.lower() != ".json":
        raise ValueError(f"settings: {p.name} is neither a .json settings file nor a superdiff .png")
    if p.stat().st_size > _MAX_SETTINGS_BYTES:
        raise ValueError(f"settings: {p.name} is larger than {_MAX_SETTINGS_BYTES} bytes")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"settings: {p.name} is not UTF-8 text") from None
    return check_adapter_files(settings_from_json(text), cache)



# ---- prompt rows and their adapter pickers ---------------------------------------------------
_FIELD_RE = re.compile(r"^([a-z_]+): (.*)$", re.S)
_A1111_AND = re.compile(r"\bAND\b")


def _row_picks(form: Mapping[str, Any], prompts_in: list[Any], prompts: list[str],
               expert_rows: list[int]) -> list[dict[str, Any] | None]:
    """The adapter picked in each prompt row's picker ({"path", "scale"} or None), aligned with
    `prompts`; a picker set on a row without a prompt is refused (it would be silently lost)."""
    loras = list(form.get("loras") or [])
    scales = list(form.get("lora_scales") or [])

    def pick(r: int) -> dict[str, Any] | None:
        v = loras[r] if r < len(loras) else None
        if _blank(v) or str(v).strip() == NO_LORA:
            return None
        scale = _number(scales[r] if r < len(scales) else None, "adapters")
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"adapters: row {r + 1}'s LoRA scale must be a finite number, got {scales[r]!r}")
        return {"path": str(v).strip(), "scale": 1.0 if scale is None else float(scale)}

    for r in range(len(prompts_in)):
        if _blank(prompts_in[r]) and pick(r) is not None:
            raise ValueError(f"prompts: row {r + 1} picks the LoRA {str(loras[r]).strip()!r} but has no prompt; "
                             "write the prompt it applies to, or set the picker back to none")
    return [pick(r) for r in expert_rows[:len(prompts)]]


def _tagged_rows(prompts: list[str], picks: Sequence[dict[str, Any] | None] = ()) -> list[str]:
    """The prompt rows with each row's picked adapter (`picks`, aligned with `prompts`) written
    as its "<lora:NAME_OR_PATH:SCALE>" tag, so that a picker and a typed tag mean the same
    (superdiff.a1111.parse_prompt_rows makes them adapter experts); a row with both, or with two
    tags, is refused (one adapter per expert row)."""
    from superdiff.a1111 import ROW_LORA_TAG

    picks = list(picks) + [None] * (len(prompts) - len(picks))
    rows = []
    for i, (p, pk) in enumerate(zip(prompts, picks)):
        t = ROW_LORA_TAG.findall(p)
        if len(t) + (pk is not None) > 1 and not _A1111_AND.search(p):  # AND parts: one tag per part, checked there
            raise ValueError(f"prompts: row {i + 1} names {len(t) + (pk is not None)} adapters (tags "
                             f"{', '.join(t) or 'none'}{', picker ' + pk['path'] if pk else ''}); pick one adapter "
                             "per expert row (another row for the other adapter)")
        rows.append(p if pk is None else f"{p} <lora:{pk['path']}:{pk['scale']!r}>")
    return rows


# ---- errors ---------------------------------------------------------------------------------
def _first_line(text: str, limit: int = 400) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def error_message(exc: BaseException) -> str:
    """A readable one-paragraph message for the user (never a stack trace); unexpected errors
    are logged with their traceback on the server."""
    if isinstance(exc, InterruptedError):
        return "Cancelled."
    if isinstance(exc, json.JSONDecodeError):
        return f"Settings: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
    if isinstance(exc, ValueError):
        text = " ".join(s.strip() for s in str(exc).splitlines() if s.strip())
        m = _FIELD_RE.match(text)
        if m and m.group(1) in FIELD_LABELS:
            text = f"{FIELD_LABELS[m.group(1)]}: {m.group(2)}"
        return text[:800] or "Invalid input."
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return ("Out of memory: use fewer images, fewer prompts, fewer extra models or a smaller image size, "
                "and try again.")
    if isinstance(exc, FileNotFoundError):
        return f"File not found: {_first_line(exc.filename or str(exc))}"
    if isinstance(exc, ImportError):
        return (f"A package is missing ({_first_line(str(exc))}); install the studio's dependencies with "
                "`pip install 'superdiff[ui]'`.")
    if isinstance(exc, OSError):
        return f"Could not load the model files: {_first_line(str(exc))}"
    log.error("studio: unexpected error", exc_info=exc)
    return (f"Generation failed ({type(exc).__name__}: {_first_line(str(exc), 300)}). "
            "The server log has the details.")


# keep the validation vocabulary visible to app.py
ESTIMATOR_UI_CHOICES: tuple[str, ...] = ("auto",) + tuple(e for e in ESTIMATOR_CHOICES if e is not None)
SAMPLER_UI_CHOICES: tuple[str, ...] = SAMPLER_CHOICES
DTYPE_UI_CHOICES: tuple[str, ...] = DTYPES
