"""What a SuperDiff pipeline hands back: the output dataclass, the trace plot and the VAE
decode (with the VAE's own latent normalisation: z / scaling_factor + shift_factor, or
z * std / scaling_factor + mean)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from superdiff.trace import Trace, plot_trace

Tensor = torch.Tensor

__all__ = ["OUTPUT_TYPES", "SuperDiffPipelineOutput", "render_trace", "decode_latents"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


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
