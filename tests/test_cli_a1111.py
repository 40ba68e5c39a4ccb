"""Files and command line as A1111 / ComfyUI / diffusers users expect them (issue 14).

Specification: every PNG's "parameters" chunk reads back through a parser written to
A1111's documented infotext format (tests/_a1111_infotext.py) into the same prompt,
negative prompt, steps, sampler, CFG scale, seed, size and model, while the `superdiff`
JSON chunk still reproduces the composition; grid.png carries the run and labels its
tiles; PNGs follow the umask; A1111's `AND` prompt syntax becomes experts with the method
named; bad or silently-ignored inputs are refused or reported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _a1111_infotext import a1111_subprompts, parse_parameters
from superdiff.a1111 import SAMPLER_LABELS, expand_prompt_syntax, split_and_prompt
from superdiff.cli import main
from superdiff.compose import Composition, read_png_composition, save_png

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("PYTHONWARNINGS", None)


# ---- the PNG "parameters" chunk in A1111's layout ----------------------------------------------------
@pytest.mark.parametrize("comp", [
    Composition(prompts=["a circle", "something red"], operator="and", steps=12, guidance_scale=4.5, seed=7,
                negative_prompt="blurry, dark", kappa_clamp=[-1.0, 2.0], lift=0.5, sampler="ddpm"),
    Composition(prompts=["a square", "something blue"], operator="or", weights=[0.3, 0.7], temperature=math.inf,
                estimator="kernel", seed=2**40),
    Composition(prompts=["a, b: c", "d"], operator="average", weights=[1.0, 2.0], seed=1),
    Composition(model="shapes-half-a", extra_models=["shapes-half-b"], operator="or", bias=[0.0, 2.0], seed=3),
    Composition(prompts=["a", "b", "c"], operator="single", single_index=2, height=48, width=64, sampler="heun"),
])
def test_png_parameters_read_back_with_an_a1111_parser(tmp_path, comp):
    comp = comp.validated()
    size = (comp.width or 32, comp.height or 32)
    path = save_png(Image.new("RGB", size, (200, 10, 10)), tmp_path / "x.png", comp)
    with Image.open(path) as im:
        text = dict(im.text)
    p = parse_parameters(text["parameters"])
    assert p["Negative prompt"] == (comp.negative_prompt or "")
    prompts, weights = split_and_prompt(p["Prompt"]) if p["Prompt"] else ([], [])
    assert prompts == comp.prompts
    if comp.operator in ("or", "average") and comp.weights and comp.prompts:
        assert weights == comp.weights
    assert int(p["Steps"]) == comp.steps and int(p["Seed"]) == comp.seed
    if comp.guidance_scale is None:  # the model's default, named once the composition runs
        assert "CFG scale" not in p
    else:
        assert float(p["CFG scale"]) == comp.guidance_scale
    assert p["Sampler"] == SAMPLER_LABELS[comp.sampler]
    assert (int(p["Size-1"]), int(p["Size-2"])) == size
    assert p["Model"] == comp.model and p["SuperDiff operator"] == comp.operator
    if comp.extra_models:
        assert p["Extra models"].split(" | ") == comp.extra_models
    if comp.lift is not None:
        assert float(p["Lift"]) == comp.lift
    if comp.kappa_clamp:
        assert json.loads(p["Kappa clamp"]) == comp.kappa_clamp
    if comp.temperature is not None:
        assert float(p["Temperature"]) == comp.temperature
    if comp.operator == "single":
        assert int(p["Single expert"]) == comp.single_index + 1
    # the JSON chunk stays the source of truth
    assert read_png_composition(path) == comp


def test_pngs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", Composition(prompts=["a"], operator="single"))
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o640
    p = save_png(Image.new("RGB", (4, 4)), tmp_path / "b.png", Composition(prompts=["a"], operator="single"))
    assert p.stat().st_mode & 0o777 == 0o666 & ~old


def test_foreign_pngs_are_refused_with_the_reason(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    Image.new("RGB", (4, 4)).save(tmp_path / "a1111.png", pnginfo=info)
    with pytest.raises(ValueError, match="Automatic1111-style parameters but no superdiff composition"):
        read_png_composition(tmp_path / "a1111.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="carries no superdiff parameters"):
        read_png_composition(tmp_path / "plain.png")


# ---- A1111 prompt syntax -----------------------------------------------------------------------------
def test_and_prompt_syntax_maps_to_experts_with_the_method_named():
    assert split_and_prompt("a circle AND something red:0.7") == (["a circle", "something red"], [None, 0.7])
    assert split_and_prompt("sand and ANDROID") == (["sand and ANDROID"], [None])  # only the word AND splits
    assert expand_prompt_syntax(["a circle AND something red"], None, "and") == (["a circle", "something red"], None)
    assert expand_prompt_syntax(["a:2 AND b"], None, "average") == (["a", "b"], [2.0, 1.0])
    assert expand_prompt_syntax(["plain"], None, None) == (["plain"], None)
    with pytest.raises(ValueError, match="name the method explicitly"):
        expand_prompt_syntax(["a AND b"], None, None)
    with pytest.raises(ValueError, match="operator 'and' takes none"):
        expand_prompt_syntax(["a:2 AND b"], None, "and")
    with pytest.raises(ValueError, match="empty part"):
        expand_prompt_syntax(["a AND "], None, "and")


# ---- superdiff generate ------------------------------------------------------------------------------
def test_generate_a1111_prompt_grid_metadata_and_random_seed(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a circle AND something red:3", "--operator", "or", "--steps", "2",
                 "-n", "2", "--seed", "-1", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    drawn = int(err.split("drew seed ")[1].split()[0])
    rec = read_png_composition(out / "image_001.png")
    assert rec.prompts == ["a circle", "something red"] and rec.weights == [1.0, 3.0] and rec.seed == drawn + 1
    grid = read_png_composition(out / "grid.png")  # the whole run: both images
    assert grid.seed == drawn and grid.num_images == 2 and grid.prompts == rec.prompts
    with Image.open(out / "grid.png") as g, Image.open(out / "image_000.png") as im:
        g, im = np.asarray(g.convert("RGB")), np.asarray(im.convert("RGB"))
    # each tile has a caption band under it ("seed N"): dark text pixels below the first tile
    scale = 256 // im.shape[0]
    band = g[2 + im.shape[0] * scale: 2 + im.shape[0] * scale + 14, 2: 2 + im.shape[1] * scale]
    assert band.size and (band.min(axis=-1) < 100).any(), "the grid's tiles are not labelled"
    assert json.loads((out / "composition.json").read_text())["seed"] == drawn


@pytest.mark.parametrize("argv, expected", [
    (["--prompt", ""], "--prompt number 1 is empty"),
    (["--prompt", "a circle", "--prompt", " "], "--prompt number 2 is empty"),
    (["--prompt", "a circle", "--operator", "and"], "AND composes two or more experts, got 1"),
    (["--prompt", "a circle AND something red"], "name the method explicitly"),
])
def test_generate_refuses_what_it_would_silently_change(tmp_path, capsys, argv, expected):
    assert main(["generate", *argv, "--steps", "1", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_generate_single_with_two_prompts_says_which_is_used(tmp_path, capsys):
    assert main(["generate", "--prompt", "a circle", "--prompt", "something red", "--operator", "single",
                 "--steps", "1", "--out", str(tmp_path / "x"), "--quiet"]) == 0
    assert "operator single samples expert 1 ('a circle') alone; the other 1 expert(s) are not used" in \
        capsys.readouterr().err
    # one prompt and no --operator (the diffusers habit): that expert alone, and it says so
    assert main(["generate", "--prompt", "a circle", "--steps", "1", "--out", str(tmp_path / "y"), "--quiet"]) == 0
    assert "one expert and no operator: sampling it alone (operator single)" in capsys.readouterr().err
    assert read_png_composition(tmp_path / "y" / "image_000.png").operator == "single"


def test_bin_only_weights_are_a_one_line_error(tmp_path, capsys):
    d = tmp_path / "pickled"
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                    "unet": ["diffusers", "UNet2DConditionModel"],
                                                    "text_encoder": ["transformers", "CLIPTextModel"]}))
    (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["generate", "--model", str(d), "--prompt", "a", "--operator", "single", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("superdiff: error:")]
    assert "Traceback" not in err and len(errors) == 1 and "only .bin weights (unet/diffusion_pytorch_model.bin); " \
        "only safetensors are loaded" in errors[0], err


def test_version_help_defaults_and_quiet(tmp_path):
    import superdiff
    from superdiff.cli import build_parser

    r = subprocess.run([sys.executable, "-m", "superdiff", "--version"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == f"superdiff {superdiff.__version__}"
    gen = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "generate")[1]
    for action in gen._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), f"{action.option_strings[0]} does not state its default"
    r = subprocess.run([sys.executable, "-m", "superdiff", "generate", "--steps", "2", "--out", str(tmp_path / "q"),
                        "--quiet"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("superdiff generate:"), r.stderr
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "q").glob("*.png")}
    assert {"image_000.png", "grid.png"} <= set(modes) and set(modes.values()) == {0o666 & ~umask}, modes


def test_hub_ids_offline_say_the_hub_is_unreachable(monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    from superdiff.compose import ModelCache, model_kind

    with pytest.raises(ValueError, match=r"hub access is switched off \(HF_HUB_OFFLINE=1\)"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        model_kind("someorg/some-model")
    with socket.socket() as s:  # a port nobody listens on: "no connection" within the timeout
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"the Hugging Face hub \(127.0.0.1\) is not reachable"):
        model_kind("someorg/some-model")
    assert time.perf_counter() - t0 < 10  # not ~20 s of retries
    with pytest.raises(ValueError, match=r"hub ids are switched off: --no-hub"):
        ModelCache(allow_hub=False).resolve("someorg/some-model")


# ---- LoRAs in the infotext, as A1111 writes them ---------------------------------------------------
def _a1111_lora_hash(path: Path) -> str:
    """A1111's short LoRA hash, computed here from its definition: the sha256 of the safetensors
    file after its 8-byte header length and JSON header, first 12 hex digits."""
    import hashlib

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def _bundled_adapters():
    from superdiff.registry import BUNDLED_ROOT

    files = {n: Path(BUNDLED_ROOT) / n / "pytorch_lora_weights.safetensors" for n in ("lora-orange", "lora-outline")}
    if not all(f.is_file() for f in files.values()):
        pytest.skip("bundled LoRAs not built (scripts/train_shapes_lora.py)")
    return files


@pytest.mark.parametrize("operator", ["and", "merge"])
def test_loras_are_written_as_a1111_tags_with_their_hashes_and_read_back(tmp_path, operator):
    from superdiff.a1111 import adapters_from_infotext
    from superdiff.compose import ModelCache, resolve_adapters

    files = _bundled_adapters()
    adapters = [{"path": "lora-orange", "scale": 0.8}, {"path": "lora-outline", "scale": 1.0}]
    if operator == "and":  # adapter experts with their own prompts, and the base model under a third
        adapters = [{**adapters[0], "prompt": "a circle"}, {**adapters[1], "prompt": "a circle"},
                    {"path": "base", "prompt": "a square"}]
    comp = Composition(prompts=["a circle", "a square"] if operator == "and" else ["a circle"], operator=operator,
                       adapters=adapters, steps=3, seed=5, guidance_scale=4.0).validated()
    comp, _ = resolve_adapters(comp, ModelCache())  # what a run records: each adapter's name and sha256
    path = save_png(Image.new("RGB", (32, 32)), tmp_path / "x.png", comp)
    with Image.open(path) as im:
        text = im.text["parameters"]
    p = parse_parameters(text)
    want_hashes = {n: _a1111_lora_hash(f) for n, f in files.items()}
    assert p["Lora hashes"] == ", ".join(f"{n}: {h}" for n, h in want_hashes.items())
    if operator == "and":
        assert p["Prompt"] == "a circle <lora:lora-orange:0.8> AND a circle <lora:lora-outline:1> AND a square"
    else:  # one expert with both adapters: A1111's own several-tags prompt
        assert p["Prompt"] == "a circle <lora:lora-orange:0.8> <lora:lora-outline:1>"
    back = adapters_from_infotext(p)
    assert [(a["name"], a["scale"], a["prompt"], a["hash"]) for a in back] == [
        ("lora-orange", 0.8, "a circle", want_hashes["lora-orange"]),
        ("lora-outline", 1.0, "a circle", want_hashes["lora-outline"])]
    assert read_png_composition(path) == comp  # the JSON chunk stays the source of truth
    # a record whose file is not the one recorded gets no hash (never a wrong one); tags stay
    other = comp.replace(adapters=[{**comp.adapters[0], "sha256": "0" * 64}, *comp.adapters[1:]])
    p2 = parse_parameters(_parameters(save_png(Image.new("RGB", (32, 32)), tmp_path / "y.png", other)))
    assert p2["Lora hashes"] == f"lora-outline: {want_hashes['lora-outline']}"
    assert [a["hash"] for a in adapters_from_infotext(p2)] == [None, want_hashes["lora-outline"]]


def _parameters(path) -> str:
    with Image.open(path) as im:
        return im.text["parameters"]


# ---- every kind of composition described truthfully in the infotext ----------------------------------
# Specification: the "parameters" chunk says what ran. Operator runs keep their prompt line
# (the prompts joined by AND, OR / average weights as ':weight') and `SuperDiff operator`; a
# formula run writes its formula (the prompt line is the formula with & | ~, never an AND of
# its prompts, never with an empty part for the unconditional prompt a NOT is relative to) and
# `SuperDiff formula` instead of an operator it did not use; a corrector, a non-default
# and_mode and a LoRA Switch interval appear as `Key: value` pairs; every value reads back
# through an A1111 parser to what the composition holds.
def _infotext_of(tmp_path, comp) -> tuple[str, dict[str, str]]:
    path = save_png(Image.new("RGB", (32, 32)), tmp_path / "x.png", comp)
    assert read_png_composition(path) == comp  # the JSON chunk stays the source of truth
    text = _parameters(path)
    return text, parse_parameters(text)


def test_plain_and_with_weights_keeps_its_a1111_line(tmp_path):
    comp = Composition(prompts=["a circle", "something red"], operator="and", weights=[1.0, 2.0], steps=4,
                       seed=3, guidance_scale=4.0).validated()
    text, p = _infotext_of(tmp_path, comp)
    # SuperDiff's AND takes no ':weight' parts: the weights are a pair of their own
    assert text.split("\n")[0] == "a circle AND something red"
    assert text.split("\n")[1] == ("Steps: 4, Sampler: Euler-Maruyama SDE, CFG scale: 4, Seed: 3, Size: 32x32, "
                                   'Model: shapes-t2i, SuperDiff operator: and, Weights: "[1.0, 2.0]", Version: '
                                   f"superdiff {__import__('superdiff').__version__}")
    assert json.loads(p["Weights"]) == comp.weights
    for key in ("SuperDiff formula", "Corrector", "AND mode", "Switch every"):
        assert key not in p


def test_or_writes_its_mixture_weights_as_a1111_weights(tmp_path):
    comp = Composition(prompts=["a square", "something blue"], operator="or", weights=[0.3, 0.7]).validated()
    text, p = _infotext_of(tmp_path, comp)
    assert p["Prompt"] == "a square:0.3 AND something blue:0.7"
    assert split_and_prompt(p["Prompt"]) == (comp.prompts, comp.weights)
    assert p["SuperDiff operator"] == "or" and "Weights" not in p and "SuperDiff formula" not in p


@pytest.mark.parametrize("formula, and_mode", [
    ('("a circle" & "something red") | "a square":0.5', "superdiff"),
    ('"a circle":2 & ~"something red":1.5', "superdiff"),
    ('"a circle" AND NOT "something red"', "product"),
    ('"a circle" & ~"something red"', "superdiff"),
])
def test_a_formula_run_writes_its_formula_not_an_and_of_its_prompts(tmp_path, formula, and_mode):
    from superdiff.a1111 import adapters_from_infotext
    from superdiff.formula import parse, unparse

    comp = Composition(compose=formula, and_mode=and_mode, steps=2).validated()
    text, p = _infotext_of(tmp_path, comp)
    prompt = text.split("\n")[0]
    assert p["Prompt"] == prompt == unparse(parse(formula))  # the formula, canonical, with & | ~
    assert " AND " not in prompt and not prompt.rstrip().endswith("AND") and "AND \n" not in text
    assert len(split_and_prompt(prompt)[0]) == 1  # A1111 reads one prompt, not an AND of several
    assert all(part.strip() for part in prompt.split("&")) and '""' not in prompt  # no empty part
    # NOT's unconditional reference is an expert of the run, but no part of the prompt line
    assert ("" in comp.prompts) == ("~" in formula or "NOT" in formula)
    for q in comp.prompts:
        assert not q or f'"{q}"' in prompt
    assert p["SuperDiff formula"] == comp.compose  # reads back exactly
    assert "SuperDiff operator" not in p  # the formula replaced the operator
    assert p.get("AND mode") == (None if and_mode == "superdiff" else and_mode)
    assert "Weights" not in p and "Corrector" not in p
    assert adapters_from_infotext(p) == []


@pytest.mark.parametrize("corrector", ["ula", "smc:8", {"particles": 8, "window": [0, 0.8]}])
def test_a_corrector_is_named(tmp_path, corrector):
    comp = Composition(prompts=["a circle", "something red"], operator="average", weights=[1.0, 1.0],
                       corrector=corrector).validated()
    text, p = _infotext_of(tmp_path, comp)
    assert p["Prompt"] == "a circle:1 AND something red:1" and p["SuperDiff operator"] == "average"
    got = p["Corrector"]
    assert (json.loads(got) if isinstance(corrector, dict) else got) == corrector
    # a formula with a corrector: both
    comp = Composition(compose='"a circle" & "something red"', and_mode="product", corrector=corrector).validated()
    _, p = _infotext_of(tmp_path, comp)
    got = p["Corrector"]
    assert (json.loads(got) if isinstance(corrector, dict) else got) == corrector
    assert p["SuperDiff formula"] == comp.compose and p["AND mode"] == "product"


def test_a_lora_switch_run_names_its_adapters_and_interval(tmp_path):
    from superdiff.a1111 import adapters_from_infotext
    from superdiff.compose import ModelCache, resolve_adapters

    files = _bundled_adapters()
    comp = Composition(prompts=["a circle"], operator="switch", adapters=["lora-orange:0.8", "lora-outline"],
                       switch_every=3, steps=6).validated()
    comp, _ = resolve_adapters(comp, ModelCache())
    text, p = _infotext_of(tmp_path, comp)
    want = {n: _a1111_lora_hash(f) for n, f in files.items()}
    assert p["Prompt"] == "a circle <lora:lora-orange:0.8> <lora:lora-outline:1>"
    assert p["SuperDiff operator"] == "switch" and int(p["Switch every"]) == 3
    assert p["Lora hashes"] == ", ".join(f"{n}: {h}" for n, h in want.items())
    assert [(a["name"], a["scale"], a["hash"]) for a in adapters_from_infotext(p)] == [
        ("lora-orange", 0.8, want["lora-orange"]), ("lora-outline", 1.0, want["lora-outline"])]
    # the interval belongs to LoRA Switch alone
    merge = comp.replace(operator="merge")
    assert "Switch every" not in _infotext_of(tmp_path, merge)[1]


def test_generate_with_a_formula_and_corrector_writes_them(tmp_path):
    formula = '("a circle" & "something red") | "a square":0.5'
    assert main(["generate", "--compose", formula, "--corrector", "ula", "--steps", "2", "--out",
                 str(tmp_path / "e"), "--quiet"]) == 0
    p = parse_parameters(_parameters(tmp_path / "e" / "image_000.png"))
    assert p["Prompt"] == formula and p["SuperDiff formula"] == formula and p["Corrector"] == "ula"
    assert "SuperDiff operator" not in p and int(p["Steps"]) == 2
    assert main(["generate", "--compose", '"a circle" & ~"something red"', "--steps", "2", "--out",
                 str(tmp_path / "e2"), "--quiet"]) == 0
    text = _parameters(tmp_path / "e2" / "image_000.png")
    assert text.split("\n")[0] == '"a circle" & ~"something red"' and "AND \n" not in text


def test_lora_tags_in_prompts_make_adapter_experts_in_the_cli_as_in_the_studio(tmp_path):
    """'a circle <lora:lora-orange:0.8>' is the expert "the model with lora-orange at 0.8, under
    'a circle'" (superdiff.a1111.prompt_adapters, shared with the studio's prompt rows); a row
    without a tag is then the base model. Tags together with --lora are refused."""
    import json

    from superdiff.a1111 import prompt_adapters
    from superdiff.cli import main

    assert prompt_adapters(["a", "b"]) == (["a", "b"], [])
    assert prompt_adapters(["a circle <lora:lora-orange:0.8>", "a square"]) == (
        ["a circle", "a square"], [{"path": "lora-orange", "scale": 0.8, "prompt": "a circle"},
                                   {"path": "base", "prompt": "a square"}])
    with pytest.raises(ValueError, match="prompt 1 names 2 adapters"):
        prompt_adapters(["a <lora:x> <lora:y>"])
    out = tmp_path / "o"
    assert main(["generate", "--prompt", "a circle <lora:lora-orange:0.8>", "--prompt", "a circle", "--operator",
                 "and", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    comp = json.loads((out / "composition.json").read_text())
    assert comp["prompts"] == ["a circle"]
    assert [(a["path"], a["scale"], a["prompt"]) for a in comp["adapters"]] == [("lora-orange", 0.8, "a circle"),
                                                                                ("base", 1.0, "a circle")]
    assert main(["generate", "--prompt", "a circle <lora:lora-orange>", "--prompt", "a square", "--lora",
                 "lora-outline", "--operator", "and", "--steps", "2", "--quiet", "--out", str(out)]) == 2


# ---- fixes: records that say what ran, inputs refused before anything is lost -----------------------
@pytest.mark.parametrize("operator, weights", [("and", None), ("single", None), ("or", None), ("average", None),
                                               ("or", [0.3, 0.7])])
def test_a_prompt_ending_in_a_number_reads_back_whole_from_the_and_line(tmp_path, operator, weights):
    """'a clock at 10:30' on an AND line is written with A1111's default ':1' (or the weights the
    operator uses), so A1111's parser and our --prompt parser read the prompt back whole, not
    'a clock at 10' with weight 30; the weights read back mean what the record's do."""
    comp = Composition(prompts=["a clock at 10:30", "something red"], operator=operator, weights=weights).validated()
    _, p = _infotext_of(tmp_path, comp)
    prompts, _ = split_and_prompt(p["Prompt"])
    assert prompts == comp.prompts, p["Prompt"]
    back, w = expand_prompt_syntax([p["Prompt"]], None, operator)
    assert back == comp.prompts
    if operator in ("and", "single"):
        assert w is None
    elif weights is not None:
        assert w == weights
    else:  # no weights: the equal weights the operator uses without any
        assert w == ([1.0, 1.0] if operator == "or" else [0.5, 0.5])
    one = Composition(prompts=["a clock at 10:30"], operator="single").validated()
    assert _infotext_of(tmp_path, one)[1]["Prompt"] == "a clock at 10:30"  # one part: no AND line to read


def test_grid_png_names_the_images_size_not_the_canvas(tmp_path):
    """grid.png's infotext Size is the generation size (the tiles'), as in every image's PNG."""
    comp = Composition(prompts=["a circle", "something red"]).validated()
    path = save_png(Image.new("RGB", (300, 170)), tmp_path / "g.png", comp, size=(32, 32))
    assert parse_parameters(_parameters(path))["Size-1"] == "32"
    out = tmp_path / "o"
    assert main(["generate", "--steps", "1", "-n", "2", "--quiet", "--out", str(out)]) == 0
    with Image.open(out / "image_000.png") as im:
        w, h = im.size
    with Image.open(out / "grid.png") as g:
        assert g.size != (w, h)
    p = parse_parameters(_parameters(out / "grid.png"))
    assert (int(p["Size-1"]), int(p["Size-2"])) == (w, h)


def test_new_prompts_over_a_png_with_lora_tags_bring_their_own_tags(tmp_path, capsys):
    """--from-png of a run made with '<lora:...>' tags, with new --prompt: each adapter belongs to
    an old prompt, so new prompts without tags are refused with the tags to repeat (never the old
    prompts sampled under the new record); new prompts with tags bring their own LoRAs."""
    out = tmp_path / "l1"
    assert main(["generate", "--prompt", "a circle <lora:lora-orange:0.8>", "--prompt", "something red",
                 "--operator", "and", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    src = str(out / "image_000.png")
    assert main(["generate", "--from-png", src, "--prompt", "a square", "--prompt", "something blue", "--quiet",
                 "--out", str(tmp_path / "l2")]) == 2
    err = capsys.readouterr().err
    assert "adapters: the LoRAs of the PNG belong to its own prompts ('a circle' <lora:lora-orange:0.8>; " \
           "'something red' (base model)), which --prompt replaces; repeat the LoRA tags" in err, err
    assert not (tmp_path / "l2").exists()
    assert main(["generate", "--from-png", src, "--prompt", "a square <lora:lora-orange:0.5>", "--prompt",
                 "something blue", "--quiet", "--out", str(tmp_path / "l3")]) == 0
    rec = read_png_composition(tmp_path / "l3" / "image_000.png")
    assert rec.prompts == ["a square", "something blue"]
    assert [(a["path"], a["scale"], a["prompt"]) for a in rec.adapters] == [("lora-orange", 0.5, "a square"),
                                                                           ("base", 1.0, "something blue")]
    # dropping the LoRAs is said explicitly
    assert main(["generate", "--from-png", src, "--prompt", "a square", "--prompt", "something blue", "--set",
                 "adapters=[]", "--quiet", "--out", str(tmp_path / "l4")]) == 0
    assert read_png_composition(tmp_path / "l4" / "image_000.png").adapters == []


def test_from_png_never_overwrites_its_source(tmp_path, capsys, monkeypatch):
    """--from-png with --out the source's own folder: refused before sampling, the source left as
    it was (no "identical pixels" against the overwritten file)."""
    import superdiff.compose as C

    out = tmp_path / "g"
    assert main(["generate", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(C, "run_composition", lambda *a, **k: pytest.fail("sampled before refusing"))
    for name in ("image_000.png", "grid.png"):
        assert main(["generate", "--from-png", str(out / name), "--steps", "3", "--quiet", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"the run would overwrite the source image {out / name} (as {name}); give another --out folder" \
            in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_merge_and_switch_without_prompts_take_one_default_prompt(tmp_path, capsys):
    """merge / switch make one expert: with no --prompt the shapes default is 'a circle' alone."""
    out = tmp_path / "m"
    assert main(["generate", "--operator", "merge", "--lora", "lora-orange", "--lora", "lora-outline", "--steps", "1",
                 "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "composition.json").read_text())["prompts"] == ["a circle"]
    assert main(["generate", "--operator", "switch", "--prompt", "a", "--prompt", "b", "--lora", "lora-orange",
                 "--lora", "lora-outline", "--steps", "1", "--quiet", "--out", str(tmp_path / "s")]) == 2
    assert "prompts: operator switch makes one expert with every adapter, so it takes one prompt" in \
        capsys.readouterr().err


def test_quiet_hides_the_trace_plots_font_warnings(tmp_path):
    """--quiet: a CJK prompt's missing glyphs in the trace plot raise no matplotlib warning."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["generate", "--prompt", "\u4e00\u4e2a\u5706", "--prompt", "something red", "--steps", "1",
                     "--quiet", "--out", str(tmp_path / "q")]) == 0
    assert not [w for w in seen if "Glyph" in str(w.message)], [str(w.message) for w in seen]


# ---- A1111 reads a prompt's ':weight' after taking its <lora:...> tags out ---------------------------
def test_a_weight_before_a_lora_tag_is_a1111s_weight_in_the_prompt_and_the_infotext(tmp_path):
    """A1111 removes the extra-network tags from a prompt before it reads each AND part's
    ':weight': 'a circle:0.3 <lora:x:0.8>' has weight 0.3 (our --prompt read 'a circle:0.3' as
    text, weight 1), and an expert row 'a clock at 10:30 <lora:x:0.8>' written on the AND line
    would be read by A1111 as 'a clock at 10' with weight 30."""
    from superdiff.a1111 import adapters_from_infotext, parse_prompt_rows

    line = "a circle:0.3 <lora:lora-orange:0.8> AND something red:0.7"
    assert a1111_subprompts(line) == [("a circle", 0.3), ("something red", 0.7)]
    prompts, weights, adapters = parse_prompt_rows([line], None, "or")
    assert prompts == ["a circle", "something red"] and weights == [0.3, 0.7]
    assert adapters == [{"path": "lora-orange", "scale": 0.8, "prompt": "a circle"},
                        {"path": "base", "prompt": "something red"}]
    assert [a["prompt"] for a in adapters_from_infotext({"Prompt": line})] == ["a circle"]
    comp = Composition(prompts=["a clock at 10:30", "something red"], operator="and", adapters=[
        {"path": "lora-orange", "scale": 0.8, "prompt": "a clock at 10:30"},
        {"path": "base", "prompt": "something red"}]).validated()
    _, p = _infotext_of(tmp_path, comp)
    assert [t for t, _ in a1111_subprompts(p["Prompt"])] == comp.prompts, p["Prompt"]
    assert parse_prompt_rows([p["Prompt"]], None, "and") == (comp.prompts, None, [
        {"path": "lora-orange", "scale": 0.8, "prompt": "a clock at 10:30"},
        {"path": "base", "prompt": "something red"}])
    assert [(a["name"], a["prompt"]) for a in adapters_from_infotext(p)] == [("lora-orange", "a clock at 10:30")]


def test_adapters_from_infotext_reads_a1111s_longer_lora_tags():
    """<lora:NAME:TE:UNET> and <lora:NAME:unet=X>, as A1111 writes them: the UNet multiplier is
    the scale (as in --prompt); before, the first was skipped and the second raised."""
    from superdiff.a1111 import adapters_from_infotext

    p = {"Prompt": "a circle <lora:orange v1.5:0.5:0.8> AND a square <lora:outline:te=1:unet=0.3>",
         "Lora hashes": "orange v1.5: 0123456789ab, outline: ba9876543210"}
    assert [(a["name"], a["scale"], a["prompt"], a["hash"]) for a in adapters_from_infotext(p)] == [
        ("orange v1.5", 0.8, "a circle", "0123456789ab"), ("outline", 0.3, "a square", "ba9876543210")]


def test_quoted_infotext_values_keep_non_ascii_text_as_a1111_writes_it(tmp_path):
    """A1111 quotes a value with json.dumps(..., ensure_ascii=False): '一个圆', not '\\u4e00...',
    which readers that only strip the quotes (image browsers) would show."""
    comp = Composition(compose='"\u4e00\u4e2a\u5706" & "something red"', steps=2).validated()
    text, p = _infotext_of(tmp_path, comp)
    assert '"\\"\u4e00\u4e2a\u5706\\" & \\"something red\\""' in text.split("\n")[-1] and "\\u" not in text
    assert p["SuperDiff formula"] == comp.compose


def test_an_average_without_weights_writes_the_weights_it_ran_with(tmp_path):
    """A1111's AND sums the parts' guidance with weight 1 each (eps = u + w sum_i w_i (c_i - u)),
    so 'a circle AND something red' is kappa (1, 1) there; operator average without weights runs
    kappa 1/M each. The infotext names those weights, so A1111 (and --prompt) read what ran."""
    comp = Composition(prompts=["a circle", "something red", "a square"], operator="average").validated()
    _, p = _infotext_of(tmp_path, comp)
    third = 1 / 3
    assert a1111_subprompts(p["Prompt"]) == [("a circle", third), ("something red", third), ("a square", third)]
    assert expand_prompt_syntax([p["Prompt"]], None, "average") == (comp.prompts, [third] * 3)
    assert "Weights" not in p


def test_lyco_tags_are_lora_tags_and_hypernetwork_tags_are_refused():
    """A1111 takes <lyco:...> as another name for <lora:...>; a <hypernet:...> tag would reach the
    text encoder as words: it is refused, naming the tag."""
    from superdiff.a1111 import parse_prompt_rows

    assert parse_prompt_rows(["a circle <lyco:lora-orange:0.8>", "something red"], None, "and") == \
        parse_prompt_rows(["a circle <lora:lora-orange:0.8>", "something red"], None, "and")
    prompts, _, adapters = parse_prompt_rows(["a circle <lyco:lora-orange:0.8>"], None, "single")
    assert prompts == ["a circle"] and adapters[0]["path"] == "lora-orange" and adapters[0]["scale"] == 0.8
    with pytest.raises(ValueError, match=r"prompt 2 names the hypernetwork <hypernet:anime:1>; A1111 hypernetworks "
                                         r"are not supported"):
        parse_prompt_rows(["a circle", "something red <hypernet:anime:1>"], None, "and")
