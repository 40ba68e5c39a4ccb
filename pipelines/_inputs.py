"""A pipeline call's inputs before any compute: prompts and negative prompts (one expert
per prompt), the joint-prompt baseline, and the argument checks every pipeline makes."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ._outputs import OUTPUT_TYPES

__all__ = ["joint_prompt", "normalize_prompts", "normalize_negative_prompts", "apply_joint", "unique_keys",
           "check_height_width", "check_unet_size", "check_common", "check_generator"]


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
    except (IndexError, KeyError, ValueError) as e:  # {5} for 2 prompts, {name}, an unmatched brace
        raise ValueError(f"joint_template {template!r} does not fit {len(prompts)} prompts ({e}); use {{0}}, "
                         "{1}, ... for the prompts in order and {{ }} for literal braces") from None


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


def check_height_width(height: int, width: int, factor: int, what: str = "the VAE factor") -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if height % factor or width % factor:
        raise ValueError(f"`height` and `width` must be divisible by {what} {factor}, got {height}x{width}")


def unet_down_levels(unet: Any) -> int:
    """Down-sampling levels of a UNet2DModel, whose skip connections need latents that are multiples
    of 2**levels; 0 for other networks (UNet2DConditionModel takes any size: forward_upsample_size)."""
    from diffusers import UNet2DModel

    if not isinstance(unet, UNet2DModel):
        return 0
    blocks = getattr(unet, "down_blocks", None)
    if blocks is not None:
        return sum(getattr(b, "downsamplers", None) is not None for b in blocks)
    return len(unet.config.block_out_channels) - 1


def check_unet_size(unets: Sequence[tuple[str, Any]], height: int, width: int, factor: int) -> None:
    """Refuse (before any compute) an image size a UNet2DModel among `unets` ((name, module) pairs)
    cannot take: height and width must be multiples of the VAE factor times 2**(its down-sampling levels)."""
    for name, unet in unets:
        levels = unet_down_levels(unet)
        m = factor * 2**levels
        if height % m or width % m:
            raise ValueError(f"`height` and `width` must be multiples of {m} for {name} (a UNet2DModel): the VAE "
                             f"factor {factor} times 2**{levels} ({levels} down-sampling level(s)); got "
                             f"{height}x{width}, e.g. use {-(-height // m) * m}x{-(-width // m) * m}")


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


#: T5's longest prompt in diffusers' SD3 and Flux pipelines
MAX_T5_SEQUENCE_LENGTH = 512


def check_max_sequence_length(n: Any) -> None:
    """T5's prompt length: an int in 1..512, as diffusers' SD3 and Flux pipelines require."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_T5_SEQUENCE_LENGTH:
        raise ValueError(f"`max_sequence_length` must be an int from 1 to {MAX_T5_SEQUENCE_LENGTH} (T5's "
                         f"longest prompt in diffusers' SD3 and Flux pipelines), got {n!r}")


def check_generator(generator: Any, batch: int) -> None:
    """None, one torch.Generator, or a list of one per image (diffusers' convention)."""
    import torch

    gens = generator if isinstance(generator, list) else [generator] if generator is not None else []
    bad = [g for g in gens if not isinstance(g, torch.Generator)]
    if bad:
        raise ValueError(f"`generator` must be a torch.Generator or a list of them, got {type(bad[0]).__name__}; "
                         "e.g. generator=torch.Generator('cpu').manual_seed(0)")
    if isinstance(generator, list) and len(generator) not in (batch,):
        raise ValueError(f"got {len(generator)} generators for a batch of {batch} images "
                         "(num_images_per_prompt); give one generator or one per image")


def unique_keys(values: Sequence[Any]) -> list[Any]:
    """Distinct values in first-seen order."""
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def apply_joint(operator: Any, prompts: list[str], negatives: list[str | None], template: str | None
                ) -> tuple[Any, list[str], list[str | None]]:
    """(operator, prompts, negatives) after the joint-prompt baseline: "joint" becomes one
    "single" expert with the prompts joined by `template` and the distinct negatives joined."""
    op_name = operator.lower() if isinstance(operator, str) else operator
    if op_name != "joint":
        return op_name, prompts, negatives
    negs = unique_keys([n for n in negatives if n is not None])
    return "single", [joint_prompt(prompts, template)], [", ".join(negs) if negs else None]


def apply_compose(prompt: Any, operator: Any, compose: str | None, and_mode: str = "superdiff") -> tuple[Any, Any]:
    """(prompt, operator) for a composition formula (superdiff.formula, docs/correctors.md):
    its prompts become the experts and its FormulaOperator the operator. Without a formula,
    both come back unchanged."""
    if compose is None:
        if and_mode != "superdiff":
            raise ValueError(f"and_mode={and_mode!r} applies to a compose= formula's '&'; without one, choose the "
                             "operator instead (operator='and' is SuperDiff's AND, 'average' the product)")
        return prompt, operator
    from superdiff.formula import FormulaOperator

    if prompt is not None:
        raise ValueError("give either `prompt` or `compose` (a formula names its own prompts), not both")
    if not (isinstance(operator, str) and operator == "and"):  # anything but the default: it would be lost
        raise ValueError(f"give either `operator` ({operator!r}) or `compose` (the formula is the operator), not "
                         "both; a corrector goes in corrector=")
    op = FormulaOperator(compose, and_mode=and_mode)
    return list(op.formula.names), op
