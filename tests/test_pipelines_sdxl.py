"""SuperDiffStableDiffusionXLPipeline, offline on tiny random SDXL components."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

from superdiff.pipelines import SuperDiffStableDiffusionXLPipeline  # noqa: E402
from superdiff.pipelines._testing import tiny_sd_unet, tiny_sdxl_components, tiny_sdxl_unet  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def comps():
    return tiny_sdxl_components(0)


@pytest.fixture(scope="module")
def pipe(comps):
    p = SuperDiffStableDiffusionXLPipeline(**comps, add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_parity_with_diffusers_sdxl_euler(comps, pipe, negative_prompt):
    """Two text encoders, pooled embeddings, add_time_ids, zeroed negative embeddings
    (force_zeros_for_empty_prompt) or an encoded negative prompt."""
    ref = StableDiffusionXLPipeline(**comps, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=negative_prompt, num_inference_steps=4, guidance_scale=5.0, output_type="np")
    a = ref("a red cat", generator=gen(0), **kw).images
    out = pipe("a red cat", generator=gen(0), operator="single", sampler="euler", **kw)
    assert out.images.shape == a.shape == (1, 16, 16, 3)
    assert np.abs(out.images - a).max() <= 1e-4


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_negative_micro_conditioning_parity_with_diffusers(comps, pipe, negative_prompt):
    """negative_original_size / negative_crops_coords_top_left / negative_target_size go into
    the unconditional branch's time ids (zeroed or encoded negative), as diffusers'
    negative_add_time_ids (before: refused as unknown arguments); one size alone is refused
    rather than ignored."""
    ref = StableDiffusionXLPipeline(**comps, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    neg = dict(negative_original_size=(8, 12), negative_crops_coords_top_left=(2, 1), negative_target_size=(12, 8))
    kw = dict(negative_prompt=negative_prompt, num_inference_steps=4, guidance_scale=5.0, output_type="np")
    a = ref("a red cat", generator=gen(0), **neg, **kw).images
    out = pipe("a red cat", generator=gen(0), operator="single", sampler="euler", **neg, **kw).images
    plain = pipe("a red cat", generator=gen(0), operator="single", sampler="euler", **kw).images
    assert np.abs(out - a).max() <= 1e-4
    assert np.abs(out - plain).max() > 1e-3  # the negative time ids did change the image
    with pytest.raises(ValueError, match="both negative_original_size and negative_target_size"):
        pipe("a red cat", negative_original_size=(8, 8), num_inference_steps=2)


@pytest.mark.parametrize("operator", ["or", "and", "average"])
@pytest.mark.parametrize("n", [2, 3])
def test_operators_one_batched_forward_per_step(pipe, operator, n):
    rows = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, kw: rows.append(a[0].shape[0]), with_kwargs=True)
    try:
        out = pipe(["a cat", "a dog", "a hat"][:n], num_inference_steps=STEPS, generator=gen(1), operator=operator,
                   output_type="np")
    finally:
        h.remove()
    assert rows == [n + 1] * STEPS
    assert np.isfinite(out.images).all()
    assert out.trace.kappa.shape == (STEPS, 1, n) and np.isfinite(out.trace.logq).all()


def test_extra_sdxl_unet_and_refusal_of_an_sd_unet(pipe):
    ft = tiny_sdxl_unet(seed=1)
    out = pipe("a cat", extra_unets=[ft], num_inference_steps=STEPS, generator=gen(0), operator="and",
               output_type="latent")
    assert out.trace.expert_names == ["a cat", "unet_2: a cat"]
    assert out.trace.meta["forward_calls_per_network"] == {"unet": STEPS, "unet_2": STEPS}
    with pytest.raises(ValueError, match="text embeddings of width 32|cannot be mixed"):
        pipe("a cat", extra_unets=[tiny_sd_unet(1)], num_inference_steps=STEPS)


def test_guidance_distilled_unet_refused_as_the_pipelines_own_unet(comps):
    """An LCM-style SDXL UNet (time_cond_proj_dim set) as the pipeline's own UNet is refused
    before any forward, with the message an extra UNet gets (before: CFG ran on it and
    timestep_cond was never passed)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = {k: v for k, v in comps["unet"].config.items() if not k.startswith("_")}
    lcm = UNet2DConditionModel(**{**config, "time_cond_proj_dim": 8}).eval()
    bad = SuperDiffStableDiffusionXLPipeline(**{**comps, "unet": lcm}, add_watermarker=False)
    bad.set_progress_bar_config(disable=True)
    rows = []
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: rows.append(1), with_kwargs=True)
             for m in (lcm, comps["text_encoder"], comps["text_encoder_2"])]
    try:
        with pytest.raises(ValueError, match=r"the pipeline's 'unet' is guidance-distilled \(time_cond_proj_dim"):
            bad("a cat", num_inference_steps=2, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    assert rows == []


def test_batch_consistency_and_errors(pipe):
    kw = dict(num_inference_steps=STEPS, operator="or", output_type="latent")
    both = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=[gen(1), gen(2)], **kw).images
    two = pipe(["a cat", "a dog"], generator=gen(2), **kw).images
    torch.testing.assert_close(both[1:], two, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no prompts"):
        pipe([], num_inference_steps=2)
    with pytest.raises(ValueError, match="divisible"):
        pipe("a", width=17, num_inference_steps=2)
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        pipe(["a", "b", "c"], negative_prompt=["x", "y"], num_inference_steps=2)


def test_save_load_round_trip_and_custom_pipeline(pipe, tmp_path):
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=STEPS, operator="or", output_type="np")
    before = pipe(generator=gen(3), **kw).images
    pipe.save_pretrained(tmp_path / "xl")
    loaded = SuperDiffStableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", add_watermarker=False)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(loaded(generator=gen(3), **kw).images, before)
    custom = DiffusionPipeline.from_pretrained(tmp_path / "xl", add_watermarker=False, trust_remote_code=True,
                                               custom_pipeline=str(REPO / "pipelines" / "stable_diffusion_xl.py"))
    assert type(custom).__name__ == "SuperDiffStableDiffusionXLPipeline"
    custom.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(custom(generator=gen(3), **kw).images, before)
