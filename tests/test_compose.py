"""superdiff.compose: the composition record shared by the CLI, the batch tool and the studio."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from superdiff.compose import Composition, ModelCache, model_kind, run_composition
from superdiff.registry import bundled_model_path


@pytest.mark.parametrize("bad,needle", [
    ({"operator": "xor"}, "operator: unknown operator 'xor'"),
    ({"sampler": "rk4"}, "sampler: unknown sampler 'rk4'"),
    ({"estimator": "magic"}, "estimator: unknown estimator 'magic'"),
    ({"estimator": "ode", "sampler": "sde"}, "estimator: with sampler 'sde': estimator 'ode' is not valid"),
    ({"estimator": "ito", "sampler": "euler"}, "use estimator 'none' or 'ode'"),
    ({"operator": "and", "corrector": "smc:4"}, "corrector: SuperDiff's AND samples where the experts' densities"),
    ({"compose": '"a" & "b"', "prompts": None, "corrector": "smc"}, "corrector: SuperDiff's AND samples"),
    ({"operator": "or", "corrector": "smc:4", "sampler": "euler"}, "corrector: SMC (particles=4) needs a stochastic"),
    ({"estimator": "kernel", "sampler": "heun"}, "estimator: with sampler 'heun': estimator 'kernel' is not valid"),
    ({"steps": 0}, "steps: must be between 1"),
    ({"steps": 2.5}, "steps: must be an integer"),
    ({"seed": -1}, "seed: must be between 0"),
    ({"temperature": -1}, "temperature: must be >= 0"),
    ({"guidance_scale": float("nan")}, "guidance_scale: must be a finite number"),
    ({"weights": [0.5]}, "weights: 1 values for 2 experts"),
    ({"weights": [0.5, 0.5], "bias": [0, 0]}, "weights: give either weights or bias"),
    ({"kappa_clamp": [2, 1]}, "kappa_clamp: lo must be below hi"),
    ({"kappa_clamp": True}, "kappa_clamp: true is ambiguous"),
    ({"dtype": "float8"}, "dtype: choose one of"),
    ({"colour": "red"}, "unknown field(s) colour"),
    ({"model": " "}, "model: give a bundled model name"),
])
def test_bad_fields_are_named(bad, needle):
    with pytest.raises(ValueError) as e:
        Composition.from_dict({"prompts": ["a circle", "something red"], **bad})
    assert needle in str(e.value)


def test_a_corrector_with_a_target_density_is_accepted():
    c = Composition.from_dict({"prompts": ["a circle", "something red"], "operator": "or", "corrector": "smc:4"})
    assert c.corrector == "smc:4"
    f = Composition.from_dict({"compose": '"a" & "b"', "and_mode": "product", "corrector": "smc:4"})
    assert f.prompts == ["a", "b"]


def test_round_trip_and_image_records():
    c = Composition.from_dict({"prompts": ["a circle", "something red"], "operator": "OR", "temperature": "inf",
                               "seed": 10, "num_images": 3})
    assert c.operator == "or" and c.temperature == float("inf")
    assert Composition.from_dict(c.to_dict()) == c
    r = c.image_record(2)
    assert (r.seed, r.num_images, r.prompts) == (12, 1, c.prompts)


def test_model_cache_refuses_paths_outside_the_allowed_roots(tmp_path):
    inside, outside = tmp_path / "models" / "m", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    cache = ModelCache(allow_roots=[tmp_path / "models"], allow_hub=False)
    assert cache.resolve(str(inside)) == str(inside.resolve())
    for p in (outside, tmp_path / "models" / ".." / "elsewhere"):
        with pytest.raises(ValueError, match="outside the allowed model folders"):
            cache.resolve(str(p))
    with pytest.raises(ValueError, match="unknown model 'org/model'"):
        cache.resolve("org/model")
    assert cache.resolve("shapes-t2i") == str(bundled_model_path("shapes-t2i"))
    with pytest.raises(ValueError, match="hub id of the form"):
        ModelCache().resolve("not a model")


def test_a_local_copy_loads_like_a_hub_checkpoint_and_is_cached(tmp_path):
    """A directory laid out like a hub snapshot goes through the same from_pretrained path."""
    local = tmp_path / "my-t2i"
    shutil.copytree(bundled_model_path("shapes-t2i"), local)
    assert model_kind(str(local)) == "sd" and model_kind(str(bundled_model_path("shapes-half-a"))) == "unet2d"
    cache = ModelCache()
    comp = Composition.from_dict({"model": str(local), "prompts": ["a circle", "something red"], "steps": 3})
    a = run_composition(comp, cache, progress=False)
    b = run_composition(comp.replace(model="shapes-t2i"), cache, progress=False)
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    run_composition(comp, cache, progress=False)
    assert cache.loads == 2  # the local copy and the bundled directory, each loaded once


def test_prompts_must_fit_the_model_kind():
    cache = ModelCache()
    with pytest.raises(ValueError, match="prompts: .* unconditional UNet2D model"):
        run_composition(Composition.from_dict({"model": "shapes-half-a", "prompts": ["a circle"], "steps": 2}),
                        cache, progress=False)
    with pytest.raises(ValueError, match="prompts: .* text-to-image model"):
        run_composition(Composition.from_dict({"model": "shapes-t2i", "steps": 2}), cache, progress=False)


def test_unconditional_experts_are_named_after_their_checkpoints():
    res = run_composition(Composition.from_dict({"model": "shapes-half-a", "extra_models": ["shapes-half-b"],
                                                 "operator": "or", "steps": 2}), ModelCache(), progress=False)
    assert res.trace.expert_names == ["shapes-half-a", "shapes-half-b"]


def test_an_infinite_or_temperature_is_written_as_strict_json_and_read_back(tmp_path):
    """OR at temperature inf (documented): the composition, its PNG chunk and the trace's meta
    are strict JSON ("inf" as a string, which Composition reads back), so nothing fails after
    sampling and --from-png reproduces the run."""
    import json

    from superdiff.compose import png_metadata
    from superdiff.trace import Trace

    c = Composition.from_dict({"prompts": ["a circle", "something red"], "operator": "or",
                               "temperature": float("inf")})
    text = c.to_json()
    assert json.loads(text)["temperature"] == "inf"
    assert Composition.from_dict(json.loads(text)) == c
    chunk = json.loads(png_metadata(c)["superdiff"])
    assert chunk["temperature"] == "inf"
    tr = Trace(np.array([1.0, 0.0]), np.array([1.0, 0.0]), np.zeros((1, 1, 2)), np.zeros((2, 1, 2)), ["a", "b"],
               {"composition": c.to_dict(), "operator_params": {"temperature": float("inf"), "bias": [float("-inf")]}})
    back = Trace.load(tr.save(tmp_path / "t.json"))
    assert back.meta["operator_params"] == {"temperature": "inf", "bias": ["-inf"]}
    assert Composition.from_dict(back.meta["composition"]).temperature == float("inf")


def test_adapters_tied_to_prompts_that_are_not_the_prompts_are_refused():
    """An adapter tied to its own prompt (a <lora:...> tag's row) must name one of `prompts`, and
    with only tied adapters every prompt must be some adapter's: else the record names prompts
    its experts do not sample (new prompts over a PNG's old tags)."""
    tied = [{"path": "lora-orange", "scale": 0.8, "prompt": "a circle"}, {"path": "base", "prompt": "something red"}]
    assert Composition(prompts=["a circle", "something red"], adapters=tied).validated().adapters[0]["prompt"] == \
        "a circle"
    with pytest.raises(ValueError, match=r"adapters: adapter 0 \(lora-orange\) is tied to the prompt 'a circle', "
                                         r"which is not among the prompts \['a square', 'something blue'\]"):
        Composition(prompts=["a square", "something blue"], adapters=tied).validated()
    with pytest.raises(ValueError, match="write the adapter as a LoRA tag in the prompt it belongs to "
                                         r"\(e.g. 'a circle <lora:lora-orange:0.8>'\)"):
        Composition(prompts=["a square", "something red"], adapters=tied).validated()
    with pytest.raises(ValueError, match="prompts: 'a square' is no expert's prompt"):
        Composition(prompts=["a circle", "something red", "a square"], adapters=tied).validated()
    # adapters without a prompt of their own take every prompt
    assert Composition(prompts=["a", "b"], adapters=["lora-orange", "lora-outline"]).validated()


def test_a_formulas_prompts_are_taken_whole():
    """A formula's quoted prompts are its experts as written: no A1111 AND splitting, no LoRA
    tags, so a run whose prompt holds the word AND reads back from its own record."""
    from superdiff.compose import prepare_composition

    formula = '"a circle AND more" | "something red"'
    comp, _ = prepare_composition({"compose": formula}, False)
    assert comp.prompts == ["a circle AND more", "something red"]
    again, _ = prepare_composition(comp.to_dict(), True)  # what --from-png hands over: prompts and formula
    assert again == comp


def test_merge_and_switch_take_one_prompt():
    """merge / switch make one expert with every adapter: two prompts are refused up front,
    naming the prompts and what to give (not the pipeline's "own prompts differ: ['None']")."""
    from superdiff.compose import prepare_composition

    for op in ("merge", "switch"):
        with pytest.raises(ValueError, match=f"prompts: operator {op} makes one expert with every adapter, so it "
                                             "takes one prompt; got 2 \\('a', 'b'\\)"):
            prepare_composition({"prompts": ["a", "b"], "operator": op, "adapters": ["lora-orange", "lora-outline"]},
                                True)
        comp, _ = prepare_composition({"prompts": ["a"], "operator": op, "adapters": ["lora-orange", "lora-outline"]},
                                      True)
        assert comp.prompts == ["a"]


@pytest.mark.parametrize("tag, scale", [
    ("lora-orange", 1.0), ("lora-orange:0.8", 0.8),
    ("lora-orange:0.8:0.5", 0.5),  # A1111's <lora:name:te:unet>: the UNet multiplier
    ("lora-orange:unet=0.5", 0.5), ("lora-orange:te=0.3", 0.3), ("lora-orange:0.8:unet=0.2", 0.2),
])
def test_a1111_lora_tag_forms_take_the_unet_multiplier(tag, scale):
    """A1111's <lora:NAME:TE:UNET> and named unet= / te= forms: the path stays the name and the
    scale is the UNet multiplier (adapter experts are denoiser-only LoRAs)."""
    from superdiff.a1111 import prompt_adapters
    from superdiff.compose import parse_lora

    assert parse_lora(tag) == {"path": "lora-orange", "scale": scale}
    _, adapters = prompt_adapters([f"a circle <lora:{tag}>"])
    assert adapters == [{"path": "lora-orange", "scale": scale, "prompt": "a circle"}]
    assert parse_lora("C:\\loras\\x.safetensors:0.7") == {"path": "C:\\loras\\x.safetensors", "scale": 0.7}


@pytest.mark.parametrize("tag, needle", [
    ("lora-orange:1:1:8", "a DyLoRA rank"), ("lora-orange:dyn=8", "a DyLoRA rank"),
    ("lora-orange:unet=high", "unet='high' is not a number"),
])
def test_a1111_lora_tag_forms_that_cannot_apply_are_refused(tag, needle):
    from superdiff.compose import parse_lora

    with pytest.raises(ValueError, match=f"adapters: <lora:{tag}>: {needle}"):
        parse_lora(tag)


def test_jobs_that_share_a_cached_pipeline_call_it_one_at_a_time():
    """The studio runs jobs in parallel threads on one ModelCache; a pipeline call changes the
    pipeline's state while it runs (LoRA routing and scales, the interrupt flag), so calls on one
    pipeline must not overlap: a LoRA merge next to a plain AND gave the plain job wrong pixels.
    Both jobs give the images they give alone."""
    import threading
    import time

    cache = ModelCache()
    real_pipeline = cache.pipeline
    active, most = [0], [0]

    class Watched:
        """The cached pipeline, with its calls watched for overlap."""

        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def __call__(self, *args, **kwargs):
            active[0] += 1
            most[0] = max(most[0], active[0])
            time.sleep(0.05)  # room for the other thread to enter
            try:
                return self._pipe(*args, **kwargs)
            finally:
                active[0] -= 1

    watched = {}

    def pipeline(*a, **kw):
        pipe, kind, extras = real_pipeline(*a, **kw)
        return watched.setdefault(id(pipe), Watched(pipe)), kind, extras

    cache.pipeline = pipeline
    lora = Composition(model="shapes-t2i", prompts=["a circle"], operator="merge", steps=3, seed=3,
                       adapters=["lora-orange", "lora-outline"])
    plain = Composition(model="shapes-t2i", prompts=["a circle", "something red"], operator="and", steps=3, seed=3)
    alone = {k: np.asarray(run_composition(c, cache, progress=False).images[0]) for k, c in (("lora", lora),
                                                                                            ("plain", plain))}
    got = {}
    threads = [threading.Thread(target=lambda k=k, c=c: got.__setitem__(
        k, np.asarray(run_composition(c, cache, progress=False).images[0]))) for k, c in (("lora", lora),
                                                                                          ("plain", plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    for k in alone:
        np.testing.assert_array_equal(got[k], alone[k])


def _half_with_pickled_unet(dst):
    """shapes-half-a with its UNet saved as a pickle (unet/*.bin) next to vae/*.safetensors."""
    from diffusers import UNet2DModel

    shutil.copytree(bundled_model_path("shapes-half-a"), dst)
    unet = UNet2DModel.from_pretrained(dst, subfolder="unet")
    (dst / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(dst / "unet", safe_serialization=False)
    return dst


def test_a_component_with_only_pickled_weights_is_refused_before_loading(tmp_path, monkeypatch):
    """One safetensors file elsewhere in the folder (the VAE) must not let a pickled UNet load:
    the UNet2D and extra-UNet loaders fall back to .bin, and torch.load can run code."""
    import torch

    model = _half_with_pickled_unet(tmp_path / "half-bin")
    def no_pickle(f, *a, **k):
        raise AssertionError(f"a pickle was loaded: {f}")

    monkeypatch.setattr(torch, "load", no_pickle)
    for kw in ({"model": str(model)}, {"model": "shapes-half-a", "extra_models": [str(model)]}):
        with pytest.raises(ValueError, match=r"only \.bin weights \(unet/diffusion_pytorch_model\.bin\); only "
                                             "safetensors are loaded"):
            ModelCache().pipeline(kw["model"], kw.get("extra_models", ()))


def test_pickled_weights_count_only_in_the_components_that_are_loaded():
    """A hub SD repo whose safety checker is pickled still loads (the pipelines pass
    safety_checker=None); a pickled text encoder does not."""
    from superdiff.model_loading import _pickle_only

    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "image_encoder": [None, None]}
    files = ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "safety_checker/pytorch_model.bin",
             "feature_extractor/preprocessor_config.json"]
    assert _pickle_only(files + ["text_encoder/model.safetensors"], index) == []
    assert _pickle_only(files + ["text_encoder/pytorch_model.bin"], index) == ["text_encoder/pytorch_model.bin"]


def test_a_bare_flow_transformer_folder_is_an_extra_model_of_a_flow_pipeline(tmp_path):
    """A bare SD3 transformer folder (config.json + weights, as load_transformer takes it) is an
    sd3 checkpoint, not a UNet2D one: as an extra model of an SD3 pipeline it is not refused as
    "a unet2d model" of another family, and as the model it is refused with what to do."""
    from diffusers import StableDiffusion3Pipeline

    from superdiff.pipelines._testing import tiny_sd3_components, tiny_sd3_transformer

    StableDiffusion3Pipeline(**tiny_sd3_components(0)).save_pretrained(tmp_path / "sd3")
    tiny_sd3_transformer(1).save_pretrained(tmp_path / "bare")
    assert model_kind(str(tmp_path / "bare")) == "sd3"
    comp = Composition.from_dict({"model": str(tmp_path / "sd3"), "prompts": ["a"], "operator": "and",
                                  "extra_models": [str(tmp_path / "bare")], "steps": 1, "sampler": "ddpm",
                                  "height": 16, "width": 16})
    res = run_composition(comp, ModelCache(), progress=False)
    assert res.images[0].size == (16, 16)
    with pytest.raises(ValueError, match="model: .*bare is a bare sd3 transformer checkpoint, not a pipeline folder"):
        ModelCache().pipeline(str(tmp_path / "bare"))


def test_adapter_paths_with_a_tilde_and_symlinks_leaving_the_allowed_folders(tmp_path, monkeypatch):
    """An adapter "~/loras/x.safetensors" is the file the allowed-roots check saw (not "not
    found"); a folder inside the roots whose weight file is a symlink to a file outside them is
    refused like a path outside them."""
    from superdiff.compose import resolve_adapters
    from superdiff.registry import BUNDLED_ROOT

    monkeypatch.setenv("HOME", str(tmp_path))
    loras, outside = tmp_path / "loras", tmp_path / "outside"
    loras.mkdir()
    outside.mkdir()
    for name in ("orange", "outline"):
        shutil.copy(BUNDLED_ROOT / f"lora-{name}" / "pytorch_lora_weights.safetensors", loras / f"{name}.safetensors")
    comp = Composition(prompts=["a circle"], operator="merge",
                       adapters=["~/loras/orange.safetensors", "~/loras/outline.safetensors"]).validated()
    for roots in (None, [loras]):
        _, entries = resolve_adapters(comp, ModelCache(allow_roots=roots))
        assert [e["path"] for e in entries] == [str(loras / "orange.safetensors"), str(loras / "outline.safetensors")]
    shutil.copy(loras / "orange.safetensors", outside / "secret.safetensors")
    (loras / "sneaky").mkdir()
    (loras / "sneaky" / "pytorch_lora_weights.safetensors").symlink_to(outside / "secret.safetensors")
    sneaky = comp.replace(adapters=[str(loras / "sneaky"), "lora-outline"])
    with pytest.raises(ValueError, match="adapters: adapter 0: .*sneaky is outside the allowed folders"):
        resolve_adapters(sneaky, ModelCache(allow_roots=[loras]))
    assert resolve_adapters(sneaky, ModelCache())  # no roots configured: any local file


def test_model_folders_under_the_allowed_roots_cannot_leave_them_through_symlinks(tmp_path, monkeypatch):
    """The roots check resolves the folder, and the component folders and weight files inside it
    too: a unet/ linked to a folder outside the roots is refused; links inside the roots (a
    Hugging Face cache snapshot's links to its blobs) are fine; "~" in a root is the home folder."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    shutil.copytree(bundled_model_path("shapes-half-a"), outside / "half")
    m = root / "half"
    m.mkdir(parents=True)
    (m / "unet").symlink_to(outside / "half" / "unet")
    for sub in ("vae", "scheduler"):
        shutil.copytree(outside / "half" / sub, m / sub)
    cache = ModelCache(allow_roots=[root])
    with pytest.raises(ValueError, match="outside the allowed model folders: .*unet is a symlink to"):
        cache.resolve(str(m))
    (m / "unet").unlink()
    (root / "blobs").mkdir()
    shutil.copytree(outside / "half" / "unet", root / "blobs" / "unet")
    (m / "unet").symlink_to(root / "blobs" / "unet")
    assert cache.resolve(str(m)) == str(m.resolve())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelCache(allow_roots=["~/models"]).resolve(str(m)) == str(m.resolve())


def test_a_hub_id_whose_cached_snapshot_has_a_pickled_unet_is_refused(tmp_path, monkeypatch):
    """A hub id is checked like a folder, through the local Hugging Face cache's snapshot (no
    network here): the UNet2D loader would otherwise fall back to its unet/*.bin pickle."""
    import torch
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--half-bin"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = _half_with_pickled_unet(repo / "snapshots" / ("0" * 40))
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_pickle(f, *a, **k):
        raise AssertionError(f"a pickle was loaded: {f}")

    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(ValueError, match=r"model: org/half-bin has only \.bin weights \(unet/diffusion_pytorch_model"
                                         r"\.bin\); only safetensors are loaded"):
        ModelCache().pipeline("org/half-bin")


@pytest.mark.parametrize("template", ["{5}", "{", "{name}"])
def test_a_joint_template_that_does_not_fit_the_prompts_is_refused_before_any_model_loads(template):
    d = {"model": "shapes-t2i", "prompts": ["a circle", "something red"], "operator": "joint"}
    with pytest.raises(ValueError, match=r"^joint_template: .* does not fit 2 prompts .*use \{0\}, \{1\}"):
        Composition.from_dict({**d, "joint_template": template})
    assert Composition.from_dict({**d, "joint_template": "{1} beside {0}"}).joint_template == "{1} beside {0}"


def test_the_one_line_description_names_every_expert():
    half = Composition.from_dict({"model": "shapes-half-a", "extra_models": ["shapes-half-b"], "operator": "or",
                                  "prompts": []})
    assert half.describe() == "OR[shapes-half-a | shapes-half-b] seed 0"  # both unconditional models
    loras = Composition.from_dict({"model": "shapes-t2i", "prompts": ["a circle"], "operator": "and", "seed": 3,
                                   "adapters": [{"path": "lora-orange"}, {"path": "x/lora-outline.safetensors"}]})
    assert loras.describe() == "AND[a circle; LoRA lora-orange, lora-outline] seed 3"


def test_a_bundled_name_with_a_trailing_slash_is_the_bundled_model_not_a_hub_id(tmp_path, monkeypatch):
    from superdiff.registry import bundled_model_path

    cache = ModelCache()
    assert cache.resolve("shapes-t2i/") == str(bundled_model_path("shapes-t2i"))
    for bad in ("org/", "name/"):  # not "org/name"
        with pytest.raises(ValueError, match="or a hub id of the form 'org/name'"):
            cache.resolve(bad)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes-t2i").mkdir()  # a local folder of that name, written with the slash, is the folder
    assert cache.resolve("shapes-t2i/") == str(tmp_path / "shapes-t2i")
