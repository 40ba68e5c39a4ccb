"""Adapters (LoRAs) as experts in the rectified-flow pipelines (SD3, Flux), offline on tiny
transformers built from configs: each row of a mixed-adapter batch equals a forward with only
that adapter active (diffusers' set_adapters), one transformer call per step for all adapter
experts and their guidance rows, `single` / `merge` reproduce diffusers' own
StableDiffusion3Pipeline / FluxPipeline with load_lora_weights + set_adapters, and bad
adapters are refused before any compute.

The LoRAs are made with PEFT (LoraConfig, random A and B so that they change the output) and
saved with diffusers' save_lora_weights, so the pipelines load them through the real loader
(SD3LoraLoaderMixin / FluxLoraLoaderMixin.load_lora_weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline  # noqa: E402

from superdiff.pipelines import SuperDiffFluxPipeline, SuperDiffStableDiffusion3Pipeline  # noqa: E402
from superdiff.pipelines import adapters as A  # noqa: E402
from superdiff.pipelines._testing import tiny_flux_components, tiny_sd3_components, tiny_sd_unet  # noqa: E402
from _lora import random_network_lora  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

SIZE = dict(height=16, width=16, max_sequence_length=16)
ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FAMILIES = {
    # LoRA layers in attention, feed-forward, the conv patch embedding and [N, D] embedding layers
    "sd3": dict(ours=SuperDiffStableDiffusion3Pipeline, theirs=StableDiffusion3Pipeline,
                comps=lambda: tiny_sd3_components(0),
                targets=ATTN + ["ff.net.2", "pos_embed.proj", "timestep_embedder.linear_1"],
                guidance=dict(guidance_scale=4.0, negative_prompt="blurry")),
    # no guidance embedding: true CFG adds unconditional rows (guidance-distilled: see below)
    "flux": dict(ours=SuperDiffFluxPipeline, theirs=FluxPipeline,
                 comps=lambda: tiny_flux_components(0, guidance_embeds=False),
                 targets=ATTN + ["proj_mlp", "proj_out", "x_embedder", "norm1.linear"],
                 guidance=dict(true_cfg_scale=3.0, negative_prompt="blurry")),
}


def transformer_lora(transformer, out_dir, seed, pipeline_cls, targets, rank=2):
    """A random LoRA for an in-memory transformer (a copy is adapted), saved as diffusers saves one."""
    return random_network_lora(transformer, out_dir, seed, pipeline_cls, targets, "transformer_lora_layers",
                               rank=rank, alpha=2 * rank)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family config, our pipeline, {"a": lora dir, "b": lora dir})"""
    f = FAMILIES[request.param]
    pipe = f["ours"](**f["comps"]())
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp(f"loras-{request.param}")
    loras = {k: transformer_lora(pipe.transformer, root / f"lora-{k}", seed, f["theirs"], f["targets"])
             for k, seed in (("a", 1), ("b", 2))}
    return request.param, f, pipe, loras


class CallCounter:
    """The transformer's forward calls and the rows of each."""

    def __init__(self, module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(
            lambda m, a, kw: self.rows.append(int(kw["hidden_states"].shape[0])), with_kwargs=True)

    def close(self):
        self.handle.remove()


def _inputs(name, pipe, n, g):
    """Random transformer inputs for n rows: (x, cond without adapter, fixed kwargs, divisor)."""
    if name == "sd3":
        x = torch.randn(n, 4, 8, 8, generator=g)
        cond = {"encoder_hidden_states": torch.randn(n, 10, 32, generator=g),
                "pooled_projections": torch.randn(n, 32, generator=g)}
        return x, cond, {}, 1.0
    x = torch.randn(n, 16, 16, generator=g)  # 4 x 4 packed tokens of 16 channels
    cond = {"encoder_hidden_states": torch.randn(n, 6, 32, generator=g),
            "pooled_projections": torch.randn(n, 32, generator=g)}
    fixed = dict(img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32), txt_ids=torch.zeros(6, 3))
    return x, cond, fixed, 1000.0


def test_each_row_equals_a_forward_with_only_its_adapter(family):
    from superdiff.diffusers_experts import transformer_forward
    from superdiff.pipelines._method import make_flow_schedule

    name, _, pipe, loras = family
    specs = A.resolve_adapters([(loras["a"], 0.7), loras["b"]])
    A.load_adapters(pipe, specs)
    routing = A.AdapterRouting()
    for s in specs:
        routing.names.append(s.name)
        routing.scales[s.name] = s.scale
    rows = [0, 1, 2, 1, 0, 2]  # base, a, b, a, base, b
    x, cond, fixed, div = _inputs(name, pipe, len(rows), gen(0))
    fn = transformer_forward(pipe.transformer, make_flow_schedule(pipe.scheduler.config, None), div, **fixed)
    routed = A.adapter_forward(fn, pipe.transformer, routing)
    seen = []  # the grid's time inputs are still computed once per call: set_grid reaches fn
    fn.set_grid = lambda times, device=None: seen.append(len(times))
    routing.step = 3
    routed.set_grid([torch.tensor(1.0), torch.tensor(0.5)])
    assert seen == [2] and routing.step is None  # a new call starts outside any step
    del fn.set_grid
    routed.begin_step(1)  # ExpertSet.begin_step: the sampler step a LoRA switch follows
    assert routing.step == 1
    t = torch.tensor(0.6, dtype=torch.float64)
    with torch.no_grad():
        mixed = routed(x, t, {**cond, "adapter": torch.tensor(rows)})
        for i, k in enumerate(rows):  # reference: diffusers' own adapter switching, one row at a time
            if k == 0:
                pipe.transformer.disable_adapters()
            else:
                pipe.transformer.enable_adapters()
                pipe.set_adapters([routing.names[k]], [routing.scales[routing.names[k]]])
            ref = fn(x[i : i + 1], t, {c: v[i : i + 1] for c, v in cond.items()})
            torch.testing.assert_close(mixed[i : i + 1], ref, rtol=1e-4, atol=1e-5)
        pipe.transformer.disable_adapters()
        base = fn(x, t, cond)
    for i, k in enumerate(rows):  # the adapters really change the rows they route, and only those
        diff = (mixed[i] - base[i]).abs().max().item()
        assert (diff > 1e-3) if k else (diff < 1e-6), (i, k, diff)


def test_adapter_experts_and_their_guidance_rows_run_in_one_call_per_step(family):
    name, f, pipe, loras = family
    counter = CallCounter(pipe.transformer)
    try:
        out = pipe("a circle", adapters=[None, loras["a"], (loras["b"], 0.5)], operator="and",
                   num_inference_steps=3, generator=gen(0), output_type="np", **f["guidance"], **SIZE)
    finally:
        counter.close()
    # 3 experts (base, a, b) and the unconditional row of each (each under its own adapter)
    assert counter.rows == [6, 6, 6]
    assert pipe.last_experts.forward_calls_per_network() == {"transformer": 3}
    assert pipe.last_experts.names == ["base: a circle", "lora-a: a circle", "lora-b@0.5: a circle"]
    meta = out.trace.meta
    assert [(a["name"], a["scale"]) for a in meta["adapters"]] == [("lora-a", 1.0), ("lora-b", 0.5)]
    assert meta["adapter_mode"] == "rows" and all(len(a["sha256"]) == 64 for a in meta["adapters"])
    assert np.isfinite(out.images).all() and np.isfinite(out.trace.kappa).all()
    # the baselines run through the same single call; composite is the 0.5 / 0.5 average
    kw = dict(num_inference_steps=2, sampler="euler", output_type="latent", **f["guidance"], **SIZE)
    comp = pipe("a circle", adapters=[loras["a"], loras["b"]], operator="composite", generator=gen(1), **kw)
    avg = pipe("a circle", adapters=[loras["a"], loras["b"]], operator="average", weights=[0.5, 0.5],
               generator=gen(1), **kw)
    torch.testing.assert_close(comp.images, avg.images, rtol=0, atol=0)
    sw = pipe("a circle", adapters=[loras["a"], loras["b"]], operator="switch", generator=gen(1), **kw)
    assert sw.trace.meta["adapter_mode"] == "switch" and pipe.last_experts.forward_calls_per_network() == {
        "transformer": 2}
    # an ordinary call afterwards runs the base transformer: the loaded adapters stay inactive
    plain = pipe("a circle", operator="single", generator=gen(2), **kw).images
    fresh = f["ours"](**f["comps"]())
    fresh.set_progress_bar_config(disable=True)
    torch.testing.assert_close(plain, fresh("a circle", operator="single", generator=gen(2), **kw).images,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["single", "merge"])
def test_one_adapter_and_the_weight_merge_match_diffusers(family, method):
    _, f, pipe, loras = family
    if method == "single":
        adapters, names, weights = [(loras["a"], 0.6)], ["lora-a"], [0.6]
    else:
        adapters, names, weights = [(loras["a"], 0.6), (loras["b"], 0.8)], ["lora-a", "lora-b"], [0.6, 0.8]
    ref = f["theirs"](**f["comps"]())
    ref.set_progress_bar_config(disable=True)
    for n in names:
        ref.load_lora_weights(loras[n[-1]], adapter_name=n)
    ref.set_adapters(names, weights)
    kw = dict(num_inference_steps=3, output_type="np", **f["guidance"], **SIZE)
    want = ref("a square", generator=gen(3), **kw).images
    got = pipe("a square", adapters=adapters, operator=method, sampler="euler", generator=gen(3), **kw).images
    no_lora = pipe("a square", operator="single", sampler="euler", generator=gen(3), **kw).images
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - no_lora).max() > 1e-3  # the adapters changed the image


def test_guidance_distilled_flux_routes_adapter_rows_without_uncond(tmp_path):
    pipe = SuperDiffFluxPipeline(**tiny_flux_components(0, guidance_embeds=True))
    pipe.set_progress_bar_config(disable=True)
    a = transformer_lora(pipe.transformer, tmp_path / "lora-a", 1, FluxPipeline, ATTN)
    ref = FluxPipeline(**tiny_flux_components(0, guidance_embeds=True))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(a, adapter_name="lora-a")
    ref.set_adapters(["lora-a"], [0.9])
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np", **SIZE)
    want = ref("a square", generator=gen(4), **kw).images
    got = pipe("a square", adapters=[(a, 0.9)], operator="single", sampler="euler", generator=gen(4), **kw).images
    np.testing.assert_allclose(got, want, atol=1e-4)
    counter = CallCounter(pipe.transformer)
    try:
        pipe("a square", adapters=[None, a], operator="or", generator=gen(4), **kw)
    finally:
        counter.close()
    assert counter.rows == [2, 2, 2]  # two expert rows, no unconditional rows


def _unet_lora(out_dir):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    u = tiny_sd_unet(0)
    u.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(u))
    return out_dir


def test_bad_adapters_are_refused_before_any_compute(family, tmp_path):
    name, f, pipe, loras = family
    counter = CallCounter(pipe.transformer)

    def refused(match, **kw):
        with pytest.raises(ValueError, match=match):
            pipe("a circle", num_inference_steps=2, output_type="np", **f["guidance"], **SIZE, **kw)

    try:
        # an SD-UNet LoRA given to a transformer pipeline
        refused(r"another base architecture: its layers belong to a UNet", adapters=[_unet_lora(tmp_path / "unet")])
        # the other flow family's LoRA: some of its layers do not exist in this transformer (the
        # tiny configs share attention widths; real SD3 and Flux widths differ as well)
        other = "flux" if name == "sd3" else "sd3"
        g = FAMILIES[other]
        lora = transformer_lora(g["comps"]()["transformer"], tmp_path / "other", 5, g["theirs"], g["targets"])
        refused("another base architecture", adapters=[lora], operator="single")
        # two experts naming one adapter name for different files
        same = transformer_lora(f["comps"]()["transformer"], tmp_path / "x" / "lora-a", 9, f["theirs"], ATTN)
        refused("two experts name the adapter 'lora-a'", adapters=[loras["a"], same])
        refused("not found", adapters=[str(tmp_path / "missing.safetensors")])
        # a file that also replaces the network's own weights (a Flux Control LoRA's norms) would act
        # on every row: refused, as is DoRA
        from safetensors.torch import load_file, save_file

        sd = load_file(loras["a"] / "pytorch_lora_weights.safetensors")
        (tmp_path / "ctl").mkdir()
        save_file({**sd, "transformer.transformer_blocks.0.attn.norm_q.weight": torch.ones(8)},
                  tmp_path / "ctl" / "pytorch_lora_weights.safetensors")
        refused("replace the network's own", adapters=[tmp_path / "ctl"], operator="single")
        # keys this pipeline's loader maps to none of its components (an SD3 kohya file, which diffusers
        # does not convert for SD3; Flux's loader tries its kohya conversion and fails)
        kohya = tmp_path / "kohya.safetensors"
        save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 32),
                   "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(96, 2)}, kohya)
        refused("not in a layout diffusers' .* loader maps|is not a LoRA diffusers can read", adapters=[kohya],
                operator="single")
    finally:
        counter.close()
    assert counter.rows == []
    loaded = set(getattr(pipe.transformer, "peft_config", {}) or {})
    assert not loaded & {"unet", "other"}  # nothing of a refused file was loaded


def test_a_transformer_lora_on_an_sd_unet_is_refused(tmp_path):
    from superdiff.pipelines import SuperDiffStableDiffusionPipeline
    from superdiff.pipelines._testing import tiny_sd_components

    sd = SuperDiffStableDiffusionPipeline(**tiny_sd_components(0), safety_checker=None, feature_extractor=None)
    sd.set_progress_bar_config(disable=True)
    f = FAMILIES["sd3"]
    lora = transformer_lora(f["comps"]()["transformer"], tmp_path / "sd3-lora", 1, f["theirs"], ATTN)
    with pytest.raises(ValueError, match="its layers belong to a transformer"):
        sd("a cat", adapters=[lora], num_inference_steps=2, output_type="np")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_superdiff_generate_composes_two_loras_on_a_saved_flow_model(name, tmp_path, capsys):
    """The user-facing path: `superdiff generate --model DIR --lora A --lora B:0.5 --operator and`
    on an SD3 / Flux diffusers folder. The PNG records both adapters (name, scale, sha256 of the
    weight file; A1111 tags and short hashes) and `--from-png` gives the same pixels; the same
    file under another scale gives other pixels, and a replaced file is refused on rerun."""
    import hashlib
    import json

    from PIL import Image

    from _a1111_infotext import parse_parameters
    from superdiff.cli import main
    from superdiff.compose import read_png_composition

    f = FAMILIES[name]
    f["theirs"](**f["comps"]()).save_pretrained(tmp_path / "model")
    base = f["comps"]()["transformer"]
    a = transformer_lora(base, tmp_path / "lora-a", 1, f["theirs"], f["targets"])
    b = transformer_lora(base, tmp_path / "lora-b", 2, f["theirs"], f["targets"])
    files = {n: d / "pytorch_lora_weights.safetensors" for n, d in (("lora-a", a), ("lora-b", b))}
    sha = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in files.items()}
    # A1111's short LoRA hash: sha256 of the file after its safetensors header, 12 hex digits
    short = {n: hashlib.sha256(p.read_bytes()[8 + int.from_bytes(p.read_bytes()[:8], "little"):]).hexdigest()[:12]
             for n, p in files.items()}

    def generate(out, *argv):
        rc = main(["generate", *argv, "--out", str(tmp_path / out), "--quiet"])
        return rc, capsys.readouterr().err

    def pixels(out):
        with Image.open(tmp_path / out / "image_000.png") as im:
            return np.asarray(im.convert("RGB"))

    run = ["--model", str(tmp_path / "model"), "--prompt", "a circle", "--lora", str(a), "--operator", "and",
           "--steps", "2", "--height", "16", "--width", "16", "--seed", "3"]
    rc, err = generate("out", *run, "--lora", f"{b}:0.5")
    assert rc == 0, err
    out = tmp_path / "out"
    assert {"image_000.png", "grid.png", "trace.json", "composition.json"} <= {p.name for p in out.iterdir()}
    assert pixels("out").shape == (16, 16, 3)
    rec = read_png_composition(out / "image_000.png")
    assert rec.model_kind == name and rec.operator == "and"
    assert [(x["name"], x["scale"], x["sha256"]) for x in rec.adapters] == [
        ("lora-a", 1.0, sha["lora-a"]), ("lora-b", 0.5, sha["lora-b"])]
    with Image.open(out / "image_000.png") as im:
        p = parse_parameters(im.text["parameters"])
    assert p["Prompt"] == "a circle <lora:lora-a:1> AND a circle <lora:lora-b:0.5>"
    assert p["Lora hashes"] == f"lora-a: {short['lora-a']}, lora-b: {short['lora-b']}"
    meta = json.loads((out / "trace.json").read_text())["meta"]
    # two adapter experts and their guidance rows: one transformer forward per step
    assert meta["adapter_mode"] == "rows" and meta["forward_calls_per_network"] == {"transformer": 2}
    assert [x["sha256"] for x in meta["adapters"]] == [sha["lora-a"], sha["lora-b"]]

    rc, err = generate("again", "--from-png", str(out / "image_000.png"))
    assert rc == 0, err
    np.testing.assert_array_equal(pixels("again"), pixels("out"))
    # the scale reaches the network: lora-b at 1.0 instead of 0.5 is another image
    rc, err = generate("scale-1", *run, "--lora", str(b))
    assert rc == 0, err
    assert np.abs(pixels("scale-1").astype(int) - pixels("out")).max() > 0
    # another file under the recorded path: the rerun is refused, nothing is written
    transformer_lora(base, tmp_path / "lora-b", 7, f["theirs"], f["targets"])
    rc, err = generate("swapped", "--from-png", str(out / "image_000.png"))
    assert rc == 2 and "lora-b is not the file this composition was made with (sha256" in err, err
    assert not (tmp_path / "swapped" / "image_000.png").exists()


def test_the_lora_scale_of_joint_attention_kwargs_multiplies_every_routed_adapter(family):
    """diffusers' joint_attention_kwargs={"scale": s} multiplies every active adapter's scale; with
    adapter experts every routed adapter's, whichever adapter the transformer loaded last."""
    _, f, pipe, loras = family
    pipe("a circle", adapters=[loras["a"], loras["b"]], operator="and", num_inference_steps=1, output_type="latent",
         **f["guidance"], **SIZE)  # both loaded
    ref = f["theirs"](**f["comps"]())
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(loras["a"], adapter_name="lora-a")
    ref.set_adapters(["lora-a"], [0.6])
    kw = dict(num_inference_steps=2, output_type="np", joint_attention_kwargs={"scale": 0.5}, **f["guidance"], **SIZE)
    want = ref("a square", generator=gen(3), **kw).images
    for last in ("lora-a", "lora-b"):  # PEFT's active adapter is not what the routed forward scales
        pipe.transformer.set_adapter(last)
        got = pipe("a square", adapters=[(loras["a"], 0.6)], operator="single", sampler="euler", generator=gen(3),
                   **kw).images
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_kohya_flux_lora_loads_as_diffusers_converts_it(tmp_path):
    from safetensors.torch import save_file

    comps = lambda: tiny_flux_components(0, guidance_embeds=False)  # noqa: E731
    pipe = SuperDiffFluxPipeline(**comps())
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    d, g, state = cfg.num_attention_heads * cfg.attention_head_dim, torch.Generator().manual_seed(0), {}
    for i in range(cfg.num_layers):  # kohya's names for Flux's double blocks: fused qkv and the output
        for part, width in (("img_attn_qkv", 3 * d), ("img_attn_proj", d), ("txt_attn_qkv", 3 * d),
                            ("txt_attn_proj", d)):
            name = f"lora_unet_double_blocks_{i}_{part}"
            state[f"{name}.lora_down.weight"] = torch.randn(2, d, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(width, 2, generator=g) * 0.3
            state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, tmp_path / "flux-kohya.safetensors")
    ref = FluxPipeline(**comps())
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(tmp_path / "flux-kohya.safetensors", adapter_name="k")
    ref.set_adapters(["k"], [0.8])
    kw = dict(num_inference_steps=2, output_type="np", **FAMILIES["flux"]["guidance"], **SIZE)
    want = ref("a square", generator=gen(3), **kw).images
    got = pipe("a square", adapters=[(tmp_path / "flux-kohya.safetensors", 0.8)], operator="single", sampler="euler",
               generator=gen(3), **kw).images
    np.testing.assert_allclose(got, want, atol=1e-4)
