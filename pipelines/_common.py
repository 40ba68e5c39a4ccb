"""Parts shared by the SuperDiff diffusers pipelines: validation, expert specs and
compatibility checks, operator/sampler/schedule resolution, latents, decoding, outputs,
and the sampling loop (one call to `superdiff.sampling.sample`, whose every step is
`superdiff.step.superdiff_step`; nothing here re-implements the SuperDiff step).

Importable as `superdiff.pipelines._common`. The pipeline files import it by its absolute
name, so that each of them also loads through
`DiffusionPipeline.from_pretrained(path, custom_pipeline="<file>.py")`. Nothing in this
module subclasses `DiffusionPipeline` (a custom-pipeline file must define exactly one).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from superdiff.diffusers_experts import Branch, Network, NetworkExperts, NullEstimator, unet_forward
from superdiff.estimators import check_pair, make_estimator
from superdiff.integrators import Integrator, make_integrator
from superdiff.operators import Operator, make_operator
from superdiff.sampling import SampleOutput, StepInfo, default_estimator, sample
from superdiff.schedules import Schedule, VESigma, make_betas, schedule_from_config
from superdiff.trace import Trace, plot_trace

Tensor = torch.Tensor

__all__ = [
    "SuperDiffPipelineOutput",
    "UNetExpert",
    "SuperDiffPipelineMixin",
    "render_trace",
    "joint_prompt",
    "normalize_prompts",
    "normalize_negative_prompts",
    "check_height_width",
    "build_operator",
    "resolve_sampler",
    "resolve_estimator",
    "make_schedule",
    "init_noise_sigma",
    "prepare_latents",
    "load_unet",
    "network_info",
    "check_compatible",
    "decode_latents",
    "OUTPUT_TYPES",
    "CALLBACK_TENSOR_INPUTS",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: what `callback_on_step_end_tensor_inputs` may ask for
CALLBACK_TENSOR_INPUTS = ["latents", "kappa", "logq", "noise_pred"]
SAMPLERS = ("sde", "em", "ode", "euler", "heun", "ddpm")
VP_KINDS = ("epsilon", "sample", "v_prediction")


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def render_trace(trace: Trace, path: str | os.PathLike | None = None, samples: int | Sequence[int] = 4,
                 title: str | None = None):
    """Render a composition trace (kappa and log q per step, sample and expert) as a PNG.

    Returns the matplotlib Figure; writes `path` when given.
    """
    if trace is None:
        raise ValueError("no trace to render")
    return plot_trace(trace, path, samples, title)


@dataclass
class SuperDiffPipelineOutput(BaseOutput):
    """Output of the SuperDiff pipelines.

    images: list of PIL images, a numpy array [B, H, W, C], a tensor [B, C, H, W] or, for
        output_type="latent", the final latents.
    trace: `superdiff.trace.Trace`: schedule times and sigmas, kappa [steps, B, M] and
        log q [steps + 1, B, M] per expert, expert names and run metadata (operator,
        estimator, sampler, forward calls, seconds).
    nsfw_content_detected: the safety checker's flags (Stable Diffusion only), else None.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trace: Trace | None = None
    nsfw_content_detected: list[bool] | None = None

    def plot_trace(self, path: str | os.PathLike | None = None, samples: int | Sequence[int] = 4,
                   title: str | None = None):
        """Render the trace as a PNG (see `render_trace`)."""
        return render_trace(self.trace, path, samples, title)


# --------------------------------------------------------------------------------------
# experts given as UNets
# --------------------------------------------------------------------------------------


@dataclass
class UNetExpert:
    """An extra network as an expert, next to the pipeline's own.

    unet: a `UNet2DConditionModel` / `UNet2DModel`, or a local directory or hub id of a
        checkpoint (a pipeline folder with unet/, or a bare model folder).
    prompt: the prompt this expert is conditioned on (text-conditional UNets); None: one
        expert per pipeline prompt. negative_prompt: its own negative prompt.
    class_label: the class of a class-conditional UNet2DModel.
    prediction_type, scheduler_config: what the network predicts and the noise schedule it
        was trained with; read from the checkpoint's scheduler/ when loading from a path,
        else the pipeline's own are assumed.
    vae_config: the config of the VAE whose latent space it was trained in (read from the
        checkpoint's vae/ when present); checked against the pipeline's VAE.
    """

    unet: Any
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    prediction_type: str | None = None
    scheduler_config: Mapping[str, Any] | None = None
    vae_config: Mapping[str, Any] | None = None
    name: str | None = None


def _read_json(path: str) -> dict | None:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def _hub_config(repo: str, subfolder: str, filename: str) -> dict | None:
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(hf_hub_download(repo, filename, subfolder=subfolder))
    except Exception:  # noqa: BLE001 - a checkpoint without this part is fine
        return None


def load_unet(source: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> UNetExpert:
    """Load a UNet checkpoint (local directory or hub id) with its scheduler and VAE configs.

    Accepts a pipeline folder (unet/, scheduler/, vae/) or a bare model folder (config.json
    + weights). The UNet class is taken from its config.
    """
    import diffusers

    src = str(source)
    local = os.path.isdir(src)
    if local:
        sub = "unet" if os.path.isfile(os.path.join(src, "unet", "config.json")) else None
        cfg = _read_json(os.path.join(src, sub or "", "config.json"))
        if cfg is None:
            raise ValueError(f"{src} is neither a diffusers pipeline folder with unet/ nor a model folder "
                             "with config.json")
        sched = (_read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
                 or _read_json(os.path.join(src, "scheduler_config.json")))
        vae = _read_json(os.path.join(src, "vae", "config.json"))
    else:  # hub id
        sub = "unet"
        cfg = _hub_config(src, "unet", "config.json")
        if cfg is None:
            sub, cfg = None, _hub_config(src, "", "config.json")
        if cfg is None:
            raise ValueError(f"cannot find a UNet config for {src!r} (neither unet/config.json nor config.json)")
        sched = _hub_config(src, "scheduler", "scheduler_config.json") or _hub_config(src, "", "scheduler_config.json")
        vae = _hub_config(src, "vae", "config.json")
    cls_name = cfg.get("_class_name", "UNet2DConditionModel")
    if cls_name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ValueError(f"{src}: a {cls_name} cannot be a SuperDiff UNet expert (expected UNet2DConditionModel "
                         "or UNet2DModel)")
    cls = getattr(diffusers, cls_name)
    kw = dict(kwargs)
    if sub:
        kw["subfolder"] = sub
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    unet = cls.from_pretrained(src, **kw)
    return UNetExpert(unet, scheduler_config=sched, vae_config=vae,
                      prediction_type=(sched or {}).get("prediction_type"), name=os.path.basename(src.rstrip("/")))


def as_unet_expert(entry: Any, torch_dtype: torch.dtype | None = None) -> UNetExpert:
    """Normalise an `extra_unets` entry: a module, a path / hub id, (unet, prompt) or a UNetExpert."""
    if isinstance(entry, UNetExpert):
        if isinstance(entry.unet, (str, os.PathLike)):
            loaded = load_unet(entry.unet, torch_dtype)
            return UNetExpert(loaded.unet, entry.prompt, entry.negative_prompt, entry.class_label,
                              entry.prediction_type or loaded.prediction_type,
                              entry.scheduler_config or loaded.scheduler_config,
                              entry.vae_config or loaded.vae_config, entry.name or loaded.name)
        return entry
    if isinstance(entry, (str, os.PathLike)):
        return load_unet(entry, torch_dtype)
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
        return as_unet_expert(UNetExpert(entry[0], prompt=entry[1]), torch_dtype)
    if isinstance(entry, torch.nn.Module):
        return UNetExpert(entry)
    raise ValueError(f"cannot use {type(entry).__name__} as an extra UNet expert; give a UNet module, a checkpoint "
                     "path or hub id, a (unet, prompt) pair or a superdiff.pipelines.UNetExpert")


def _betas(cfg: Mapping[str, Any]) -> np.ndarray:
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float64)
    return make_betas(cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 1e-4),
                      cfg.get("beta_end", 0.02), cfg.get("beta_schedule", "linear"))


def network_info(unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | None,
                 prediction_type: str | None = None, vae_config: Mapping[str, Any] | None = None,
                 name: str = "unet") -> dict[str, Any]:
    """What the compatibility check compares, for one network."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(cfg, "in_channels"):
        raise ValueError(f"expert network {name!r} is a {type(unet).__name__}; expected a diffusers "
                         "UNet2DConditionModel or UNet2DModel")
    sched = dict(scheduler_config or {})
    cls = str(sched.get("_class_name", ""))
    pred = prediction_type or sched.get("prediction_type", "epsilon")
    if "FlowMatch" in cls:
        pred = "flow"
    return {
        "name": name,
        "class": type(unet).__name__,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "sample_size": cfg.sample_size,
        "cross_attention_dim": getattr(cfg, "cross_attention_dim", None),
        "addition_embed_type": getattr(cfg, "addition_embed_type", None),
        "projection_class_embeddings_input_dim": getattr(cfg, "projection_class_embeddings_input_dim", None),
        "class_conditional": bool(getattr(cfg, "num_class_embeds", None) or getattr(cfg, "class_embed_type", None))
        and type(unet).__name__ == "UNet2DModel",
        "prediction_type": pred,
        "betas": _betas(sched) if sched else None,
        "scaling_factor": None if vae_config is None else vae_config.get("scaling_factor"),
        "latent_channels": None if vae_config is None else vae_config.get("latent_channels"),
        "time_cond_proj_dim": getattr(cfg, "time_cond_proj_dim", None),
    }


def check_compatible(base: Mapping[str, Any], other: Mapping[str, Any], text_dim: int | None = None) -> None:
    """Refuse (ValueError) an expert network that cannot share the base network's space and
    noise process. Called for every expert before any compute."""
    who = f"expert network {other['name']!r}"
    ref = f"the pipeline's {base['name']!r}"
    if other["in_channels"] != base["in_channels"]:
        raise ValueError(f"{who} takes {other['in_channels']} input channels, {ref} {base['in_channels']}: "
                         "experts must work on the same latent (or pixel) space")
    if other["out_channels"] != other["in_channels"]:
        raise ValueError(f"{who} outputs {other['out_channels']} channels for {other['in_channels']} input "
                         "channels (learned variance?); only plain epsilon/x0/v predictions can be composed")
    if other["sample_size"] != base["sample_size"]:
        raise ValueError(f"{who} was trained at sample_size {other['sample_size']}, {ref} at "
                         f"{base['sample_size']}; experts must share the sample size")
    if other["prediction_type"] not in VP_KINDS:
        raise ValueError(f"{who} has prediction type {other['prediction_type']!r}, which cannot be converted to "
                         f"the {base['prediction_type']!r} predictions of {ref} (supported: "
                         f"{', '.join(VP_KINDS)} on a DDPM-style noise schedule)")
    if other["betas"] is not None and base["betas"] is not None:
        if other["betas"].shape != base["betas"].shape or not np.allclose(other["betas"], base["betas"], rtol=1e-6, atol=1e-9):
            raise ValueError(f"{who} was trained with a different noise schedule (betas) than {ref}: the same "
                             "x_t would mean different noise levels to the two models")
    for key, what in (("scaling_factor", "VAE scaling factor"), ("latent_channels", "VAE latent channels")):
        if other[key] is not None and base[key] is not None and not math.isclose(float(other[key]), float(base[key])):
            raise ValueError(f"{who} was trained with {what} {other[key]}, {ref} with {base[key]}: they do not "
                             "share a latent space")
    if other["time_cond_proj_dim"] is not None:
        raise ValueError(f"{who} is guidance-distilled (time_cond_proj_dim set); it cannot be composed here")
    if other["class"] == "UNet2DConditionModel":
        if text_dim is None:
            raise ValueError(f"{who} is text-conditional, but this pipeline has no text encoder")
        if other["cross_attention_dim"] != text_dim:
            raise ValueError(f"{who} expects text embeddings of width {other['cross_attention_dim']}, the "
                             f"pipeline's text encoder gives {text_dim}")
        if other["addition_embed_type"] != base["addition_embed_type"] or (
                other["projection_class_embeddings_input_dim"] != base["projection_class_embeddings_input_dim"]):
            raise ValueError(f"{who} expects added conditions {other['addition_embed_type']!r} "
                             f"({other['projection_class_embeddings_input_dim']}), {ref} "
                             f"{base['addition_embed_type']!r} ({base['projection_class_embeddings_input_dim']}); "
                             "an SDXL UNet and an SD 1.x/2.x UNet cannot be mixed")
    elif other["class"] != "UNet2DModel":
        raise ValueError(f"{who} is a {other['class']}; expected UNet2DConditionModel or UNet2DModel")


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def joint_prompt(prompts: Sequence[str], template: str | None = None) -> str:
    """The paper's joint-prompt baseline: one prompt naming every concept.

    template: a format string with one {} per prompt ("{} that looks like {}", "{} or {}");
    default: the prompts joined with " and ".
    """
    prompts = list(prompts)
    if template is None:
        return " and ".join(prompts)
    try:
        return template.format(*prompts)
    except (IndexError, KeyError) as e:
        raise ValueError(f"joint_template {template!r} does not fit {len(prompts)} prompts ({e})") from None


def normalize_prompts(prompt: str | Sequence[str] | None, allow_empty: bool = False) -> list[str]:
    """A list of N >= 1 prompt strings (one expert each)."""
    if prompt is None:
        prompts: list[str] = []
    elif isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
    else:
        raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"every prompt must be a string, got {bad!r}")
    if not prompts and not allow_empty:
        raise ValueError("no prompts given: pass `prompt` as a string or a list of N >= 1 prompts, one expert each")
    return prompts


def normalize_negative_prompts(negative_prompt: str | Sequence[str] | None, n: int) -> list[str | None]:
    """One negative prompt (or None) per prompt: None, a string for all, or a list of N."""
    if negative_prompt is None:
        return [None] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
        raise ValueError("`negative_prompt` must be a string or a list of strings")
    if len(negative_prompt) == 1:
        return [negative_prompt[0]] * n
    if len(negative_prompt) != n:
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {n} prompts; give one negative prompt "
                         "for all, or exactly one per prompt")
    return list(negative_prompt)


def check_height_width(height: int, width: int, factor: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if height % factor or width % factor:
        raise ValueError(f"`height` and `width` must be divisible by the VAE factor {factor}, got {height}x{width}")


def check_common(num_inference_steps: Any, num_images_per_prompt: Any, output_type: str,
                 callback_inputs: Sequence[str] | None, allowed_inputs: Sequence[str], guidance_scale: Any,
                 max_batch_size: Any) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) \
            or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    if callback_inputs is not None:
        bad = [k for k in callback_inputs if k not in allowed_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` may only name {allowed_inputs}, got {bad}")
    try:
        ok = math.isfinite(float(guidance_scale))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}")
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        raise ValueError(f"`max_batch_size` must be an int >= 1 or None, got {max_batch_size!r}")


def check_generator(generator: Any, batch: int) -> None:
    if isinstance(generator, list) and len(generator) not in (batch,):
        raise ValueError(f"got {len(generator)} generators for a batch of {batch} images "
                         "(num_images_per_prompt); give one generator or one per image")


# --------------------------------------------------------------------------------------
# operator, sampler, estimator, schedule
# --------------------------------------------------------------------------------------


def build_operator(operator: str | Operator, num_experts: int, *, weights: Sequence[float] | None = None,
                   bias: Sequence[float] | None = None, temperature: float | None = None,
                   lift: float | Sequence[float] | None = None, offsets: Sequence[float] | None = None,
                   kappa_clamp: Any = None, ridge: float | None = None, feedback: float | None = None,
                   operator_kwargs: Mapping[str, Any] | None = None) -> Operator:
    """The core operator from the pipeline's arguments (validated before any compute).

    or:      temperature, weights (mixture weights) or bias (log-weights)
    and:     lift (scalar for 2 experts: offsets (lift, 0); or one per expert) / offsets,
             kappa_clamp ((lo, hi); False disables; None keeps the default), ridge, feedback
    average: weights (default 1/N; negative = NOT)
    single:  operator_kwargs={"index": i}
    """
    if isinstance(operator, Operator):
        given = [k for k, v in dict(weights=weights, bias=bias, temperature=temperature, lift=lift, offsets=offsets,
                                    kappa_clamp=kappa_clamp, ridge=ridge, feedback=feedback).items() if v is not None]
        if given or operator_kwargs:
            raise ValueError(f"operator parameters {given or sorted(operator_kwargs)} were given together with an "
                             "Operator instance; set them on the instance")
        op = operator
    else:
        if not isinstance(operator, str):
            raise ValueError(f"`operator` must be a name or an Operator, got {type(operator).__name__}")
        name = operator.lower()
        params: dict[str, Any] = dict(operator_kwargs or {})
        if temperature is not None:
            params["temperature"] = temperature
        if bias is not None:
            params["bias"] = bias
        if weights is not None:
            params["weights"] = weights
        if lift is not None and offsets is not None:
            raise ValueError("give either `lift` or `offsets`, not both")
        if lift is not None:
            if np.ndim(lift) == 0:
                if num_experts != 2:
                    raise ValueError(f"a scalar `lift` is defined for 2 experts (offsets (lift, 0)); with "
                                     f"{num_experts} experts give one offset per expert")
                offsets = [float(lift), 0.0]
            else:
                offsets = list(lift)
        if offsets is not None:
            params["offsets"] = offsets
        if kappa_clamp is not None:
            params["clamp"] = None if kappa_clamp is False else tuple(kappa_clamp)
        if ridge is not None:
            params["ridge"] = ridge
        if feedback is not None:
            params["feedback"] = feedback
        op = make_operator(name, **params)
    op.validate(num_experts)
    return op


def resolve_sampler(sampler: str | Integrator, scheduler_config: Mapping[str, Any] | None = None) -> Integrator:
    """The integrator; the ddpm sampler follows the scheduler's x0 clipping (clip_sample and
    clip_sample_range, as diffusers' DDPMScheduler), so pixel models keep their behaviour."""
    if isinstance(sampler, Integrator):
        return sampler
    integrator = make_integrator(sampler)
    cfg = scheduler_config or {}
    if integrator.name == "ddpm" and cfg.get("clip_sample"):
        integrator = make_integrator("ddpm", clip_sample=float(cfg.get("clip_sample_range", 1.0)))
    return integrator


def resolve_estimator(estimator: Any, operator: Operator, integrator: Integrator):
    """The density estimator; None: the core's default for the integrator, except that an
    ODE integrator with an operator that ignores log q ("single", "average") tracks nothing
    (the divergence would cost a Jacobian-vector product per step for no effect)."""
    if estimator is None:
        if not integrator.stochastic and operator.name in ("single", "average"):
            return NullEstimator()
        return make_estimator(default_estimator(integrator))
    if isinstance(estimator, str) and estimator.lower() == "none":
        if operator.needs_linear_model:
            raise ValueError(f"estimator 'none' cannot drive the {operator.name!r} operator, which needs "
                             "log-density changes; use 'kernel', 'ito' or 'ode'")
        return NullEstimator()
    return make_estimator(estimator)


_UNSUPPORTED = {
    "rescale_betas_zero_snr": "zero-terminal-SNR schedules (rescale_betas_zero_snr=True)",
    "use_exponential_sigmas": "exponential sigmas",
    "use_beta_sigmas": "beta sigmas",
}


def make_schedule(scheduler_config: Mapping[str, Any], integrator: Integrator,
                  schedule: str | Schedule | None = None) -> Schedule:
    """The core schedule for a diffusers scheduler config.

    schedule=None: "vp" (DDPM/DDIM timesteps) for the ddpm sampler, "ve" (the sigma grid of
    diffusers' Euler schedulers) for the others; "vp"/"ve" force one; a Schedule is used as is.
    """
    if isinstance(schedule, Schedule):
        return schedule
    cfg = dict(scheduler_config)
    if "FlowMatch" in str(cfg.get("_class_name", "")):
        raise ValueError(f"{cfg.get('_class_name')} is a flow-matching scheduler; these pipelines compose "
                         "DDPM-family (epsilon / v / x0) models")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"the scheduler config uses {what}, which superdiff's schedules do not support; "
                             "load the pipeline with a scheduler config without it")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"timestep_type={cfg['timestep_type']!r} is not supported (only 'discrete')")
    if schedule is None:
        schedule = "vp" if integrator.name == "ddpm" else "ve"
    if schedule not in ("vp", "ve"):
        raise ValueError(f"unknown schedule {schedule!r}; expected 'vp', 've' or a superdiff Schedule")
    return schedule_from_config(cfg, kind=schedule)


def init_noise_sigma(schedule: Schedule, grid: Tensor, scheduler_config: Mapping[str, Any]) -> float:
    """Std of the initial latents, as diffusers' schedulers set it.

    VP: 1. VE: sqrt(1 + sigma_max^2), except that diffusers' Euler schedulers use sigma_max
    itself for "linspace"/"trailing" spacing; that convention is followed so that a seed gives
    the image diffusers gives.
    """
    if isinstance(schedule, VESigma):
        smax = float(grid[0])
        if schedule.timestep_spacing in ("linspace", "trailing"):
            return smax
        return math.sqrt(smax**2 + 1.0)
    return float(schedule.prior_std(grid[0]))


def prepare_latents(shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype,
                    latents: Tensor | None, sigma: float) -> Tensor:
    """Initial latents as diffusers draws them (randn_tensor, per-sample generators), times sigma."""
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {tuple(shape)}")
        latents = latents.to(device=device)
    return latents * sigma


# --------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------


def decode_latents(vae: torch.nn.Module, latents: Tensor, generator: Any = None) -> Tensor:
    """VAE decode with the VAE's own normalisation (scaling_factor, shift_factor,
    latents_mean/std); upcasts an fp16 VAE with force_upcast as diffusers does."""
    cfg = vae.config
    upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    dtype = next(vae.parameters()).dtype
    z = latents.to(dtype)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        c = z.shape[1]
        m = torch.tensor(mean).view(1, c, 1, 1).to(z)
        s = torch.tensor(std).view(1, c, 1, 1).to(z)
        z = z * s / cfg.scaling_factor + m
    else:
        z = z / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
    try:
        device = next(vae.parameters()).device
    except StopIteration:
        device = z.device
    image = vae.decode(z.to(device), return_dict=False, generator=generator)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    return image


# --------------------------------------------------------------------------------------
# the sampling loop (shared by every pipeline)
# --------------------------------------------------------------------------------------


class SuperDiffPipelineMixin:
    """Shared `__call__` machinery; mixed into each DiffusionPipeline subclass."""

    _callback_tensor_inputs = CALLBACK_TENSOR_INPUTS

    #: experts and trace of the last call (for inspection: forward-call counters, names)
    last_experts: NetworkExperts | None = None

    def _callback_inputs(self, callback_on_step_end: Any, tensor_inputs: Sequence[str] | None) -> list[str]:
        try:
            from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                return list(callback_on_step_end.tensor_inputs)
        except ImportError:  # pragma: no cover - older diffusers
            pass
        return list(tensor_inputs) if tensor_inputs is not None else ["latents"]

    def _check_call(self, height: int, width: int, num_inference_steps: Any, batch: Any, output_type: str,
                    guidance_scale: Any, max_batch_size: Any, generator: Any, sampler: str | Integrator,
                    callback_on_step_end: Any, tensor_inputs: Sequence[str] | None) -> tuple[list[str], Integrator]:
        """The checks every pipeline makes before any compute; (callback tensor inputs, integrator)."""
        check_height_width(height, width, self.vae_scale_factor)
        callback_inputs = self._callback_inputs(callback_on_step_end, tensor_inputs)
        check_common(num_inference_steps, batch, output_type, callback_inputs, self._callback_tensor_inputs,
                     guidance_scale, max_batch_size)
        check_generator(generator, int(batch))
        return callback_inputs, resolve_sampler(sampler, self.scheduler.config)

    def _plan_method(self, operator: str | Operator, num_experts: int, op_params: Mapping[str, Any],
                     estimator: Any, integrator: Integrator, schedule: Any, num_inference_steps: int,
                     time_grid: Any, grid_end: str) -> "MethodPlan":
        """Operator, estimator, schedule and time grid of one call, each checked."""
        op = build_operator(operator, num_experts, **op_params)
        est = resolve_estimator(estimator, op, integrator)
        check_pair(est, integrator)
        sched = make_schedule(self.scheduler.config, integrator, schedule)
        grid, sigma0 = self._grid_and_sigma(sched, num_inference_steps, time_grid, grid_end, self.scheduler.config)
        return MethodPlan(op, est, integrator, sched, grid, sigma0)

    def _run(self, method: "MethodPlan", experts: NetworkExperts, names: Sequence[str], batch: int, height: int,
             width: int, latents: Tensor | None, generator: Any, guidance_scale: float, num_inference_steps: int,
             time_grid: Any, grid_end: str, callback_on_step_end: Callable | None,
             callback_inputs: Sequence[str]) -> SampleOutput:
        """Draw the initial latents as diffusers does and sample; the trace records the
        pipeline and the forward calls per network."""
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        x = prepare_latents(shape, generator, self._execution_device, self.unet.dtype, latents, method.sigma0)
        out = self._superdiff_sample(experts, method.schedule, num_inference_steps, method.operator,
                                     method.estimator, method.integrator, x, generator, guidance_scale,
                                     method.grid if time_grid is not None else None, grid_end, self.unet.dtype,
                                     callback_on_step_end, callback_inputs, names)
        out.trace.meta.update(pipeline=type(self).__name__,
                              forward_calls_per_network=experts.forward_calls_per_network())
        return out

    def _superdiff_sample(
        self,
        experts: NetworkExperts,
        schedule: Schedule,
        num_inference_steps: int,
        operator: Operator,
        estimator: Any,
        integrator: Integrator,
        latents: Tensor,
        generator: Any,
        guidance_scale: float,
        timesteps: Any,
        grid_end: str,
        model_dtype: torch.dtype,
        callback_on_step_end: Callable | None,
        callback_inputs: Sequence[str],
        expert_names: Sequence[str],
    ) -> SampleOutput:
        self.last_experts = experts
        n_steps = num_inference_steps if timesteps is None else len(timesteps) - 1
        bar = self.progress_bar(total=n_steps)

        def on_step(info: StepInfo):
            bar.update()
            if callback_on_step_end is None:
                return None
            lat = info.x.to(torch.float32)
            orig = lat.clone() if "latents" in callback_inputs else None
            available = {"latents": lat, "kappa": info.kappa, "logq": info.logq, "noise_pred": info.output.pred}
            kwargs = {k: available[k] for k in callback_inputs}
            t_model = schedule.model_time(torch.tensor(info.t, dtype=torch.float64))
            out = callback_on_step_end(self, info.step, t_model, kwargs)
            if not out or "latents" not in out:
                return None
            new = out["latents"]
            if new is lat and orig is not None and torch.equal(lat, orig):
                return None  # handed back unchanged: keep the float64 latents
            return new

        try:
            return sample(experts, schedule, num_inference_steps, operator=operator, estimator=estimator,
                          integrator=integrator, latents=latents, generator=generator,
                          guidance_scale=guidance_scale, timesteps=timesteps, grid_end=grid_end,
                          dtype=torch.float32, model_dtype=model_dtype, expert_names=list(expert_names),
                          progress=False, callback=on_step)
        finally:
            bar.close()

    def _postprocess(self, image: Tensor, output_type: str, do_denormalize: list[bool] | None = None):
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

    @staticmethod
    def _guidance(guidance_scale: float) -> tuple[bool, float]:
        """(do_cfg, scale for the core): as diffusers, guidance applies when the scale is > 1."""
        g = float(guidance_scale)
        return (g > 1.0, g if g > 1.0 else 1.0)

    @staticmethod
    def _grid_and_sigma(schedule: Schedule, num_inference_steps: int, timesteps: Any, grid_end: str,
                        scheduler_config: Mapping[str, Any]) -> tuple[Tensor, float]:
        if timesteps is not None:
            grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
            if len(grid) < 2 or not bool(torch.all(grid[1:] < grid[:-1])) or not bool(torch.isfinite(grid).all()):
                raise ValueError("`time_grid` must be a strictly decreasing list of at least 2 finite schedule "
                                 "times (sigmas for the 've' schedule, DDPM timesteps for 'vp')")
        else:
            grid = schedule.grid(int(num_inference_steps), end=grid_end)
        return grid, init_noise_sigma(schedule, grid, scheduler_config)


@dataclass
class MethodPlan:
    """What `_plan_method` settled for one call."""

    operator: Operator
    estimator: Any
    integrator: Integrator
    schedule: Schedule
    grid: Tensor
    sigma0: float


def unique_keys(values: Sequence[Any]) -> list[Any]:
    """Distinct values in first-seen order."""
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


__all__ += ["Branch", "Network", "NetworkExperts", "NullEstimator", "unet_forward", "check_common",
            "check_generator", "as_unet_expert", "unique_keys", "SAMPLERS"]


# --------------------------------------------------------------------------------------
# planning the experts (shared by the text-conditional pipelines and UNet2D)
# --------------------------------------------------------------------------------------


@dataclass
class ExpertPlan:
    """One expert before encoding: which network, which prompt / class, which negative."""

    network: int
    prompt: str | None = None
    negative: str | None = None
    class_label: int | None = None
    name: str = "expert"


@dataclass
class NetworkPlan:
    module: torch.nn.Module
    info: dict[str, Any]
    name: str


def _module_device(m: torch.nn.Module) -> torch.device:
    try:
        return next(m.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def plan_extra_networks(base: NetworkPlan, extras: Sequence[Any] | None, scheduler_config: Mapping[str, Any],
                        text_dim: int | None,
                        torch_dtype: torch.dtype | None = None,
                        first_index: int = 2) -> tuple[list[NetworkPlan], list[UNetExpert]]:
    """Normalise `extra_unets` and check every one against the base network (ValueError
    before any compute). Returns the networks (base first; a module given twice is one
    network) and the entries as UNetExperts. base.info must carry the pipeline VAE's
    scaling_factor / latent_channels (network_info(..., vae_config=pipe.vae.config))."""
    networks = [base]
    entries: list[UNetExpert] = []
    if extras is None:
        return networks, entries
    if isinstance(extras, (torch.nn.Module, str, os.PathLike, UNetExpert)):
        extras = [extras]
    for k, raw in enumerate(extras):
        e = as_unet_expert(raw, torch_dtype)
        if not isinstance(e.unet, torch.nn.Module):
            raise ValueError(f"extra UNet {k} is a {type(e.unet).__name__}, not a UNet module")
        name = e.name or f"unet_{first_index + k}"
        sched = e.scheduler_config if e.scheduler_config is not None else scheduler_config
        info = network_info(e.unet, sched, e.prediction_type or (None if e.scheduler_config else
                                                                 base.info["prediction_type"]),
                            e.vae_config, name)
        check_compatible(base.info, info, text_dim)
        idx = next((i for i, n in enumerate(networks) if n.module is e.unet), None)
        if idx is None:
            networks.append(NetworkPlan(e.unet, info, name))
        entries.append(UNetExpert(e.unet, e.prompt, e.negative_prompt, e.class_label, info["prediction_type"],
                                  sched, e.vae_config, name))
    return networks, entries


def apply_joint(operator: Any, prompts: list[str], negatives: list[str | None], template: str | None
                ) -> tuple[Any, list[str], list[str | None]]:
    """(operator, prompts, negatives) after the joint-prompt baseline: "joint" becomes one
    "single" expert with the prompts joined by `template` and the distinct negatives joined."""
    op_name = operator.lower() if isinstance(operator, str) else operator
    if op_name != "joint":
        return op_name, prompts, negatives
    negs = unique_keys([n for n in negatives if n is not None])
    return "single", [joint_prompt(prompts, template)], [", ".join(negs) if negs else None]


def promptless_branch(plan: "ExpertPlan", device: torch.device) -> Branch:
    """The branch of an expert without a prompt in a text pipeline (an extra UNet2DModel):
    unguided, conditioned on its class label if it has one."""
    cond = None if plan.class_label is None else {"class_labels": torch.tensor([plan.class_label], device=device)}
    return Branch(plan.network, cond, name=plan.name)


def plan_text_experts(prompts: Sequence[str], negatives: Sequence[str | None], networks: Sequence[NetworkPlan],
                      extras: Sequence[UNetExpert]) -> list[ExpertPlan]:
    """Experts of a text-conditional pipeline: one per prompt on the pipeline's UNet, then
    for each extra UNet one per prompt (or its own prompt); an unconditional UNet2DModel is
    one expert without guidance, a class-conditional one one expert for its class_label."""
    plans = [ExpertPlan(0, p, negatives[i], name=p) for i, p in enumerate(prompts)]
    shared_neg = negatives[0] if len(set(negatives)) == 1 else None
    for e in extras:
        net = next(i for i, n in enumerate(networks) if n.module is e.unet)
        info = networks[net].info
        if info["class"] == "UNet2DModel":
            if info["class_conditional"]:
                if e.class_label is None:
                    raise ValueError(f"extra UNet {e.name!r} is class-conditional: give its class_label "
                                     "(superdiff.pipelines.UNetExpert(unet, class_label=...))")
                plans.append(ExpertPlan(net, class_label=int(e.class_label), name=f"{e.name}: class {e.class_label}"))
            else:
                plans.append(ExpertPlan(net, name=e.name))
        elif e.prompt is not None:
            neg = e.negative_prompt if e.negative_prompt is not None else (
                negatives[prompts.index(e.prompt)] if e.prompt in prompts else shared_neg)
            plans.append(ExpertPlan(net, e.prompt, neg, name=f"{e.name}: {e.prompt}"))
        else:
            for i, p in enumerate(prompts):
                neg = e.negative_prompt if e.negative_prompt is not None else negatives[i]
                plans.append(ExpertPlan(net, p, neg, name=f"{e.name}: {p}"))
    return plans


def prepare_networks(networks: Sequence[NetworkPlan], schedule: Schedule, device: torch.device,
                     cross_attention_kwargs: dict | None = None) -> list[Network]:
    """Core Network objects; extra UNets are moved to the execution device."""
    out = []
    for k, n in enumerate(networks):
        if k > 0 and _module_device(n.module) != device:
            n.module.to(device)
        out.append(Network(unet_forward(n.module, schedule, cross_attention_kwargs), n.info["prediction_type"], n.name))
    return out


__all__ += ["ExpertPlan", "NetworkPlan", "plan_extra_networks", "plan_text_experts", "prepare_networks"]
