"""Adapters (LoRAs) as experts: per-row exactness of the mixed-adapter batch, one forward
per step, parity with diffusers' own LoRA loading (one adapter, weight merge), the
baselines behind operator=, and refusals before any compute."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from superdiff.registry import bundled_model_path, list_bundled_models  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)
from _training import killed_after_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif("shapes-t2i" not in list_bundled_models(), reason="shapes-t2i not built")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj", "proj_in"]


def random_lora(unet_dir, out_dir, seed, rank=4, targets=TARGETS):
    """A LoRA with random A and B (so that it changes the output), saved as diffusers saves one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name="pytorch_lora_weights.safetensors")
    return out_dir


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    base = bundled_model_path("shapes-t2i")
    return {k: random_lora(base, root / f"lora-{k}", seed) for k, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def pipe():
    from superdiff.pipelines import SuperDiffStableDiffusionPipeline

    p = SuperDiffStableDiffusionPipeline.from_pretrained(bundled_model_path("shapes-t2i"))
    p.set_progress_bar_config(disable=True)
    return p


def test_each_row_equals_a_forward_with_only_its_adapter(pipe, loras):
    from superdiff.diffusers_experts import unet_forward
    from superdiff.pipelines import adapters as A
    from superdiff.schedules import schedule_from_config

    specs = A.resolve_adapters([(loras["a"], 0.7), loras["b"]])
    A.load_adapters(pipe, specs)
    routing = A.AdapterRouting()
    for s in specs:
        routing.names.append(s.name)
        routing.scales[s.name] = s.scale
    sched = schedule_from_config(pipe.scheduler.config, "ve")
    fn = unet_forward(pipe.unet, sched)
    routed = A.adapter_forward(fn, pipe.unet, routing)
    g = gen(0)
    rows = [0, 1, 2, 1, 0, 2]  # base, a, b, a, base, b
    x = torch.randn(len(rows), 4, 8, 8, generator=g)
    emb = torch.randn(len(rows), 8, 64, generator=g)
    t = torch.tensor(3.0, dtype=torch.float64)
    with torch.no_grad():
        mixed = routed(x, t, {"encoder_hidden_states": emb, "adapter": torch.tensor(rows)})
        for i, k in enumerate(rows):  # reference: diffusers' own adapter switching, one row at a time
            if k == 0:
                pipe.unet.disable_adapters()
            else:
                pipe.unet.enable_adapters()
                pipe.set_adapters([routing.names[k]], [routing.scales[routing.names[k]]])
            ref = fn(x[i : i + 1], t, {"encoder_hidden_states": emb[i : i + 1]})
            torch.testing.assert_close(mixed[i : i + 1], ref, rtol=1e-4, atol=1e-5)
        pipe.unet.disable_adapters()
        base = fn(x, t, {"encoder_hidden_states": emb})
    # the adapters really change the rows they route (and only those)
    for i, k in enumerate(rows):
        diff = (mixed[i] - base[i]).abs().max().item()
        assert (diff > 1e-3) if k else (diff < 1e-5), (i, k, diff)


def test_adapter_experts_run_in_one_forward_per_step(pipe, loras):
    out = pipe("a circle", adapters=[loras["a"], (loras["b"], 0.5)], operator="and", num_inference_steps=4,
               guidance_scale=4.0, generator=gen(0), output_type="np")
    experts = pipe.last_experts
    assert experts.forward_calls_per_network() == {"unet": 4}
    assert experts.names == ["lora-a: a circle", "lora-b@0.5: a circle"]
    assert [a["name"] for a in out.trace.meta["adapters"]] == ["lora-a", "lora-b"]
    assert out.trace.meta["adapters"][1]["scale"] == 0.5 and len(out.trace.meta["adapters"][0]["sha256"]) == 64
    assert np.isfinite(out.images).all()
    # an ordinary call afterwards runs the base model: the loaded adapters stay inactive
    plain = pipe("a circle", operator="single", num_inference_steps=3, generator=gen(1), output_type="np").images
    again = pipe("a circle", operator="single", num_inference_steps=3, generator=gen(1), output_type="np").images
    np.testing.assert_array_equal(plain, again)
    from superdiff.pipelines import SuperDiffStableDiffusionPipeline

    fresh = SuperDiffStableDiffusionPipeline.from_pretrained(bundled_model_path("shapes-t2i"))
    fresh.set_progress_bar_config(disable=True)
    ref = fresh("a circle", operator="single", num_inference_steps=3, generator=gen(1), output_type="np").images
    np.testing.assert_allclose(plain, ref, atol=1e-5)


@pytest.fixture(scope="module")
def diffusers_pipe(loras):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(bundled_model_path("shapes-t2i"), safety_checker=None,
                                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    for k, d in loras.items():
        p.load_lora_weights(d, adapter_name=f"lora-{k}")
    return p


@pytest.mark.parametrize("method", ["single", "merge"])
def test_one_adapter_and_the_weight_merge_match_diffusers(pipe, loras, diffusers_pipe, method):
    if method == "single":
        adapters, names, weights = [(loras["a"], 0.6)], ["lora-a"], [0.6]
    else:
        adapters, names, weights = [(loras["a"], 0.6), (loras["b"], 0.8)], ["lora-a", "lora-b"], [0.6, 0.8]
    diffusers_pipe.set_adapters(names, weights)
    ref = diffusers_pipe("a square", num_inference_steps=5, guidance_scale=4.0, generator=gen(3),
                         output_type="np").images
    ours = pipe("a square", adapters=adapters, operator=method, sampler="euler", num_inference_steps=5,
                guidance_scale=4.0, generator=gen(3), output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_composite_is_the_average_of_each_adapters_guided_prediction(pipe, loras):
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np", sampler="euler")
    comp = pipe("a circle", adapters=[loras["a"], loras["b"]], operator="composite", generator=gen(5), **kw)
    avg = pipe("a circle", adapters=[loras["a"], loras["b"]], operator="average", weights=[0.5, 0.5],
               generator=gen(5), **kw)
    np.testing.assert_array_equal(comp.images, avg.images)
    assert pipe.last_experts.forward_calls_per_network() == {"unet": 3}


def test_switch_alternates_adapters_every_k_steps(pipe, loras):
    from superdiff.pipelines import adapters as A

    out = pipe("a circle", adapters=[loras["a"], loras["b"]], operator="switch", switch_every=2,
               num_inference_steps=5, generator=gen(0), output_type="np")
    assert out.trace.meta["adapter_mode"] == "switch" and pipe.last_experts.num_experts == 1
    routing = A.AdapterRouting(names=[A.BASE, "x", "y"], switch_every=2, grid=torch.linspace(5, 0, 6))
    assert [routing.switch_adapter(t) for t in torch.linspace(5, 0, 6)[:-1]] == ["x", "x", "y", "y", "x"]


def test_bad_adapters_are_refused_before_any_compute(pipe, loras, tmp_path, request):
    from diffusers import UNet2DConditionModel

    from superdiff.pipelines import adapters as A

    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    request.addfinalizer(handle.remove)

    def refused(match, **kw):
        with pytest.raises(ValueError, match=match):
            pipe("a circle", num_inference_steps=2, output_type="np", **kw)

    refused("not found", adapters=[str(tmp_path / "nope.safetensors")])
    # the same adapter name for two different files
    other = tmp_path / "x" / "lora-a"
    random_lora(bundled_model_path("shapes-t2i"), other, seed=9)
    refused("two experts name the adapter 'lora-a'", adapters=[loras["a"], other])
    # pickled weights where only safetensors are allowed (the studio's setting)
    pt = tmp_path / "lora.bin"
    pt.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .safetensors"):
        A.resolve_adapters([pt], safetensors_only=True)
    # an adapter for another base architecture (wider UNet blocks)
    cfg = dict(UNet2DConditionModel.load_config(bundled_model_path("shapes-t2i"), subfolder="unet"))
    cfg["block_out_channels"] = [48, 96]
    wide = tmp_path / "wide"
    UNet2DConditionModel.from_config(cfg).save_pretrained(wide / "unet")
    random_lora(wide, tmp_path / "lora-wide", seed=3)
    refused("another base architecture", adapters=[tmp_path / "lora-wide"], operator="single")
    # a file diffusers would load only in part (attention keys in the old format, the rest in PEFT's)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    sd = load_file(loras["a"] / "pytorch_lora_weights.safetensors")
    mixed = convert_state_dict_to_diffusers({k[len("unet."):]: v for k, v in sd.items()})
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora-mixed", unet_lora_layers=mixed)
    refused("diffusers loaded", adapters=[tmp_path / "lora-mixed"], operator="single")
    from peft.tuners.lora import LoraLayer

    # plain calls run the base: every LoRA layer is switched off, has no active adapter or holds none any more
    assert all(m.disable_adapters or not m.active_adapters or not m.lora_A
               for m in pipe.unet.modules() if isinstance(m, LoraLayer))
    # a LoRA that also adapts the text encoder (its text part would be shared by every expert)
    unet_part = {k[len("unet."):]: v for k, v in sd.items()}
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    te_part = {f"{q}.lora_A.weight": torch.zeros(4, 64), f"{q}.lora_B.weight": torch.zeros(64, 4)}
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora-te", unet_lora_layers=unet_part,
                                              text_encoder_lora_layers=te_part)
    refused("adapts text_encoder", adapters=[tmp_path / "lora-te"], operator="single")
    # merge/switch make one expert: a base entry among them is refused
    refused("combines adapters", adapters=[None, loras["a"]], operator="merge")
    assert not calls


def lora_for(unet, out_dir, seed, pipeline_cls, rank=2, targets=("to_q", "to_v", "conv1")):
    """A random LoRA for an in-memory UNet (its copy is adapted, the UNet itself is untouched)."""
    from _lora import random_network_lora

    return random_network_lora(unet, out_dir, seed, pipeline_cls, targets, "unet_lora_layers", rank=rank)


def test_sdxl_adapter_experts(tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from superdiff.pipelines import SuperDiffStableDiffusionXLPipeline
    from superdiff.pipelines._testing import tiny_sd_unet, tiny_sdxl_components

    comps = tiny_sdxl_components(0)
    a = lora_for(comps["unet"], tmp_path / "xl-a", 1, StableDiffusionXLPipeline)
    b = lora_for(comps["unet"], tmp_path / "xl-b", 2, StableDiffusionXLPipeline)
    ours = SuperDiffStableDiffusionXLPipeline(**comps, add_watermarker=False)
    ours.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    # one adapter, single expert: diffusers' own SDXL pipeline with the LoRA loaded
    ref = StableDiffusionXLPipeline(**tiny_sdxl_components(0), add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(a, adapter_name="xl-a")
    ref.set_adapters(["xl-a"], [0.8])
    want = ref("a red cat", generator=gen(0), **kw).images
    got = ours("a red cat", adapters=[(a, 0.8)], operator="single", sampler="euler", generator=gen(0), **kw).images
    np.testing.assert_allclose(got, want, atol=1e-4)
    # two adapters + a base expert: one forward per step
    out = ours("a red cat", adapters=[None, a, b], operator="or", generator=gen(0), **kw)
    assert ours.last_experts.forward_calls_per_network() == {"unet": 3} and out.trace.num_experts == 3
    # an SD 1.x LoRA on the SDXL UNet: another base architecture
    sd = lora_for(tiny_sd_unet(0), tmp_path / "sd-lora", 3, StableDiffusionPipeline)
    with pytest.raises(ValueError, match="another base architecture"):
        ours("a red cat", adapters=[sd], **kw)


def test_composition_with_adapters_round_trips_through_png(loras, tmp_path):
    from superdiff.compose import Composition, ModelCache, read_png_composition, run_composition, save_png

    cache = ModelCache()
    comp = Composition.from_dict({"prompts": ["a circle"], "operator": "and", "steps": 3, "num_images": 2,
                                  "adapters": [f"{loras['a']}:0.7", {"path": str(loras["b"])}]})
    res = run_composition(comp, cache, progress=False)
    rec = res.records[1]
    assert [a["name"] for a in rec.adapters] == ["lora-a", "lora-b"] and rec.adapters[0]["scale"] == 0.7
    assert all(len(a["sha256"]) == 64 for a in rec.adapters)
    png = save_png(res.images[1], tmp_path / "img.png", rec)
    back = read_png_composition(png)
    assert back == rec
    again = run_composition(back, cache, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.images[1]))
    # the recorded hash pins the file: another file under the same path is refused
    other = back.replace(adapters=[{**back.adapters[0], "sha256": "0" * 64}, back.adapters[1]])
    with pytest.raises(ValueError, match="not the file this composition was made with"):
        run_composition(other, cache, progress=False)
    # the command line's --lora PATH[:SCALE] and the studio's restrictions
    with pytest.raises(ValueError, match="composes LoRA adapters"):
        Composition.from_dict({"prompts": ["a circle"], "operator": "merge", "adapters": [str(loras["a"])]})
    pt = tmp_path / "lora.bin"
    pt.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="not a .safetensors"):
        run_composition(comp.replace(adapters=[str(pt), str(loras["a"])]), cache, progress=False)
    with pytest.raises(ValueError, match="outside the allowed folders"):
        run_composition(comp, ModelCache(allow_roots=[tmp_path / "models"]), progress=False)


def test_cli_lora_flags_png_metadata_and_from_png(loras, tmp_path, capsys):
    import json

    from PIL import Image

    from superdiff.cli import main

    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a circle", "--lora", f"{loras['a']}:0.7", "--lora", str(loras["b"]),
                 "--operator", "and", "--steps", "3", "-n", "2", "--out", str(out), "--quiet"]) == 0
    with Image.open(out / "image_001.png") as im:
        meta = json.loads(im.text["superdiff"])
    assert [(a["name"], a["scale"]) for a in meta["adapters"]] == [("lora-a", 0.7), ("lora-b", 1.0)]
    from superdiff.pipelines.adapters import file_sha256

    assert meta["adapters"][1]["sha256"] == file_sha256(loras["b"] / "pytorch_lora_weights.safetensors")
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(out / "image_001.png"), "--out", str(again), "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "image_001.png")),
                                  np.asarray(Image.open(again / "image_000.png")))
    # errors: nothing written
    bad = tmp_path / "bad"
    assert main(["generate", "--prompt", "a circle", "--lora", str(tmp_path / "missing.safetensors"),
                 "--lora", str(loras["a"]), "--out", str(bad), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not bad.exists() or not any(bad.iterdir())


def test_studio_rows_pick_adapters_with_lora_tags(loras, tmp_path):
    from superdiff.ui import handlers as H

    from superdiff.compose import ModelCache, run_composition

    a, b = loras["a"], loras["b"]
    form = {"model": "shapes-t2i", "rows": 3, "operator": "and", "steps": 2,
            "prompts": [f"a circle <lora:{a}:0.8>", f"a circle <lora:{b}>", "a square"]}
    comp, _ = H.parse_form(form)
    assert comp.prompts == ["a circle", "a square"]
    assert comp.adapters == [{"path": str(a), "scale": 0.8, "prompt": "a circle"},
                             {"path": str(b), "scale": 1.0, "prompt": "a circle"},
                             {"path": "base", "prompt": "a square", "scale": 1.0}]
    assert H.parse_form(H.form_from_composition(comp))[0] == comp  # settings export / import
    res = run_composition(comp, ModelCache(allow_roots=[a.parent]), progress=False)
    assert res.trace.expert_names == ["lora-a@0.8: a circle", "lora-b: a circle", "base: a square"]
    with pytest.raises(ValueError, match="one adapter per expert row"):
        H.parse_form({**form, "prompts": [f"a circle <lora:{a}> <lora:{b}>", "a square"]})
    pt = tmp_path / "x.bin"
    pt.write_bytes(b"\0")
    bad, _ = H.parse_form({**form, "prompts": [f"a circle <lora:{pt}>", f"a circle <lora:{b}>"]})
    with pytest.raises(ValueError, match="not a .safetensors"):
        run_composition(bad, ModelCache(allow_roots=[a.parent, tmp_path]), progress=False)


def test_batch_jobs_take_the_adapters_field(loras, tmp_path):
    import json

    from superdiff.cli import main
    from superdiff.compose import read_png_composition

    a, b = loras["a"], loras["b"]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "two-loras", "prompts": ["a circle"], "adapters": [f"{a}:0.5", str(b)],
                                "methods": ["merge", "and"], "steps": 2}) + "\n")
    csv = tmp_path / "jobs.csv"
    csv.write_text(f"id,prompts,adapters,operator,steps\nc,a square,{a}|{b}:0.3,composite,2\n")
    for f in (jobs, csv):
        out = tmp_path / f"out-{f.suffix[1:]}"
        assert main(["batch", str(f), "--out", str(out), "--quiet"]) == 0
        lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert lines and all(x["status"] == "ok" for x in lines), lines
        pngs = sorted(out.glob("images/**/*.png"))
        rec = read_png_composition(pngs[0])
        assert [x["name"] for x in rec.adapters] == ["lora-a", "lora-b"] and rec.operator in ("merge", "and", "composite")


@pytest.mark.parametrize("name", ["lora-orange", "lora-outline"])
def test_bundled_loras_are_small_and_their_cards_state_the_measured_rates(name):
    import json

    from superdiff.pipelines import adapters as A
    from superdiff.registry import BUNDLED_ROOT

    d = BUNDLED_ROOT / name
    if not (d / "training.json").is_file():
        pytest.skip(f"{name} not trained (scripts/train_shapes_lora.py)")
    (spec,) = A.resolve_adapters([name], safetensors_only=True)  # a bundled name resolves to its file
    assert spec.file == d / "pytorch_lora_weights.safetensors" and spec.file.stat().st_size < 5_000_000
    info = json.loads((d / "training.json").read_text())
    q = info["quality"]
    assert info["base_model"] == "shapes-t2i" and q["with_lora"]["concept_rate"] > q["base"]["concept_rate"]
    card = (d / "README.md").read_text()
    for key in ("base", "with_lora"):
        assert f"{100 * q[key]['concept_rate']:.1f}%" in card


# --- the pipeline's own LoRA state, kohya files, names, scales and the multi-LoRA methods (tiny SD UNet) ---

def _tiny_sd(theirs=False):
    from diffusers import StableDiffusionPipeline

    from superdiff.pipelines import SuperDiffStableDiffusionPipeline
    from superdiff.pipelines._testing import tiny_sd_components

    cls = StableDiffusionPipeline if theirs else SuperDiffStableDiffusionPipeline
    p = cls(**tiny_sd_components(0), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def tiny_loras(tmp_path_factory):
    """LoRAs for the tiny SD UNet: a, b (other layers) and the user's own."""
    from diffusers import StableDiffusionPipeline

    from superdiff.pipelines._testing import tiny_sd_unet

    root, unet = tmp_path_factory.mktemp("tiny-loras"), tiny_sd_unet(0)
    return {"a": lora_for(unet, root / "lora-a", 1, StableDiffusionPipeline),
            "b": lora_for(unet, root / "lora-b", 2, StableDiffusionPipeline,
                          targets=("to_k", "to_out.0", "conv2", "time_emb_proj")),
            "user": lora_for(unet, root / "user" / "lora-a", 7, StableDiffusionPipeline)}


TINY = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np", sampler="euler")


def _image(p, **kw):
    return p("a red cat", generator=gen(0), **{**TINY, **kw}).images


def _lora_state(net, names):
    """Every LoRA layer's active adapters, the scales of adapters `names` and whether it is switched off."""
    from peft.tuners.lora import LoraLayer

    return {n: (list(m.active_adapters), m.disable_adapters, {k: v for k, v in m.scaling.items() if k in names})
            for n, m in net.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_format_loras_load_as_diffusers_loads_them(family, tiny_loras, tmp_path):
    """A kohya / A1111 file (lora_unet_*.lora_down/up + alpha) is the adapter diffusers' own
    load_lora_weights makes of it: the same images as diffusers, and as the same LoRA in PEFT keys."""
    from diffusers import StableDiffusionXLPipeline

    from _lora import kohya_from_peft
    from superdiff.pipelines import SuperDiffStableDiffusionXLPipeline
    from superdiff.pipelines._testing import tiny_sdxl_components

    if family == "sd":
        peft, ours, ref, kw = tiny_loras["a"], _tiny_sd(), _tiny_sd(theirs=True), TINY
    else:
        peft = lora_for(tiny_sdxl_components(0)["unet"], tmp_path / "xl", 1, StableDiffusionXLPipeline)
        ours = SuperDiffStableDiffusionXLPipeline(**tiny_sdxl_components(0), add_watermarker=False)
        ref = StableDiffusionXLPipeline(**tiny_sdxl_components(0), add_watermarker=False)
        ours.set_progress_bar_config(disable=True)
        ref.set_progress_bar_config(disable=True)
        kw = {**TINY, "guidance_scale": 5.0}
    kohya = kohya_from_peft(peft / "pytorch_lora_weights.safetensors", tmp_path / "kohya-style.safetensors")
    ref.load_lora_weights(kohya, adapter_name="k")
    ref.set_adapters(["k"], [0.8])
    want = ref("a red cat", generator=gen(0), **{k: v for k, v in kw.items() if k != "sampler"}).images
    got = ours("a red cat", adapters=[(kohya, 0.8)], operator="single", generator=gen(0), **kw).images
    np.testing.assert_allclose(got, want, atol=1e-5)
    peft_too = ours("a red cat", adapters=[(peft, 0.8)], operator="single", generator=gen(0), **kw).images
    np.testing.assert_allclose(got, peft_too, atol=1e-5)
    ours("a red cat", adapters=[kohya, peft], operator="and", generator=gen(0), **kw)  # and next to each other


def test_the_users_own_adapters_are_as_they_were_after_every_adapter_call(tiny_loras):
    """Adapters the user loaded (load_lora_weights + set_adapters / disable_lora) keep their active
    set, weights and on/off state through SuperDiff calls, also through a call that raises."""
    pipe = _tiny_sd()
    base = _image(pipe, operator="single")
    pipe.load_lora_weights(tiny_loras["user"], adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    styled = _image(pipe, operator="single")
    assert np.abs(styled - base).max() > 1e-3
    before = _lora_state(pipe.unet, ["style"])

    def boom(*_):
        raise RuntimeError("stop")

    for kw in (dict(operator="and"), dict(operator="merge"), dict(operator="switch"),
               dict(operator="and", callback_on_step_end=boom)):
        with contextlib.suppress(RuntimeError):
            _image(pipe, adapters=[tiny_loras["a"], (tiny_loras["b"], 0.5)], **kw)
        assert pipe.get_active_adapters() == ["style"]
        after = _lora_state(pipe.unet, ["style"])
        assert {n: s for n, s in after.items() if n in before} == before
        # layers made for SuperDiff's adapters only: the user's active set, so nothing acts there
        assert all(s[:2] == (["style"], False) for n, s in after.items() if n not in before)
        np.testing.assert_array_equal(_image(pipe, operator="single"), styled)
    pipe.disable_lora()
    _image(pipe, adapters=[tiny_loras["a"]], operator="single")
    np.testing.assert_array_equal(_image(pipe, operator="single"), base)  # still switched off
    pipe.enable_lora()
    np.testing.assert_array_equal(_image(pipe, operator="single"), styled)


def test_a_lora_the_user_loads_after_an_adapter_call_acts_as_in_diffusers(tiny_loras):
    """On a pipeline without LoRAs, SuperDiff's layers are left on with no active adapter: an
    ordinary call is the base network, a LoRA loaded afterwards acts as in diffusers, and
    enable_lora() does not turn SuperDiff's adapters on (before, the layers were left switched
    off with SuperDiff's last adapter active: the user's LoRA was silently ignored)."""
    ref = _tiny_sd(theirs=True)
    base = ref("a red cat", generator=gen(0), **{k: v for k, v in TINY.items() if k != "sampler"}).images
    ref.load_lora_weights(tiny_loras["user"], adapter_name="style")
    styled = ref("a red cat", generator=gen(0), **{k: v for k, v in TINY.items() if k != "sampler"}).images
    pipe = _tiny_sd()
    _image(pipe, adapters=[tiny_loras["a"], tiny_loras["b"]], operator="and")
    np.testing.assert_allclose(_image(pipe, operator="single"), base, atol=1e-5)
    pipe.enable_lora()
    np.testing.assert_allclose(_image(pipe, operator="single"), base, atol=1e-5)
    pipe.load_lora_weights(tiny_loras["user"], adapter_name="style")
    np.testing.assert_allclose(_image(pipe, operator="single"), styled, atol=1e-5)
    _image(pipe, adapters=[tiny_loras["a"], tiny_loras["b"]], operator="and")  # and after another adapter call
    np.testing.assert_allclose(_image(pipe, operator="single"), styled, atol=1e-5)


def test_an_adapter_the_user_loaded_under_the_same_name_is_never_replaced(tiny_loras):
    pipe, fresh = _tiny_sd(), _tiny_sd()
    pipe.load_lora_weights(tiny_loras["user"], adapter_name="lora-a")  # the name SuperDiff derives for loras["a"]
    users = _image(pipe, operator="single")
    want = _image(fresh, adapters=[(tiny_loras["a"], 0.8)], operator="single")
    got = _image(pipe, adapters=[(tiny_loras["a"], 0.8)], operator="single")
    np.testing.assert_allclose(got, want, atol=1e-6)  # SuperDiff's lora-a is the file it was given
    assert pipe.get_list_adapters()["unet"][0] == "lora-a" and len(pipe.get_list_adapters()["unet"]) == 2
    np.testing.assert_array_equal(_image(pipe, operator="single"), users)  # and the user's is untouched


@pytest.mark.parametrize("remove", ["unload_lora_weights", "delete_adapters"])
def test_adapters_the_user_removed_are_loaded_again(tiny_loras, remove):
    pipe = _tiny_sd()
    first = _image(pipe, adapters=[tiny_loras["a"]], operator="single")
    assert np.abs(first - _image(pipe, operator="single")).max() > 1e-3
    getattr(pipe, remove)(*(["lora-a"] if remove == "delete_adapters" else []))
    np.testing.assert_array_equal(_image(pipe, adapters=[tiny_loras["a"]], operator="single"), first)


@pytest.mark.parametrize("method", ["single", "merge"])
def test_the_lora_scale_of_cross_attention_kwargs_multiplies_every_routed_adapter(tiny_loras, method):
    """diffusers' cross_attention_kwargs={"scale": s} multiplies every active adapter's scale; with
    adapter experts every routed adapter's, whichever adapters the network holds."""
    pipe, ref = _tiny_sd(), _tiny_sd(theirs=True)
    _image(pipe, adapters=[tiny_loras["a"], tiny_loras["b"]], operator="and")  # both loaded, b last
    adapters = [(tiny_loras["a"], 0.6)] + ([(tiny_loras["b"], 0.8)] if method == "merge" else [])
    for k, (path, _) in zip("ab", adapters):
        ref.load_lora_weights(path, adapter_name=k)
    ref.set_adapters(list("ab"[: len(adapters)]), [s for _, s in adapters])
    cak = {"cross_attention_kwargs": {"scale": 0.5}}
    want = ref("a red cat", generator=gen(0), **{k: v for k, v in TINY.items() if k != "sampler"}, **cak).images
    np.testing.assert_allclose(_image(pipe, adapters=adapters, operator=method, **cak), want, atol=1e-5)


def _switch_log(monkeypatch):
    from superdiff.pipelines import adapters as A

    seen, orig = [], A.AdapterRouting.switch_adapter
    monkeypatch.setattr(A.AdapterRouting, "switch_adapter", lambda self, t: seen.append(orig(self, t)) or seen[-1])
    return seen


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_lora_switch_runs_one_adapter_for_every_evaluation_of_a_step(tiny_loras, monkeypatch, sampler):
    seen = _switch_log(monkeypatch)
    _image(_tiny_sd(), adapters=[tiny_loras["a"], tiny_loras["b"]], operator="switch", sampler=sampler,
           num_inference_steps=4)
    # heun evaluates each step at t_k and at t_(k+1), but only once on its last step (to sigma = 0)
    per_step = {"euler": [1, 1, 1, 1], "heun": [2, 2, 2, 1]}[sampler]
    want = [n for k, m in enumerate(per_step) for n in [("lora-a", "lora-b")[k % 2]] * m]
    assert seen == want


def test_duplicate_adapters_count_in_merge_and_switch(tiny_loras, monkeypatch):
    """merge adds sum_k s_k B_k A_k over its entries (the same file twice adds up); switch cycles
    through its entries as given."""
    a, b, pipe = tiny_loras["a"], tiny_loras["b"], _tiny_sd()
    np.testing.assert_allclose(_image(pipe, adapters=[(a, 0.5), (a, 0.5)], operator="merge"),
                               _image(pipe, adapters=[(a, 1.0)], operator="single"), atol=1e-6)
    np.testing.assert_allclose(_image(pipe, adapters=[(a, 0.5), (a, 0.3), (b, 0.4)], operator="merge"),
                               _image(pipe, adapters=[(a, 0.8), (b, 0.4)], operator="merge"), atol=1e-6)
    seen = _switch_log(monkeypatch)
    _image(pipe, adapters=[a, a, b], operator="switch", num_inference_steps=6)
    assert seen == ["lora-a", "lora-a", "lora-b"] * 2


@pytest.mark.parametrize("method", ["merge", "switch", "composite"])
def test_multi_lora_methods_with_fewer_than_two_adapters_are_refused_before_any_compute(tiny_loras, method):
    pipe = _tiny_sd()
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    one = [[tiny_loras["a"]], [(tiny_loras["a"], 0.5)]] + ([[None, tiny_loras["a"]]] if method == "composite" else [])
    for adapters in one:  # a base entry is no adapter
        with pytest.raises(ValueError, match=f"operator '{method}' combines several adapters: give at least two"):
            _image(pipe, adapters=adapters, operator=method)
    assert not calls and not getattr(pipe.unet, "peft_config", None)


def test_the_same_file_at_two_scales_keeps_its_name(tiny_loras):
    pipe = _tiny_sd()
    out = pipe("a red cat", adapters=[(tiny_loras["a"], 0.5), tiny_loras["a"]], operator="and", generator=gen(0),
               **TINY)
    assert pipe.last_experts.names == ["lora-a@0.5: a red cat", "lora-a: a red cat"]
    assert [(x["name"], x["scale"]) for x in out.trace.meta["adapters"]] == [("lora-a", 0.5), ("lora-a", 1.0)]
    assert sorted(pipe.unet.peft_config) == ["lora-a", "lora-a_x1"]  # loaded twice, the name itself unchanged


def test_an_empty_adapter_list_is_no_adapters(tiny_loras):
    pipe = _tiny_sd()
    np.testing.assert_array_equal(_image(pipe, adapters=[], operator="and"), _image(pipe, operator="and"))
    assert not getattr(pipe.unet, "peft_config", None)  # nothing loaded
    for method in ("merge", "switch", "composite"):  # the multi-LoRA methods say what they need
        for adapters in (None, []):
            with pytest.raises(ValueError, match=f"operator '{method}' combines LoRA adapters: give at least two "
                                                 r"with adapters=\[...\] \(got none\)"):
                _image(pipe, adapters=adapters, operator=method)


def test_adapter_files_are_hashed_once_per_version(tmp_path, monkeypatch):
    import hashlib
    import os

    from superdiff.pipelines import adapters as A

    one, two = hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two!").hexdigest()
    reads, sha256 = [], hashlib.sha256
    monkeypatch.setattr(A.hashlib, "sha256", lambda *a: reads.append(1) or sha256(*a))
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"one")
    assert A.file_sha256(f) == A.file_sha256(str(f)) == one and len(reads) == 1
    f.write_bytes(b"two!")  # a new version of the file, at the same path
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))
    assert A.file_sha256(f) == two and len(reads) == 2


# --- scripts/train_shapes_lora.py: resume, export and cache robustness (tiny runs, measurement stubbed) ---

def _lora_script(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_shapes_lora.py"
    spec = importlib.util.spec_from_file_location("train_shapes_lora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rates = {"concept_rate": 0.5, "per_prompt": {"a circle": {"concept": 0.5, "shape": 1.0}}, "samples": 3}
    monkeypatch.setattr(mod, "measure", lambda base, lora, label, n, seed: rates)  # 2 x 25 sampling steps otherwise
    return mod


def _tiny_lora_args(tmp_path, *extra):
    return ["--concept", "orange", "--steps", "4", "--batch", "2", "--dataset-size", "3", "--invert-steps", "1",
            "--rank", "2", "--log-every", "1", "--ckpt-every", "2", "--eval-samples", "3",
            "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out"), *extra]


def _stop_after_first_lora_checkpoint(mod, monkeypatch, argv):
    killed_after_checkpoint(monkeypatch, mod.Run, "save", lambda: mod.main(argv))


def test_lora_export_only_takes_the_trained_settings_and_leaves_the_runs_log_alone(tmp_path, monkeypatch):
    import json

    mod = _lora_script(monkeypatch)
    _stop_after_first_lora_checkpoint(mod, monkeypatch, _tiny_lora_args(tmp_path))  # checkpoint at step 2
    log = tmp_path / "w" / "log.jsonl"
    with log.open("a") as f:  # the live run has logged step 3 since its checkpoint
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    monkeypatch.setattr(mod, "load_concept_dataset", lambda *a: pytest.fail("an export needs no training data"))
    mod.main(["--concept", "orange", "--export-only", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")])
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert info["steps_trained"] == 2
    assert {k: info["hyperparameters"][k] for k in ("rank", "dataset_size", "steps")} == {"rank": 2, "dataset_size": 3, "steps": 4}


def test_lora_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    mod = _lora_script(monkeypatch)
    _stop_after_first_lora_checkpoint(mod, monkeypatch, _tiny_lora_args(tmp_path))
    with pytest.raises(SystemExit, match=r"other settings.*'lr': \(0\.002, 0\.05\)"):
        mod.main(_tiny_lora_args(tmp_path, "--lr", "0.05"))
    mod.main(_tiny_lora_args(tmp_path, "--eval-samples", "6"))  # the measurement is not a training setting


def test_a_failed_lora_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    mod = _lora_script(monkeypatch)
    argv = _tiny_lora_args(tmp_path)
    mod.main(argv)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    state = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    state["lora"] = {k: v + 1.0 for k, v in state["lora"].items()}  # other weights to export
    torch.save(state, tmp_path / "w" / "checkpoint.pt")

    def measurement_fails(*a):
        raise RuntimeError("out of memory while measuring")

    monkeypatch.setattr(mod, "measure", measurement_fails)
    with pytest.raises(RuntimeError, match="measuring"):
        mod.main([*argv, "--export-only"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old weights beside their own card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "w"]  # no staging directory left


def test_a_crash_while_caching_the_lora_latents_leaves_no_cache(tmp_path, monkeypatch):
    import argparse

    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    mod = _lora_script(monkeypatch)
    base = bundled_model_path("shapes-t2i")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    run = mod.Run(tmp_path / "w")
    args = argparse.Namespace(seed=0, dataset_size=2, invert_steps=1, invert_lr=0.1)
    real_save = torch.save

    def save_half_then_die(obj, path):
        open(path, "wb").write(b"PK\x03\x04")  # the first bytes of a zip: a cut-short file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        mod.load_concept_dataset(run, vae, tok, "orange", args)
    monkeypatch.setattr(torch, "save", real_save)
    assert not list(run.dir.glob("latents-*.pt"))
    assert len(mod.load_concept_dataset(run, vae, tok, "orange", args)["ids"]) == 2
