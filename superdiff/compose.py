"""One composition described as data, and the one function that runs it.

`Composition` is a flat, JSON-serialisable record of everything that determines a set of
images (models, prompts, operator and its parameters, sampler, steps, guidance, seed,
image count). The command line (`superdiff generate` / `batch`), the Gradio studio and the
benchmarks all build a Composition and call `run_composition`, which loads the models
through a `ModelCache` and calls the SuperDiff diffusers pipeline (which runs the one
SuperDiff step of `superdiff.step`).

Reproducibility: image i of a composition is sampled in its own pipeline call with
``torch.Generator(device).manual_seed(seed + i)``, so every image is bit-for-bit the same
whatever else is generated with it (a batch, a resumed run, another process). Its PNG
carries the composition with ``seed = seed + i`` and ``num_images = 1``; running that
record again gives the same pixels (`read_png_composition`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# loading models and writing images live in their own modules; their names stay importable
# from here, where earlier versions defined them
from .images import GRID_KEY, PNG_KEY, image_grid, png_metadata, read_png_composition, save_png  # noqa: F401
from .model_loading import (FLOW_KINDS, MODEL_KINDS, TEXT_KINDS, ModelCache, check_safetensors,  # noqa: F401
                            hub_unreachable, inside, model_kind)

__all__ = [
    "Composition",
    "CompositionResult",
    "ModelCache",
    "OPERATOR_CHOICES",
    "SAMPLER_CHOICES",
    "ESTIMATOR_CHOICES",
    "run_composition",
    "save_png",
    "read_png_composition",
    "png_metadata",
    "image_grid",
    "DEFAULT_COMPOSITION",
    "model_kind",
    "MODEL_KINDS",
    "TEXT_KINDS",
    "FLOW_KINDS",
    "FAMILY_DEFAULTS",
    "ADAPTER_OPERATORS",
    "parse_lora",
    "resolve_adapters",
]

OPERATOR_CHOICES = ("or", "and", "average", "single", "joint", "composite", "merge", "switch")
#: the multi-LoRA baselines: they need `adapters` (superdiff/pipelines/adapters.py)
ADAPTER_OPERATORS = ("composite", "merge", "switch")
#: the optional Composition parameters each operator uses, and their unset values
OPERATOR_PARAMS: dict[str, frozenset[str]] = {
    "or": frozenset({"temperature", "weights", "bias"}),
    "and": frozenset({"lift", "kappa_clamp"}),
    "average": frozenset({"weights"}),
    "single": frozenset({"single_index"}),
    "joint": frozenset({"joint_template"}),
    "composite": frozenset(),
    "merge": frozenset(),
    "switch": frozenset({"switch_every"}),
}
PARAM_UNSET: dict[str, Any] = {"temperature": None, "weights": None, "bias": None, "lift": None, "kappa_clamp": None,
                               "single_index": 0, "joint_template": None, "switch_every": 1}


def split_foreign_params(d: dict[str, Any], given: Any, hint: str = "") -> tuple[dict[str, Any],
                                                                              list[tuple[str, str]]]:
    """(`d` less the operator parameters its operator does not use, [(parameter, the operators
    that use it)] of those dropped). One set in `given` (what the user set now) is refused
    instead: a ValueError naming the operators that take it (`hint` ends its message). Shared
    by `superdiff generate` (a PNG's or config's parameters) and `batch` (a sweep line's)."""
    op = str(d.get("operator", "and")).lower().strip()
    out, dropped = dict(d), []
    for k in foreign_params(d):
        uses = ", ".join(sorted(o for o, ps in OPERATOR_PARAMS.items() if k in ps))
        if k in given:
            raise ValueError(f"{k}: operator {op} does not take it (it is for: {uses}); remove it or choose one of "
                             f"those operators{hint}")
        out[k] = PARAM_UNSET[k]
        dropped.append((k, uses))
    return out, dropped


def foreign_params(d: dict[str, Any]) -> list[str]:
    """The operator parameters set in composition fields `d` that its operator does not use
    (none for a compose formula, which checks its own)."""
    op = str(d.get("operator", "and")).lower().strip()
    if d.get("compose") or op not in OPERATOR_PARAMS:
        return []
    return [k for k, unset in PARAM_UNSET.items() if d.get(k, unset) not in (unset, None) and k not in OPERATOR_PARAMS[op]]
#: the `adapters` path of an expert on the base network without adapter (next to adapter experts)
BASE_ADAPTER = "base"
SAMPLER_CHOICES = ("sde", "ddpm", "ode", "euler", "heun")
ESTIMATOR_CHOICES = (None, "kernel", "ito", "ode", "none")
DTYPES = ("float32", "float16", "bfloat16")
#: per family: the defaults diffusers' own pipelines use, and whether a negative prompt
#: applies (Flux: only for transformers without guidance embedding, through true CFG)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": {"steps": 50, "guidance_scale": 7.5, "negative_prompt": True, "text_encoders": 1},
    "sdxl": {"steps": 50, "guidance_scale": 5.0, "negative_prompt": True, "text_encoders": 2},
    "sd3": {"steps": 28, "guidance_scale": 7.0, "negative_prompt": True, "text_encoders": 3},
    "flux": {"steps": 28, "guidance_scale": 3.5, "negative_prompt": False, "text_encoders": 2},
    "unet2d": {"steps": 50, "guidance_scale": 1.0, "negative_prompt": False, "text_encoders": 0},
}


#: the guidance of a bundled model whose card records none (every bundled text-to-image recipe)
BUNDLED_GUIDANCE = 4.0


def default_guidance(model: str, kind: str) -> float:
    """The guidance scale of a composition that names none: the scale the model's card measured
    its quality at (``quality.json`` settings, as the bundled models and copies of them carry),
    4.0 for a bundled model without one, else the family's diffusers default (FAMILY_DEFAULTS:
    SD 7.5, SDXL 5.0, SD3 7.0, Flux 3.5 embedded guidance)."""
    from .registry import bundled_model_path, list_bundled_models

    bundled = model in list_bundled_models()
    folder = bundled_model_path(model) if bundled else Path(model).expanduser()
    card = folder / "quality.json"
    if card.is_file():
        scale = json.loads(card.read_text()).get("settings", {}).get("guidance_scale")
        if scale is not None:
            return float(scale)
    return BUNDLED_GUIDANCE if bundled else float(FAMILY_DEFAULTS[kind]["guidance_scale"])


def _fail(field_name: str, msg: str) -> ValueError:
    return ValueError(f"{field_name}: {msg}")


@dataclass
class Composition:
    """Everything that determines the images of one composition (see the module docstring).

    model: a bundled model name (`superdiff.registry.list_bundled_models()`), a local
        diffusers directory or a hub id; a text-to-image pipeline (one expert per prompt),
        or an unconditional UNet2D checkpoint.
    extra_models: further UNet checkpoints, each one more expert (for a text-to-image model:
        unconditional UNets sharing its VAE; for UNet2D models: the other checkpoints).
    prompts: one expert per prompt (text-to-image models); empty for unconditional models.
    operator: "or", "and", "average" (kappa fixed by `weights`, 0.5/0.5 by default: the
        averaging baseline), "single" (expert `single_index` alone), "joint" (the joint-prompt
        baseline: one prompt made from all of them with `joint_template`).
    guidance_scale: classifier-free guidance; for a guidance-distilled Flux model the embedded
        guidance instead (such a model has no negative prompt). None: the model's default
        (`default_guidance`), recorded in the images' metadata as the scale used.
    adapters: LoRA adapters as experts on the model's own network, each {"path", "scale",
        optional "prompt", "name", "sha256"} (or "PATH[:SCALE]"): one expert per adapter and
        prompt, all in one batched forward; path "base" is the network without adapter. With adapters, operator may also be "composite"
        (LoRA Composite), "merge" (weight merge) or "switch" (LoRA Switch, every
        `switch_every` steps). `run_composition` records each file's sha256; a record read
        back refuses a file whose hash differs.
    compose: a formula over prompts, e.g. '("a circle" & "something red") | "a square":0.5'
        (superdiff.formula; `&` AND, `|` OR, `~` NOT relative to the unconditional prompt,
        `:w` weights); its prompts become `prompts` and it replaces `operator`.
    and_mode: "superdiff" (equal-density AND, the default) or "product" (the product of the
        experts; sampled exactly with an SMC corrector).
    corrector: particles and MCMC moves after each step (superdiff.correctors.make_corrector:
        "smc:8", "ula", "smc:4+hmc", or a dict such as {"particles": 8, "window": [0, 0.8]}).
    model_kind: recorded by `run_composition` (one of MODEL_KINDS: "sd", "sdxl", "sd3",
        "flux", "unet2d"), so that PNG metadata says which family made an image; a value
        read back is informational (the model itself decides).
    """

    model: str = "shapes-t2i"
    prompts: list[str] = field(default_factory=list)
    operator: str = "and"
    extra_models: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    bias: list[float] | None = None
    temperature: float | None = None
    lift: float | None = None
    kappa_clamp: list[float] | bool | None = None
    single_index: int = 0
    joint_template: str | None = None
    estimator: str | None = None
    sampler: str = "sde"
    steps: int = 25
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    model_kind: str | None = None
    adapters: list[dict[str, Any]] = field(default_factory=list)
    switch_every: int = 1
    compose: str | None = None
    and_mode: str = "superdiff"
    corrector: Any = None

    # ---- validation and (de)serialisation -------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Composition":
        """Build and validate; unknown fields are an error that names them."""
        if not isinstance(d, dict):
            raise ValueError(f"a composition must be a JSON object, got {type(d).__name__}")
        names = cls.field_names()
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known fields: {', '.join(names)}")
        comp = cls(**{k: v for k, v in d.items()})
        return comp.validated()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        """Strict JSON (an infinite OR temperature as the string "inf", which from_dict reads)."""
        from .trace import json_safe

        return json.dumps(json_safe(self.to_dict()), allow_nan=False, **kwargs)

    def replace(self, **changes: Any) -> "Composition":
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "Composition":
        """A normalised copy; raises ValueError naming the first bad field and how to fix it."""
        c = dataclasses.replace(self)
        if not isinstance(c.model, str) or not c.model.strip():
            raise _fail("model", "give a bundled model name, a local directory or a hub id")
        c.model = c.model.strip()
        c.prompts = _str_list(c.prompts, "prompts")
        c.extra_models = _str_list(c.extra_models, "extra_models")
        c.operator = str(c.operator).lower().strip()
        if c.operator not in OPERATOR_CHOICES:
            raise _fail("operator", f"unknown operator {self.operator!r}; choose one of {', '.join(OPERATOR_CHOICES)}")
        c.sampler = str(c.sampler).lower().strip()
        if c.sampler not in SAMPLER_CHOICES:
            raise _fail("sampler", f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_CHOICES)}")
        if c.estimator is not None:
            c.estimator = str(c.estimator).lower().strip() or None
        if c.estimator not in ESTIMATOR_CHOICES:
            raise _fail("estimator", f"unknown estimator {self.estimator!r}; choose one of "
                                     f"{', '.join(str(e) for e in ESTIMATOR_CHOICES[1:])} or leave it empty")
        if c.estimator not in (None, "none"):  # the pair every pipeline refuses, refused before a model loads
            from .estimators import check_pair, make_estimator
            from .integrators import make_integrator

            try:
                check_pair(make_estimator(c.estimator), make_integrator(c.sampler))
            except ValueError as e:
                raise _fail("estimator", f"with sampler {c.sampler!r}: {e}") from None
        c.steps = _int(c.steps, "steps", 1, 10_000)
        c.num_images = _int(c.num_images, "num_images", 1, 10_000)
        c.seed = _int(c.seed, "seed", 0, 2**63 - 1)
        c.single_index = _int(c.single_index, "single_index", 0, 1_000)
        if c.guidance_scale is not None:
            c.guidance_scale = _float(c.guidance_scale, "guidance_scale", lo=0.0)
        if c.temperature is not None:
            c.temperature = _float(c.temperature, "temperature", lo=0.0, allow_inf=True)
        if c.lift is not None:
            c.lift = _float(c.lift, "lift")
        for name in ("weights", "bias"):
            v = getattr(c, name)
            if v is not None:
                if isinstance(v, (int, float)) or not isinstance(v, Sequence) or isinstance(v, str):
                    raise _fail(name, f"give a list with one number per expert, got {v!r}")
                setattr(c, name, [_float(x, name) for x in v])
        if c.weights is not None and c.bias is not None:
            raise _fail("weights", "give either weights or bias (log-weights), not both")
        if c.kappa_clamp is not None and not isinstance(c.kappa_clamp, bool):
            if not isinstance(c.kappa_clamp, Sequence) or len(c.kappa_clamp) != 2:
                raise _fail("kappa_clamp", f"give [lo, hi], false to disable, or leave it empty; got {c.kappa_clamp!r}")
            lo, hi = (_float(x, "kappa_clamp") for x in c.kappa_clamp)
            if not lo < hi:
                raise _fail("kappa_clamp", f"lo must be below hi, got {c.kappa_clamp!r}")
            c.kappa_clamp = [lo, hi]
        if c.kappa_clamp is True:
            raise _fail("kappa_clamp", "true is ambiguous: give [lo, hi] or leave it empty for the default")
        for name in ("height", "width"):
            v = getattr(c, name)
            if v is not None:
                setattr(c, name, _int(v, name, 8, 8192))
        if c.model_kind is not None and c.model_kind not in MODEL_KINDS:
            raise _fail("model_kind", f"one of {', '.join(MODEL_KINDS)} or empty, got {c.model_kind!r}")
        if c.dtype not in DTYPES:
            raise _fail("dtype", f"choose one of {', '.join(DTYPES)}, got {c.dtype!r}")
        if c.negative_prompt is not None and not isinstance(c.negative_prompt, str):
            raise _fail("negative_prompt", "must be a string")
        if c.joint_template is not None and not isinstance(c.joint_template, str):
            raise _fail("joint_template", "must be a string such as '{0} that looks like {1}'")
        if c.joint_template is not None and c.operator == "joint" and c.prompts:  # before any model loads
            from .pipelines._inputs import joint_prompt

            try:
                joint_prompt(c.prompts, c.joint_template)
            except ValueError as e:
                raise _fail("joint_template", str(e).removeprefix("joint_template ")) from None
        c.adapters = _adapter_list(c.adapters)
        c.switch_every = _int(c.switch_every, "switch_every", 1, 10_000)
        _check_formula_fields(c)
        _check_adapter_prompts(c)
        if c.operator in ADAPTER_OPERATORS and len([a for a in c.adapters if a["path"] != BASE_ADAPTER]) < 2:
            raise _fail("adapters", f"operator {c.operator} composes LoRA adapters: give two or more (got "
                                    f"{len(c.adapters)}), e.g. --lora lora-orange --lora lora-outline")
        if c.adapters and c.operator == "joint":
            raise _fail("operator", "the joint-prompt baseline does not take adapters; use composite, merge, "
                                    "switch, or, and, average or single")
        n_experts = num_experts(c)
        if c.operator == "joint" and len(c.prompts) < 1:
            raise _fail("prompts", "the joint-prompt baseline needs prompts to join")
        # text-to-image: one expert per prompt and extra model (unconditional models: the
        # checkpoints; the pipeline checks those counts before any compute)
        for name in ("weights", "bias"):
            v = getattr(c, name)
            if v is not None and c.prompts and c.operator != "joint" and len(v) != n_experts:
                raise _fail(name, f"{len(v)} values for {n_experts} experts "
                                  f"({len(c.prompts)} prompts + {len(c.extra_models)} extra models"
                                  + (f", {len(c.adapters)} adapters" if c.adapters else "") + ")")
        if c.corrector is not None and c.operator != "joint" and c.operator not in ADAPTER_OPERATORS:
            _check_corrector(c, n_experts)
        return c

    def image_record(self, index: int) -> "Composition":
        """The composition that reproduces image `index` alone (seed + index, one image)."""
        return dataclasses.replace(self, seed=self.seed + index, num_images=1)

    def describe(self) -> str:
        """One line naming the method and its experts (what `superdiff generate` prints first):
        the prompts and extra models, or the unconditional models, then the LoRA adapters."""
        what = " | ".join(self.prompts + self.extra_models if self.prompts else [self.model, *self.extra_models])
        loras = [a.get("name") or Path(str(a["path"])).stem for a in self.adapters if a["path"] != BASE_ADAPTER]
        if loras:
            what += f"; LoRA {', '.join(loras)}"
        corr = f" + {self.corrector}" if self.corrector is not None else ""
        if self.compose is not None:
            mode = "" if self.and_mode == "superdiff" else f" ({self.and_mode} AND)"
            return f"FORMULA[{self.compose}]{mode}{corr} seed {self.seed}"
        return f"{self.operator.upper()}[{what}]{corr} seed {self.seed}"


def parse_lora(text: str) -> dict[str, Any]:
    """"PATH[:SCALE]" -> {"path", "scale"} (the CLI's --lora, a <lora:...> tag's body; a
    Windows drive letter or a path with a colon stays whole unless what follows the last colon
    is a number).

    A1111's longer tag forms are read as A1111 reads them: "NAME:TE:UNET" (text-encoder, then
    UNet multiplier) and named "NAME:unet=0.5" / "NAME:te=0.8" (the UNet multiplier defaults to
    the text-encoder one, which defaults to 1). The scale is the UNet (denoiser) multiplier:
    adapter experts take denoiser-only LoRAs (one that adapts a text encoder is refused when
    loaded), so the text-encoder multiplier changes nothing. DyLoRA's dyn= is refused."""
    parts = str(text).split(":")
    args: list[str] = []
    while len(parts) > 1 and (_lora_number(parts[-1]) is not None or _LORA_NAMED_ARG.match(parts[-1])):
        args.insert(0, parts.pop())
    if not args:
        return {"path": str(text), "scale": 1.0}
    path = ":".join(parts)
    if len(args) == 1 and _lora_number(args[0]) is not None:
        return {"path": path, "scale": _lora_number(args[0])}
    positional, named = [], {}
    for a in args:
        m = _LORA_NAMED_ARG.match(a)
        if m is None:
            positional.append(_lora_number(a))
            continue
        v = _lora_number(m.group(2))
        if v is None:
            raise _fail("adapters", f"<lora:{text}>: {m.group(1)}={m.group(2)!r} is not a number; write e.g. "
                                    f"<lora:{path}:unet=0.5>")
        named[m.group(1)] = v
    if len(positional) >= 3 or "dyn" in named:
        raise _fail("adapters", f"<lora:{text}>: a DyLoRA rank (dyn=, or a third number after the name) is not "
                                f"supported; write <lora:{path}:SCALE> or <lora:{path}:TE:UNET>")
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return {"path": path, "scale": unet}


#: an A1111 named LoRA tag argument: te=, unet= or dyn= (what follows is checked as a number)
_LORA_NAMED_ARG = re.compile(r"^\s*(te|unet|dyn)\s*=\s*(.*?)\s*$")


def _lora_number(text: str) -> float | None:
    try:
        return float(text)  # inf / nan too: the scale check names them
    except ValueError:
        return None


_ADAPTER_KEYS = ("path", "scale", "prompt", "name", "sha256")


def _adapter_list(v: Any) -> list[dict[str, Any]]:
    """Normalise `adapters`: strings "PATH[:SCALE]" or dicts with _ADAPTER_KEYS."""
    if v is None:
        return []
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, Sequence):
        raise _fail("adapters", f"give a list of adapters (\"PATH[:SCALE]\" or {{\"path\", \"scale\"}}), got {v!r}")
    out = []
    for k, a in enumerate(v):
        if isinstance(a, str):
            a = parse_lora(a)
        if not isinstance(a, dict) or "path" not in a:
            raise _fail("adapters", f"adapter {k}: give \"PATH[:SCALE]\" or a dict with 'path', got {a!r}")
        unknown = sorted(set(a) - set(_ADAPTER_KEYS))
        if unknown:
            raise _fail("adapters", f"adapter {k}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_ADAPTER_KEYS)}")
        if not isinstance(a["path"], str) or not a["path"].strip():
            raise _fail("adapters", f"adapter {k}: path must be a non-empty string")
        d = {"path": a["path"].strip(), "scale": _float(a.get("scale", 1.0), f"adapters[{k}].scale")}
        for key in ("prompt", "name", "sha256"):
            if a.get(key) is not None:
                if not isinstance(a[key], str):
                    raise _fail("adapters", f"adapter {k}: {key} must be a string")
                d[key] = a[key]
        out.append(d)
    return out


def _check_formula_fields(c: "Composition") -> None:
    """compose (a formula over prompts, superdiff.formula), and_mode and corrector
    (superdiff.correctors.make_corrector); with a formula the prompts are its experts."""
    from .correctors import make_corrector
    from .formula import AND_MODES, compile_formula

    if c.and_mode not in AND_MODES:
        raise _fail("and_mode", f"choose one of {', '.join(AND_MODES)}, got {c.and_mode!r}")
    if c.corrector is not None:
        if isinstance(c.corrector, str) and not c.corrector.strip():
            c.corrector = None
        else:
            if isinstance(c.corrector, str) and c.corrector.strip().startswith("{"):
                try:
                    c.corrector = json.loads(c.corrector)
                except json.JSONDecodeError as e:
                    raise _fail("corrector", f"not a JSON object: {e}") from None
            try:
                make_corrector(c.corrector)
            except ValueError as e:
                raise _fail("corrector", str(e)) from None
    if c.compose is None or not str(c.compose).strip():
        c.compose = None
        return
    if not isinstance(c.compose, str):
        raise _fail("compose", f"a formula is a string such as '(\"a circle\" & \"something red\") | "
                               f"\"a square\"', got {type(c.compose).__name__}")
    try:
        f = compile_formula(c.compose, and_mode=c.and_mode)
    except ValueError as e:
        raise _fail("compose", str(e)) from None
    if c.prompts and c.prompts != f.names:
        raise _fail("prompts", f"give either prompts or a compose formula; the formula's experts are {f.names}")
    c.prompts = list(f.names)


def _check_adapter_prompts(c: "Composition") -> None:
    """An adapter tied to its own prompt (a "<lora:...>" tag's row) is the expert "that adapter
    under that prompt": the prompt must be one of `prompts`, else the record would name prompts
    that are not what its experts sample (e.g. prompts replaced, adapters left as they were)."""
    for k, a in enumerate(c.adapters):
        if a.get("prompt") is None or a["prompt"] in c.prompts:
            continue
        if a["path"] == BASE_ADAPTER:
            raise _fail("adapters", f"adapter {k} (the base model) is tied to the prompt {a['prompt']!r}, which is "
                                    f"not among the prompts {c.prompts}; add that prompt or remove the entry")
        raise _fail("adapters", f"adapter {k} ({a['path']}) is tied to the prompt {a['prompt']!r}, which is not "
                                f"among the prompts {c.prompts}; add that prompt, or write the adapter as a LoRA "
                                f"tag in the prompt it belongs to (e.g. '{a['prompt']} <lora:{a['path']}:"
                                f"{a['scale']:g}>') instead of a separate adapter")
    if c.adapters and all(a.get("prompt") is not None for a in c.adapters):  # no adapter covers every prompt
        own = {a["prompt"] for a in c.adapters}
        lost = [p for p in c.prompts if p not in own]
        if lost:
            raise _fail("prompts", f"{lost[0]!r} is no expert's prompt: every adapter is tied to its own prompt "
                                   f"({', '.join(map(repr, sorted(own)))}); give it a LoRA tag, a 'base' adapter "
                                   "entry (the model without adapter), or remove it")


def _check_corrector(c: "Composition", n_experts: int) -> None:
    """The corrector against the operator and sampler, as every pipeline checks it
    (Corrector.check: SMC needs a stochastic sampler and an operator with a target density),
    before a model loads. Only the operator's kind and OR's temperature decide that."""
    from .correctors import make_corrector
    from .formula import FormulaOperator
    from .integrators import make_integrator
    from .operators import make_operator

    if c.compose is not None:
        op: Any = FormulaOperator(c.compose, and_mode=c.and_mode)
        n_experts = op.formula.num_experts
    else:
        t = {"temperature": c.temperature} if c.operator == "or" and c.temperature is not None else {}
        op = make_operator(c.operator, **t)
    try:
        make_corrector(c.corrector).check(op, make_integrator(c.sampler), max(n_experts, 1))
    except ValueError as e:
        raise _fail("corrector", str(e)) from None


def _str_list(v: Any, name: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if not isinstance(v, Sequence) or not all(isinstance(x, str) for x in v):
        raise _fail(name, f"must be a list of strings, got {v!r}")
    return [x for x in v]


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool):
        raise _fail(name, f"must be an integer, got {v!r}")
    try:
        iv = int(v)
    except (TypeError, ValueError):
        raise _fail(name, f"must be an integer, got {v!r}") from None
    if isinstance(v, float) and iv != v:
        raise _fail(name, f"must be an integer, got {v!r}")
    if not lo <= iv <= hi:
        raise _fail(name, f"must be between {lo} and {hi}, got {iv}")
    return iv


def _float(v: Any, name: str, lo: float | None = None, allow_inf: bool = False) -> float:
    if isinstance(v, bool):
        raise _fail(name, f"must be a number, got {v!r}")
    try:
        fv = float(v)
    except (TypeError, ValueError):
        raise _fail(name, f"must be a number, got {v!r}") from None
    if math.isnan(fv) or (math.isinf(fv) and not allow_inf):
        raise _fail(name, f"must be a finite number, got {v!r}")
    if lo is not None and fv < lo:
        raise _fail(name, f"must be >= {lo}, got {fv}")
    return fv


DEFAULT_COMPOSITION = Composition(model="shapes-t2i", prompts=["a circle", "something red"], operator="and")


def draw_seed(seed: int | None) -> tuple[int, bool]:
    """(seed, drawn): -1 means "random", as in A1111 and ComfyUI: a seed is drawn and
    returned so that it can be recorded; any other value is returned as it is."""
    if not isinstance(seed, bool) and isinstance(seed, (int, float, str)) and str(seed).strip() in ("-1", "-1.0"):
        import secrets

        return secrets.randbelow(2**32), True
    return seed, False  # type: ignore[return-value]


def num_experts(comp: Composition) -> int:
    """Experts of a composition: one per prompt and extra model (an unconditional model and its
    extra models: one each); with adapters, one per adapter and prompt (or per adapter for its
    own prompt), plus the extra models."""
    if comp.adapters:
        return sum(1 if a.get("prompt") else max(1, len(comp.prompts)) for a in comp.adapters) + len(comp.extra_models)
    return len(comp.prompts) + len(comp.extra_models) if comp.prompts else 1 + len(comp.extra_models)


def prepare_composition(d: dict[str, Any], operator_named: bool) -> tuple[Composition, list[str]]:
    """(composition, notes) from composition fields as a user writes them, the one path of
    `superdiff generate` and `superdiff batch`: A1111's "a AND b:0.7" prompt syntax expanded
    (its method is the operator, when named) and "<lora:name:0.8>" tags made adapter experts
    (superdiff.a1111); one expert with no operator named is sampled alone (operator single,
    with a note); then validated, and checked by check_experts. Seeds are the caller's."""
    from .a1111 import parse_prompt_rows

    d, notes = dict(d), []
    prompts = [d["prompts"]] if isinstance(d.get("prompts"), str) else d.get("prompts")
    weights = d.get("weights")
    if isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) and not d.get("compose") \
            and (weights is None or isinstance(weights, (list, tuple))):  # else from_dict names the field
        # (a formula's prompts are its quoted names, taken whole: no AND syntax, no tags)
        named = str(d.get("operator", "")).strip().lower() if operator_named else None
        prompts, w, tagged = parse_prompt_rows(prompts, weights, named or None)
        if w is not None:
            d["weights"] = w
        if tagged:
            if d.get("adapters"):
                raise _fail("adapters", "give LoRAs either as adapters (--lora) or as <lora:...> tags in the "
                                        "prompts, not both")
            d["adapters"] = tagged
        d["prompts"] = prompts
    comp = Composition.from_dict(d)
    if not operator_named and comp.compose is None and comp.operator != "single" and num_experts(comp) == 1:
        comp = comp.replace(operator="single")
        notes.append("one expert and no operator: sampling it alone (operator single)")
    return comp, notes + check_experts(comp)


def check_experts(comp: Composition) -> list[str]:
    """Refuse compositions whose operator has nothing to compose (AND / OR / average with
    one expert would silently run that expert alone); return notes on what is not used
    (the other experts under "single"). A compose formula checks its own terms."""
    if comp.compose is not None:
        return []
    n = num_experts(comp)
    if comp.operator in ("and", "or", "average") and n < 2:
        raise _fail("prompts", f"{comp.operator.upper()} composes two or more experts, got {n}; add a prompt "
                               "(or an extra model), or use operator single for one expert alone")
    if comp.operator in ("merge", "switch"):  # one expert made of every adapter: one prompt
        own = {a.get("prompt") for a in comp.adapters if a["path"] != BASE_ADAPTER}
        prompts = sorted(set(comp.prompts)) if None in own else sorted(p for p in own if p is not None)
        if len(prompts) > 1:
            raise _fail("prompts", f"operator {comp.operator} makes one expert with every adapter, so it takes one "
                                   f"prompt; got {len(prompts)} ({', '.join(map(repr, prompts))}): give one "
                                   "--prompt, or use and / or / composite for one expert per prompt")
    if comp.operator == "single" and comp.single_index >= n:
        raise _fail("single_index", f"{comp.single_index} picks expert {comp.single_index + 1}, but there are {n}; "
                                    f"give 0..{n - 1} (counting the prompts, then the extra models, from 0)")
    if comp.operator == "single" and n > 1:
        names = comp.prompts + comp.extra_models if comp.prompts else [comp.model, *comp.extra_models]
        if comp.adapters:
            names = [f"{a['path']}: {p}" for a in comp.adapters for p in ([a["prompt"]] if a.get("prompt")
                                                                            else comp.prompts or [""])]
            names += comp.extra_models
        return [f"operator single samples expert {comp.single_index + 1} ({names[comp.single_index]!r}) "
                f"alone; the other {n - 1} expert(s) are not used (single_index picks another)"]
    return []


# ---- models ---------------------------------------------------------------------------------
# ---- running --------------------------------------------------------------------------------
@dataclass
class CompositionResult:
    composition: Composition
    images: list[Any]  # PIL images, one per image index
    trace: Any  # superdiff.trace.Trace over all images (batch axis = image index)
    seconds: float
    records: list[Composition] = field(default_factory=list)  # per image: reproduces it alone


def _call_kwargs(c: Composition, kind: str, extras: list[str],
                 guidance_distilled: bool = False) -> dict[str, Any]:
    """The pipeline call for a composition. Per family: SD / SDXL / SD3 take guidance_scale
    as classifier-free guidance (extra models as extra_unets / extra_transformers); a
    guidance-distilled Flux model takes it as its embedded guidance and has no negative
    prompt; a Flux model without guidance embedding takes it as true CFG (true_cfg_scale)."""
    kw: dict[str, Any] = dict(num_inference_steps=c.steps, sampler=c.sampler, estimator=c.estimator)
    op = c.operator
    if op == "single":
        kw["operator_kwargs"] = {"index": c.single_index}
    if c.weights is not None:
        kw["weights"] = c.weights
    if c.bias is not None:
        kw["bias"] = c.bias
    if c.temperature is not None:
        kw["temperature"] = c.temperature
    if c.lift is not None:
        kw["lift"] = c.lift
    if c.kappa_clamp is not None:
        kw["kappa_clamp"] = False if c.kappa_clamp is False else tuple(c.kappa_clamp)
    if c.adapters and kind not in ("sd", "sdxl") and kind not in FLOW_KINDS:
        raise _fail("adapters", f"adapter (LoRA) experts run on Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux "
                                f"models; {c.model} is a {kind} model")
    if c.height is not None:
        kw["height"] = c.height
    if c.width is not None:
        kw["width"] = c.width
    if kind == "unet2d":
        if c.prompts:
            raise _fail("prompts", f"{c.model} is an unconditional UNet2D model; it takes no prompts "
                                   "(compose checkpoints with extra_models instead)")
        if op == "joint":
            raise _fail("operator", "the joint-prompt baseline needs a text-to-image model")
        kw["operator"] = op
        kw["batch_size"] = 1  # unconditional UNets: guidance_scale does not apply
    else:
        if not c.prompts:
            raise _fail("prompts", f"{c.model} is a text-to-image model: give at least one prompt")
        kw.update(prompt=list(c.prompts), operator=op, guidance_scale=c.guidance_scale,
                  num_images_per_prompt=1)
        if kind == "flux" and guidance_distilled and c.negative_prompt:
            raise _fail("negative_prompt", f"{c.model} is a guidance-distilled Flux model: it has no unconditional "
                                           "branch, so a negative prompt cannot apply; clear it (guidance_scale "
                                           "is its embedded guidance)")
        if kind == "flux" and not guidance_distilled:  # no guidance embedding: guidance_scale is true CFG
            kw["true_cfg_scale"] = max(1.0, kw.pop("guidance_scale"))
        if c.negative_prompt:
            kw["negative_prompt"] = c.negative_prompt
        if c.joint_template is not None:
            kw["joint_template"] = c.joint_template
        if extras:
            kw["extra_transformers" if kind in FLOW_KINDS else "extra_unets"] = extras
        if c.adapters:
            kw["adapters"] = [{k: a[k] for k in ("path", "scale", "prompt", "name") if k in a} for a in c.adapters]
            kw["switch_every"] = c.switch_every
    if c.compose is not None or c.corrector is not None:
        _formula_kwargs(c, kind, kw, len(extras))
    return kw


def _formula_kwargs(c: Composition, kind: str, kw: dict[str, Any], n_extras: int) -> None:
    """A compose formula becomes the pipeline's operator (superdiff.formula.FormulaOperator over
    the formula's prompts); a corrector rides on the operator (superdiff.correctors.Corrected),
    so every pipeline runs it through superdiff.sampling.sample."""
    from .correctors import Corrected
    from .formula import FormulaOperator
    from .pipelines._method import build_operator

    params = ("weights", "bias", "temperature", "lift", "kappa_clamp", "operator_kwargs")
    if c.compose is not None:
        if kind == "unet2d":
            raise _fail("compose", "a formula composes the prompts of a text-to-image model; for unconditional "
                                   "checkpoints use operator with extra_models")
        given = [k for k in params if k in kw and k != "operator_kwargs"]
        if given:
            raise _fail("compose", f"the formula carries its own weights; remove {', '.join(given)}")
        if c.adapters or n_extras:
            raise _fail("compose", "a formula composes prompts of one model; it takes no adapters or extra models")
        op: Any = FormulaOperator(c.compose, and_mode=c.and_mode)
    else:
        if c.operator == "joint" or c.operator in ADAPTER_OPERATORS:
            raise _fail("corrector", f"operator {c.operator} takes no corrector; use or, and, average, single "
                                     "or a compose formula")
        n = len(kw.get("prompt", [])) + n_extras if kind != "unet2d" else 1 + n_extras
        op = build_operator(c.operator, n, **{k: kw.pop(k) for k in params if k in kw})
    for k in params:
        kw.pop(k, None)
    kw["operator"] = Corrected(op, c.corrector) if c.corrector is not None else op


def resolve_adapters(comp: Composition, cache: ModelCache) -> tuple[Composition, list[dict[str, Any]]]:
    """Check the composition's adapter files before anything runs: bundled adapter names or
    local files (under the cache's allowed roots), safetensors only, one name per file, and
    the recorded sha256 (a record read back from a PNG) equal to the file's. Returns the
    composition with each adapter's name and sha256 filled in, and the pipeline entries."""
    from .pipelines.adapters import resolve_adapters as check_files
    from .registry import BUNDLED_ROOT

    entries = []
    for k, a in enumerate(comp.adapters):
        if a["path"] == BASE_ADAPTER:
            entries.append({"path": None, "prompt": a["prompt"]} if a.get("prompt") else None)
            continue
        p = Path(a["path"]).expanduser()
        if p.exists() and cache.allow_roots is not None:
            rp = p.resolve()
            if not inside(rp, cache.allow_roots):
                raise _fail("adapters", f"adapter {k}: {a['path']} is outside the allowed folders "
                                        f"({', '.join(map(str, cache.allow_roots)) or 'none configured'})")
        entry = {k2: a[k2] for k2 in ("path", "scale", "prompt", "name") if k2 in a}
        if p.exists():  # "~/loras/x.safetensors": the file the roots check saw
            entry["path"] = str(p)
        entries.append(entry)
    try:
        specs = check_files(entries, safetensors_only=True)
    except ValueError as e:
        raise _fail("adapters", str(e)) from None
    if cache.allow_roots is not None:  # the weight file itself (a symlink in an allowed folder may leave it)
        for k, (a, spec) in enumerate(zip(comp.adapters, specs)):
            if spec is None or spec.file is None:
                continue
            rf = Path(spec.file).resolve()
            if not inside(rf, (BUNDLED_ROOT, *cache.allow_roots)):
                raise _fail("adapters", f"adapter {k}: {a['path']} is outside the allowed folders (its weight file "
                                        f"{spec.file} leads to {rf}; allowed: "
                                        f"{', '.join(map(str, cache.allow_roots)) or 'none configured'})")
    adapters = []
    for a, spec in zip(comp.adapters, specs):
        if spec is None or spec.file is None:
            adapters.append(a)
            continue
        if a.get("sha256") and a["sha256"] != spec.sha256:
            raise _fail("adapters", f"{a['path']} is not the file this composition was made with (sha256 "
                                    f"{spec.sha256[:12]}..., recorded {a['sha256'][:12]}...)")
        adapters.append({**a, "name": spec.name, "sha256": spec.sha256})
    for e, spec in zip(entries, specs):
        if spec is not None and spec.file is not None:
            e.update(path=str(spec.file), name=spec.name)
    return dataclasses.replace(comp, adapters=adapters), entries


def run_composition(comp: Composition, cache: ModelCache | None = None, *,
                    progress: bool = True,
                    on_step: Callable[[int, int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    indices: Sequence[int] | None = None) -> CompositionResult:
    """Generate the images of `comp` (all, or only the image `indices`).

    on_step(image_index, step, num_steps) is called after every sampler step (progress bars,
    the studio's live progress); should_stop() returning True aborts with InterruptedError
    after the current step (cancel buttons).
    """
    import torch

    from .trace import Trace

    comp = comp.validated()
    cache = cache or ModelCache()
    pipe, kind, extras = cache.pipeline(comp.model, comp.extra_models, comp.dtype)
    if comp.guidance_scale is None:  # the record names the scale used
        comp = dataclasses.replace(comp, guidance_scale=default_guidance(comp.model, kind))
    kw = _call_kwargs(comp, kind, extras, bool(getattr(pipe, "guidance_distilled", False)))
    if comp.adapters:
        comp, kw["adapters"] = resolve_adapters(comp, cache)
    comp = dataclasses.replace(comp, model_kind=kind)
    pipe.set_progress_bar_config(disable=True)
    device = pipe.device
    idx = list(range(comp.num_images)) if indices is None else [int(i) for i in indices]
    images, traces, records = [], [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(idx) * comp.steps, disable=not progress, unit="step", leave=False,
               desc=f"{comp.operator} x{len(idx)}")
    t0 = time.perf_counter()
    try:
        for i in idx:
            def callback(p, step, t, cb_kwargs, _i=i):
                bar.update(1)
                if on_step is not None:
                    on_step(_i, step + 1, comp.steps)
                if should_stop is not None and should_stop():
                    raise InterruptedError("cancelled")
                return {}

            g = torch.Generator(device=device.type if device.type != "mps" else "cpu").manual_seed(comp.seed + i)
            with cache.call_lock(pipe):  # one call at a time on a shared pipeline
                out = pipe(generator=g, output_type="pil", callback_on_step_end=callback, **kw)
            images.append(out.images[0])
            traces.append(out.trace)
            records.append(comp.image_record(i))
    finally:
        bar.close()
    trace = Trace.concat(traces) if traces else None
    if trace is not None:
        trace.meta["composition"] = comp.to_dict()
        names = [Path(m).name for m in (comp.model, *comp.extra_models)]
        if kind == "unet2d" and trace.num_experts == len(names):  # name experts after their checkpoints
            trace.expert_names = names
    return CompositionResult(comp, images, trace, time.perf_counter() - t0, records)
