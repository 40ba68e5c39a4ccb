"""Per-family defaults (issue 11, item 7): a composition that names no guidance scale uses the
scale its bundled model's card measured, else the family's diffusers default, and records the
scale it used; the studio sets the same default when a model is picked and disables the
negative prompt for guidance-distilled Flux models."""

from __future__ import annotations

import json

import pytest
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from superdiff.compose import FAMILY_DEFAULTS, Composition, ModelCache, default_guidance
from superdiff.registry import bundled_model_path
from superdiff.pipelines._testing import tiny_flux_components, tiny_sd3_components


def test_bundled_models_default_to_the_scale_their_card_measured():
    for name in ("shapes-t2i", "shapes-flow"):
        card = json.loads((bundled_model_path(name) / "quality.json").read_text())
        assert default_guidance(name, "sd3" if name == "shapes-flow" else "sd") == card["settings"]["guidance_scale"]


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_other_models_default_to_the_family_default(kind, tmp_path):
    assert default_guidance(str(tmp_path / "some-model"), kind) == FAMILY_DEFAULTS[kind]["guidance_scale"]


def test_composition_without_guidance_is_valid_and_keeps_none_until_run():
    c = Composition(model="shapes-t2i", prompts=["a circle"], operator="single").validated()
    assert c.guidance_scale is None
    with pytest.raises(ValueError, match="guidance_scale"):
        Composition(model="shapes-t2i", prompts=["a circle"], guidance_scale=-1.0).validated()


def test_cli_records_the_family_default_of_a_flux_folder(tmp_path):
    from PIL import Image

    from superdiff.cli import main

    FluxPipeline(**tiny_flux_components(0)).save_pretrained(tmp_path / "flux")
    assert main(["generate", "--model", str(tmp_path / "flux"), "--prompt", "a circle", "--steps", "1",
                 "--sampler", "ddpm", "--height", "16", "--width", "16", "--quiet", "--out", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "image_000.png") as im:
        meta = json.loads(im.text["superdiff"])
    assert meta["guidance_scale"] == FAMILY_DEFAULTS["flux"]["guidance_scale"]
    trace = json.loads((tmp_path / "o" / "trace.json").read_text())["meta"]
    assert trace["embedded_guidance"] == FAMILY_DEFAULTS["flux"]["guidance_scale"]


def test_studio_model_defaults_per_family(tmp_path):
    from superdiff.ui import handlers as H

    FluxPipeline(**tiny_flux_components(0)).save_pretrained(tmp_path / "flux")
    FluxPipeline(**tiny_flux_components(0, guidance_embeds=False)).save_pretrained(tmp_path / "flux-cfg")
    StableDiffusion3Pipeline(**tiny_sd3_components(0)).save_pretrained(tmp_path / "sd3")
    cache = ModelCache(allow_roots=[tmp_path], allow_hub=False)
    assert H.model_defaults(str(tmp_path / "flux"), cache) == (FAMILY_DEFAULTS["flux"]["guidance_scale"], False)
    assert H.model_defaults(str(tmp_path / "flux-cfg"), cache) == (FAMILY_DEFAULTS["flux"]["guidance_scale"], True)
    assert H.model_defaults(str(tmp_path / "sd3"), cache) == (FAMILY_DEFAULTS["sd3"]["guidance_scale"], True)
    assert H.model_defaults("shapes-flow", cache) == (default_guidance("shapes-flow", "sd3"), True)


def test_a_model_folder_with_a_card_defaults_to_the_scale_its_card_names(tmp_path):
    (tmp_path / "quality.json").write_text(json.dumps({"settings": {"guidance_scale": 2.5}}))
    assert default_guidance(str(tmp_path), "sd") == 2.5


def test_a_model_folder_given_with_a_tilde_reads_its_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "quality.json").write_text(json.dumps({"settings": {"guidance_scale": 2.5}}))
    assert default_guidance("~/m", "sd") == 2.5
