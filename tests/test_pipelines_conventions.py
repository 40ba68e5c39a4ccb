"""diffusers' calling habits on the SuperDiff pipelines (issue 14; pipelines/_conventions.py),
offline on the tiny SD components: one default operator everywhere, batches of compositions
as nested prompt lists, `pipe.scheduler` swaps mapped or refused, prompt_embeds, sigmas,
`pipe._interrupt`, and diffusers' other arguments refused with a message (not a TypeError)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       StableDiffusionPipeline)

from superdiff.compose import DEFAULT_COMPOSITION, Composition  # noqa: E402
from superdiff.pipelines import (SuperDiffFluxPipeline, SuperDiffStableDiffusion3Pipeline,  # noqa: E402
                                 SuperDiffStableDiffusionPipeline, SuperDiffStableDiffusionXLPipeline,
                                 SuperDiffUNet2DPipeline)
from superdiff.pipelines._testing import SD_SCHEDULE, tiny_sd_components  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

KW = dict(num_inference_steps=3, output_type="np")


def make_pipe(scheduler="euler"):
    pipe = SuperDiffStableDiffusionPipeline(**tiny_sd_components(0, scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, scheduler):
    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=pipe.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def test_one_default_operator_everywhere(pipe):
    """"and" in every pipeline, the Composition (CLI, batch) and the studio's default form."""
    for cls in (SuperDiffStableDiffusionPipeline, SuperDiffStableDiffusionXLPipeline,
                SuperDiffStableDiffusion3Pipeline, SuperDiffFluxPipeline, SuperDiffUNet2DPipeline):
        assert inspect.signature(cls.__call__).parameters["operator"].default == "and", cls.__name__
    assert Composition().operator == DEFAULT_COMPOSITION.operator == "and"
    out = pipe(["a red cat", "a dog"], generator=gen(0), **KW)
    assert out.trace.meta["operator"] == "and"


def test_nested_prompt_lists_are_a_batch_of_compositions(pipe):
    batch = [["a red cat", "a dog"], ["a hat", "a cat", "a dog"]]
    out = pipe(batch, generator=[gen(1), gen(2)], operator="or", **KW)
    assert out.images.shape[0] == 2
    for i, prompts in enumerate(batch):
        alone = pipe(prompts, generator=gen(1 + i), operator="or", **KW)
        np.testing.assert_array_equal(out.images[i], alone.images[0])
    assert isinstance(out.trace, list) and [t.num_experts for t in out.trace] == [2, 3]
    same = pipe([["a red cat", "a dog"]] * 2, generator=gen(0), output_type="pil", num_inference_steps=2)
    assert len(same.images) == 2 and same.trace.batch_size == 2  # equal expert counts: one concatenated trace


def test_scheduler_swaps_are_mapped_or_refused():
    pipe = make_pipe()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    ref = reference(pipe, DDPMScheduler(**SD_SCHEDULE, clip_sample=False, steps_offset=1))
    kw = dict(num_inference_steps=4, output_type="np")
    a = ref("a red cat", generator=gen(3), **kw).images
    out = pipe("a red cat", generator=gen(3), operator="single", **kw)  # no sampler=: the DDPM swap decides
    assert out.trace.meta["integrator"] == "ddpm" and np.abs(out.images - a).max() <= 1e-4
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe("a red cat", generator=gen(3), operator="single", **kw).trace.meta["integrator"] == "euler"
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"DPMSolverMultistepScheduler.*sampler= one of sde, ddpm, ode, euler, heun"):
        pipe("a red cat", generator=gen(3), **kw)
    # an explicit sampler wins (the schedule still comes from the scheduler's config)
    assert pipe("a red cat", generator=gen(3), sampler="heun", operator="single",
                **kw).trace.meta["integrator"] == "heun"


def test_prompt_embeds_are_one_expert_per_row(pipe):
    prompts, neg = ["a red cat", "a dog"], "blurry"
    emb, neg_emb = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=[neg, neg])
    kw = dict(guidance_scale=5.0, operator="and", **KW)
    a = pipe(prompts, negative_prompt=neg, generator=gen(4), **kw)
    b = pipe(prompt_embeds=emb, negative_prompt_embeds=neg_emb, generator=gen(4), **kw)
    np.testing.assert_allclose(b.images, a.images, atol=1e-5)
    assert b.trace.expert_names == ["<prompt_embeds 0>", "<prompt_embeds 1>"]
    c = pipe(prompt_embeds=emb, generator=gen(4), guidance_scale=5.0, **KW)  # negatives: the empty prompt
    np.testing.assert_allclose(c.images, pipe(prompts, generator=gen(4), guidance_scale=5.0, **KW).images, atol=1e-5)
    with pytest.raises(ValueError, match="pooled embeddings belong to SDXL"):
        pipe(prompt_embeds=emb, pooled_prompt_embeds=emb[:, 0], **KW)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        pipe("a cat", prompt_embeds=emb, **KW)


def test_sigmas_are_diffusers_euler_sigmas(pipe):
    """sigmas= as diffusers' Euler scheduler takes them (n + 1 sigmas for n steps, ending at the
    final one): here the "trailing" grid of 5 steps, which differs from the pipeline's default."""
    trailing = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="trailing")
    trailing.set_timesteps(5)
    sigmas = trailing.sigmas.tolist()
    ref = reference(pipe, EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1))
    kw = dict(guidance_scale=7.5, output_type="np", operator="single", sampler="euler")
    a = ref("a red cat", generator=gen(0), sigmas=sigmas, guidance_scale=7.5, output_type="np").images
    out = pipe("a red cat", generator=gen(0), sigmas=sigmas, **kw)
    assert out.trace.num_steps == len(sigmas) - 1 == 5 and out.trace.sigma[-1] == 0.0
    assert np.abs(out.images - a).max() <= 1e-4
    default = pipe("a red cat", generator=gen(0), num_inference_steps=5, **kw).images
    assert np.abs(default - a).max() > 1e-3  # the sigmas were really used


def test_interrupt_from_a_callback_stops_after_that_step(pipe):
    def stop_after_two(p, step, t, kwargs):
        if step == 1:
            p._interrupt = True
        return kwargs

    out = pipe(["a red cat", "a dog"], generator=gen(0), num_inference_steps=6, output_type="np",
               callback_on_step_end=stop_after_two)
    assert pipe.interrupt and out.trace.num_steps == 2 and out.trace.logq.shape[0] == 3
    assert out.trace.meta["interrupted_after_step"] == 2 and np.isfinite(out.images).all()
    full = pipe(["a red cat", "a dog"], generator=gen(0), num_inference_steps=6, output_type="np")
    assert not pipe.interrupt and full.trace.num_steps == 6  # the flag is reset by the next call
    np.testing.assert_allclose(out.trace.kappa, full.trace.kappa[:2])  # the same first two steps


@pytest.mark.parametrize("kwargs, expected", [
    ({"eta": 0.0}, "eta is DDIM's noise level"),
    ({"guidance_rescale": 0.7}, "guidance_rescale"),
    ({"timesteps": [999, 500, 1]}, "custom DDPM timesteps are not taken"),
    ({"ip_adapter_image": object()}, "IP-Adapters are not supported"),
    ({"callback": print, "callback_steps": 1}, "use callback_on_step_end"),
    ({"prompt_2": "x"}, "each expert's prompt feeds both text encoders"),
    ({"strength": 0.5}, "unknown argument strength="),
])
def test_other_diffusers_arguments_are_refused_with_a_message(pipe, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        pipe("a red cat", **KW, **kwargs)


def test_guidance_rescale_zero_is_accepted(pipe):
    a = pipe("a red cat", generator=gen(0), guidance_rescale=0.0, operator="single", **KW)
    b = pipe("a red cat", generator=gen(0), operator="single", **KW)
    np.testing.assert_array_equal(a.images, b.images)


def test_sdxl_prompt_embeds_with_pooled():
    from superdiff.pipelines._testing import tiny_sdxl_components

    pipe = SuperDiffStableDiffusionXLPipeline(**tiny_sdxl_components(0))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a dog"]
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"),
                                                      num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                      negative_prompt=["", ""])
    kw = dict(guidance_scale=5.0, operator="or", num_inference_steps=2, output_type="np")
    a = pipe(prompts, negative_prompt="", generator=gen(0), **kw)  # "" encoded, as in encode_prompt above
    b = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
             negative_pooled_prompt_embeds=neg_pooled, generator=gen(0), **kw)
    np.testing.assert_allclose(b.images, a.images, atol=1e-5)
    with pytest.raises(ValueError, match="SDXL needs pooled_prompt_embeds"):
        pipe(prompt_embeds=emb, **kw)
