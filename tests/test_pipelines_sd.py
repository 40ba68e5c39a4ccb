"""SuperDiffStableDiffusionPipeline, offline on tiny random components built from configs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDPMScheduler, DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402

from superdiff.pipelines import (  # noqa: E402
    SuperDiffPipelineOutput,
    SuperDiffStableDiffusionPipeline,
    UNetExpert,
    render_trace,
)
from superdiff.pipelines._testing import SD_SCHEDULE, tiny_sd_components, tiny_sd_unet, tiny_unet2d  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def make_pipe(scheduler="euler", prediction_type="epsilon", seed=0):
    pipe = SuperDiffStableDiffusionPipeline(**tiny_sd_components(seed, scheduler, prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, scheduler):
    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=pipe.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


class CallCounter:
    """Counts forward calls of a module and the batch size of each."""

    def __init__(self, module):
        self.rows = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        self.rows.append(int(x.shape[0]))

    @property
    def calls(self):
        return len(self.rows)

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_with_diffusers_euler(prediction_type):
    """One prompt, operator single, deterministic Euler == diffusers' SD + EulerDiscreteScheduler."""
    pipe = make_pipe(prediction_type=prediction_type)
    sched = EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type=prediction_type, steps_offset=1)
    ref = reference(pipe, sched)
    kw = dict(num_inference_steps=5, guidance_scale=7.5, negative_prompt="blurry", output_type="np")
    a = ref("a red cat", generator=gen(0), **kw).images
    out = pipe("a red cat", generator=gen(0), operator="single", sampler="euler", **kw)
    assert out.images.shape == a.shape == (1, 16, 16, 3)
    assert np.abs(out.images - a).max() <= 1e-4
    assert out.trace.meta["integrator"] == "euler" and out.trace.kappa.shape == (5, 1, 1)


def test_stochastic_parity_with_diffusers_ddpm():
    """sampler "ddpm" on the VP schedule draws the same noise as DDPMScheduler.step (one randn of
    the latent shape per step, per-sample with a list of generators)."""
    pipe = make_pipe(scheduler="ddpm")
    ref = reference(pipe, DDPMScheduler(**SD_SCHEDULE, clip_sample=False, steps_offset=1))
    kw = dict(num_inference_steps=6, num_images_per_prompt=2, output_type="np")
    for g in (lambda: gen(3), lambda: [gen(3), gen(4)]):
        a = ref("a red cat", generator=g(), **kw).images
        out = pipe("a red cat", generator=g(), operator="single", sampler="ddpm", **kw)
        assert np.abs(out.images - a).max() <= 1e-4
        assert out.trace.meta["schedule"].startswith("VPDiscrete")
    # and a different seed gives a different image (the noise is really used)
    other = pipe("a red cat", generator=gen(5), operator="single", sampler="ddpm", **kw).images
    assert np.abs(other - a).max() > 1e-3


# ----------------------------------------------------------------------------- batching


def test_batch_of_generators_equals_separate_calls(pipe):
    kw = dict(num_inference_steps=STEPS, operator="or", output_type="np")
    prompts = ["a red cat", "a blue dog"]
    both = pipe(prompts, num_images_per_prompt=2, generator=[gen(1), gen(2)], **kw)
    one = pipe(prompts, generator=[gen(1)], **kw)
    two = pipe(prompts, generator=gen(2), **kw)
    assert np.abs(both.images[0] - one.images[0]).max() < 1e-4
    assert np.abs(both.images[1] - two.images[0]).max() < 1e-4
    np.testing.assert_allclose(both.trace.kappa[:, 1], two.trace.kappa[:, 0], atol=1e-5)


# ----------------------------------------------------------------------------- operators


@pytest.mark.parametrize("operator", ["or", "and", "average"])
@pytest.mark.parametrize("n", [2, 3])
def test_operators_n_prompts(pipe, operator, n):
    prompts = ["a red cat", "a blue dog", "green hills"][:n]
    counter = CallCounter(pipe.unet)
    try:
        out = pipe(prompts, num_inference_steps=STEPS, generator=gen(0), operator=operator, output_type="np")
    finally:
        counter.remove()
    assert isinstance(out, SuperDiffPipelineOutput)
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
    tr = out.trace
    assert tr.kappa.shape == (STEPS, 1, n) and tr.logq.shape == (STEPS + 1, 1, n)
    assert np.isfinite(tr.kappa).all() and np.isfinite(tr.logq).all()
    np.testing.assert_allclose(tr.kappa.sum(-1), 1.0, atol=1e-9)
    assert tr.expert_names == prompts
    # all n prompts + the unconditional branch: one batched forward per step
    assert counter.calls == STEPS and counter.rows == [n + 1] * STEPS
    assert tr.meta["forward_calls"] == STEPS
    if operator == "average":
        np.testing.assert_allclose(tr.kappa, 1.0 / n)


def test_forward_calls_chunked_by_max_batch_size(pipe):
    counter = CallCounter(pipe.unet)
    try:
        # 3 prompts + uncond = 4 branches x B=2 = 8 rows; chunks of 3 -> 3 calls per step
        out = pipe(["a", "b", "c"], num_images_per_prompt=2, num_inference_steps=STEPS, generator=gen(0),
                   operator="and", max_batch_size=3, output_type="latent")
    finally:
        counter.remove()
    assert counter.rows == [3, 3, 2] * STEPS
    assert out.trace.meta["forward_calls"] == 3 * STEPS
    # the same samples as unchunked (up to batched-conv rounding)
    full = pipe(["a", "b", "c"], num_images_per_prompt=2, num_inference_steps=STEPS, generator=gen(0),
                operator="and", output_type="latent")
    assert torch.allclose(out.images, full.images, atol=1e-4, rtol=1e-4)


def test_baselines_joint_prompt_and_averaging(pipe):
    kw = dict(num_inference_steps=STEPS, output_type="np")
    joint = pipe(["a cat", "a dog"], operator="joint", joint_template="{} that looks like {}", generator=gen(0), **kw)
    single = pipe("a cat that looks like a dog", operator="single", generator=gen(0), **kw)
    np.testing.assert_array_equal(joint.images, single.images)
    assert joint.trace.expert_names == ["a cat that looks like a dog"]
    joint_or = pipe(["a cat", "a dog"], operator="joint", generator=gen(0), **kw)
    assert joint_or.trace.expert_names == ["a cat and a dog"]
    avg = pipe(["a cat", "a dog"], operator="average", generator=gen(0), **kw)
    np.testing.assert_allclose(avg.trace.kappa, 0.5)
    weighted = pipe(["a cat", "a dog"], operator="average", weights=[1.0, -0.5], generator=gen(0), **kw)
    np.testing.assert_allclose(weighted.trace.kappa[..., 1], -0.5)  # NOT


def test_operator_parameters_reach_the_core(pipe):
    kw = dict(num_inference_steps=STEPS, output_type="latent")
    out = pipe(["a", "b"], operator="or", temperature=0.0, weights=[3.0, 1.0], **kw)
    np.testing.assert_allclose(out.trace.kappa, np.broadcast_to([0.75, 0.25], out.trace.kappa.shape), atol=1e-12)
    out = pipe(["a", "b"], operator="and", lift=2.0, kappa_clamp=(0.2, 0.8), **kw)
    assert out.trace.meta["operator_params"]["offsets"] == [2.0, 0.0]
    assert (out.trace.kappa >= 0.2 - 1e-9).all() and (out.trace.kappa <= 0.8 + 1e-9).all()
    out = pipe(["a", "b"], operator="and", kappa_clamp=False, estimator="ito", **kw)
    assert out.trace.meta["operator_params"]["clamp"] is None and out.trace.meta["estimator"] == "ito"
    out = pipe(["a", "b"], operator="single", operator_kwargs={"index": 1}, **kw)
    np.testing.assert_allclose(out.trace.kappa[..., 1], 1.0)
    # a custom time grid (sigmas here) reproduces the default one
    ref = pipe(["a", "b"], num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    again = pipe(["a", "b"], time_grid=ref.trace.t, num_inference_steps=99, generator=gen(0), output_type="latent")
    torch.testing.assert_close(again.images, ref.images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        pipe("a", time_grid=[1.0, 2.0])
    out = pipe(["a", "b"], operator="average", sampler="heun", **kw)  # corrector: 2 forwards, none at sigma=0
    assert out.trace.meta["forward_calls"] == 2 * STEPS - 1 and out.trace.meta["estimator"] == "none"
    out = pipe(["a", "b"], operator="or", sampler="euler", **kw)  # ODE sampler: divergence estimator
    assert out.trace.meta["estimator"] == "ode" and np.isfinite(out.trace.logq).all()


# ----------------------------------------------------------------------------- extra UNets


def test_two_unet_checkpoints_as_experts(pipe):
    """A second text-conditional UNet (a "fine-tune") and an unconditional UNet2DModel on the
    same latents: one batched forward per network per step."""
    ft = tiny_sd_unet(seed=1)
    uncond = tiny_unet2d(seed=2, channels=4, sample_size=8)
    counters = [CallCounter(m) for m in (pipe.unet, ft, uncond)]
    try:
        for operator in ("or", "and", "average"):
            out = pipe(["a red cat", "a dog"], extra_unets=[ft, uncond], num_inference_steps=STEPS,
                       generator=gen(0), operator=operator, output_type="np")
            assert out.trace.expert_names == ["a red cat", "a dog", "unet_2: a red cat", "unet_2: a dog", "unet_3"]
            assert np.isfinite(out.images).all() and np.isfinite(out.trace.logq).all()
            assert out.trace.meta["forward_calls_per_network"] == {"unet": STEPS, "unet_2": STEPS, "unet_3": STEPS}
    finally:
        for c in counters:
            c.remove()
    assert [c.calls for c in counters] == [3 * STEPS] * 3
    assert counters[0].rows[0] == 3 and counters[1].rows[0] == 3 and counters[2].rows[0] == 1
    # an explicit (unet, prompt) pair adds exactly one expert
    out = pipe("a red cat", extra_unets=[UNetExpert(ft, prompt="a dog")], num_inference_steps=STEPS,
               generator=gen(0), operator="and", output_type="latent")
    assert out.trace.expert_names == ["a red cat", "unet_2: a dog"]


def test_extra_unet_from_a_checkpoint_directory(pipe, tmp_path):
    other = make_pipe(seed=3)
    other.save_pretrained(tmp_path / "ft")
    out = pipe("a red cat", extra_unets=[str(tmp_path / "ft")], num_inference_steps=STEPS, generator=gen(0),
               operator="or", output_type="np")
    assert out.trace.expert_names == ["a red cat", "ft: a red cat"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "no prompts"),
    (dict(prompt=None), "no prompts"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "3 negative prompts for 2 prompts"),
    (dict(prompt="a", height=15), "divisible by the VAE factor 2"),
    (dict(prompt="a", operator="xor"), "unknown operator 'xor'"),
    (dict(prompt="a", sampler="rk4"), "unknown integrator 'rk4'"),
    (dict(prompt=["a", "b"], operator="or", lift=1.0), "bad parameters"),
    (dict(prompt="a", output_type="jpeg"), "unknown output_type"),
    (dict(prompt="a", num_images_per_prompt=2, generator=[torch.Generator()]), "1 generators for a batch of 2"),
    (dict(prompt=["a", "b"], operator="and", estimator="none"), "estimator 'none'"),
    (dict(prompt="a", sampler="euler", estimator="kernel"), "not valid with integrator"),
    (dict(prompt="a", callback_on_step_end_tensor_inputs=["prompt_embeds"]), "may only name"),
])
def test_errors_before_any_compute(pipe, kwargs, match):
    counters = [CallCounter(pipe.unet), CallCounter(pipe.text_encoder)]
    try:
        with pytest.raises(ValueError, match=match):
            pipe(num_inference_steps=2, **kwargs)
    finally:
        for c in counters:
            c.remove()
    assert [c.calls for c in counters] == [0, 0]


def test_smc_on_an_or_needing_log_q_u_is_refused_before_the_text_encoders(pipe):
    """("a" & "b") | "c" in product mode under classifier-free guidance: the branches' kappa
    sums (2, 1) differ, so SMC's target needs the untracked log q_u (Corrector.check with
    has_uncond). The pipeline knows the unconditional branch from guidance_scale > 1, so the
    call is refused while it is planned, with no text-encoder or UNet forward (before: only in
    sample(), after the text encoding). Without guidance there is no unconditional branch and
    the same call samples."""
    counters = [CallCounter(pipe.unet), CallCounter(pipe.text_encoder)]
    kw = dict(compose='("a" & "b") | "c"', and_mode="product", corrector="smc:2", sampler="sde",
              num_inference_steps=2, height=16, width=16, output_type="latent", generator=gen(0))
    try:
        with pytest.raises(ValueError, match=r'no tracked target for the OR \("a" & "b"\) \| "c"'):
            pipe(guidance_scale=7.5, **kw)
        assert [c.calls for c in counters] == [0, 0]
        out = pipe(guidance_scale=1.0, **kw)
    finally:
        for c in counters:
            c.remove()
    assert counters[0].calls > 0 and out.images.shape[0] == 1


def _flow_expert():
    return UNetExpert(tiny_sd_unet(1), scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                         "num_train_timesteps": 1000})


@pytest.mark.parametrize("make_extra, match", [
    (lambda: tiny_sd_unet(1, in_channels=3), "input channels"),
    (lambda: tiny_sd_unet(1, sample_size=16), "sample_size"),
    (lambda: tiny_sd_unet(1, cross_attention_dim=16), "text embeddings of width 16"),
    (_flow_expert, "rectified-flow model"),
    (lambda: UNetExpert(tiny_sd_unet(1), scheduler_config=dict(SD_SCHEDULE, beta_schedule="linear")),
     "different noise schedule"),
    (lambda: UNetExpert(tiny_sd_unet(1), vae_config={"scaling_factor": 0.13025, "latent_channels": 4}),
     "VAE scaling factor"),
    (lambda: tiny_unet2d(1, channels=4, sample_size=4), "sample_size"),
    (lambda: torch.nn.Linear(2, 2), "cannot use Linear|Linear"),
])
def test_incompatible_experts_refused(pipe, make_extra, match):
    counter = CallCounter(pipe.unet)
    try:
        with pytest.raises(ValueError, match=match):
            pipe("a", extra_unets=[make_extra()], num_inference_steps=2)
    finally:
        counter.remove()
    assert counter.calls == 0


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_is_diffusers_formula(pipe, clip_skip):
    """clip_skip on a CLIPTextModel without `.text_model` (transformers >= 5; diffusers' own
    encode_prompt raised AttributeError): the prompt embedding is hidden_states[-(clip_skip + 1)]
    through the final layer norm, the negative one the plain last hidden state, and the call
    samples with it."""
    te, tok = pipe.text_encoder, pipe.tokenizer
    ids = tok(["a red cat"], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        want = getattr(te, "text_model", te).final_layer_norm(hidden[-(clip_skip + 1)])
        emb, neg = pipe.encode_prompt("a red cat", "cpu", 2, True, clip_skip=clip_skip)
        plain, _ = pipe.encode_prompt("a red cat", "cpu", 1, False)
        neg_plain = te(tok([""], padding="max_length", max_length=tok.model_max_length,
                           return_tensors="pt").input_ids)[0]
    assert emb.shape == (2, *want.shape[1:])
    torch.testing.assert_close(emb, want.expand(2, -1, -1))
    torch.testing.assert_close(neg, neg_plain.expand(2, -1, -1))
    assert not torch.allclose(emb[:1], plain)
    kw = dict(num_inference_steps=2, generator=gen(0), operator="single", sampler="euler", output_type="latent")
    a = pipe("a red cat", clip_skip=clip_skip, **kw).images
    assert torch.isfinite(a).all() and not torch.equal(a, pipe("a red cat", **kw).images)


def _guidance_distilled_unet():
    """tiny_sd_unet with an LCM-style guidance embedding (time_cond_proj_dim)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = {k: v for k, v in tiny_sd_unet(0).config.items() if not k.startswith("_")}
    return UNet2DConditionModel(**{**config, "time_cond_proj_dim": 8}).eval()


def test_guidance_distilled_unet_refused_as_the_pipelines_own_unet():
    """An LCM-style UNet (time_cond_proj_dim set) as the pipeline's own UNet is refused before
    any compute, as it is as an extra: the composition would run CFG on it and never pass the
    timestep_cond it expects (before: a wrong image, no error)."""
    lcm = _guidance_distilled_unet()
    bad = SuperDiffStableDiffusionPipeline(**{**tiny_sd_components(0), "unet": lcm})
    bad.set_progress_bar_config(disable=True)
    counters = [CallCounter(lcm), CallCounter(bad.text_encoder)]
    try:
        for gs in (7.5, 1.0):
            with pytest.raises(ValueError, match=r"the pipeline's 'unet' is guidance-distilled \(time_cond_proj_dim"):
                bad("a red cat", guidance_scale=gs, num_inference_steps=2, output_type="latent")
        with pytest.raises(ValueError, match=r"expert network 'unet_2' is guidance-distilled"):
            make_pipe()("a red cat", extra_unets=[lcm], num_inference_steps=2, output_type="latent")
    finally:
        for c in counters:
            c.remove()
    assert [c.calls for c in counters] == [0, 0]


# ----------------------------------------------------------------------------- outputs, callbacks


def test_output_types_and_trace_png(pipe, tmp_path):
    kw = dict(num_inference_steps=2, generator=gen(0))
    pil = pipe(["a", "b"], **kw).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    pt = pipe(["a", "b"], output_type="pt", **kw).images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 16, 16)
    out = pipe(["a", "b"], output_type="latent", num_images_per_prompt=2, generator=[gen(0), gen(1)],
               num_inference_steps=2)
    assert out.images.shape == (2, 4, 8, 8)
    images, trace = pipe(["a", "b"], return_dict=False, **kw)
    assert trace.kappa.shape == (2, 1, 2)
    path = out.plot_trace(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"
    render_trace(trace, tmp_path / "t2.png")
    assert (tmp_path / "t2.png").stat().st_size > 0
    assert path is not None
    out.trace.save(tmp_path / "trace.json")  # JSON-serialisable, pipeline metadata included
    d = out.trace.to_dict()
    assert set(d) >= {"t", "sigma", "kappa", "logq", "expert_names", "meta"}


def test_callback_on_step_end_sees_kappa_and_logq_and_may_replace_latents(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, float(t), kw["kappa"].shape, kw["logq"].shape, kw["latents"].dtype))
        if i == STEPS - 1:
            return {"latents": torch.zeros_like(kw["latents"])}
        return kw

    out = pipe(["a", "b", "c"], num_inference_steps=STEPS, generator=gen(0), output_type="latent",
               callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "kappa", "logq"])
    assert [s[0] for s in seen] == list(range(STEPS))
    assert seen[0][2] == (1, 3) and seen[0][3] == (1, 3) and seen[0][4] == torch.float32
    assert seen[0][1] > seen[-1][1]  # decreasing timesteps
    assert torch.count_nonzero(out.images) == 0
    # a callback that hands the kwargs back unchanged changes nothing
    plain = pipe(["a", "b", "c"], num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    same = pipe(["a", "b", "c"], num_inference_steps=STEPS, generator=gen(0), output_type="latent",
                callback_on_step_end=lambda p, i, t, kw: kw)
    torch.testing.assert_close(plain.images, same.images, rtol=0, atol=0)


def test_bf16_networks_keep_float64_densities():
    pipe = make_pipe()
    pipe.to(torch_dtype=torch.bfloat16)
    out = pipe(["a", "b"], num_inference_steps=2, generator=gen(0), operator="and", output_type="np")
    assert np.isfinite(out.images).all()
    assert out.trace.logq.dtype == np.float64 and np.isfinite(out.trace.logq).all()


# ----------------------------------------------------------------------------- loading


def test_save_load_round_trip_and_custom_pipeline(pipe, tmp_path):
    kw = dict(prompt=["a red cat", "a dog"], num_inference_steps=STEPS, operator="and", output_type="np")
    before = pipe(generator=gen(7), **kw).images
    pipe.save_pretrained(tmp_path / "sd")
    loaded = SuperDiffStableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(loaded(generator=gen(7), **kw).images, before)
    custom = DiffusionPipeline.from_pretrained(tmp_path / "sd",
                                               custom_pipeline=str(REPO / "pipelines" / "stable_diffusion.py"),
                                               trust_remote_code=True)
    assert type(custom).__name__ == "SuperDiffStableDiffusionPipeline"
    custom.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(custom(generator=gen(7), **kw).images, before)


def test_loads_a_plain_stable_diffusion_directory(tmp_path):
    """The layout of a hub SD checkpoint (model_index.json of StableDiffusionPipeline)."""
    comp = tiny_sd_components(0)
    ref = StableDiffusionPipeline(**comp, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(tmp_path / "plain")
    pipe = SuperDiffStableDiffusionPipeline.from_pretrained(tmp_path / "plain", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    a = ref("a cat", num_inference_steps=3, generator=gen(0), output_type="np").images
    b = pipe("a cat", num_inference_steps=3, generator=gen(0), output_type="np", operator="single",
             sampler="euler").images
    assert np.abs(a - b).max() <= 1e-4


def test_model_cpu_offload_sequence(pipe):
    assert pipe.model_cpu_offload_seq == "text_encoder->unet->vae"
    p = make_pipe()
    try:
        p.enable_model_cpu_offload(device="cpu")
    except (RuntimeError, ValueError, ImportError) as e:  # accelerate without a device
        pytest.skip(f"model offload unavailable here: {e}")
    out = p(["a", "b"], num_inference_steps=2, generator=gen(0), output_type="np")
    ref = make_pipe()(["a", "b"], num_inference_steps=2, generator=gen(0), output_type="np")
    assert np.abs(out.images - ref.images).max() < 1e-5
