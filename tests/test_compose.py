"""superdiff.compose: the composition record shared by the CLI, the batch tool and the studio."""

from __future__ import annotations

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
