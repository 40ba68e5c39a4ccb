"""Architectures of the bundled shapes models (all ordinary diffusers/transformers classes).

    vae            AutoencoderKL, 32x32x3 <-> 8x8x4 latents (three encoder levels)
    text_encoder   CLIPTextModel, from scratch, tiny (hidden 64, 2 layers)
    unet (t2i)     UNet2DConditionModel on 8x8x4 latents, cross-attention dim 64
    unet (halves)  UNet2DModel on the same 8x8x4 latents, no conditioning
    scheduler      DDPM training schedule of Stable Diffusion v1 (scaled_linear betas
                   0.00085 -> 0.012, 1000 steps, epsilon prediction); the text-to-image
                   directory ships EulerDiscreteScheduler with the same betas for sampling

The rectified-flow model ``shapes-flow`` (Stable Diffusion 3 layout) shares the VAE:
    transformer    SD3Transformer2DModel (MMDiT) on the 8x8x4 latents, patch size 1
    text_encoder,  two CLIPTextModelWithProjection (the CLIP-L and CLIP-G slots), from
    text_encoder_2 scratch like the one above; no T5 (text_encoder_3 = None), so diffusers
                   appends ``FLOW_T5_TOKENS`` zero tokens of width ``joint_attention_dim``
    scheduler      FlowMatchEulerDiscreteScheduler, 1000 steps, shift ``FLOW_SHIFT``

Every constructor is deterministic given ``torch.manual_seed`` and returns a model in
train mode; the configs are what ``save_pretrained`` writes to the bundled directories.
"""

from __future__ import annotations

from typing import Any

LATENT_CHANNELS: int = 4
LATENT_SIZE: int = 8
TEXT_MAX_LENGTH: int = 16
TEXT_HIDDEN: int = 64

#: Timestep shift of the flow model's scheduler (SD3's value), used in training and sampling.
FLOW_SHIFT: float = 3.0
#: Zero "T5" tokens diffusers' SD3 pipeline appends without text_encoder_3: its default
#: ``max_sequence_length``, the layout ``shapes-flow`` is trained for.
FLOW_T5_TOKENS: int = 256

SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def make_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                      with_projection: bool = False):
    """CLIPTextModel, or CLIPTextModelWithProjection (SD3's encoders) with ``with_projection``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def make_t2i_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_flow_transformer():
    """SD3Transformer2DModel for ``shapes-flow``: sequence features of both CLIP encoders side
    by side (``joint_attention_dim`` = 2 x TEXT_HIDDEN), their pooled projections likewise."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=6,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=64,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=LATENT_SIZE,
    )


def make_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def make_uncond_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def make_sampling_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="linspace", steps_offset=1)
