"""Unit tests of the studio's handlers (ui/handlers.py) and its command line: form <->
Composition, validation messages, settings JSON, compare expansion, model allow-list,
model cache reuse, cancellation and error messages. No browser; a few seconds of CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from superdiff.compose import DEFAULT_COMPOSITION, Composition, ModelCache, read_png_composition, save_png
from superdiff.registry import list_bundled_models
from superdiff.ui import handlers as H


def roundtrip(comp: Composition) -> Composition:
    values = H.values_from_form(H.form_from_composition(comp))
    return H.composition_from_form(H.form_from_values(values))


def form(**kw):
    f = H.form_from_composition(DEFAULT_COMPOSITION)
    f.update(kw)
    return f


# ---- form <-> Composition ---------------------------------------------------------------------
@pytest.mark.parametrize("comp", [
    DEFAULT_COMPOSITION,
    Composition(prompts=["a circle", "something red"], operator="or", temperature=math.inf, weights=[0.3, 0.7]),
    Composition(prompts=["a circle", "something red"], operator="or", temperature=0.5, bias=[-1.25, 0.0]),
    Composition(prompts=["a", "b"], operator="and", lift=1.5, kappa_clamp=[-0.5, 1.5], estimator="kernel",
                sampler="ddpm", steps=12, guidance_scale=2.5, negative_prompt="blurry", seed=7, num_images=3),
    Composition(prompts=["a", "b", "c"], operator="and", kappa_clamp=False, height=64, width=48),
    Composition(prompts=["a", "b", "c"], operator="single", single_index=2),
    Composition(prompts=["a", "b"], operator="joint", joint_template="{0} that is {1}"),
    Composition(prompts=["a", "b"], operator="average", weights=[1.5, -0.5]),
    Composition(model="shapes-half-a", extra_models=["shapes-half-b"], operator="or", bias=[0.0, 2.0]),
])
def test_form_round_trip(comp):
    assert roundtrip(comp) == comp.validated()


def test_blank_and_extra_rows():
    f = form(rows=4, prompts=["a circle", "", "  something red ", "", "hidden row", ""],
             weights=["0.25", "", "0.75", "", "9", ""], operator="or")
    c = H.composition_from_form(f)
    assert c.prompts == ["a circle", "something red"]  # blank rows skipped, rows beyond `rows` ignored
    assert c.weights == [0.25, 0.75]


def test_prompts_beyond_the_shown_rows_are_named_in_a_note():
    """A scripted call (gradio_client) that sets prompt_3 but leaves prompt_rows at the page's 2
    lost the third prompt without a word."""
    named = dict(zip(H.API_NAMES, H.values_from_form(H.form_from_composition(DEFAULT_COMPOSITION))))
    named.update(prompt_1="a circle", prompt_2="something red", prompt_3="a square", operator="or")
    c, notes = H.parse_form(H.form_from_values([named[n] for n in H.API_NAMES]))
    assert c.prompts == ["a circle", "something red"]
    assert any("prompt 3 is beyond the 2 prompt rows shown and was ignored" in n for n in notes), notes
    c, notes = H.parse_form(H.form_from_values([{**named, "prompt_rows": 3}[n] for n in H.API_NAMES]))
    assert c.prompts == ["a circle", "something red", "a square"] and not any("beyond" in n for n in notes)
    c, notes = H.parse_form(H.form_from_values([{**named, "prompt_rows": 0}[n] for n in H.API_NAMES]))
    assert c.prompts == ["a circle"] and any("prompt 2, 3 are beyond the 1 prompt rows" in n for n in notes), notes


def test_unconditional_rows_are_model_then_extra_models():
    f = form(model="shapes-half-a", extra_models=["shapes-half-b"], prompts=["", ""], biases=["0", "1"],
             operator="or")
    c = H.composition_from_form(f)
    assert c.prompts == [] and c.extra_models == ["shapes-half-b"] and c.bias == [0.0, 1.0]


def test_parameters_of_other_operators_are_dropped_with_a_note():
    c, notes = H.parse_form(form(operator="and", weights=["1", "2"], temperature="3", lift="0.5"))
    assert c.weights is None and c.temperature is None and c.lift == 0.5
    assert any("weights" in n for n in notes) and any("temperature" in n for n in notes)
    c, notes = H.parse_form(form(operator="or", lift="0.5", clamp_mode="off", temperature="inf"))
    assert c.lift is None and c.kappa_clamp is None and c.temperature == math.inf
    assert any("lift" in n for n in notes)


@pytest.mark.parametrize("changes, expected", [
    ({"steps": 0}, "Steps: must be between 1 and"),
    ({"steps": "many"}, "Steps: must be a number"),
    ({"num_images": 2.5}, "Images: must be a whole number"),
    ({"seed": -2}, "Seed: must be between 0"),  # -1 is "random"
    ({"model": " "}, "Model: give a bundled model name"),
    ({"operator": "xor"}, "Operator: unknown operator 'xor'"),
    ({"operator": "or", "weights": ["0.5", ""]}, "Weights: set a value in every expert's row"),
    ({"operator": "or", "weights": ["abc", "1"]}, "Weights: must be a number, got 'abc'"),
    ({"operator": "or", "weights": ["1", "1"], "biases": ["0", "1"]}, "Weights: give either weights or bias"),
    ({"operator": "or", "weights": ["-1", "1"]}, "Weights: OR mixture weights must be positive"),
    ({"operator": "or", "temperature": "-2"}, "Temperature: must be >= 0"),
    ({"clamp_mode": "custom", "clamp_lo": None}, "Kappa clamp: give both bounds"),
    ({"clamp_mode": "custom", "clamp_lo": 2, "clamp_hi": 1}, "Kappa clamp: lo must be below hi"),
    ({"rows": 3, "prompts": ["a", "b", "c"], "lift": "1"}, "Lift: the lift offsets log q_1 - log q_2 and needs "
                                                           "exactly two experts, got 3"),
    ({"operator": "single", "single_expert": 3}, "Single expert: expert 3 does not exist (2 experts)"),
    ({"operator": "joint", "prompts": ["", ""]}, "Prompts: the joint-prompt baseline needs prompts"),
    ({"height": "4"}, "Height: must be between 8 and"),
    ({"dtype": "int8"}, "Precision: choose one of float32"),
])
def test_validation_messages_name_the_field_and_the_fix(changes, expected):
    with pytest.raises(ValueError) as e:
        H.composition_from_form(form(**changes))
    msg = H.error_message(e.value)
    assert msg.startswith(expected), msg
    assert "Traceback" not in msg


def test_request_limits():
    H.check_limits(DEFAULT_COMPOSITION, max_steps=200, max_images=8)
    with pytest.raises(ValueError, match="steps: at most 50"):
        H.check_limits(DEFAULT_COMPOSITION.replace(steps=51), max_steps=50, max_images=8)
    with pytest.raises(ValueError, match="num_images: at most 8 .*superdiff batch"):
        H.check_limits(DEFAULT_COMPOSITION.replace(num_images=9), max_steps=50, max_images=8)


def test_form_from_values_checks_the_count():
    with pytest.raises(ValueError, match="expected"):
        H.form_from_values([1, 2, 3])


# ---- compare methods --------------------------------------------------------------------------
def test_compare_expansion_text_to_image():
    base = Composition(prompts=["a circle", "something red"], operator="or", temperature=2.0, weights=[1.0, 3.0],
                       lift=0.5, kappa_clamp=[-0.5, 1.5], seed=11, steps=9, num_images=2)
    jobs = H.compare_methods(base)
    assert [label for label, _ in jobs] == ["joint prompt", "average", "OR", "AND"]
    ops = {label: c for label, c in jobs}
    assert [c.operator for _, c in jobs] == ["joint", "average", "or", "and"]
    assert all(c.seed == 11 and c.steps == 9 and c.num_images == 2 and c.prompts == base.prompts for _, c in jobs)
    assert ops["OR"].temperature == 2.0 and ops["OR"].weights == [1.0, 3.0] and ops["OR"].lift is None
    assert ops["AND"].lift == 0.5 and ops["AND"].kappa_clamp == [-0.5, 1.5] and ops["AND"].weights is None
    assert ops["average"].weights == [1.0, 3.0] and ops["average"].temperature is None
    assert ops["joint prompt"].weights is None and ops["joint prompt"].lift is None


def test_compare_expansion_unconditional_has_no_joint_prompt():
    jobs = H.compare_methods(Composition(model="shapes-half-a", extra_models=["shapes-half-b"], operator="and"))
    assert [label for label, _ in jobs] == ["average", "OR", "AND"]


def test_compare_needs_two_experts():
    with pytest.raises(ValueError, match="at least two experts"):
        H.compare_methods(Composition(prompts=["a circle"]))


@pytest.mark.parametrize("prompts", [["a circle", "a circle"], ["a circle", "a square"]])
def test_compare_expansion_of_lora_rows(prompts):
    """Two LoRA rows are two experts (also on one prompt), and the joint prompt, which takes no
    adapters, is left out (before, the compare refused both forms)."""
    form = {"model": "shapes-t2i", "rows": 2, "operator": "and", "steps": 2, "prompts": prompts,
            "loras": ["lora-orange", "lora-outline"], "lora_scales": [1.0, 0.8]}
    comp, _ = H.parse_form(form)
    jobs = H.compare_methods(comp)
    assert [label for label, _ in jobs] == ["average", "OR", "AND"]
    assert all(c.adapters == comp.adapters for _, c in jobs)


def test_compare_refuses_a_formula_instead_of_drawing_it_under_four_labels():
    """A formula fixes its own method (the operator is ignored by the run): before, Compare drew
    the same formula four times, labelled joint prompt / average / OR / AND, with records that
    named those operators."""
    comp, _ = H.parse_form(form(compose='"a circle" & "something red"'))
    with pytest.raises(ValueError, match="^compose: Compare methods") as e:
        H.compare_methods(comp)
    assert H.error_message(e.value).startswith("Formula: ")


def test_compare_with_a_corrector_leaves_out_the_joint_prompt_and_names_the_run_that_refuses():
    """The joint-prompt baseline takes no corrector: before, Compare with e.g. 'ula' failed only
    after the model loaded, at its first run; and with SMC the message told the user to pick
    the operator they had picked (it was Compare's AND run that refused it)."""
    comp, _ = H.parse_form(form(operator="or", corrector="ula", sampler="ddpm"))
    jobs = H.compare_methods(comp)
    assert [label for label, _ in jobs] == ["average", "OR", "AND"]
    assert all(c.corrector == "ula" for _, c in jobs)
    with pytest.raises(ValueError, match="^corrector: .*joint-prompt baseline takes no corrector"):
        H.parse_form(form(operator="joint", corrector="ula", sampler="ddpm"))
    comp, _ = H.parse_form(form(operator="average", corrector="smc:4", sampler="ddpm"))
    with pytest.raises(ValueError, match="^corrector: Compare methods also runs AND"):
        H.compare_methods(comp)


@pytest.mark.parametrize("changes, label", [
    ({"compose": '"a circle" & '}, "Formula: "), ({"corrector": "foo"}, "Corrector: "),
    ({"compose": '"a" & "b"', "and_mode": "xx"}, "& means: ")])
def test_formula_and_corrector_errors_name_the_fields_on_the_page(changes, label):
    with pytest.raises(ValueError) as e:
        H.parse_form(form(**changes))
    assert H.error_message(e.value).startswith(label)


# ---- settings JSON --------------------------------------------------------------------------------
def test_settings_json_round_trip_and_envelope():
    c = Composition(prompts=["a", "b"], operator="or", temperature=math.inf, bias=[0.5, -0.5], seed=3)
    text = H.settings_json(c)
    assert H.settings_from_json(text) == c
    d = json.loads(text)
    assert set(d) == set(Composition.field_names()) and d["temperature"] == "inf"  # strict JSON
    assert H.settings_from_json(json.dumps({"composition": d, "note": "from a batch job"})) == c
    assert H.settings_from_json(json.dumps({**d, "superdiff_version": "0.1.0"})) == c


@pytest.mark.parametrize("text, expected", [
    ("", "Settings: the JSON is empty"),
    ('{"model": "shapes-t2i",\n "steps": }', "Settings: not valid JSON (Expecting value at line 2, column 11)"),
    ('[1, 2]', "a composition must be a JSON object"),
    ('{"stepz": 3}', "unknown field(s) stepz; known fields: model"),
    ('{"steps": 0}', "Steps: must be between 1"),
])
def test_settings_json_errors(text, expected):
    with pytest.raises(ValueError) as e:
        H.settings_from_json(text)
    assert H.error_message(e.value).startswith(expected), H.error_message(e.value)


def test_settings_files_json_and_png(tmp_path):
    from PIL import Image

    c = DEFAULT_COMPOSITION.replace(seed=5, operator="or")
    (tmp_path / "s.json").write_text(H.settings_json(c))
    assert H.load_settings_file(tmp_path / "s.json") == c
    rec = c.image_record(2)
    save_png(Image.new("RGB", (8, 8), (255, 0, 0)), tmp_path / "img.png", rec)
    assert H.load_settings_file(tmp_path / "img.png") == rec  # reproduces that image: seed 7, one image
    (tmp_path / "s.txt").write_text("{}")
    with pytest.raises(ValueError, match="neither a .json settings file nor a superdiff .png"):
        H.load_settings_file(tmp_path / "s.txt")


# ---- models: allow-list and choices ---------------------------------------------------------------
def _fake_model(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                    "unet": ["diffusers", "UNet2DConditionModel"],
                                                    "text_encoder": ["transformers", "CLIPTextModel"]}))
    return d


def test_paths_outside_the_allowed_roots_are_refused(tmp_path):
    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    inside = _fake_model(root / "org" / "mine")
    secret = _fake_model(outside / "secret")
    (root / "link").symlink_to(secret, target_is_directory=True)
    cache = ModelCache(allow_roots=[root], allow_hub=False)
    assert H.model_kind(str(inside), cache) == "sd"
    for bad in (str(secret), str(root / "link"), str(root / ".." / "elsewhere" / "secret"), "/etc", "~"):
        with pytest.raises(ValueError) as e:
            H.model_kind(bad, cache)
        msg = H.error_message(e.value)
        assert msg.startswith("Model: ") and "outside the allowed model folders" in msg, msg
    assert "outside the allowed model folders" in H.describe_model(str(secret), cache)
    with pytest.raises(ValueError, match="unknown model 'org/hub-model'"):
        H.model_kind("org/hub-model", cache)  # hub ids off
    # no roots at all: bundled models only
    with pytest.raises(ValueError, match="none configured"):
        H.model_kind(str(inside), ModelCache(allow_roots=[], allow_hub=False))
    assert H.model_kind("shapes-t2i", ModelCache(allow_roots=[], allow_hub=False)) == "sd"


def test_model_choices_lists_bundled_then_allowed_folders(tmp_path):
    root = tmp_path / "models"
    mine = _fake_model(root / "org" / "mine")
    _fake_model(root / ".hidden" / "x")
    (root / "empty").mkdir()
    _fake_model(tmp_path / "elsewhere" / "secret")
    choices = H.model_choices([root])
    bundled = list_bundled_models()
    assert {"shapes-flow", "shapes-half-a", "shapes-half-b", "shapes-t2i"} <= set(bundled)
    assert choices[: len(bundled)] == bundled
    assert choices[len(bundled):] == [str(mine.resolve())]
    assert H.default_allow_roots(tmp_path) == [root.resolve()]
    assert H.default_allow_roots(tmp_path / "models" / "empty") == []


def test_model_descriptions_and_suggestions():
    cache = ModelCache(allow_roots=[], allow_hub=True)
    assert "text-to-image" in H.describe_model("shapes-t2i", cache)
    assert "unconditional" in H.describe_model("shapes-half-a", cache)
    assert "Hub model `org/name`" in H.describe_model("org/name", cache)
    assert "shapes-half-b" in H.suggest_extra_models("shapes-half-a", [], cache)  # the other unconditional models
    assert "shapes-half-a" in H.suggest_extra_models("shapes-half-b", None, cache)
    assert all(H.model_kind(m, cache) == "unet2d" for m in H.suggest_extra_models("shapes-half-a", [], cache))
    assert H.suggest_extra_models("shapes-t2i", [], cache) == []
    assert H.suggest_extra_models("shapes-half-a", ["x/y"], cache) == ["x/y"]


def test_model_fit_is_checked_before_loading():
    cache = ModelCache(allow_roots=[], allow_hub=False)
    half = Composition(model="shapes-half-a", prompts=["a circle"], extra_models=["shapes-half-b"])
    with pytest.raises(ValueError, match="unconditional model and takes no prompts; clear the prompt rows"):
        H.check_model_fits(half, H.model_kind(half.model, cache))
    with pytest.raises(ValueError, match="text-to-image model; give at least one prompt"):
        H.check_model_fits(Composition(prompts=[]), H.model_kind("shapes-t2i", cache))
    H.check_model_fits(half.replace(prompts=[]), "unet2d")
    H.check_model_fits(DEFAULT_COMPOSITION, "sd")
    H.check_model_fits(DEFAULT_COMPOSITION, None)  # hub ids: the pipeline checks after loading


# ---- errors -----------------------------------------------------------------------------------------
def test_error_messages_are_readable():
    assert H.error_message(InterruptedError("cancelled")) == "Cancelled."
    assert H.error_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")).startswith("Out of memory")
    assert H.error_message(OSError("Error no file named diffusion_pytorch_model.safetensors found\nmore")) == \
        "Could not load the model files: Error no file named diffusion_pytorch_model.safetensors found"
    assert H.error_message(ValueError("lift: needs two experts")) == "Lift: needs two experts"
    assert H.error_message(ImportError("No module named 'gradio'")).startswith("A package is missing")
    msg = H.error_message(KeyError("boom"))
    assert msg.startswith("Generation failed (KeyError: 'boom')") and "server log" in msg
    long = H.error_message(RuntimeError("x" * 2000 + "\nTraceback (most recent call last):"))
    assert len(long) < 500 and "Traceback" not in long


# ---- running: cache reuse, PNGs, traces, cancel ---------------------------------------------------
@pytest.fixture(scope="module")
def cache():
    import torch

    torch.set_num_threads(1)
    return ModelCache(allow_roots=[], allow_hub=False)


def test_run_jobs_reuses_the_loaded_model_and_writes_pngs(cache, tmp_path):
    comp = DEFAULT_COMPOSITION.replace(steps=2, num_images=2, seed=4)
    progress = []
    batches = list(H.run_jobs([("AND", comp)], cache, tmp_path / "a", on_progress=lambda f, t: progress.append(f)))
    assert [len(b) for b in batches] == [1, 2]
    items = batches[-1]
    assert cache.loads == 1
    assert progress[-1] == 1.0 and progress == sorted(progress)
    for i, it in enumerate(items):
        assert read_png_composition(it.path) == comp.replace(model_kind="sd", guidance_scale=4.0).image_record(i)  # the scale used
        assert it.trace.kappa.shape == (2, 1, 2) and it.trace.expert_names == ["a circle", "something red"]
        assert Path(H.render_trace_plot(it)).stat().st_size > 1000
    # the compare run on the same model loads nothing more
    jobs = [(label, c.replace(num_images=1)) for label, c in H.compare_methods(comp)]
    items = list(H.run_jobs(jobs, cache, tmp_path / "b"))[-1]
    assert [it.method for it in items] == ["joint prompt", "average", "OR", "AND"]
    assert {it.record.seed for it in items} == {4}
    assert cache.loads == 1
    z = H.zip_results(items, tmp_path / "all.zip")
    names = zipfile.ZipFile(z).namelist()
    assert "compositions.json" in names and sum(n.endswith(".png") for n in names) == 4
    assert sum(n.endswith("_trace.json") for n in names) == 4


def test_cancel_stops_after_the_current_step(cache, tmp_path):
    reg = H.CancelRegistry()
    assert not reg.cancel("s1")
    flag = reg.start("s1")
    steps = []

    def on_progress(frac: float, text: str) -> None:
        steps.append(text)
        if "step 1/" in text:
            assert reg.cancel("s1")

    comp = DEFAULT_COMPOSITION.replace(steps=5, num_images=3)
    done = []
    with pytest.raises(InterruptedError):
        for items in H.run_jobs([("AND", comp)], cache, tmp_path, on_progress=on_progress, should_stop=flag.is_set):
            done = items
    assert done == [] and not any("step 2/" in s for s in steps)
    reg.finish("s1", flag)
    assert not reg.running("s1")


def test_output_dirs_keep_only_the_newest(tmp_path):
    out = H.OutputDirs(tmp_path / "root", keep=2)
    dirs = [out.new() for _ in range(4)]
    assert [d.exists() for d in dirs] == [False, False, True, True]
    out.cleanup()
    assert not (tmp_path / "root").exists()


# ---- command line -------------------------------------------------------------------------------
def test_ui_cli_parser_and_light_import():
    from superdiff.cli import build_parser

    args = build_parser().parse_args(["ui", "--port", "7999", "--allow-root", "a", "--allow-root", "b", "--no-hub",
                                      "--max-concurrency", "2", "--max-models", "3"])
    assert (args.host, args.port, args.share, args.allow_root, args.no_hub) == ("127.0.0.1", 7999, False,
                                                                                ["a", "b"], True)
    assert (args.max_concurrency, args.max_models) == (2, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ui", "--max-concurrency", "0"])
    code = "import sys, superdiff.ui.cli; sys.exit(1 if 'gradio' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


# ---- adapter (LoRA) pickers ---------------------------------------------------------------------
def _bundled_lora() -> Path:
    from superdiff.registry import BUNDLED_ROOT

    f = Path(BUNDLED_ROOT) / "lora-orange" / "pytorch_lora_weights.safetensors"
    if not f.is_file():
        pytest.skip("lora-orange not built (scripts/train_shapes_lora.py)")
    return f


def test_each_prompt_row_picks_its_adapter_and_scale():
    f = form(rows=3, prompts=["a circle", "a circle", "a square"], loras=["lora-orange", "lora-outline", ""],
             lora_scales=[0.8, None, None])
    comp, _ = H.parse_form(f)
    assert comp.prompts == ["a circle", "a square"]
    assert comp.adapters == [{"path": "lora-orange", "scale": 0.8, "prompt": "a circle"},
                             {"path": "lora-outline", "scale": 1.0, "prompt": "a circle"},
                             {"path": "base", "prompt": "a square", "scale": 1.0}]
    # settings export / import: the adapters come back in the rows' pickers, not as prompt tags
    back = H.form_from_composition(comp)
    assert back["prompts"][:3] == ["a circle", "a circle", "a square"]
    assert back["loras"][:3] == ["lora-orange", "lora-outline", ""] and back["lora_scales"][:2] == [0.8, 1.0]
    assert H.composition_from_form(H.form_from_values(H.values_from_form(back))) == comp
    # a picker and an A1111 tag mix across rows; no picker and no tag: no adapters at all
    mixed, _ = H.parse_form({**f, "loras": ["", "lora-outline", ""], "prompts": [
        "a circle <lora:lora-orange:0.8>", "a circle", "a square"]})
    assert mixed == comp
    assert H.parse_form(form(prompts=["a circle", "a square"]))[0].adapters == []
    # the API names the pickers per row
    assert H.API_NAMES[-2 * H.MAX_PROMPTS:] == (*(f"lora_{i}" for i in range(1, H.MAX_PROMPTS + 1)),
                                                *(f"lora_scale_{i}" for i in range(1, H.MAX_PROMPTS + 1)))


@pytest.mark.parametrize("changes, expected", [
    ({"prompts": ["a circle <lora:lora-outline>", "a square"], "loras": ["lora-orange", ""]},
     "Prompts: row 1 names 2 adapters"),
    ({"prompts": ["a circle", ""], "loras": ["", "lora-orange"]},
     "Prompts: row 2 picks the LoRA 'lora-orange' but has no prompt"),
    ({"loras": ["lora-orange", ""], "lora_scales": ["strong", None]}, "LoRA adapters: must be a number"),
    ({"loras": ["lora-orange", ""], "lora_scales": ["inf", None]}, "LoRA adapters: row 1's LoRA scale must be"),
])
def test_adapter_picker_mistakes_are_explained(changes, expected):
    with pytest.raises(ValueError) as e:
        H.parse_form(form(**changes))
    assert H.error_message(e.value).startswith(expected), H.error_message(e.value)


def test_lora_uploads_take_only_safetensors_loras(tmp_path):
    store = tmp_path / "loras"
    for name, data in (("lora.bin", b"\0" * 64), ("lora.ckpt", b"\0" * 64), ("lora.pt", b"PK\3\4")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            H.store_lora_upload(tmp_path / name, store)
        msg = H.error_message(e.value)
        assert msg.startswith(f"LoRA adapters: {name} is not a .safetensors file") and "can run code" in msg
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a safetensors header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        H.store_lora_upload(fake, store)
    import torch
    from safetensors.torch import save_file

    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="holds no LoRA tensors"):
        H.store_lora_upload(tmp_path / "weights.safetensors", store)
    with pytest.raises(ValueError, match="no file received"):
        H.store_lora_upload(None, store)
    assert not store.exists() or not any(store.iterdir())  # nothing refused was kept
    # a LoRA is stored under a safe adapter name (no dots, no spaces) and listed in the pickers
    src = tmp_path / "my style.v2.safetensors"
    src.write_bytes(_bundled_lora().read_bytes())
    kept = H.store_lora_upload(src, store)
    assert Path(kept) == store / "my-style-v2.safetensors"
    assert H.store_lora_upload(src, store) == kept  # the same file again: the same entry
    other = tmp_path / "up2" / "my style.v2.safetensors"
    other.parent.mkdir()
    save_file({"unet.a.lora_A.weight": torch.zeros(1, 2)}, other)
    assert Path(H.store_lora_upload(other, store)).name == "my-style-v2-2.safetensors"
    values = [v for _, v in H.lora_choices(store)]
    assert values[:3] == ["", "lora-orange", "lora-outline"] and kept in values
    # an upload named like a bundled adapter gets its own name: both can be picked in one call
    clash = tmp_path / "up3" / "lora-orange.safetensors"
    clash.parent.mkdir()
    save_file({"unet.b.lora_A.weight": torch.zeros(1, 2)}, clash)
    assert Path(H.store_lora_upload(clash, store)).name == "lora-orange-2.safetensors"


def test_an_uploaded_lora_runs_from_its_row_and_its_png_reproduces(cache, tmp_path):
    store = tmp_path / "loras"
    src = tmp_path / "orange.safetensors"
    src.write_bytes(_bundled_lora().read_bytes())
    kept = H.store_lora_upload(src, store)
    comp, _ = H.parse_form(form(model="shapes-t2i", prompts=["a circle", "a circle"], loras=[kept, ""],
                                lora_scales=[0.9, None], steps=2, num_images=1))
    run_cache = ModelCache(allow_roots=[store], allow_hub=False)
    (item,) = list(H.run_jobs([("AND", comp)], run_cache, tmp_path / "out"))[-1]
    rec = read_png_composition(item.path)
    assert [(a.get("name"), a["scale"]) for a in rec.adapters] == [("orange", 0.9), (None, 1.0)]
    assert item.trace.expert_names == ["orange@0.9: a circle", "base: a circle"]
    back, _ = H.parse_form(H.form_from_composition(H.load_settings_file(item.path)))
    assert back.adapters[0]["path"] == kept and back.adapters[0]["scale"] == 0.9
    # a studio without the upload folder among its roots refuses the file before running
    with pytest.raises(ValueError, match="outside the allowed folders"):
        list(H.run_jobs([("AND", comp)], cache, tmp_path / "refused"))


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_switch_every_round_trips_and_an_imported_png_regenerates_identically(cache, tmp_path):
    """`generate --operator switch --switch-every 2`: the studio form keeps switch_every (the
    import used to reset it to 1, and Generate drew other pixels)."""
    import numpy as np

    from superdiff.compose import run_composition

    _bundled_lora()
    comp = Composition.from_dict({"model": "shapes-t2i", "prompts": ["a circle"], "operator": "switch",
                                  "adapters": ["lora-orange", "lora-outline"], "switch_every": 2, "steps": 3})
    res = run_composition(comp, cache, progress=False)
    src = save_png(res.images[0], tmp_path / "image_000.png", res.records[0])
    imported = H.load_settings_file(src)
    assert imported.switch_every == 2
    f = H.form_from_composition(imported)
    back, notes = H.parse_form(H.form_from_values(H.values_from_form(f)))  # through the page's components
    (item,) = list(H.run_jobs([("SWITCH", back)], cache, tmp_path / "out"))[-1]
    assert np.array_equal(_pixels(src), _pixels(item.path))
    assert back.switch_every == 2 and notes == [] and read_png_composition(item.path).switch_every == 2
    assert H.settings_from_json(H.settings_json(back)).switch_every == 2
    assert f["switch_every"] == 2 and "switch_every" in H.FORM_SCALARS and "switch_every" in H.API_NAMES
    # blank: the default (1); another operator does not use it and says so
    assert H.parse_form({**f, "switch_every": None})[0].switch_every == 1
    c, notes = H.parse_form({**f, "operator": "composite"})
    assert c.switch_every == 1 and "switch every is not used by COMPOSITE and was ignored" in notes
    with pytest.raises(ValueError) as e:
        H.parse_form({**f, "switch_every": 0})
    assert H.error_message(e.value).startswith("Switch every: "), H.error_message(e.value)


def test_settings_import_refuses_a_lora_whose_hash_differs_like_from_png(cache, tmp_path):
    """docs/lora.md: --from-png and a studio settings import refuse an adapter file whose
    sha256 differs from the recorded one; the recorded hash goes through the form."""
    from PIL import Image

    from superdiff.compose import resolve_adapters
    from superdiff.pipelines.adapters import file_sha256

    sha = file_sha256(_bundled_lora())
    base = {"model": "shapes-t2i", "prompts": ["a circle"], "operator": "and", "steps": 2,
            "adapters": [{"path": "lora-orange", "scale": 1.0, "sha256": "0" * 64},
                         {"path": "lora-outline", "scale": 0.8}]}
    wrong = Composition.from_dict(base)
    with pytest.raises(ValueError) as cli:  # the command line's check (generate --from-png)
        resolve_adapters(wrong, ModelCache())
    assert "lora-orange is not the file this composition was made with" in str(cli.value)
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "wrong.png", wrong)
    (tmp_path / "wrong.json").write_text(H.settings_json(wrong))
    for path in (png, tmp_path / "wrong.json"):
        with pytest.raises(ValueError) as e:
            H.load_settings_file(path)
        assert str(e.value) == str(cli.value)  # the same message as the command line
        assert H.error_message(e.value).startswith("LoRA adapters: lora-orange is not the file this composition")
    with pytest.raises(ValueError, match="not the file this composition"):
        H.check_adapter_files(H.settings_from_json(H.settings_json(wrong)), cache)  # the JSON box

    # the right hash: imported, kept through the form, checked by Generate and recorded again
    right = Composition.from_dict({**base, "adapters": [{**base["adapters"][0], "sha256": sha},
                                                        base["adapters"][1]]})
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "right.png", right)
    f = H.form_from_composition(H.load_settings_file(png, cache))
    back, _ = H.parse_form(H.form_from_values(H.values_from_form(f)))
    assert [a.get("sha256") for a in back.adapters] == [sha, None]
    (item,) = list(H.run_jobs([("AND", back)], cache, tmp_path / "out"))[-1]
    assert read_png_composition(item.path).adapters[0]["sha256"] == sha
    # a file that changed after the import is refused when Generate runs
    stale, _ = H.parse_form({**f, "lora_sha256": json.dumps({"lora-orange": "0" * 64})})
    with pytest.raises(ValueError, match="lora-orange is not the file this composition was made with"):
        list(H.run_jobs([("AND", stale)], cache, tmp_path / "refused"))
    # another adapter picked in the row is not held to the imported hash
    other, _ = H.parse_form({**f, "loras": ["lora-outline", "lora-outline"]})
    assert [a.get("sha256") for a in other.adapters] == [None, None]
    with pytest.raises(ValueError) as e:
        H.parse_form({**f, "lora_sha256": "not json"})
    assert H.error_message(e.value).startswith("LoRA adapters: the recorded LoRA hashes"), H.error_message(e.value)


def test_imported_adapter_names_survive_the_form_and_name_the_run(tmp_path):
    """An adapter's own name (not its file's) is kept through the form by the hidden lora_names
    field and names the adapter in the run's PNG; another file picked in that row, or one
    file that two experts name differently, takes the default name."""
    from PIL import Image

    cache = ModelCache()
    comp = Composition.from_dict({"model": "shapes-t2i", "prompts": ["a circle"], "operator": "and", "steps": 2,
                                  "adapters": [{"path": "lora-orange", "scale": 1.0, "name": "warm"},
                                               {"path": "lora-outline", "scale": 0.8}]})
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "named.png", comp)
    f = H.form_from_composition(H.load_settings_file(png, cache))
    assert json.loads(f["lora_names"]) == {"lora-orange": "warm"}
    back, _ = H.parse_form(H.form_from_values(H.values_from_form(f)))
    assert [a.get("name") for a in back.adapters] == ["warm", None]
    (item,) = list(H.run_jobs([("AND", back)], cache, tmp_path / "out"))[-1]
    assert [a["name"] for a in read_png_composition(item.path).adapters] == ["warm", "lora-outline"]
    other, _ = H.parse_form({**f, "loras": ["lora-outline", "lora-outline"]})
    assert [a.get("name") for a in other.adapters] == [None, None]
    twice = Composition.from_dict({**comp.to_dict(), "prompts": ["a circle", "a square"],
                                   "adapters": [{"path": "lora-orange", "prompt": "a circle", "name": "warm"},
                                                {"path": "lora-orange", "prompt": "a square", "name": "hot"}]})
    assert H.form_from_composition(twice)["lora_names"] == ""
    with pytest.raises(ValueError) as e:
        H.parse_form({**f, "lora_names": json.dumps({"lora-orange": 3})})
    assert H.error_message(e.value).startswith("LoRA adapters: the recorded LoRA names"), H.error_message(e.value)


@pytest.mark.parametrize("operator", ["and", "single"])
def test_a_row_with_a_lora_tag_and_and_reads_as_the_cli_reads_it(operator):
    """'a circle <lora:lora-orange:0.8> AND something red' in one row: AND parts first, then each
    part's tag (superdiff.a1111.parse_prompt_rows, as the CLI's --prompt): the adapter expert under
    'a circle' and the base model under 'something red', not one adapter under the whole row."""
    from superdiff.compose import num_experts, prepare_composition

    row = "a circle <lora:lora-orange:0.8> AND something red"
    comp, _ = H.parse_form(form(prompts=[row, ""], operator=operator))
    cli, _ = prepare_composition({"prompts": [row], "operator": operator}, True)
    assert (comp.prompts, comp.adapters) == (cli.prompts, cli.adapters)
    assert comp.adapters == [{"path": "lora-orange", "scale": 0.8, "prompt": "a circle"},
                             {"path": "base", "scale": 1.0, "prompt": "something red"}]
    assert num_experts(comp) == 2
    with pytest.raises(ValueError) as e:  # a picker on such a row cannot say which part it is for
        H.parse_form(form(prompts=["a circle AND something red", ""], loras=["lora-orange", ""], operator=operator))
    assert "its LoRA picker cannot say which part it applies to" in H.error_message(e.value)


def test_the_compare_grid_names_the_images_size_not_the_canvas(tmp_path):
    """The compare grid's infotext Size is its tiles' generation size, not the canvas's."""
    from PIL import Image

    comp = DEFAULT_COMPOSITION.replace(steps=2)
    items = []
    for method, op in (("OR", "or"), ("AND", "and")):
        rec = comp.replace(operator=op)
        path = save_png(Image.new("RGB", (32, 32), (200, 10, 10)), tmp_path / f"{op}.png", rec)
        items.append(H.ResultItem(method, method, str(path), rec))
    grid = H.compare_grid(items, tmp_path / "grid.png", comp)
    with Image.open(grid) as im:
        assert im.size != (32, 32)
        assert "Size: 32x32" in im.text["parameters"].splitlines()[-1]


def test_imported_guidance_beyond_the_slider_is_refused_with_the_way_out():
    """A composition with guidance 25 fits the slider (0-30, as A1111's CFG scale); one with 40
    would fail in the browser at Generate: the import says so."""
    assert H.form_from_composition(DEFAULT_COMPOSITION.replace(guidance_scale=25.0))["guidance_scale"] == 25.0
    with pytest.raises(ValueError, match=r"guidance_scale: the studio's slider holds 0 to 30, this composition has 40; "
                                         "run it with `superdiff generate --config` instead"):
        H.form_from_composition(DEFAULT_COMPOSITION.replace(guidance_scale=40.0))
