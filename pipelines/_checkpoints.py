"""Expert networks given as checkpoints: loading a UNet with its scheduler and VAE configs,
and the compatibility check that refuses, before any compute, a network that cannot share
the pipeline's latent space and noise process (same x_t must mean the same noise level:
equal betas, VAE scaling, channels, sample size, conditioning widths)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from superdiff.schedules import make_betas

__all__ = ["VP_KINDS", "FLOW_TRANSFORMERS", "UNetExpert", "load_unet", "as_unet_expert", "network_info",
           "check_compatible", "check_not_guidance_distilled", "TransformerExpert", "load_transformer", "as_transformer_expert", "transformer_info",
           "check_transformer_compatible", "mixed_families_message", "check_flow_layout", "check_flow_checkpoint"]

VP_KINDS = ("epsilon", "sample", "v_prediction")
#: rectified-flow transformer classes and the pipeline that composes each
FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "SuperDiffStableDiffusion3Pipeline",
                     "FluxTransformer2DModel": "SuperDiffFluxPipeline"}


def mixed_families_message(who: str, flow_side: str) -> str:
    """Why a flow-matching model and an epsilon-family model cannot be experts of one call."""
    return (f"{who} cannot be composed with {flow_side}: one is a rectified-flow model (it predicts the velocity "
            "of x_t = (1 - t) x0 + t eps, with t in [0, 1]) and the other an epsilon / v / x0 model of a DDPM "
            "noise process, in another latent space and with another meaning of t; compose flow models "
            "with flow models (SuperDiffStableDiffusion3Pipeline / SuperDiffFluxPipeline) and UNets with UNets")


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
        if cfg is None and os.path.isfile(os.path.join(src, "transformer", "config.json")):
            raise ValueError(mixed_families_message(f"{src} (a transformer checkpoint)", "a UNet pipeline"))
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
    if cls_name in FLOW_TRANSFORMERS:
        raise ValueError(mixed_families_message(f"{src} (a {cls_name})", "a UNet pipeline"))
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
    if type(unet).__name__ in FLOW_TRANSFORMERS:
        raise ValueError(mixed_families_message(f"expert network {name!r} (a {type(unet).__name__})",
                                                "this pipeline's UNet"))
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


def check_not_guidance_distilled(info: Mapping[str, Any], who: str) -> None:
    """Refuse (ValueError) a guidance-distilled UNet (LCM-style, config.time_cond_proj_dim set),
    the pipeline's own UNet or an expert: it expects its guidance scale as `timestep_cond` and
    no classifier-free guidance, and the composition gives it neither."""
    if info.get("time_cond_proj_dim") is not None:
        raise ValueError(f"{who} is guidance-distilled (time_cond_proj_dim={info['time_cond_proj_dim']} set, "
                         "LCM-style): it expects its guidance as timestep_cond and no classifier-free guidance, "
                         "which the SuperDiff composition does not give; it cannot be composed here. Use a "
                         "standard (not guidance-distilled) UNet")


def check_compatible(base: Mapping[str, Any], other: Mapping[str, Any], text_dim: int | None = None) -> None:
    """Refuse (ValueError) an expert network that cannot share the base network's space and
    noise process. Called for every expert before any compute."""
    who = f"expert network {other['name']!r}"
    ref = f"the pipeline's {base['name']!r}"
    if other["prediction_type"] == "flow":
        raise ValueError(mixed_families_message(who, ref))
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
    check_not_guidance_distilled(other, who)
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
# rectified-flow transformers (SD3, Flux)
# --------------------------------------------------------------------------------------


@dataclass
class TransformerExpert:
    """An extra flow transformer as an expert (`extra_transformers` of the SD3 / Flux pipelines).

    transformer: an `SD3Transformer2DModel` / `FluxTransformer2DModel`, or a local directory
        or hub id (a pipeline folder with transformer/, or a bare model folder).
    prompt / negative_prompt: its own prompt (None: one expert per pipeline prompt).
    scheduler_config: its FlowMatch scheduler config (read from the checkpoint's scheduler/
        when loading from a path; else the pipeline's own is assumed).
    """

    transformer: Any
    prompt: str | None = None
    negative_prompt: str | None = None
    scheduler_config: Mapping[str, Any] | None = None
    vae_config: Mapping[str, Any] | None = None
    name: str | None = None

    @property
    def unet(self) -> Any:  # the field name plan_text_experts reads for every extra network
        return self.transformer

    class_label = None


def load_transformer(source: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                     **kwargs: Any) -> TransformerExpert:
    """Load a flow transformer checkpoint (local directory or hub id) with its scheduler and
    VAE configs; the class is taken from its config and must be a flow transformer."""
    import diffusers

    src = str(source)
    if os.path.isdir(src):
        sub = "transformer" if os.path.isfile(os.path.join(src, "transformer", "config.json")) else None
        cfg = _read_json(os.path.join(src, sub or "", "config.json"))
        sched = (_read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
                 or _read_json(os.path.join(src, "scheduler_config.json")))
        vae = _read_json(os.path.join(src, "vae", "config.json"))
        if cfg is None and os.path.isfile(os.path.join(src, "unet", "config.json")):
            raise ValueError(mixed_families_message(f"{src} (a UNet checkpoint)", "a flow-matching pipeline"))
    else:
        sub, cfg = "transformer", _hub_config(src, "transformer", "config.json")
        if cfg is None:
            sub, cfg = None, _hub_config(src, "", "config.json")
        sched = _hub_config(src, "scheduler", "scheduler_config.json") or _hub_config(src, "", "scheduler_config.json")
        vae = _hub_config(src, "vae", "config.json")
    if cfg is None:
        raise ValueError(f"cannot find a transformer config for {src!r} (neither transformer/config.json nor "
                         "config.json)")
    cls_name = cfg.get("_class_name", "")
    if cls_name not in FLOW_TRANSFORMERS:
        if cls_name.startswith("UNet"):
            raise ValueError(mixed_families_message(f"{src} (a {cls_name})", "a flow-matching pipeline"))
        raise ValueError(f"{src}: a {cls_name or 'model without _class_name'} is not a flow transformer "
                         f"(expected one of {', '.join(FLOW_TRANSFORMERS)})")
    kw = dict(kwargs)
    if sub:
        kw["subfolder"] = sub
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    module = getattr(diffusers, cls_name).from_pretrained(src, **kw)
    return TransformerExpert(module, scheduler_config=sched, vae_config=vae, name=os.path.basename(src.rstrip("/")))


def as_transformer_expert(entry: Any, torch_dtype: torch.dtype | None = None) -> TransformerExpert:
    """Normalise an `extra_transformers` entry: a module, a path / hub id, (module, prompt)
    or a TransformerExpert."""
    if isinstance(entry, TransformerExpert):
        if isinstance(entry.transformer, (str, os.PathLike)):
            loaded = load_transformer(entry.transformer, torch_dtype)
            return TransformerExpert(loaded.transformer, entry.prompt, entry.negative_prompt,
                                     entry.scheduler_config or loaded.scheduler_config,
                                     entry.vae_config or loaded.vae_config, entry.name or loaded.name)
        return entry
    if isinstance(entry, (str, os.PathLike)):
        return load_transformer(entry, torch_dtype)
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
        return as_transformer_expert(TransformerExpert(entry[0], prompt=entry[1]), torch_dtype)
    if isinstance(entry, UNetExpert) or (isinstance(entry, torch.nn.Module)
                                         and type(entry).__name__.startswith("UNet")):
        raise ValueError(mixed_families_message(f"extra expert {type(entry).__name__}", "a flow-matching pipeline"))
    if isinstance(entry, torch.nn.Module):
        return TransformerExpert(entry)
    raise ValueError(f"cannot use {type(entry).__name__} as an extra transformer expert; give a transformer "
                     "module, a checkpoint path or hub id, a (transformer, prompt) pair or a "
                     "superdiff.pipelines.TransformerExpert")


def transformer_info(transformer: torch.nn.Module, scheduler_config: Mapping[str, Any] | None,
                     vae_config: Mapping[str, Any] | None = None, name: str = "transformer") -> dict[str, Any]:
    """What `check_transformer_compatible` compares, for one flow transformer."""
    cls = type(transformer).__name__
    cfg = getattr(transformer, "config", None)
    if cls.startswith("UNet"):
        raise ValueError(mixed_families_message(f"expert network {name!r} (a {cls})", "a flow-matching pipeline"))
    if cfg is None or not hasattr(cfg, "in_channels") or not hasattr(cfg, "joint_attention_dim"):
        raise ValueError(f"expert network {name!r} is a {cls}; expected a diffusers SD3Transformer2DModel "
                         "or FluxTransformer2DModel")
    sched = dict(scheduler_config or {})
    sched_cls = str(sched.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
    return {
        "name": name,
        "class": cls,
        "in_channels": cfg.in_channels,
        "out_channels": getattr(cfg, "out_channels", None) or cfg.in_channels,
        "patch_size": getattr(cfg, "patch_size", None),
        "joint_attention_dim": cfg.joint_attention_dim,
        "pooled_projection_dim": getattr(cfg, "pooled_projection_dim", None),
        "guidance_embeds": bool(getattr(cfg, "guidance_embeds", False)),
        "prediction_type": "flow" if "FlowMatch" in sched_cls else sched.get("prediction_type", "epsilon"),
        "num_train_timesteps": sched.get("num_train_timesteps", 1000),
        "scaling_factor": None if vae_config is None else vae_config.get("scaling_factor"),
        "shift_factor": None if vae_config is None else vae_config.get("shift_factor"),
        "latent_channels": None if vae_config is None else vae_config.get("latent_channels"),
    }


def check_transformer_compatible(base: Mapping[str, Any], other: Mapping[str, Any]) -> None:
    """Refuse (ValueError), before any compute, a flow transformer that cannot be an expert
    next to the pipeline's: another family (SD3 vs Flux), another process, another latent
    space or another text-conditioning width."""
    who = f"expert network {other['name']!r}"
    ref = f"the pipeline's {base['name']!r}"
    if other["prediction_type"] != "flow":
        raise ValueError(mixed_families_message(who, ref))
    if other["class"] != base["class"]:
        raise ValueError(f"{who} is a {other['class']}, {ref} a {base['class']}: SD3 and Flux transformers take "
                         "different inputs (Flux packs 2x2 latents and embeds its guidance) and cannot be mixed")
    for key, what in (("in_channels", "input channels"), ("out_channels", "output channels"),
                      ("patch_size", "patch size"), ("joint_attention_dim", "text embedding width"),
                      ("pooled_projection_dim", "pooled text embedding width"),
                      ("num_train_timesteps", "number of training timesteps")):
        if other[key] != base[key]:
            raise ValueError(f"{who} has {what} {other[key]}, {ref} {base[key]}: experts must share the latent "
                             "space, the text encoders and the time variable")
    if other["guidance_embeds"] != base["guidance_embeds"]:
        raise ValueError(f"{who} {'is' if other['guidance_embeds'] else 'is not'} guidance-distilled, {ref} "
                         f"{'is' if base['guidance_embeds'] else 'is not'}: one takes an embedded guidance scale "
                         "and the other classifier-free guidance, so their predictions are not on one footing")
    for key, what in (("scaling_factor", "VAE scaling factor"), ("shift_factor", "VAE shift factor"),
                      ("latent_channels", "VAE latent channels")):
        if other[key] is not None and base[key] is not None and not math.isclose(float(other[key]), float(base[key])):
            raise ValueError(f"{who} was trained with {what} {other[key]}, {ref} with {base[key]}: they do not "
                             "share a latent space")


def check_flow_layout(transformer: Any, scheduler: Any, expected: str, pipeline: str) -> None:
    """Refuse, when a flow pipeline is built, a transformer of another layout (a Flux
    checkpoint given to the SD3 pipeline or the reverse, a UNet) or a non-FlowMatch scheduler."""
    if transformer is not None:
        cls = type(transformer).__name__
        if cls.startswith("UNet"):
            raise ValueError(mixed_families_message(f"a {cls}", pipeline) + "; load a UNet checkpoint with "
                             "SuperDiffStableDiffusionPipeline / SuperDiffStableDiffusionXLPipeline")
        if cls != expected and cls in FLOW_TRANSFORMERS:
            raise ValueError(f"this checkpoint's transformer is a {cls}, the layout of "
                             f"{FLOW_TRANSFORMERS[cls]}; {pipeline} takes a {expected}. Load it with "
                             f"superdiff.pipelines.{FLOW_TRANSFORMERS[cls]}.from_pretrained(...)")
        if cls != expected:
            raise ValueError(f"{pipeline} takes a {expected} as its transformer, got a {cls}")
    if scheduler is not None and "FlowMatch" not in type(scheduler).__name__:
        raise ValueError(f"{pipeline} needs the checkpoint's FlowMatchEulerDiscreteScheduler (its shift defines "
                         f"the time grid), got a {type(scheduler).__name__}")


def check_flow_checkpoint(source: Any, expected: str, pipeline: str) -> None:
    """Before any weights load: refuse a local pipeline folder whose model_index.json names a
    UNet (an epsilon-family checkpoint) or another flow transformer than `expected`. Hub ids
    and folders without model_index.json are checked when the components are built."""
    index = _read_json(os.path.join(str(source), "model_index.json")) if os.path.isdir(str(source)) else None
    if index is None:
        return
    entry = index.get("transformer")
    cls = str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 else ""
    if not cls and isinstance(index.get("unet"), (list, tuple)):
        raise ValueError(mixed_families_message(f"{source} (a {index.get('_class_name', 'UNet')} checkpoint)",
                                                pipeline) + "; load it with SuperDiffStableDiffusionPipeline / "
                         "SuperDiffStableDiffusionXLPipeline / SuperDiffUNet2DPipeline")
    if cls in FLOW_TRANSFORMERS and cls != expected:
        raise ValueError(f"{source} is a {index.get('_class_name', cls)} checkpoint (transformer: {cls}), the layout "
                         f"of {FLOW_TRANSFORMERS[cls]}; {pipeline} takes a {expected}. Load it with "
                         f"superdiff.pipelines.{FLOW_TRANSFORMERS[cls]}.from_pretrained(...)")
