"""diffusers' calling habits on the SuperDiff pipelines (issue 14; pipelines/_conventions.py),
offline on the tiny SD components: one default operator everywhere, batches of compositions
as nested prompt lists, `pipe.scheduler` swaps mapped or refused, prompt_embeds, sigmas,
`pipe._interrupt`, and diffusers' other arguments refused with a message (not a TypeError)."""

from __future__ import annotations

import inspect
import re

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


def test_negative_prompts_of_a_batch_of_compositions_that_do_not_fit_say_how(pipe):
    """diffusers' habit of one negative prompt per batch entry, as a flat list next to nested
    prompt lists, is refused naming the list-of-lists form (before: "got 2 negative prompts for
    1 prompts", as if one prompt had been given), before any compute."""
    with pytest.raises(ValueError, match=r"one negative prompt per composition give a list of lists, e\.g\. "
                                         r"\[\['blurry'\], \['dark'\]\]"):
        pipe([["a red cat"], ["a dog"]], negative_prompt=["blurry", "dark"], **KW)
    with pytest.raises(ValueError, match="3 lists for 2 prompt lists; give one list per composition"):
        pipe([["a red cat"], ["a dog"]], negative_prompt=[["x"], ["y"], ["z"]], **KW)
    # a flat list that fits every composition is one negative prompt per prompt, as before
    out = pipe([["a red cat", "a dog"], ["a hat", "a cat"]], negative_prompt=["blurry", "dark"], generator=gen(0),
               **KW)
    assert out.images.shape[0] == 2
    with pytest.raises(ValueError, match=r"latents: give a torch\.Tensor of 2 rows .* got ndarray"):
        pipe([["a red cat"], ["a dog"]], latents=np.zeros((2, 4, 8, 8), dtype=np.float32), **KW)


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
    with pytest.raises(ValueError, match="a compose formula names its own prompts as text"):
        pipe(prompt_embeds=emb, compose='"a red cat" | "a dog"', **KW)


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


@pytest.mark.parametrize("sampler,scheduler", [("euler", EulerDiscreteScheduler), ("ddpm", DDPMScheduler)])
def test_timesteps_are_diffusers_custom_timesteps(pipe, sampler, scheduler):
    """timesteps= as diffusers' pipelines take them (one training timestep per step, e.g. Align
    Your Steps' schedule): Euler's sigmas interpolated at them and the network fed them, DDPM's
    steps between them; the same images as diffusers' own pipeline with the same timesteps."""
    ays = [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]
    ref = reference(pipe, scheduler(**SD_SCHEDULE, steps_offset=1))
    a = ref("a red cat", generator=gen(0), timesteps=ays, guidance_scale=7.5, output_type="np").images
    out = pipe("a red cat", generator=gen(0), timesteps=ays, guidance_scale=7.5, output_type="np",
               operator="single", sampler=sampler)
    assert out.trace.num_steps == len(ays)
    assert np.abs(out.images - a).max() <= 1e-4
    default = pipe("a red cat", generator=gen(0), num_inference_steps=len(ays), guidance_scale=7.5,
                   output_type="np", operator="single", sampler=sampler).images
    assert np.abs(default - a).max() > 1e-3  # the timesteps were really used


def test_timesteps_are_refused_with_karras_sigmas_and_on_flow_pipelines():
    from superdiff.pipelines._testing import tiny_sd3_components

    karras = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, use_karras_sigmas=True)
    pipe = SuperDiffStableDiffusionPipeline(**{**tiny_sd_components(0), "scheduler": karras})
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"timesteps= cannot be combined with Karras sigmas"):
        pipe("a red cat", timesteps=[999, 500], operator="single", output_type="np")
    sd3 = SuperDiffStableDiffusion3Pipeline(**tiny_sd3_components(0))
    with pytest.raises(ValueError, match=r"timesteps= is not taken by the flow pipelines; give sigmas="):
        sd3("a red cat", timesteps=[999, 500], height=16, width=16, output_type="latent")


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


def test_interrupt_in_a_batch_of_compositions_stops_every_composition_at_that_step(pipe):
    """diffusers stops its whole batch at the step a callback sets `_interrupt`; a batch of
    compositions (nested prompt lists) runs them one after the other, so the later ones stop after
    the same number of steps (before: the flag still set made them stop after their first step,
    and joining the traces of different lengths failed with a ValueError after all the compute)."""
    def stop_after_two(p, step, t, kwargs):
        if step == 1:
            p._interrupt = True
        return kwargs

    ref = reference(pipe, EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1))
    kw = dict(num_inference_steps=4, output_type="np")
    a = ref(["a red cat", "a dog"], generator=[gen(0), gen(1)], callback_on_step_end=stop_after_two, **kw).images
    out = pipe([["a red cat"], ["a dog"]], generator=[gen(0), gen(1)], operator="single", sampler="euler",
               callback_on_step_end=stop_after_two, **kw)
    assert np.abs(out.images - a).max() <= 1e-4
    assert out.trace.num_steps == 2 and pipe.interrupt
    # an interrupt the callback sets only once (e.g. a cancel button) stops the later compositions too
    calls = []

    def once(p, step, t, kwargs):
        calls.append(step)
        if len(calls) == 2:
            p._interrupt = True
        return kwargs

    out = pipe([["a red cat"], ["a dog"], ["a hat"]], generator=gen(0), callback_on_step_end=once, **kw)
    assert out.images.shape[0] == 3 and out.trace.num_steps == 2 and calls == [0, 1, 0, 1, 0, 1]
    full = pipe([["a red cat"], ["a dog"]], generator=gen(0), **kw)
    assert not pipe.interrupt and full.trace.num_steps == 4  # reset by the next call


@pytest.mark.parametrize("kwargs, expected", [
    ({"eta": 0.0}, "eta is DDIM's noise level"),
    ({"guidance_rescale": 0.7}, "guidance_rescale"),
    ({"timesteps": [999, 500, 1], "sigmas": [10.0, 1.0, 0.0]}, "give one of timesteps=, sigmas= and time_grid="),
    ({"timesteps": [999, 500, 1], "time_grid": [10.0, 1.0, 0.0]}, "give one of timesteps=, sigmas= and time_grid="),
    ({"timesteps": [500, 999]}, "strictly decreasing list of training timesteps in \\[0, 999\\]"),
    ({"timesteps": [999, 500, 0], "grid_end": "min"}, "the last one \\(0\\) is already the end point"),
    ({"ip_adapter_image": object()}, "IP-Adapters are not supported"),
    ({"callback": print, "callback_steps": 1}, "use callback_on_step_end"),
    ({"prompt_2": "x"}, "each expert's prompt feeds every text encoder"),
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


def _sdxl_pipe():
    from superdiff.pipelines._testing import tiny_sdxl_components

    pipe = SuperDiffStableDiffusionXLPipeline(**tiny_sdxl_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _forward_counter(*modules):
    """(list that grows by one per forward of any of `modules`, hook handles)."""
    calls: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in modules if m is not None]
    return calls, hooks


def test_prompt_embeds_with_a_negative_prompt_text_encode_it(pipe):
    """As diffusers: without negative_prompt_embeds, negative_prompt is encoded (one for all or one per row)."""
    prompts = ["a red cat", "a dog"]
    emb, _ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
    kw = dict(guidance_scale=5.0, operator="and", **KW)
    for neg in ("blurry", ["blurry", "a hat"]):
        a = pipe(prompts, negative_prompt=neg, generator=gen(4), **kw).images
        b = pipe(prompt_embeds=emb, negative_prompt=neg, generator=gen(4), **kw).images
        np.testing.assert_allclose(b, a, atol=1e-5)
    plain = pipe(prompt_embeds=emb, generator=gen(4), **kw).images
    assert np.abs(plain - b).max() > 1e-3  # the negative prompt was really used

    xl = _sdxl_pipe()
    emb, _, pooled, _ = xl.encode_prompt(prompt=prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
    kw = dict(guidance_scale=5.0, operator="or", num_inference_steps=2, output_type="np")
    a = xl(prompts, negative_prompt="blurry", generator=gen(0), **kw).images
    b = xl(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt="blurry", generator=gen(0), **kw).images
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_sdxl_negative_embeds_need_their_pooled_embeds_before_any_compute():
    xl = _sdxl_pipe()
    emb, neg, pooled, neg_pooled = xl.encode_prompt(prompt=["a red cat", "a dog"], device=torch.device("cpu"),
                                                    num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                    negative_prompt=["blurry", "blurry"])
    kw = dict(guidance_scale=5.0, num_inference_steps=2, output_type="np")
    calls, hooks = _forward_counter(xl.text_encoder, xl.text_encoder_2, xl.unet)
    try:
        with pytest.raises(ValueError, match=r"negative_prompt_embeds= needs negative_pooled_prompt_embeds= too"):
            xl(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg, **kw)
        with pytest.raises(ValueError, match=r"negative_pooled_prompt_embeds= needs negative_prompt_embeds= too"):
            xl(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled, **kw)
        with pytest.raises(ValueError, match=r"SDXL needs pooled_prompt_embeds="):
            xl(prompt_embeds=emb, negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled, **kw)
        with pytest.raises(ValueError, match=r"negative_pooled_prompt_embeds: expected \[2, "):
            xl(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
               negative_pooled_prompt_embeds=neg_pooled[:1], **kw)
    finally:
        for h in hooks:
            h.remove()
    assert not calls


def _deep_unet2d(seed=0, channels=3, levels=2):
    """A UNet2DModel with `levels` down-sampling levels (latents must be multiples of 2**levels)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    n = levels + 1
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8,) * n,
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * n,
                       up_block_types=("UpBlock2D",) * n).eval()


def test_unet2d_sizes_its_unets_cannot_take_are_refused_before_any_compute():
    from superdiff.pipelines._testing import tiny_unet2d, tiny_vae

    sched = DDPMScheduler(num_train_timesteps=1000)
    deep = _deep_unet2d(0)
    pixel = SuperDiffUNet2DPipeline.from_unets([deep, _deep_unet2d(1)], sched)
    latent = SuperDiffUNet2DPipeline.from_unets([_deep_unet2d(0, 4), _deep_unet2d(1, 4)], sched, vae=tiny_vae(0))
    shallow = SuperDiffUNet2DPipeline.from_unets([tiny_unet2d(0), tiny_unet2d(1)], sched)
    for p in (pixel, latent, shallow):
        p.set_progress_bar_config(disable=True)
    calls, hooks = _forward_counter(deep, *[u for _, u in latent.unets])
    kw = dict(num_inference_steps=2, output_type="np")
    try:
        with pytest.raises(ValueError, match=r"multiples of 4 for unet .*2\*\*2 .*got 10x8, e.g. use 12x8"):
            pixel(height=10, width=8, **kw)  # 10 px: not a multiple of 2**2
        with pytest.raises(ValueError, match=r"multiples of 8 for unet .*VAE factor 2 times 2\*\*2"):
            latent(height=12, width=16, **kw)  # a multiple of the VAE factor, but 6x8 latents
        with pytest.raises(ValueError, match=r"multiples of 4 for unet_3"):  # an extra UNet deeper than the pipe's
            shallow(height=6, width=8, extra_unets=[deep], **kw)
    finally:
        for h in hooks:
            h.remove()
    assert not calls
    assert pixel(height=12, width=8, **kw).images.shape == (1, 12, 8, 3)
    assert latent(height=16, width=8, **kw).images.shape == (1, 16, 8, 3)
    assert shallow(height=6, width=8, **kw).images.shape == (1, 6, 8, 3)  # one level: multiples of 2


def test_sd_unet2dcondition_takes_any_multiple_of_the_vae_factor(pipe):
    # UNet2DConditionModel pads (forward_upsample_size): no UNet-level restriction
    assert pipe("a red cat", height=18, width=14, generator=gen(0), **KW).images.shape == (1, 18, 14, 3)


def test_callbacks_read_diffusers_call_state(pipe):
    """num_timesteps, guidance_scale, do_classifier_free_guidance during a call, as diffusers' pipelines."""
    from diffusers.callbacks import PipelineCallback

    seen = []

    def halfway_zero(p, i, t, kwargs):  # diffusers' callback docs' idiom
        seen.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance))
        if i == int(p.num_timesteps * 0.5):
            kwargs["latents"] = kwargs["latents"] * 0.0
        return kwargs

    class Cutoff(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            cutoff = self.config.cutoff_step_index or int(pipeline.num_timesteps * self.config.cutoff_step_ratio)
            if step_index == cutoff:
                callback_kwargs["latents"] = callback_kwargs["latents"] * 0.0
            return callback_kwargs

    out = pipe(["a red cat", "a dog"], guidance_scale=5.0, generator=gen(0), num_inference_steps=4,
               output_type="latent", callback_on_step_end=halfway_zero)
    assert seen == [(4, 5.0, True)] * 4
    by_ratio = pipe(["a red cat", "a dog"], guidance_scale=5.0, generator=gen(0), num_inference_steps=4,
                    output_type="latent", callback_on_step_end=Cutoff(cutoff_step_ratio=0.5))
    by_index = pipe(["a red cat", "a dog"], guidance_scale=5.0, generator=gen(0), num_inference_steps=4,
                    output_type="latent", callback_on_step_end=Cutoff(cutoff_step_ratio=None, cutoff_step_index=2))
    torch.testing.assert_close(by_ratio.images, out.images)
    torch.testing.assert_close(by_index.images, out.images)
    assert pipe.num_timesteps == 4  # readable after the call, as in diffusers
    seen.clear()
    pipe("a red cat", guidance_scale=1.0, sigmas=[10.0, 4.0, 1.0, 0.0], callback_on_step_end=halfway_zero, **KW)
    assert seen == [(3, 1.0, False)] * 3  # the steps of the sigmas, no unconditional branch


def test_call_state_in_every_family():
    from superdiff.pipelines._testing import tiny_flux_components, tiny_sd3_components, tiny_unet2d

    def state(p, *args, **kw):
        seen = []
        p.set_progress_bar_config(disable=True)
        p(*args, num_inference_steps=2, output_type="np", max_batch_size=None,
          callback_on_step_end=lambda q, i, t, k: seen.append((q.num_timesteps, q.guidance_scale,
                                                               q.do_classifier_free_guidance)) or k, **kw)
        return seen[0]

    assert state(_sdxl_pipe(), "a cat", guidance_scale=5.0) == (2, 5.0, True)
    assert state(SuperDiffStableDiffusion3Pipeline(**tiny_sd3_components(0)), "a cat") == (2, 7.0, True)
    flux = dict(height=16, width=16, max_sequence_length=16)
    assert state(SuperDiffFluxPipeline(**tiny_flux_components(0, True)), "a cat", **flux) == (2, 3.5, False)
    assert state(SuperDiffFluxPipeline(**tiny_flux_components(0, False)), "a cat", true_cfg_scale=3.0,
                 **flux) == (2, 3.0, True)
    u = SuperDiffUNet2DPipeline.from_unets([tiny_unet2d(0, num_class_embeds=3)], DDPMScheduler())
    assert state(u, class_labels=[1], guidance_scale=2.0, null_class_label=2) == (2, 2.0, True)
    assert state(u, class_labels=[1]) == (2, 1.0, False)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_wrong_shape_latents_are_refused_before_text_encoding(family):
    from superdiff.pipelines._testing import tiny_flux_components, tiny_sd3_components

    if family == "sd":
        p, bad, want, kw = make_pipe(), torch.zeros(2, 4, 8, 8), r"\(1, 4, 8, 8\)", {}
    elif family == "sdxl":
        p, bad, want, kw = _sdxl_pipe(), torch.zeros(2, 4, 8, 8), r"\(1, 4, 8, 8\)", {}
    elif family == "sd3":
        p = SuperDiffStableDiffusion3Pipeline(**tiny_sd3_components(0))
        bad, want, kw = torch.zeros(2, 4, 8, 8), r"\(1, 4, 8, 8\)", {}
    else:
        p = SuperDiffFluxPipeline(**tiny_flux_components(0))
        bad, want, kw = torch.zeros(2, 16, 16), r"\(1, 16, 16\)", dict(height=16, width=16, max_sequence_length=16)
    calls, hooks = _forward_counter(*[getattr(p, k, None) for k in ("text_encoder", "text_encoder_2",
                                                                    "text_encoder_3")])
    try:
        with pytest.raises(ValueError, match=rf"`latents` has shape {tuple(bad.shape)}".replace("(", r"\(")
                           .replace(")", r"\)") + rf".*batch of 1 \(num_images_per_prompt\) take {want}"):
            p(["a red cat", "a dog"], latents=bad, num_inference_steps=2, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert not calls
    if family == "sd":  # the fix the message names: num_images_per_prompt to match the latents' rows
        p.set_progress_bar_config(disable=True)
        assert p(["a red cat", "a dog"], latents=bad, num_images_per_prompt=2, **KW).images.shape[0] == 2


@pytest.mark.parametrize("kwargs, expected", [
    ({"generator": 5}, "`generator` must be a torch.Generator or a list of them, got int"),
    ({"generator": [torch.Generator(), "seed"]}, "got str"),
    ({"callback_on_step_end": 5}, "`callback_on_step_end` must be callable"),
])
def test_bad_generator_or_callback_types_are_refused_before_text_encoding(pipe, kwargs, expected):
    calls, hooks = _forward_counter(pipe.text_encoder, pipe.unet)
    try:
        with pytest.raises(ValueError, match=expected):
            pipe(["a red cat", "a dog"], num_images_per_prompt=2, **KW, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_compose_takes_no_operator_weights_or_stray_and_mode(pipe):
    """compose= is the operator: another operator (a Corrected one's corrector included) would be
    lost, weights belong on the formula's terms, and and_mode only means something for a formula."""
    from superdiff.correctors import Corrected

    for op in ("or", Corrected("average", "smc:2")):
        with pytest.raises(ValueError, match="give either `operator`"):
            pipe(compose='"a red cat" & "a dog"', operator=op, **KW)
    with pytest.raises(ValueError, match="a compose formula carries its own weights"):
        pipe(compose='"a red cat" | "a dog"', weights=[0.3, 0.7], **KW)
    with pytest.raises(ValueError, match="and_mode='product' applies to a compose= formula"):
        pipe(["a red cat", "a dog"], and_mode="product", **KW)


def test_scheduler_options_the_schedules_do_not_follow_are_refused_and_clip_sample_reset_as_diffusers():
    """A scheduler option that changes the grid or the step (DDPM's fixed_large variance, dynamic
    thresholding, Euler's final sigma_min, log-linear interpolation, a custom sigma range) is
    refused, not silently sampled without; clip_sample=True is reset at construction as
    diffusers' StableDiffusionPipeline resets it, and the DDPM image then matches diffusers'."""
    comps = tiny_sd_components(0)
    cases = [(DDPMScheduler, dict(variance_type="fixed_large"), "variance_type='fixed_large'"),
             (DDPMScheduler, dict(thresholding=True), "dynamic thresholding"),
             (EulerDiscreteScheduler, dict(final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
             (EulerDiscreteScheduler, dict(interpolation_type="log_linear"), "interpolation_type='log_linear'"),
             (EulerDiscreteScheduler, dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), "sigma_min=0.1")]
    for cls, extra, msg in cases:
        pipe = SuperDiffStableDiffusionPipeline(**{**comps, "scheduler": cls(**SD_SCHEDULE, steps_offset=1, **extra)})
        pipe.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match=re.escape(msg)):
            pipe("a red cat", operator="single", **KW)
    pipe = SuperDiffStableDiffusionPipeline(**{**comps, "scheduler": DDPMScheduler(**SD_SCHEDULE, clip_sample=True)})
    pipe.set_progress_bar_config(disable=True)
    ref = reference(pipe, DDPMScheduler(**SD_SCHEDULE, clip_sample=True))
    assert pipe.scheduler.config.clip_sample is False and ref.scheduler.config.clip_sample is False
    kw = dict(num_inference_steps=4, output_type="latent")
    a = ref("a red cat", generator=gen(3), **kw).images
    b = pipe("a red cat", generator=gen(3), operator="single", sampler="ddpm", **kw).images
    assert (b - a).abs().max() <= 1e-4


def test_sd3_custom_sigmas_below_one_start_from_unit_noise_as_diffusers():
    from diffusers import StableDiffusion3Pipeline

    from superdiff.pipelines._testing import tiny_sd3_components

    comps = tiny_sd3_components(0, t5=False)
    ours = SuperDiffStableDiffusion3Pipeline(**comps)
    ref = StableDiffusion3Pipeline(**comps)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    kw = dict(height=16, width=16, max_sequence_length=16, output_type="latent", sigmas=[0.9, 0.5, 0.1],
              num_inference_steps=3, guidance_scale=1.0)
    a = ref("a red cat", generator=gen(0), **kw).images
    b = ours("a red cat", generator=gen(0), operator="single", sampler="euler", **kw).images
    assert (b - a).abs().max() <= 1e-4
