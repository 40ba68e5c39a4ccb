"""SuperDiffStableDiffusion3Pipeline, offline on tiny random SD3 components (CLIP-L, CLIP-G,
T5 and their tokenizers built locally from configs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402

from superdiff.pipelines import (  # noqa: E402
    SuperDiffStableDiffusion3Pipeline,
    SuperDiffStableDiffusionPipeline,
    TransformerExpert,
)
from superdiff.pipelines._testing import (  # noqa: E402
    tiny_flux_transformer,
    tiny_sd3_components,
    tiny_sd3_transformer,
    tiny_sd_components,
    tiny_sd_unet,
)
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SIZE = dict(height=16, width=16, max_sequence_length=16)


@pytest.fixture(scope="module")
def comps():
    return tiny_sd3_components(0)


@pytest.fixture(scope="module")
def pipe(comps):
    p = SuperDiffStableDiffusion3Pipeline(**comps)
    p.set_progress_bar_config(disable=True)
    return p


class CallCounter:
    """Counts the transformer's forward calls and the rows of each."""

    def __init__(self, module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.rows.append(int(kwargs["hidden_states"].shape[0]))

    def close(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("t5", [True, False])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_single_euler_reproduces_diffusers_sd3(t5, guidance_scale):
    """operator="single" + Euler is diffusers' StableDiffusion3Pipeline: same components, same
    generators (one per image), with and without CFG, with and without T5."""
    comps = tiny_sd3_components(0, t5=t5)
    ref = StableDiffusion3Pipeline(**comps)
    ours = SuperDiffStableDiffusion3Pipeline(**comps)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=guidance_scale, negative_prompt="blurry",
              num_images_per_prompt=2, **SIZE)
    for output_type in ("np", "latent"):
        a = ref("a red circle", generator=[gen(0), gen(1)], output_type=output_type, **kw).images
        b = ours("a red circle", generator=[gen(0), gen(1)], output_type=output_type, operator="single",
                 sampler="euler", **kw).images
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4


def test_dynamic_shifting_grid_matches_diffusers():
    """A scheduler with use_dynamic_shifting: mu from the image size, as diffusers computes it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    comps = tiny_sd3_components(0)
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                         max_image_seq_len=256)
    ref = StableDiffusion3Pipeline(**comps)
    ours = SuperDiffStableDiffusion3Pipeline(**comps)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    a = ref("a cat", generator=gen(3), num_inference_steps=3, output_type="np", **SIZE).images
    out = ours("a cat", generator=gen(3), num_inference_steps=3, output_type="np", operator="single",
               sampler="euler", **SIZE)
    assert np.abs(a - out.images).max() <= 1e-4
    np.testing.assert_allclose(out.trace.t, ref.scheduler.sigmas.numpy().astype(np.float64))


def test_sigmas_ending_in_zero_match_diffusers_and_drop_the_empty_step():
    """diffusers appends a terminal 0 to custom sigmas, so sigmas ending in 0 give a step of
    length 0 there (x unchanged); here that step is dropped, with the same image."""
    comps = tiny_sd3_components(0)
    ref, ours = StableDiffusion3Pipeline(**comps), SuperDiffStableDiffusion3Pipeline(**comps)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    for sigmas in ([1.0, 0.5, 0.0], [1.0, 0.5, 0.5, 0.2]):
        a = ref("a cat", generator=gen(1), sigmas=sigmas, output_type="np", **SIZE).images
        out = ours("a cat", generator=gen(1), sigmas=sigmas, output_type="np", operator="single", sampler="euler",
                   **SIZE)
        assert np.abs(a - out.images).max() <= 1e-4
        assert np.all(np.diff(out.trace.t) < 0)  # no zero-length step left
    with pytest.raises(ValueError, match="`sigmas` must be a non-increasing"):
        ours("a cat", sigmas=[0.5, 1.0], **SIZE)


def test_a_rectified_flow_schedule_lays_out_its_own_grid(pipe):
    """schedule=RectifiedFlow(...) is used with its own shift and range, as the UNet pipelines use
    a given Schedule's grid (it was silently replaced by the scheduler's grid)."""
    from superdiff.schedules import RectifiedFlow

    sched = RectifiedFlow(shift=1.0, t_max=0.5)
    out = pipe("a", schedule=sched, num_inference_steps=4, sampler="euler", operator="single", output_type="latent",
               generator=gen(0), **SIZE)
    np.testing.assert_allclose(out.trace.t, sched.grid(4).numpy())
    default = pipe("a", num_inference_steps=4, sampler="euler", operator="single", output_type="latent",
                   generator=gen(0), **SIZE)
    assert not np.allclose(out.trace.t, default.trace.t)


def test_two_sources_for_the_grid_are_refused(pipe):
    from superdiff.schedules import RectifiedFlow

    with pytest.raises(ValueError, match="either time_grid="):
        pipe("a", time_grid=[1.0, 0.5, 0.0], sigmas=[1.0, 0.5], **SIZE)
    with pytest.raises(ValueError, match="either time_grid="):
        pipe("a", time_grid=[1.0, 0.5, 0.0], mu=0.5, **SIZE)
    with pytest.raises(ValueError, match="lays out its own grid"):
        pipe("a", schedule=RectifiedFlow(), sigmas=[1.0, 0.5], **SIZE)


def test_a_swapped_flow_heun_scheduler_runs_with_an_explicit_sampler(comps):
    """The refusal of FlowMatchHeunDiscreteScheduler says to pass sampler=; doing so samples on
    the plain grid of its config (Heun's own sigmas repeat its interior points)."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    p = SuperDiffStableDiffusion3Pipeline(**comps)
    p.set_progress_bar_config(disable=True)
    p.scheduler = FlowMatchHeunDiscreteScheduler.from_config(p.scheduler.config)
    with pytest.raises(ValueError, match="sampler="):
        p("a", num_inference_steps=3, **SIZE)
    out = p("a", num_inference_steps=3, sampler="heun", operator="single", output_type="latent", **SIZE)
    assert len(out.trace.t) == 4 and np.all(np.diff(out.trace.t) < 0)


def test_t5_prompts_longer_than_512_tokens_are_refused_as_in_diffusers(pipe):
    with pytest.raises(ValueError, match="max_sequence_length"):
        pipe("a", num_inference_steps=2, height=16, width=16, max_sequence_length=600)


def test_diffusers_per_encoder_prompts_left_at_none_are_accepted(pipe):
    """Wrappers pass diffusers' own defaults (prompt_3=None, skip_guidance_layers=None); a value is refused."""
    out = pipe("a", prompt_2=None, prompt_3=None, negative_prompt_3=None, skip_guidance_layers=None,
               num_inference_steps=2, output_type="latent", **SIZE)
    assert out.images.shape[0] == 1
    with pytest.raises(ValueError, match="every text encoder"):
        pipe("a", prompt_2="b", num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match="skip-layer guidance"):
        pipe("a", skip_guidance_layers=[7], num_inference_steps=2, **SIZE)


# ----------------------------------------------------------------------------- batching


def test_one_batched_transformer_call_per_step_for_all_experts_and_uncond(pipe):
    """Three prompts with one shared negative prompt and CFG: 3 expert rows + 1 unconditional
    row per image, in ONE transformer call per step."""
    counter = CallCounter(pipe.transformer)
    try:
        out = pipe(["a circle", "a square", "red"], num_inference_steps=STEPS, guidance_scale=5.0,
                   num_images_per_prompt=2, generator=gen(0), operator="or", sampler="ddpm", output_type="latent",
                   **SIZE)
    finally:
        counter.close()
    assert counter.rows == [(3 + 1) * 2] * STEPS
    assert out.trace.meta["forward_calls"] == STEPS
    assert out.trace.kappa.shape == (STEPS, 2, 3)
    assert np.isfinite(out.trace.kappa).all() and np.isfinite(out.trace.logq).all()


def test_per_expert_negative_prompts_add_one_row_each(pipe):
    counter = CallCounter(pipe.transformer)
    try:
        pipe(["a circle", "a square"], negative_prompt=["blue", "green"], num_inference_steps=2, guidance_scale=3.0,
             generator=gen(0), sampler="ddpm", output_type="latent", **SIZE)
        pipe(["a circle", "a square"], num_inference_steps=2, guidance_scale=1.0, generator=gen(0),
             sampler="ddpm", output_type="latent", **SIZE)
    finally:
        counter.close()
    assert counter.rows == [4, 4, 2, 2]  # (2 experts + 2 negatives), then no guidance: 2 experts


def test_extra_transformer_adds_experts_one_call_per_network(pipe):
    other = tiny_sd3_transformer(seed=1)
    counter = CallCounter(other)
    try:
        out = pipe(["a circle", "a square"], extra_transformers=[TransformerExpert(other, prompt="a circle",
                                                                                   name="other")],
                   num_inference_steps=2, guidance_scale=3.0, generator=gen(0), sampler="ddpm",
                   output_type="latent", **SIZE)
    finally:
        counter.close()
    assert out.trace.expert_names == ["a circle", "a square", "other: a circle"]
    assert counter.rows == [2, 2]  # its expert row and the shared negative, once per step
    assert out.trace.meta["forward_calls_per_network"] == {"transformer": 2, "other": 2}


# ----------------------------------------------------------------------------- composition


@pytest.mark.parametrize("sampler", ["ddpm", "euler"])
def test_and_composition_is_finite_from_t_equal_one(pipe, sampler):
    out = pipe(["a circle", "a square"], num_inference_steps=STEPS, guidance_scale=4.0, generator=gen(2),
               operator="and", sampler=sampler, output_type="np", **SIZE)
    assert out.trace.t[0] == 1.0 and out.trace.t[-1] == 0.0
    assert np.isfinite(out.trace.kappa).all() and np.isfinite(out.trace.logq).all()
    assert np.isfinite(out.images).all() and out.images.shape == (1, 16, 16, 3)
    assert out.trace.meta["model_family"] == "sd3"


def test_default_sampler_is_the_sde_with_the_ito_estimator_and_finite_from_t_equal_one(pipe):
    out = pipe(["a circle", "a square"], num_inference_steps=STEPS, guidance_scale=4.0, generator=gen(2),
               operator="and", output_type="latent", **SIZE)
    assert (out.trace.meta["integrator"], out.trace.meta["estimator"]) == ("em", "ito")
    assert np.isfinite(out.trace.kappa).all() and np.isfinite(out.trace.logq).all()


def test_extra_transformer_from_a_checkpoint_folder(comps, pipe, tmp_path):
    StableDiffusion3Pipeline(**{**comps, "transformer": tiny_sd3_transformer(seed=1)}).save_pretrained(tmp_path / "ft")
    out = pipe("a circle", extra_transformers=[str(tmp_path / "ft")], operator="or", num_inference_steps=2,
               generator=gen(0), sampler="ddpm", output_type="latent", **SIZE)
    assert out.trace.expert_names == ["a circle", "ft: a circle"]


# ----------------------------------------------------------------------------- refusals


def test_a_unet_as_extra_transformer_is_refused_before_compute(pipe):
    counter = CallCounter(pipe.transformer)
    try:
        with pytest.raises(ValueError, match="rectified-flow model"):
            pipe(["a", "b"], extra_transformers=[tiny_sd_unet(0)], num_inference_steps=2, **SIZE)
    finally:
        counter.close()
    assert counter.rows == []


def test_an_sd3_transformer_as_extra_unet_is_refused():
    sd = SuperDiffStableDiffusionPipeline(**tiny_sd_components(0), safety_checker=None, feature_extractor=None)
    with pytest.raises(ValueError, match="rectified-flow model"):
        sd(["a", "b"], extra_unets=[tiny_sd3_transformer(0)], num_inference_steps=2)


def test_a_flux_transformer_is_refused_by_the_sd3_pipeline(comps, pipe):
    with pytest.raises(ValueError, match="SuperDiffFluxPipeline"):
        SuperDiffStableDiffusion3Pipeline(**{**comps, "transformer": tiny_flux_transformer(0)})
    with pytest.raises(ValueError, match="SD3 and Flux"):
        pipe(["a", "b"], extra_transformers=[tiny_flux_transformer(0)], num_inference_steps=2, **SIZE)


def test_other_refusals(comps, pipe):
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        SuperDiffStableDiffusion3Pipeline(**{**comps, "scheduler": EulerDiscreteScheduler()})
    with pytest.raises(ValueError, match="divisible"):
        pipe("a", height=17, width=16, num_inference_steps=2)
    with pytest.raises(ValueError, match="flow-matching schedule"):
        pipe("a", schedule="ve", num_inference_steps=2, **SIZE)
    wide = tiny_sd3_transformer(0, in_channels=8)
    with pytest.raises(ValueError, match="input channels"):
        pipe(["a", "b"], extra_transformers=[wide], num_inference_steps=2, **SIZE)


# ----------------------------------------------------------------------------- loading


def test_save_load_round_trip_custom_pipeline_and_plain_sd3_directory(comps, pipe, tmp_path):
    kw = dict(prompt=["a circle", "a square"], num_inference_steps=2, operator="and", sampler="ddpm",
              output_type="np", **SIZE)
    before = pipe(generator=gen(7), **kw).images
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = SuperDiffStableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3")
    loaded.set_progress_bar_config(disable=True)
    after = loaded(generator=gen(7), **kw).images
    # the same weights and tokens; text encoders loaded from disk pick their own attention
    # implementation, which moves the float32 result by ~1e-6
    assert np.abs(after - before).max() <= 1e-5
    custom = DiffusionPipeline.from_pretrained(tmp_path / "sd3", trust_remote_code=True,
                                               custom_pipeline=str(REPO / "pipelines" / "stable_diffusion_3.py"))
    assert type(custom).__name__ == "SuperDiffStableDiffusion3Pipeline"
    custom.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(custom(generator=gen(7), **kw).images, after)
    # a checkpoint saved by diffusers' own StableDiffusion3Pipeline (the hub layout)
    StableDiffusion3Pipeline(**comps).save_pretrained(tmp_path / "plain")
    from superdiff.pipelines import SuperDiffFluxPipeline

    with pytest.raises(ValueError, match="layout of SuperDiffStableDiffusion3Pipeline"):  # before any weights load
        SuperDiffFluxPipeline.from_pretrained(tmp_path / "plain")
    plain = SuperDiffStableDiffusion3Pipeline.from_pretrained(tmp_path / "plain", torch_dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(plain(generator=gen(7), **kw).images, after)


def test_bf16_transformer_keeps_float64_densities():
    p = SuperDiffStableDiffusion3Pipeline(**tiny_sd3_components(0))
    p.set_progress_bar_config(disable=True)
    p.to(torch_dtype=torch.bfloat16)
    out = p(["a", "b"], num_inference_steps=2, generator=gen(0), operator="and", sampler="ddpm", output_type="np",
            **SIZE)
    assert np.isfinite(out.images).all()
    assert out.trace.logq.dtype == np.float64 and np.isfinite(out.trace.logq).all()


def test_model_cpu_offload(pipe):
    assert pipe.model_cpu_offload_seq == "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    p = SuperDiffStableDiffusion3Pipeline(**tiny_sd3_components(0))
    p.set_progress_bar_config(disable=True)
    try:
        p.enable_model_cpu_offload(device="cpu")
    except (RuntimeError, ValueError, ImportError) as e:  # accelerate without a device
        pytest.skip(f"model offload unavailable here: {e}")
    kw = dict(num_inference_steps=2, sampler="ddpm", output_type="np", **SIZE)
    out = p(["a", "b"], generator=gen(0), **kw)
    ref = pipe(["a", "b"], generator=gen(0), **kw)
    assert np.abs(out.images - ref.images).max() < 1e-5


# ----------------------------------------------------------------------------- command line


def test_generate_cli_runs_an_sd3_folder_and_records_its_kind(tmp_path, capsys):
    """`superdiff generate` on a diffusers SD3 folder without T5 (text_encoder_3: null):
    images, trace and PNG metadata naming the model kind; a UNet model as an extra expert
    is refused before anything is loaded."""
    import json

    from PIL import Image

    from superdiff.cli import main

    StableDiffusion3Pipeline(**tiny_sd3_components(0, t5=False)).save_pretrained(tmp_path / "sd3")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tmp_path / "sd3"), "--prompt", "a circle", "--prompt", "red",
                 "--operator", "and", "--sampler", "ddpm", "--steps", "2", "--height", "16", "--width", "16",
                 "--out", str(out), "--quiet"]) == 0
    with Image.open(out / "image_000.png") as im:
        meta = json.loads(im.text["superdiff"])
    assert meta["model_kind"] == "sd3" and meta["prompts"] == ["a circle", "red"]
    assert json.loads((out / "trace.json").read_text())["meta"]["model_family"] == "sd3"
    sd = tmp_path / "sd"
    comps = tiny_sd_components(0)
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(sd)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "sd3"), "--extra-model", str(sd), "--prompt", "a",
                 "--prompt", "b", "--steps", "2", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "rectified-flow model" in capsys.readouterr().err


def test_smc_from_t_equal_one_is_refused_before_the_text_encoders(pipe):
    """The grid starts at t = 1, where the Feynman-Kac potential is infinite: refused while the
    call is planned (Corrector.check_grid), before any text-encoder or transformer forward."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1))
             for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer) if m is not None]
    try:
        with pytest.raises(ValueError, match="potential is infinite on the first step"):
            pipe(["a", "b"], operator="or", corrector="smc:2", num_inference_steps=3, height=16, width=16,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
