"""The bundled rectified-flow model shapes-flow: an ordinary diffusers SD3 directory (no T5),
small, loaded through from_pretrained by the stock pipeline and by SuperDiff's, sampling finite
32x32 images in a few steps; its card states the measured figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from superdiff import registry

NAME = "shapes-flow"


@pytest.fixture(scope="module")
def path():
    return registry.bundled_model_path(NAME)


def test_registered_with_its_card_and_within_the_size_budget(path):
    assert NAME in registry.list_bundled_models() and registry.resolve(NAME) == str(path)
    info = registry.bundled_model_info(NAME)
    assert info["kind"] == "text-to-image" and info["layout"] == "sd3"
    assert ["red", "circle"] in info["data"]["held_out"]
    assert sum(f.stat().st_size for f in path.rglob("*.safetensors")) <= 8 * 1024 * 1024
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert registry.absent_components(path) == {"text_encoder_3": None, "tokenizer_3": None}
    q = info["quality"]
    card = (path / "README.md").read_text()
    assert f"{100 * q['full_caption']['joint']:.1f}%" in card
    assert f"{info['cpu_seconds']['transformer_and_text_encoders'] / 60:.1f} CPU-min" in card


def test_stock_sd3_pipeline_samples_finite_images(path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    pipe = StableDiffusion3Pipeline.from_pretrained(path, **registry.absent_components(path))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.text_encoder_3 is None
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0

    def gen():
        g = torch.Generator().manual_seed(0)
        return pipe(["a blue circle", "a square and something red"], num_inference_steps=3, guidance_scale=4.0,
                    generator=g, output_type="np").images

    a = gen()
    assert a.shape == (2, 32, 32, 3) and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, gen())


def test_superdiff_sd3_pipeline_composes_it(path):
    pipelines = pytest.importorskip("superdiff.pipelines")
    if not hasattr(pipelines, "SuperDiffStableDiffusion3Pipeline"):
        pytest.skip("SuperDiffStableDiffusion3Pipeline not available")
    pipe = pipelines.SuperDiffStableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a circle", "something red"], operator="and", num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    assert np.isfinite(out.trace.kappa).all() and np.isfinite(out.trace.logq).all()
