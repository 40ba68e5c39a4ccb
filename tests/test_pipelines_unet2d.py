"""SuperDiffUNet2DPipeline: two or more UNet2DModel checkpoints as experts, offline."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline  # noqa: E402

from superdiff.pipelines import SuperDiffUNet2DPipeline, UNetExpert  # noqa: E402
from superdiff.pipelines._testing import tiny_unet2d, tiny_vae  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SCHED = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def quiet(p):
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def unets():
    return [tiny_unet2d(seed=s) for s in (0, 1, 2)]


@pytest.fixture(scope="module")
def pipe(unets):
    return quiet(SuperDiffUNet2DPipeline.from_unets(unets[:2], DDPMScheduler(**SCHED)))


def count_rows(modules):
    rows = {id(m): [] for m in modules}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: rows[id(mod)].append(a[0].shape[0]), with_kwargs=True)
             for m in modules]
    return rows, hooks


@pytest.mark.parametrize("clip_sample", [False, True])
def test_stochastic_parity_with_diffusers_ddpm_pipeline(unets, clip_sample):
    """One UNet, operator single, sampler ddpm == diffusers' DDPMPipeline (same noise draws),
    including the scheduler's x0 clipping when its config asks for it."""
    sched = DDPMScheduler(**dict(SCHED, clip_sample=clip_sample, clip_sample_range=0.5))
    ref = quiet(DDPMPipeline(unet=unets[0], scheduler=sched))
    a = ref(batch_size=2, generator=gen(0), num_inference_steps=8, output_type="np").images
    pipe = quiet(SuperDiffUNet2DPipeline.from_unets(unets[:1], sched))
    out = pipe(batch_size=2, generator=gen(0), num_inference_steps=8, output_type="np", operator="single",
               sampler="ddpm")
    assert out.images.shape == a.shape == (2, 8, 8, 3)
    assert np.abs(out.images - a).max() <= 1e-4


@pytest.mark.parametrize("operator", ["or", "and", "average"])
def test_two_checkpoints_one_forward_per_network_per_step(pipe, unets, operator):
    rows, hooks = count_rows(unets[:2])
    try:
        out = pipe(batch_size=2, generator=[gen(0), gen(1)], num_inference_steps=STEPS, operator=operator,
                   output_type="np")
    finally:
        for h in hooks:
            h.remove()
    assert rows[id(unets[0])] == [2] * STEPS and rows[id(unets[1])] == [2] * STEPS
    assert out.images.shape == (2, 8, 8, 3) and np.isfinite(out.images).all()
    assert out.trace.expert_names == ["unet", "unet_2"]
    assert out.trace.kappa.shape == (STEPS, 2, 2) and np.isfinite(out.trace.logq).all()
    np.testing.assert_allclose(out.trace.kappa.sum(-1), 1.0, atol=1e-9)


@pytest.mark.parametrize("operator", ["or", "and", "average"])
def test_three_checkpoints_via_extra_unets(pipe, unets, operator):
    out = pipe(batch_size=1, generator=gen(0), num_inference_steps=STEPS, operator=operator, output_type="np",
               extra_unets=[unets[2]])
    assert out.trace.expert_names == ["unet", "unet_2", "unet_3"]
    assert out.trace.meta["forward_calls_per_network"] == {"unet": STEPS, "unet_2": STEPS, "unet_3": STEPS}
    assert np.isfinite(out.trace.kappa).all()


def test_batch_consistency(pipe):
    kw = dict(num_inference_steps=STEPS, operator="or", output_type="np")
    both = pipe(batch_size=2, generator=[gen(3), gen(4)], **kw).images
    one = pipe(batch_size=1, generator=gen(4), **kw).images
    assert np.abs(both[1] - one[0]).max() < 1e-4


def test_shared_vae_latent_space():
    vae = tiny_vae(0)
    pipe = quiet(SuperDiffUNet2DPipeline.from_unets([tiny_unet2d(0, channels=4), tiny_unet2d(1, channels=4)],
                                                    DDPMScheduler(**SCHED), vae=vae))
    out = pipe(batch_size=1, generator=gen(0), num_inference_steps=STEPS, operator="and", output_type="np")
    assert out.images.shape == (1, 16, 16, 3)  # 8x8x4 latents, VAE factor 2
    lat = pipe(batch_size=1, generator=gen(0), num_inference_steps=STEPS, operator="and", output_type="latent")
    assert lat.images.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="divisible by the VAE factor 2"):
        pipe(height=15, num_inference_steps=2)


def test_class_conditional_with_guidance():
    unets = [tiny_unet2d(s, num_class_embeds=5) for s in (0, 1)]
    pipe = quiet(SuperDiffUNet2DPipeline.from_unets(unets, DDPMScheduler(**SCHED)))
    rows, hooks = count_rows(unets)
    try:
        out = pipe(class_labels=[1, 2], guidance_scale=3.0, null_class_label=4, num_inference_steps=STEPS,
                   generator=gen(0), operator="or", output_type="np")
    finally:
        for h in hooks:
            h.remove()
    assert out.trace.expert_names == ["unet: class 1", "unet: class 2", "unet_2: class 1", "unet_2: class 2"]
    assert rows[id(unets[0])] == [3] * STEPS  # two labels + the null class, one forward
    with pytest.raises(ValueError, match="class_labels"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="null_class_label"):
        pipe(class_labels=[1], guidance_scale=2.0, num_inference_steps=2)


def test_labels_and_batch_size_that_would_be_ignored_or_crash_are_refused(pipe, unets):
    """Before any forward: class_labels / null_class_label / UNetExpert(class_label=...) on
    unconditional UNets (before: silently ignored), labels outside num_class_embeds (before: a
    bare IndexError in the UNet's embedding), and batch_size with a different
    num_images_per_prompt (before: one of them silently won)."""
    cond = tiny_unet2d(0, num_class_embeds=5)
    cpipe = quiet(SuperDiffUNet2DPipeline.from_unets([cond], DDPMScheduler(**SCHED)))
    rows, hooks = count_rows([*unets, cond])
    kw = dict(num_inference_steps=2, output_type="np")
    try:
        with pytest.raises(ValueError, match="class_labels given, but none of the UNets is class-conditional"):
            pipe(class_labels=[3, 7], **kw)
        with pytest.raises(ValueError, match="class_labels and null_class_label given, but none"):
            pipe(class_labels=[3], null_class_label=0, guidance_scale=3.0, **kw)
        with pytest.raises(ValueError, match="null_class_label given, but none"):
            pipe(null_class_label=0, **kw)
        with pytest.raises(ValueError, match="extra UNet 'unet_3' is unconditional .* class_label=2"):
            pipe(extra_unets=[UNetExpert(unets[2], class_label=2)], **kw)
        with pytest.raises(ValueError, match=r"class label 12 is outside unet's classes 0\.\.4"):
            cpipe(class_labels=[1, 12], **kw)
        with pytest.raises(ValueError, match=r"class label -1 is outside"):
            cpipe(class_labels=-1, **kw)
        with pytest.raises(ValueError, match=r"null_class_label=5 is outside unet's classes 0\.\.4"):
            cpipe(class_labels=[3], null_class_label=5, guidance_scale=2.0, **kw)
        with pytest.raises(ValueError, match=r"class label 9 is outside unet_2's classes"):
            cpipe(extra_unets=[UNetExpert(tiny_unet2d(1, num_class_embeds=5), class_label=9)], class_labels=[1],
                  **kw)
        with pytest.raises(ValueError, match="batch_size=3 and num_images_per_prompt=2 .* give one of them"):
            pipe(batch_size=3, num_images_per_prompt=2, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert all(r == [] for r in rows.values())
    # either one alone, or both equal, sets the batch
    for given in (dict(batch_size=2), dict(num_images_per_prompt=2), dict(batch_size=2, num_images_per_prompt=2)):
        assert pipe(**given, generator=gen(0), **kw).images.shape[0] == 2
    assert pipe(generator=gen(0), **kw).images.shape[0] == 1


def _save_checkpoint(path, unet, sched_kw=SCHED, vae=None):
    unet.save_pretrained(path / "unet")
    DDPMScheduler(**sched_kw).save_pretrained(path / "scheduler")
    if vae is not None:
        vae.save_pretrained(path / "vae")
    return str(path)


def test_from_checkpoints_and_round_trip(tmp_path, unets):
    a = _save_checkpoint(tmp_path / "a", unets[0])
    b = _save_checkpoint(tmp_path / "b", unets[1])
    pipe = quiet(SuperDiffUNet2DPipeline.from_checkpoints([a, b]))
    kw = dict(batch_size=1, num_inference_steps=STEPS, operator="or", output_type="np")
    before = pipe(generator=gen(5), **kw).images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = quiet(SuperDiffUNet2DPipeline.from_pretrained(tmp_path / "pipe"))
    assert loaded.unet_2 is not None and loaded.unet_3 is None
    np.testing.assert_array_equal(loaded(generator=gen(5), **kw).images, before)
    custom = quiet(DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True,
                                                     custom_pipeline=str(REPO / "pipelines" / "unet2d.py")))
    assert type(custom).__name__ == "SuperDiffUNet2DPipeline"
    np.testing.assert_array_equal(custom(generator=gen(5), **kw).images, before)


def test_incompatible_checkpoints_refused(tmp_path, unets):
    a = _save_checkpoint(tmp_path / "a", unets[0])
    with pytest.raises(ValueError, match="different noise schedule"):
        SuperDiffUNet2DPipeline.from_checkpoints(
            [a, _save_checkpoint(tmp_path / "b", unets[1], dict(SCHED, beta_schedule="squaredcos_cap_v2"))])
    with pytest.raises(ValueError, match="sample_size"):
        SuperDiffUNet2DPipeline.from_checkpoints([a, _save_checkpoint(tmp_path / "c", tiny_unet2d(1, sample_size=16))])
    with pytest.raises(ValueError, match="input channels"):
        SuperDiffUNet2DPipeline.from_checkpoints([a, _save_checkpoint(tmp_path / "d", tiny_unet2d(1, channels=4))])
    va = _save_checkpoint(tmp_path / "va", tiny_unet2d(0, channels=4), vae=tiny_vae(0))
    vb = _save_checkpoint(tmp_path / "vb", tiny_unet2d(1, channels=4), vae=tiny_vae(0, scaling_factor=0.5))
    with pytest.raises(ValueError, match="VAE scaling factor"):
        SuperDiffUNet2DPipeline.from_checkpoints([va, vb])
    pipe = quiet(SuperDiffUNet2DPipeline.from_unets(unets[:2], DDPMScheduler(**SCHED)))
    rows, hooks = count_rows(unets[:2])
    try:
        flow = UNetExpert(unets[2], scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler"})
        with pytest.raises(ValueError, match="rectified-flow model"):
            pipe(extra_unets=[flow], num_inference_steps=2)
        with pytest.raises(ValueError, match="unknown operator"):
            pipe(operator="nand", num_inference_steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert all(not r for r in rows.values())


def test_v_prediction_and_epsilon_experts_mix(unets):
    """Prediction types are converted to a common kind: an x0- and an eps-predicting expert."""
    pipe = quiet(SuperDiffUNet2DPipeline.from_unets(unets[:2], DDPMScheduler(**SCHED),
                                                    prediction_types=["epsilon", "sample"]))
    out = pipe(num_inference_steps=STEPS, generator=gen(0), operator="and", output_type="np")
    assert np.isfinite(out.images).all()
    assert pipe.config.prediction_types == ["epsilon", "sample"]
