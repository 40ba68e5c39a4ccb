"""Plain diffusers reference samplers for the bundled unconditional (half-data) models.

``load_unconditional(dir)`` reads the three diffusers components of a half-data model
directory (unet/, vae/, scheduler/) with the ordinary ``from_pretrained`` calls;
``sample_unconditional`` runs the scheduler's own loop (ancestral or ODE, as configured),
    z_T ~ N(0, init_noise_sigma^2 I),  z <- scheduler.step(unet(scale_model_input(z), t), t, z),
then decodes ``x = vae.decode(z / scaling_factor)`` and maps it to [0, 1]. This is the
single-model baseline that multi-checkpoint composition is compared against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_unconditional(directory: str | Path, dtype: torch.dtype = torch.float32):
    """(unet, vae, scheduler) from a half-data model directory, via ``from_pretrained``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DModel

    directory = Path(directory)
    for sub in ("unet", "vae", "scheduler"):
        if not (directory / sub).is_dir():
            raise FileNotFoundError(
                f"{directory} has no {sub}/ folder; expected a half-data model directory "
                "with unet/, vae/ and scheduler/ (see superdiff.registry.list_bundled_models())"
            )
    unet = UNet2DModel.from_pretrained(directory, subfolder="unet", torch_dtype=dtype).eval()
    vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", torch_dtype=dtype).eval()
    scheduler = EulerDiscreteScheduler.from_pretrained(directory, subfolder="scheduler")
    return unet, vae, scheduler


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode scaled latents to float32 images [N, 3, H, W] in [0, 1]."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu().numpy()


@torch.no_grad()
def sample_unconditional(
    unet,
    vae,
    scheduler,
    n: int,
    num_inference_steps: int = 25,
    generator: torch.Generator | None = None,
    batch_size: int = 128,
) -> np.ndarray:
    """Draw ``n`` images [n, 3, H, W] in [0, 1] from an unconditional latent model."""
    if n < 1 or num_inference_steps < 1:
        raise ValueError(f"need n >= 1 and num_inference_steps >= 1, got {n}, {num_inference_steps}")
    cfg = unet.config
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        scheduler.set_timesteps(num_inference_steps)
        shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        z = torch.randn(shape, generator=generator, dtype=unet.dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(z, t), t).sample
            z = scheduler.step(eps, t, z, generator=generator).prev_sample
        out.append(decode_latents(vae, z))
    return np.concatenate(out)
