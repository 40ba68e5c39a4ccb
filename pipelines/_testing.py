"""Tiny random components for offline tests and demos of the pipelines (no downloads).

Every builder is deterministic given `seed` (torch.manual_seed before each module) and
returns modules in eval mode, built from configs only; the tokenizer is a character-level
CLIP BPE tokenizer written to a temporary directory.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from typing import Any

import torch

__all__ = ["tiny_tokenizer", "tiny_t5_tokenizer", "tiny_sd_components", "tiny_sdxl_components", "tiny_unet2d",
           "tiny_vae", "tiny_sd3_transformer", "tiny_sd3_components", "tiny_flux_transformer", "tiny_flux_components",
           "SD_SCHEDULE"]

SD_SCHEDULE: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000)


def tiny_tokenizer(directory: str | None = None, max_length: int = 12):
    """A CLIPTokenizer over lowercase letters and digits (one token per character)."""
    from transformers import CLIPTokenizer

    d = directory or tempfile.mkdtemp(prefix="superdiff-tok-")
    os.makedirs(d, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(vocab=os.path.join(d, "vocab.json"), merges=os.path.join(d, "merges.txt"),
                         model_max_length=max_length)


def _eval(m):
    return m.eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4, scaling_factor: float = 0.18215, sample_size: int = 16):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _eval(AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                               latent_channels=latent_channels, norm_num_groups=2, sample_size=sample_size,
                               scaling_factor=scaling_factor))


def _text_config(hidden: int = 32, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
                          max_position_embeddings=16, projection_dim=projection_dim or hidden)


def tiny_sd_unet(seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 32, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _eval(UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size,
                                      in_channels=in_channels, out_channels=in_channels,
                                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                      cross_attention_dim=cross_attention_dim, norm_num_groups=2))


def tiny_sd_components(seed: int = 0, scheduler: str = "euler", prediction_type: str = "epsilon",
                       tokenizer_dir: str | None = None) -> dict[str, Any]:
    """vae, text_encoder, tokenizer, unet, scheduler of a tiny SD 1.x-layout model (16x16 px,
    8x8x4 latents)."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
    from transformers import CLIPTextModel

    unet = tiny_sd_unet(seed)
    vae = tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = _eval(CLIPTextModel(_text_config()))
    kw = dict(SD_SCHEDULE, prediction_type=prediction_type, steps_offset=1)
    if scheduler == "euler":
        sched = EulerDiscreteScheduler(**kw)
    elif scheduler == "ddpm":
        sched = DDPMScheduler(**kw, clip_sample=False)
    elif scheduler == "ddim":
        sched = DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False)
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(tokenizer_dir), unet=unet,
                scheduler=sched)


def tiny_sdxl_unet(seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _eval(UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size,
                                      in_channels=4, out_channels=4,
                                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                      attention_head_dim=(2, 4), use_linear_projection=True,
                                      addition_embed_type="text_time", addition_time_embed_dim=8,
                                      transformer_layers_per_block=(1, 1),
                                      projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
                                      cross_attention_dim=64, norm_num_groups=1))


def tiny_sdxl_components(seed: int = 0, tokenizer_dir: str | None = None) -> dict[str, Any]:
    """The SDXL layout: two text encoders (the second with projection), text_time UNet."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = tiny_sdxl_unet(seed)
    vae = tiny_vae(seed)
    torch.manual_seed(seed)
    te1 = _eval(CLIPTextModel(_text_config()))
    torch.manual_seed(seed + 1)
    te2 = _eval(CLIPTextModelWithProjection(_text_config()))
    sched = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    d2 = None if tokenizer_dir is None else os.path.join(tokenizer_dir, "2")
    return dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tiny_tokenizer(tokenizer_dir),
                tokenizer_2=tiny_tokenizer(d2), unet=unet, scheduler=sched)


def tiny_unet2d(seed: int = 0, channels: int = 3, sample_size: int = 8, num_class_embeds: int | None = None):
    """A tiny UNet2DModel (pixel space with channels=3, or 4-channel VAE latents)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return _eval(UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                             block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                             num_class_embeds=num_class_embeds))


def tiny_t5_tokenizer(directory: str | None = None):
    """A T5 tokenizer (Unigram over lowercase letters and digits, SentencePiece-style word
    boundaries "\u2581"), built from a vocabulary list and saved as tokenizer.json."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in string.ascii_lowercase + string.digits:
        vocab += [(c, -3.0), ("\u2581" + c, -3.0)]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    d = directory or tempfile.mkdtemp(prefix="superdiff-t5tok-")
    tok.save_pretrained(d)
    return T5TokenizerFast.from_pretrained(d)


def _t5_encoder(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return _eval(T5EncoderModel(T5Config(vocab_size=100, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                         relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                         decoder_start_token_id=0)))


def _flow_vae(seed: int, latent_channels: int = 4):
    """A tiny AutoencoderKL with SD3/Flux-style latent normalisation (scaling and shift)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _eval(AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                               latent_channels=latent_channels, norm_num_groups=2, sample_size=16,
                               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                               use_post_quant_conv=False))


def tiny_sd3_transformer(seed: int = 0, sample_size: int = 8, in_channels: int = 4):
    """A one-layer SD3Transformer2DModel (joint attention width 32, pooled projections 32)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return _eval(SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=in_channels,
                                       out_channels=in_channels, num_layers=1, attention_head_dim=8,
                                       num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                       pooled_projection_dim=32, pos_embed_max_size=16))


def tiny_sd3_components(seed: int = 0, t5: bool = True, shift: float = 3.0,
                        tokenizer_dir: str | None = None) -> dict[str, Any]:
    """The SD3 layout: CLIP-L and CLIP-G (with projection; pooled 16 + 16 = 32), T5
    (d_model 32; None with t5=False), SD3 transformer, FlowMatchEulerDiscreteScheduler
    with `shift`, VAE with scaling and shift factors (16x16 px, 8x8x4 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    transformer = tiny_sd3_transformer(seed)
    vae = _flow_vae(seed)
    torch.manual_seed(seed)
    te1 = _eval(CLIPTextModelWithProjection(_text_config(16)))
    torch.manual_seed(seed + 1)
    te2 = _eval(CLIPTextModelWithProjection(_text_config(16)))
    d = tokenizer_dir
    return dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
                text_encoder=te1, tokenizer=tiny_tokenizer(d and os.path.join(d, "1"), 16),
                text_encoder_2=te2, tokenizer_2=tiny_tokenizer(d and os.path.join(d, "2"), 16),
                text_encoder_3=_t5_encoder(seed + 2) if t5 else None,
                tokenizer_3=tiny_t5_tokenizer(d and os.path.join(d, "3")) if t5 else None)


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True, in_channels: int = 16):
    """A FluxTransformer2DModel with one double and one single block (packed 2x2 latents of a
    4-channel VAE: 16 channels per token)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _eval(FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                        axes_dims_rope=(4, 4, 8)))


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True,
                         tokenizer_dir: str | None = None) -> dict[str, Any]:
    """The Flux layout: CLIP (pooled 32), T5 (d_model 32), Flux transformer, a dynamically
    shifting FlowMatchEulerDiscreteScheduler, VAE with scaling and shift (16x16 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel

    transformer = tiny_flux_transformer(seed, guidance_embeds)
    vae = _flow_vae(seed)
    torch.manual_seed(seed)
    te = _eval(CLIPTextModel(_text_config(32)))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=4, max_image_seq_len=64)
    d = tokenizer_dir
    return dict(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te,
                tokenizer=tiny_tokenizer(d and os.path.join(d, "1"), 16), text_encoder_2=_t5_encoder(seed + 1),
                tokenizer_2=tiny_t5_tokenizer(d and os.path.join(d, "2")))
