"""SuperDiffFluxPipeline, offline on tiny random Flux components (CLIP, T5 and their
tokenizers built locally from configs), guidance-distilled and not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline, FluxPipeline  # noqa: E402

from superdiff.pipelines import SuperDiffFluxPipeline, TransformerExpert  # noqa: E402
from superdiff.pipelines._testing import (  # noqa: E402
    tiny_flux_components,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_sd_unet,
)
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SIZE = dict(height=16, width=16, max_sequence_length=16)


def make(guidance_embeds: bool = True) -> SuperDiffFluxPipeline:
    p = SuperDiffFluxPipeline(**tiny_flux_components(0, guidance_embeds))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def dev():
    """guidance-distilled (guidance_embeds=True, like FLUX.1-dev)"""
    return make(True)


@pytest.fixture(scope="module")
def schnell():
    """no guidance embedding (like FLUX.1-schnell / de-distilled variants)"""
    return make(False)


class CallCounter:
    """The transformer's forward calls: rows and embedded guidance of each."""

    def __init__(self, module):
        self.rows: list[int] = []
        self.guidance: list[torch.Tensor | None] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.rows.append(int(kwargs["hidden_states"].shape[0]))
        self.guidance.append(kwargs.get("guidance"))

    def close(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("guidance_embeds,call", [
    (True, dict(guidance_scale=4.0)),
    (False, dict()),
    (False, dict(true_cfg_scale=3.0, negative_prompt="blurry")),
])
def test_single_euler_reproduces_diffusers_flux(guidance_embeds, call):
    """operator="single" + Euler is diffusers' FluxPipeline: packed latents, image ids, the
    dynamic shift of the image size, embedded guidance or true CFG; one generator per image."""
    comps = tiny_flux_components(0, guidance_embeds)
    ref, ours = FluxPipeline(**comps), SuperDiffFluxPipeline(**comps)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, num_images_per_prompt=2, **SIZE, **call)
    for output_type in ("np", "latent"):
        a = ref("a red circle", generator=[gen(0), gen(1)], output_type=output_type, **kw).images
        out = ours("a red circle", generator=[gen(0), gen(1)], output_type=output_type, operator="single",
                   sampler="euler", **kw)
        assert np.abs(np.asarray(a) - np.asarray(out.images)).max() <= 1e-4
    np.testing.assert_allclose(out.trace.t, ref.scheduler.sigmas.numpy().astype(np.float64))
    assert out.trace.t[1] > 0.75  # the dynamic shift moved the uniform 0.75 up


# ----------------------------------------------------------------------------- batching


def test_distilled_experts_are_rows_of_one_call_without_uncond(dev):
    counter = CallCounter(dev.transformer)
    try:
        out = dev(["a circle", "a square", "red"], num_inference_steps=STEPS, guidance_scale=2.5,
                  num_images_per_prompt=2, generator=gen(0), operator="or", sampler="ddpm", output_type="latent",
                  **SIZE)
    finally:
        counter.close()
    assert counter.rows == [3 * 2] * STEPS  # N experts x B images, no unconditional rows
    assert all(torch.equal(g, torch.full((6,), 2.5)) for g in counter.guidance)
    assert out.trace.meta["embedded_guidance"] == 2.5 and out.trace.meta["guidance_distilled"] is True
    assert out.images.shape == (2, 16, 16)  # packed: (16/2/2)^2 tokens of 4 x 4 channels


def test_true_cfg_adds_the_unconditional_rows_to_the_same_call(schnell):
    counter = CallCounter(schnell.transformer)
    try:
        schnell(["a circle", "a square"], num_inference_steps=STEPS, true_cfg_scale=4.0, num_images_per_prompt=2,
                generator=gen(0), sampler="ddpm", output_type="latent", **SIZE)
    finally:
        counter.close()
    assert counter.rows == [(2 + 1) * 2] * STEPS
    assert all(g is None for g in counter.guidance)


def test_extra_flux_transformer(dev):
    other = tiny_flux_transformer(seed=1)
    out = dev(["a circle", "a square"], extra_transformers=[TransformerExpert(other, name="other")],
              num_inference_steps=2, generator=gen(0), sampler="ddpm", output_type="latent", **SIZE)
    assert out.trace.expert_names == ["a circle", "a square", "other: a circle", "other: a square"]
    assert out.trace.meta["forward_calls_per_network"] == {"transformer": 2, "other": 2}


@pytest.mark.parametrize("sampler", ["ddpm", "euler"])
def test_and_composition_is_finite(dev, sampler):
    out = dev(["a circle", "a square"], num_inference_steps=STEPS, generator=gen(2), operator="and",
              sampler=sampler, output_type="np", **SIZE)
    assert out.trace.t[0] == 1.0 and out.trace.t[-1] == 0.0
    assert np.isfinite(out.trace.kappa).all() and np.isfinite(out.trace.logq).all()
    assert out.images.shape == (1, 16, 16, 3) and out.trace.meta["model_family"] == "flux"


def test_default_sampler_is_the_sde_with_the_ito_estimator(dev):
    out = dev(["a circle", "a square"], num_inference_steps=STEPS, generator=gen(2), operator="or",
              output_type="latent", **SIZE)
    assert (out.trace.meta["integrator"], out.trace.meta["estimator"]) == ("em", "ito")
    assert np.isfinite(out.trace.kappa).all() and np.isfinite(out.trace.logq).all()


# ----------------------------------------------------------------------------- refusals


def test_guidance_that_cannot_apply_is_refused_before_compute(dev, schnell):
    counter = CallCounter(dev.transformer)
    try:
        with pytest.raises(ValueError, match="guidance-distilled"):
            dev("a", true_cfg_scale=4.0, num_inference_steps=2, **SIZE)
        with pytest.raises(ValueError, match="no negative prompt"):
            dev("a", negative_prompt="blurry", num_inference_steps=2, **SIZE)
    finally:
        counter.close()
    assert counter.rows == []
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell("a", guidance_scale=3.5, num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match="max_sequence_length"):
        dev("a", num_inference_steps=2, height=16, width=16, max_sequence_length=513)
    with pytest.raises(ValueError, match=">= 1"):
        schnell("a", true_cfg_scale=0.5, num_inference_steps=2, **SIZE)


def test_schnells_documented_guidance_zero_and_numpy_scalars_are_taken(dev, schnell):
    """FLUX.1-schnell's documented call passes guidance_scale=0.0 (diffusers ignores it without a
    guidance embedding); numpy scalars are numbers too."""
    a = schnell("a", guidance_scale=0.0, num_inference_steps=2, output_type="latent", generator=gen(0), **SIZE)
    b = schnell("a", num_inference_steps=2, output_type="latent", generator=gen(0), **SIZE)
    assert torch.equal(a.images, b.images)
    c = dev("a", guidance_scale=np.float32(3.5), num_inference_steps=2, output_type="latent", generator=gen(0), **SIZE)
    d = dev("a", guidance_scale=3.5, num_inference_steps=2, output_type="latent", generator=gen(0), **SIZE)
    assert torch.equal(c.images, d.images)


def test_flux_sigmas_ending_in_zero_match_diffusers():
    comps = tiny_flux_components(0, True)
    ref, ours = FluxPipeline(**comps), SuperDiffFluxPipeline(**comps)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    a = ref("a cat", generator=gen(2), sigmas=[1.0, 0.5, 0.0], output_type="np", **SIZE).images
    out = ours("a cat", generator=gen(2), sigmas=[1.0, 0.5, 0.0], output_type="np", operator="single",
               sampler="euler", **SIZE)
    assert np.abs(a - out.images).max() <= 1e-4


def test_sizes_the_packing_cannot_take_are_refused(dev):
    with pytest.raises(ValueError, match="packs 2x2"):
        dev("a", height=18, width=16, num_inference_steps=2, max_sequence_length=16)
    with pytest.raises(ValueError, match="packed shape"):
        dev("a", latents=torch.zeros(1, 4, 8, 8), num_inference_steps=2, **SIZE)


def test_wrong_family_experts_and_layouts_are_refused(dev):
    comps = tiny_flux_components(0)
    with pytest.raises(ValueError, match="SuperDiffStableDiffusion3Pipeline"):
        SuperDiffFluxPipeline(**{**comps, "transformer": tiny_sd3_transformer(0)})
    with pytest.raises(ValueError, match="rectified-flow model"):
        dev(["a", "b"], extra_transformers=[tiny_sd_unet(0)], num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match="guidance-distilled"):
        dev(["a", "b"], extra_transformers=[tiny_flux_transformer(1, guidance_embeds=False)], num_inference_steps=2,
            **SIZE)


# ----------------------------------------------------------------------------- loading


def test_save_load_round_trip_custom_pipeline_and_plain_flux_directory(dev, tmp_path):
    kw = dict(prompt=["a circle", "a square"], num_inference_steps=2, operator="and", sampler="ddpm",
              output_type="np", **SIZE)
    before = dev(generator=gen(7), **kw).images
    dev.save_pretrained(tmp_path / "flux")
    loaded = SuperDiffFluxPipeline.from_pretrained(tmp_path / "flux")
    loaded.set_progress_bar_config(disable=True)
    after = loaded(generator=gen(7), **kw).images
    assert np.abs(after - before).max() <= 1e-5  # encoders loaded from disk: their own attention kernels
    custom = DiffusionPipeline.from_pretrained(tmp_path / "flux", trust_remote_code=True,
                                               custom_pipeline=str(REPO / "pipelines" / "flux.py"))
    assert type(custom).__name__ == "SuperDiffFluxPipeline"
    custom.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(custom(generator=gen(7), **kw).images, after)
    FluxPipeline(**tiny_flux_components(0)).save_pretrained(tmp_path / "plain")
    from superdiff.pipelines import SuperDiffStableDiffusion3Pipeline

    with pytest.raises(ValueError, match="layout of SuperDiffFluxPipeline"):  # before any weights load
        SuperDiffStableDiffusion3Pipeline.from_pretrained(tmp_path / "plain")
    plain = SuperDiffFluxPipeline.from_pretrained(tmp_path / "plain", torch_dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(plain(generator=gen(7), **kw).images, after)


def test_bf16_and_model_cpu_offload(dev):
    p = make(True)
    p.to(torch_dtype=torch.bfloat16)
    out = p(["a", "b"], num_inference_steps=2, generator=gen(0), operator="and", sampler="ddpm", output_type="np",
            **SIZE)
    assert np.isfinite(out.images).all() and out.trace.logq.dtype == np.float64
    assert dev.model_cpu_offload_seq == "text_encoder->text_encoder_2->transformer->vae"
    p = make(True)
    try:
        p.enable_model_cpu_offload(device="cpu")
    except (RuntimeError, ValueError, ImportError) as e:  # accelerate without a device
        pytest.skip(f"model offload unavailable here: {e}")
    kw = dict(num_inference_steps=2, sampler="ddpm", output_type="np", **SIZE)
    np.testing.assert_allclose(p(["a", "b"], generator=gen(0), **kw).images,
                               dev(["a", "b"], generator=gen(0), **kw).images, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- command line


def test_generate_cli_runs_a_flux_folder_and_refuses_a_negative_prompt(tmp_path, capsys):
    import json

    from PIL import Image

    from superdiff.cli import main

    FluxPipeline(**tiny_flux_components(0)).save_pretrained(tmp_path / "flux")
    args = ["generate", "--model", str(tmp_path / "flux"), "--prompt", "a circle", "--prompt", "red", "--steps", "2",
            "--sampler", "ddpm", "--height", "16", "--width", "16", "--guidance-scale", "2.5", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "image_000.png") as im:
        meta = json.loads(im.text["superdiff"])
    assert meta["model_kind"] == "flux"
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())["meta"]
    assert trace["embedded_guidance"] == 2.5 and trace["guidance_scale"] == 1.0  # no CFG in the core step
    capsys.readouterr()
    assert main(args + ["--negative-prompt", "blurry", "--out", str(tmp_path / "x")]) == 2
    assert "no unconditional branch" in capsys.readouterr().err
