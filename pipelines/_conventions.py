"""diffusers' calling habits on top of the composition semantics, for every SuperDiff pipeline.

`diffusers_conventions` wraps a pipeline's ``__call__``:

- prompt batches: a list of prompts is ONE composition (one expert per prompt); a list of
  such lists (``[["a cat", "a hat"], ["a dog", "a hat"]]``) is a batch of compositions, run
  one after the other and returned together (images concatenated, traces concatenated),
  as diffusers returns a batch for a list of prompts.
- ``pipe.scheduler`` swapped after loading: schedulers whose update rule one of our
  samplers reproduces are mapped (EulerDiscreteScheduler and FlowMatchEulerDiscreteScheduler
  -> sampler "euler", DDPMScheduler -> "ddpm"); any other is refused with the `sampler=`
  choices, since SuperDiff reads only the noise schedule from the scheduler's config. An
  explicit ``sampler=`` always wins.
- ``prompt_embeds`` / ``negative_prompt_embeds`` (and ``pooled_prompt_embeds`` /
  ``negative_pooled_prompt_embeds`` for SDXL, given in pairs): one expert per row, for the SD
  and SDXL pipelines (without ``negative_prompt_embeds``, a ``negative_prompt`` is encoded,
  as in diffusers); ``sigmas=`` (diffusers' custom Euler sigmas: n + 1 of them for n steps,
  ending at the final sigma, usually 0) becomes our VE time grid; ``timesteps=`` (diffusers'
  custom training timesteps, one per step, e.g. Align Your Steps') becomes the grid of the
  call's schedule as diffusers' Euler and DDPM schedulers make it (_method.DiffusersTimesteps).
- ``pipe._interrupt = True`` (``pipe.interrupt``) set in a callback stops after that step;
  the images are decoded from the latents reached, as in diffusers (see _mixin.py). In a batch
  of compositions, the later ones stop after the same number of steps (diffusers stops its
  whole batch at that step).
- ``guidance_rescale`` (0 only), ``eta``, ``ip_adapter_*``, the legacy
  ``callback`` and the rest of diffusers' arguments that have no meaning here are refused
  with a message saying what to use, instead of a TypeError.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

__all__ = ["diffusers_conventions", "SCHEDULER_SAMPLERS", "SAMPLER_CHOICES"]

SAMPLER_CHOICES = ("sde", "ddpm", "ode", "euler", "heun")

#: schedulers whose update rule a superdiff sampler reproduces exactly (tests/test_pipelines_sd.py
#: and test_pipelines_sd3.py check euler / ddpm against diffusers' own pipelines)
SCHEDULER_SAMPLERS = {
    "EulerDiscreteScheduler": "euler",
    "FlowMatchEulerDiscreteScheduler": "euler",
    "DDPMScheduler": "ddpm",
}

_REFUSED = {
    "eta": "eta is DDIM's noise level; here the sampler decides it: sampler='ddpm' (ancestral, like eta=1) "
           "or 'euler' / 'ode' (deterministic, like eta=0), 'sde' (the paper's Euler-Maruyama)",
    "guidance_rescale": "guidance_rescale (Lin et al.'s rescaled CFG) is not applied by the SuperDiff "
                        "combination; leave it at 0",
    "callback": "the legacy callback is not supported; use callback_on_step_end",
    "callback_steps": "the legacy callback is not supported; use callback_on_step_end",
    "ip_adapter_image": "IP-Adapters are not supported; compose images' prompts or LoRA adapters (adapters=)",
    "ip_adapter_image_embeds": "IP-Adapters are not supported; compose prompts or LoRA adapters (adapters=)",
    "prompt_2": "a prompt per text encoder is not taken: each expert's prompt feeds every text encoder of the "
                "pipeline (SDXL's two, SD3's three, Flux's CLIP and T5)",
    "prompt_3": "a prompt per text encoder is not taken: each expert's prompt feeds all three of SD3's text encoders",
    "negative_prompt_2": "a negative prompt per text encoder is not taken: the negative prompt feeds every text "
                         "encoder",
    "negative_prompt_3": "a negative prompt per text encoder is not taken: the negative prompt feeds all three of "
                         "SD3's text encoders",
    "skip_guidance_layers": "skip-layer guidance (SD3.5's skip_guidance_layers) is not applied by the SuperDiff "
                            "combination; leave it unset",
    "denoising_end": "denoising_end (ensemble of experts) is not supported: the composition runs every step",
    "guidance_end": "guidance_end is not supported",
}

_EMBED_ARGS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def diffusers_conventions(call: Callable) -> Callable:
    """Decorate a SuperDiff pipeline's __call__ (see the module docstring)."""
    sig = inspect.signature(call)
    names = [n for n in sig.parameters if n != "self"]

    @functools.wraps(call)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes at most {len(names)} positional arguments")
        given = dict(zip(names, args))
        dup = sorted(set(given) & set(kwargs))
        if dup:
            raise TypeError(f"{type(self).__name__}() got multiple values for {', '.join(dup)}")
        given.update(kwargs)
        extra = {k: given.pop(k) for k in list(given) if k not in sig.parameters}
        _take_conventions(self, given, extra, type(self).__name__)
        self._interrupt = False
        prompt = given.get("prompt")
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
            return _batch(call, self, given)
        embeds = {k: extra.pop(k) for k in _EMBED_ARGS if k in extra}
        if embeds:
            return _with_embeds(call, self, given, embeds)
        return call(self, **given)

    return wrapper


def _take_conventions(pipe: Any, given: dict[str, Any], extra: dict[str, Any], cls: str) -> None:
    """Map or refuse diffusers' arguments (in place), and the scheduler swap, before any compute."""
    for key in list(extra):
        value = extra[key]
        if key == "guidance_rescale" and not value:
            extra.pop(key)
        elif key == "sigmas":
            extra.pop(key)
            if pipe._flow_matching:
                raise ValueError(f"{cls}: sigmas= is not taken by the flow pipelines; give time_grid= (a decreasing "
                                 "grid of flow times from 1 towards 0)")
            if given.get("time_grid") is not None:
                raise ValueError("give either sigmas= or time_grid=, not both")
            if given.get("schedule") not in (None, "ve"):
                raise ValueError("sigmas= are Euler (VE) sigmas; they need schedule='ve' (the default)")
            s = [float(x) for x in value]
            if len(s) < 2:
                raise ValueError("sigmas: give at least two, ending with the final sigma (usually 0), as diffusers' "
                                 "EulerDiscreteScheduler takes them")
            given["time_grid"] = s  # as diffusers: n + 1 sigmas for n steps, the last one the end point
            given["schedule"] = "ve"
        elif key == "timesteps":
            extra.pop(key)
            if value is None:
                continue
            if pipe._flow_matching:
                raise ValueError(f"{cls}: timesteps= is not taken by the flow pipelines; give sigmas= (flow times "
                                 "from 1 towards 0) or time_grid=")
            if given.get("time_grid") is not None or "sigmas" in extra:
                raise ValueError("give one of timesteps=, sigmas= and time_grid=")
            from ._method import DiffusersTimesteps

            # one per step, on the training scale; the schedule of the call (its sampler's) makes
            # them its grid (DiffusersTimesteps.grid), as diffusers' Euler and DDPM schedulers do
            given["time_grid"] = DiffusersTimesteps(tuple(float(t) for t in value))
        elif key in _REFUSED and value is None:  # diffusers' own default: nothing asked for
            extra.pop(key)
        elif key in _REFUSED:
            raise ValueError(f"{cls}: {key}= is not supported here: {_REFUSED[key]}")
        elif key not in _EMBED_ARGS:
            raise ValueError(f"{cls}: unknown argument {key}=; see help({cls}.__call__) for the arguments, "
                             "e.g. operator=, sampler=, estimator=, weights=, bias=, temperature=, lift=")
    embeds = [k for k in _EMBED_ARGS if k in extra and extra[k] is not None]
    for k in _EMBED_ARGS:
        if k in extra and extra[k] is None:
            extra.pop(k)
    if embeds:
        kind = getattr(pipe, "_embeds_kind", None)
        if kind is None:
            raise ValueError(f"{cls}: {embeds[0]}= is supported by the SD and SDXL pipelines only; pass prompts")
        if kind != "sdxl" and any("pooled" in k for k in embeds):
            raise ValueError(f"{cls}: pooled embeddings belong to SDXL; SD takes prompt_embeds only")
        if "prompt_embeds" not in embeds:
            raise ValueError(f"{cls}: {embeds[0]}= needs prompt_embeds= too")
        if given.get("prompt") is not None:
            raise ValueError(f"{cls}: give either prompt or prompt_embeds, not both")
        if "negative_prompt_embeds" in embeds and given.get("negative_prompt") is not None:
            raise ValueError(f"{cls}: give either negative_prompt or negative_prompt_embeds, not both")
        if kind == "sdxl" and "pooled_prompt_embeds" not in embeds:
            raise ValueError(f"{cls}: SDXL needs pooled_prompt_embeds= with prompt_embeds= (encode_prompt returns "
                             "both)")
        if kind == "sdxl" and "negative_prompt_embeds" in embeds and "negative_pooled_prompt_embeds" not in embeds:
            raise ValueError(f"{cls}: negative_prompt_embeds= needs negative_pooled_prompt_embeds= too (SDXL's "
                             "negative branch takes both; encode_prompt returns them together), or give "
                             "negative_prompt= instead")
        if "negative_pooled_prompt_embeds" in embeds and "negative_prompt_embeds" not in embeds:
            raise ValueError(f"{cls}: negative_pooled_prompt_embeds= needs negative_prompt_embeds= too "
                             "(encode_prompt returns them together)")
        if given.get("operator") == "joint":
            raise ValueError(f"{cls}: the joint-prompt baseline joins prompt texts; it cannot take prompt_embeds")
        if given.get("compose") is not None:
            raise ValueError(f"{cls}: a compose formula names its own prompts as text; it cannot take "
                             "prompt_embeds (give the formula alone, or prompt_embeds with an operator)")
    # pipe.scheduler swapped after loading
    swapped = pipe.__dict__.get("_swapped_scheduler")
    if swapped and "sampler" not in given:
        sampler = SCHEDULER_SAMPLERS.get(swapped)
        if sampler is None:
            mapped = ", ".join(f"{k} -> {v}" for k, v in SCHEDULER_SAMPLERS.items())
            raise ValueError(
                f"{cls}: pipe.scheduler was set to {swapped}, whose update rule SuperDiff does not reproduce "
                f"(it reads only the noise schedule from the scheduler's config and samples with its own "
                f"integrators). Mapped schedulers: {mapped}. Or pass sampler= one of {', '.join(SAMPLER_CHOICES)} "
                "explicitly (the schedule still comes from this scheduler's config)")
        given["sampler"] = sampler


def _batch(call: Callable, pipe: Any, given: dict[str, Any]) -> Any:
    """A list of prompt lists: one composition each, outputs concatenated along the batch."""
    import numpy as np
    import torch

    from superdiff.trace import Trace

    prompts = [list(p) for p in given["prompt"]]
    n = len(prompts)
    per_call: list[dict[str, Any]] = []
    neg = given.get("negative_prompt")
    gens = given.get("generator")
    B = int(given.get("num_images_per_prompt") or 1)
    nested_neg = isinstance(neg, (list, tuple)) and bool(neg) and all(isinstance(x, (list, tuple)) for x in neg)
    if nested_neg and len(neg) != n:
        raise ValueError(f"negative_prompt: {len(neg)} lists for {n} prompt lists; give one list per composition "
                         "(each with one negative prompt for all its prompts, or one per prompt), or one string for all")
    if isinstance(neg, (list, tuple)) and not nested_neg and len(neg) > 1:
        bad = [len(p) for p in prompts if len(p) != len(neg)]
        if bad:
            raise ValueError(f"negative_prompt: a flat list of {len(neg)} negative prompts is one per prompt of every "
                             f"composition, but a composition has {bad[0]} prompts; for one negative prompt per "
                             f"composition give a list of lists, e.g. {[[str(x)] for x in neg[:n]]!r}, or one string "
                             "for all")
    if isinstance(gens, (list, tuple)) and len(gens) not in (n, n * B):
        raise ValueError(f"generator: give one, one per composition ({n}) or one per image ({n * B}); got {len(gens)}")
    lat = given.get("latents")
    if lat is not None and not isinstance(lat, torch.Tensor):
        raise ValueError(f"latents: give a torch.Tensor of {n * B} rows (one per image of the {n} compositions), "
                         f"got {type(lat).__name__}")
    if lat is not None and lat.shape[0] != n * B:
        raise ValueError(f"latents: {lat.shape[0]} rows for {n} compositions x {B} images")
    for i, p in enumerate(prompts):
        kw = dict(given, prompt=p)
        if isinstance(neg, (list, tuple)) and neg and all(isinstance(x, (list, tuple)) for x in neg):
            kw["negative_prompt"] = list(neg[i])
        if isinstance(gens, (list, tuple)):
            kw["generator"] = gens[i] if len(gens) == n else list(gens[i * B:(i + 1) * B])
        if lat is not None:
            kw["latents"] = lat[i * B:(i + 1) * B]
        per_call.append(kw)
    return_dict = given.get("return_dict", True)
    outs: list[Any] = []
    stop_after = None  # diffusers stops its whole batch at the step `_interrupt` is set
    try:
        for kw in per_call:
            pipe._interrupt = False
            pipe._stop_after_steps = stop_after
            outs.append(call(pipe, **kw))
            if pipe._interrupt and stop_after is None:
                stop_after = (outs[-1].trace if return_dict else outs[-1][1]).num_steps
    finally:
        pipe._stop_after_steps = None
        pipe._interrupt = stop_after is not None
    images = [o.images if return_dict else o[0] for o in outs]
    traces = [o.trace if return_dict else o[1] for o in outs]
    first = images[0]
    if isinstance(first, torch.Tensor):
        merged: Any = torch.cat(images)
    elif isinstance(first, np.ndarray):
        merged = np.concatenate(images)
    else:
        merged = [im for ims in images for im in ims]
    joinable = all(t.num_experts == traces[0].num_experts and t.num_steps == traces[0].num_steps for t in traces)
    trace = Trace.concat(traces) if joinable else traces
    if not return_dict:
        return (merged, trace)
    out = outs[0]
    out.images = merged
    out.trace = trace
    if getattr(out, "nsfw_content_detected", None) is not None:
        out.nsfw_content_detected = [f for o in outs for f in (o.nsfw_content_detected or [])]
    return out


def _with_embeds(call: Callable, pipe: Any, given: dict[str, Any], embeds: dict[str, Any]) -> Any:
    """prompt_embeds [N, L, D] -> N experts named "<prompt_embeds i>" whose encodings are the rows."""
    pe = embeds["prompt_embeds"]
    if pe.ndim != 3:
        raise ValueError(f"prompt_embeds: expected [N, L, D] (one row per expert), got {tuple(pe.shape)}")
    n = pe.shape[0]
    names = [f"<prompt_embeds {i}>" for i in range(n)]
    table: dict[str, dict[str, Any]] = {}
    pooled = embeds.get("pooled_prompt_embeds")
    for i, name in enumerate(names):
        table[name] = {"encoder_hidden_states": pe[i:i + 1]}
        if pooled is not None:
            table[name]["text_embeds"] = pooled[i:i + 1]
    ne = embeds.get("negative_prompt_embeds")
    negatives = None
    if ne is not None:
        if ne.ndim != 3 or ne.shape[0] not in (1, n) or ne.shape[1:] != pe.shape[1:]:
            raise ValueError(f"negative_prompt_embeds: expected [1 or {n}, {pe.shape[1]}, {pe.shape[2]}], got "
                             f"{tuple(ne.shape)}")
        npool = embeds.get("negative_pooled_prompt_embeds")  # given with them for SDXL (_take_conventions)
        if npool is not None and (pooled is None or npool.ndim != 2 or npool.shape[0] != ne.shape[0]
                                  or npool.shape[1:] != pooled.shape[1:]):
            raise ValueError(f"negative_pooled_prompt_embeds: expected [{ne.shape[0]}, {pooled.shape[1]}] (one "
                             f"row per negative_prompt_embeds row), got {tuple(npool.shape)}")
        negatives = [f"<negative_prompt_embeds {i}>" for i in range(ne.shape[0])]
        for i, name in enumerate(negatives):
            table[name] = {"encoder_hidden_states": ne[i:i + 1]}
            if npool is not None:
                table[name]["text_embeds"] = npool[i:i + 1]
        negatives = negatives if len(negatives) == n else negatives * n
    original = type(pipe)._encode_texts

    def encode(texts: Any, device: Any, clip_skip: Any, lora_scale: Any, *rest: Any) -> dict[str, Any]:
        real = [t for t in texts if t not in table]
        out = original(pipe, real, device, clip_skip, lora_scale, *rest) if real else {}
        dtype = pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None else pipe.unet.dtype
        for t in texts:
            if t in table:
                enc = {k: v.to(device=device, dtype=dtype) for k, v in table[t].items()}
                if rest:  # SDXL: the micro-conditioning time ids
                    enc["time_ids"] = rest[0]
                out[t] = enc
        return out

    pipe._encode_texts = encode
    if negatives is not None:  # else the user's negative_prompt (if any) is encoded, as diffusers does
        given = dict(given, negative_prompt=negatives)
    try:
        return call(pipe, **dict(given, prompt=names))
    finally:
        del pipe._encode_texts
