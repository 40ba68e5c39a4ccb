"""The shipped models: registry lookups, the stock diffusers loaders, a quick quality check."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from superdiff import registry
from superdiff.shapes import oracle, world
from superdiff.shapes.reference import load_unconditional, sample_unconditional

NAMES = ("shapes-t2i", "shapes-half-a", "shapes-half-b")


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(registry.bundled_model_path("shapes-t2i"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_registry_lists_and_resolves_bundled_models():
    names = registry.list_bundled_models()
    assert set(NAMES) <= set(names)
    for name in NAMES:
        path = registry.bundled_model_path(name)
        assert path.is_dir() and path.name == name and (path / "README.md").is_file()
        assert registry.resolve(name) == str(path)
    assert (registry.bundled_model_path("shapes-t2i") / "model_index.json").is_file()
    assert registry.bundled_model_info("shapes-half-b")["shapes"] == list(world.SHAPE_HALVES["b"])
    assert registry.resolve("some-org/some-model") == "some-org/some-model"


def test_registry_unknown_name_lists_available_models():
    with pytest.raises(ValueError) as err:
        registry.bundled_model_path("shapes-t2j")
    msg = str(err.value)
    assert "shapes-t2j" in msg and all(n in msg for n in NAMES)
    with pytest.raises(TypeError):
        registry.bundled_model_path(None)


def test_shipped_weights_are_small_and_real():
    files = list(registry.BUNDLED_ROOT.rglob("*.safetensors"))
    assert len(files) >= 3 + 2 * 2
    # Identical files (the shared VAE copied into each model directory) are one git blob:
    # count each distinct content once.
    distinct = {hashlib.sha1(f.read_bytes()).hexdigest(): f.stat().st_size for f in files}
    assert sum(distinct.values()) <= 40 * 1024 * 1024
    for f in files:
        assert not f.read_bytes()[:40].startswith(b"version https://git-lfs")


def test_stable_diffusion_pipeline_loads_and_generates(sd_pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(sd_pipe.unet, UNet2DConditionModel) and isinstance(sd_pipe.vae, AutoencoderKL)
    assert isinstance(sd_pipe.text_encoder, CLIPTextModel) and isinstance(sd_pipe.tokenizer, CLIPTokenizer)
    assert sd_pipe.safety_checker is None and sd_pipe.unet.dtype == torch.float32
    tok_dir = registry.bundled_model_path("shapes-t2i") / "tokenizer"
    assert (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()

    def gen(seed):
        g = torch.Generator().manual_seed(seed)
        return sd_pipe(["a blue circle", "a square"], num_inference_steps=3, guidance_scale=3.0, generator=g, output_type="np").images

    a, b = gen(0), gen(0)
    assert a.shape == (2, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_text_to_image_follows_full_captions(sd_pipe):
    """A small-sample regression check of the >= 90% bar measured in the model card."""
    prompts = ["a blue circle", "a yellow square", "a red triangle", "a green cross"]
    g = torch.Generator().manual_seed(1)
    out = sd_pipe(prompts, num_images_per_prompt=6, num_inference_steps=12, guidance_scale=4.0, generator=g, output_type="np").images
    res = oracle.classify(out)
    labels = [world.parse_caption(p) for p in prompts for _ in range(6)]
    ok = [res.matches(c, s)[i] for i, (c, s) in enumerate(labels)]
    assert np.mean(ok) >= 0.75, (np.mean(ok), res.shape, res.colour)


@pytest.mark.parametrize("half", ["a", "b"])
def test_half_models_load_with_unet2dmodel_and_stay_in_their_half(half):
    from diffusers import UNet2DModel

    path = registry.bundled_model_path(f"shapes-half-{half}")
    unet = UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    assert isinstance(unet, UNet2DModel) and unet.config.in_channels == 4
    unet, vae, sched = load_unconditional(path)
    imgs = sample_unconditional(unet, vae, sched, 24, num_inference_steps=12, generator=torch.Generator().manual_seed(2))
    assert imgs.shape == (24, 3, 32, 32)
    res = oracle.classify(imgs)
    own = set(world.SHAPE_HALVES[half])
    assert np.mean([s in own for s in res.shape]) >= 0.8, res.shape


def test_half_models_share_the_text_to_image_latent_space():
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(registry.bundled_model_path("shapes-t2i"), subfolder="vae").state_dict()
    for half in ("a", "b"):
        sd = AutoencoderKL.from_pretrained(registry.bundled_model_path(f"shapes-half-{half}"), subfolder="vae").state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_model_cards_record_the_quality_bars():
    q = json.loads((registry.bundled_model_path("shapes-t2i") / "quality.json").read_text())
    assert q["full_caption"]["samples"] >= 256 and q["full_caption"]["joint"] >= 0.90
    assert q["held_out"]["samples"] >= 256 and 0.0 <= q["held_out"]["joint"] <= 1.0
    card = (registry.bundled_model_path("shapes-t2i") / "README.md").read_text()
    assert f"{100 * q['full_caption']['joint']:.1f}%" in card
    for half in ("a", "b"):
        path = registry.bundled_model_path(f"shapes-half-{half}")
        hq = json.loads((path / "quality.json").read_text())
        assert hq["samples"] >= 256 and hq["purity"] >= 0.95
        assert f"{100 * hq['purity']:.1f}%" in (path / "README.md").read_text()


def test_registry_ignores_an_export_left_half_done_beside_the_models(tmp_path, monkeypatch):
    # the training scripts build an export in .<name>.partial and swap it in when complete
    for d in ("shapes-x", ".shapes-x.partial", ".shapes-x.old"):
        (tmp_path / d / "unet").mkdir(parents=True)
        (tmp_path / d / "training.json").write_text("{}")
    monkeypatch.setattr(registry, "BUNDLED_ROOT", tmp_path)
    assert registry.list_bundled_models() == ["shapes-x"]
    with pytest.raises(ValueError, match="unknown bundled model"):
        registry.bundled_model_path(".shapes-x.partial")
