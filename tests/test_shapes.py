"""The shapes world (determinism, held-out pairs, captions, geometry) and its oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from superdiff.shapes import oracle, world
from _training import killed_after_checkpoint
from superdiff.shapes.tokenizer import bpe_tables, build_tokenizer


def test_generator_is_deterministic_per_seed():
    a = world.make_dataset(5, 64)
    b = world.make_dataset(np.random.default_rng(5), 64)
    c = world.make_dataset(6, 64)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and a.scenes == b.scenes
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (64, 3, world.RESOLUTION, world.RESOLUTION)
    assert a.images.dtype == np.float32 and a.images.min() >= 0.0 and a.images.max() <= 1.0


def test_generator_rejects_bad_seeds_and_names():
    with pytest.raises(TypeError, match="seed"):
        world.sample_scenes("0", 3)
    with pytest.raises(ValueError, match="hexagon"):
        world.sample_scenes(0, 3, shapes=("hexagon",))
    with pytest.raises(ValueError, match="excluded"):
        world.sample_scenes(0, 3, shapes=("circle",), colours=("red",))


def test_held_out_pairs_never_appear_by_default():
    scenes = world.sample_scenes(0, 4000)
    pairs = {(s.colour, s.shape) for s in scenes}
    assert pairs.isdisjoint(world.HELD_OUT)
    assert pairs == set(world.allowed_combinations())
    assert len(pairs) == len(world.SHAPES) * len(world.COLOURS) - len(world.HELD_OUT)
    # Every shape and every colour is still seen in training.
    assert {s for _, s in pairs} == set(world.SHAPES) and {c for c, _ in pairs} == set(world.COLOURS)
    # ... and the held-out pairs are reachable when explicitly allowed.
    assert set(world.HELD_OUT) <= {(s.colour, s.shape) for s in world.sample_scenes(0, 4000, exclude=())}


def test_half_datasets_contain_only_their_shapes():
    assert set(world.SHAPE_HALVES["a"]).isdisjoint(world.SHAPE_HALVES["b"])
    assert set(world.SHAPE_HALVES["a"]) | set(world.SHAPE_HALVES["b"]) == set(world.SHAPES)
    d = world.make_dataset(1, 500, shapes=world.SHAPE_HALVES["a"])
    assert {world.SHAPES[i] for i in d.shape_ids} == set(world.SHAPE_HALVES["a"])


def test_captions_name_all_or_some_attributes():
    assert world.caption("red", "circle") == "a red circle"
    assert world.caption(None, "circle") == "a circle"
    assert world.caption("red", None) == "something red"
    for c in world.COLOURS:
        for s in world.SHAPES:
            assert world.parse_caption(world.caption(c, s)) == (c, s)
    d = world.make_dataset(2, 600)
    kinds = {world.parse_caption(t) for t in d.captions}
    assert any(c and s for c, s in kinds) and any(c is None for c, _ in kinds) and any(s is None for _, s in kinds)
    for t, sc in zip(d.captions, d.scenes):
        c, s = world.parse_caption(t)
        assert c in (None, sc.colour) and s in (None, sc.shape)


@pytest.mark.parametrize("shape", world.SHAPES)
def test_rendered_area_matches_geometry(shape):
    r = np.full(8, 9.0)
    centre = np.linspace(12.0, 20.0, 8)
    mask = world.shape_masks([shape] * 8, r, centre, centre[::-1])
    expected = oracle._AREA_PER_R2[shape] * 81.0
    np.testing.assert_allclose(mask.sum(axis=(1, 2)), expected, rtol=0.03)


def test_oracle_accuracy_on_fresh_samples():
    data = world.make_dataset(np.random.default_rng(20240101), 1024, exclude=())
    res = oracle.classify(data.images)
    acc = oracle.accuracy(res, data.shape_ids, data.colour_ids)
    assert acc["shape"] >= 0.98 and acc["colour"] >= 0.98 and acc["joint"] >= 0.98, acc
    np.testing.assert_allclose(res.shape_probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.colour_probs.sum(1), 1.0, atol=1e-5)
    assert not res.empty.any()


def test_oracle_is_robust_to_blur_and_noise():
    rng = np.random.default_rng(7)
    data = world.make_dataset(rng, 512, exclude=())
    damaged = np.clip(oracle.smooth(data.images, 1.0) + rng.normal(0, 0.1, data.images.shape), 0, 1)
    acc = oracle.accuracy(oracle.classify(damaged), data.shape_ids, data.colour_ids)
    assert acc["joint"] >= 0.95, acc


def test_oracle_reports_empty_and_wrong_images():
    res = oracle.classify(np.zeros((2, 3, 32, 32), dtype=np.float32))
    assert res.empty.all() and not res.matches(shape="circle").any()
    # A red square is not a red circle, nor a blue square.
    sq = world.render([world.Scene("square", "red", 9.0, 16.0, 16.0, world.COLOUR_RGB["red"])])
    res = oracle.classify(sq)
    assert res.matches("red", "square")[0]
    assert not res.matches("red", "circle")[0] and not res.matches("blue", "square")[0]
    assert res.shape_probs[0, world.SHAPES.index("square")] > 0.9


def test_oracle_accepts_common_layouts():
    from PIL import Image

    data = world.make_dataset(3, 16, exclude=())
    ref = oracle.classify(data.images)
    x = torch.from_numpy(data.images)
    u8 = (data.images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    variants = [
        oracle.classify(x * 2 - 1, value_range=(-1, 1)),
        oracle.classify(data.images.transpose(0, 2, 3, 1)),
        oracle.classify(u8),
        oracle.classify([Image.fromarray(a) for a in u8]),
    ]
    for v in variants:
        assert v.shape == ref.shape and v.colour == ref.colour
    with pytest.raises(ValueError, match="channels"):
        oracle.classify(np.zeros((2, 4, 32, 32)))


def test_oracle_reads_torch_uint8_images_as_0_to_255_like_numpy_uint8():
    """torchvision's image format (uint8 tensors) is divided by 255, as numpy uint8 is."""
    data = world.make_dataset(5, 16, exclude=())
    ref = oracle.classify(data.images)
    u8 = torch.from_numpy((data.images * 255).round().astype(np.uint8))
    for v in (oracle.classify(u8), oracle.classify(list(u8)), oracle.classify(u8.permute(0, 2, 3, 1))):
        assert v.shape == ref.shape and v.colour == ref.colour
        np.testing.assert_allclose(v.area, ref.area, atol=0.5)


def test_tokenizer_maps_each_caption_word_to_one_token(tmp_path):
    vocab, merges = bpe_tables(world.vocabulary())
    assert len(set(vocab.values())) == len(vocab)
    tok = build_tokenizer(tmp_path, model_max_length=16)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    ids = tok("a yellow triangle", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16
    assert tok.convert_ids_to_tokens(ids[:5]) == ["<|startoftext|>", "a</w>", "yellow</w>", "triangle</w>", "<|endoftext|>"]
    # Unknown words still tokenize (letter by letter), never to an empty sequence.
    assert len(tok("purple", add_special_tokens=False).input_ids) > 1


def test_two_part_captions_join_the_single_prompts_of_seen_pairs(tmp_path):
    assert world.two_part_caption("red", "circle", "shape_and_colour") == "a circle and something red"
    assert world.two_part_caption("red", "circle", "colour_and_shape") == "something red and a circle"
    assert world.two_part_caption("red", "circle", "shape_that_is_colour") == "a circle that is red"
    assert world.parse_caption("a circle that is red") == ("red", "circle")
    with pytest.raises(ValueError, match="two-part caption mode"):
        world.two_part_caption("red", "circle", "full")
    probs = {m: 1.0 for m in world.TWO_PART_MODES}
    data = world.make_dataset(3, 64, caption_probs=probs)
    for s, text in zip(data.scenes, data.captions):
        assert (s.colour, s.shape) not in world.HELD_OUT
        assert world.parse_caption(text) == (s.colour, s.shape)
        assert " and " in text or " that is " in text
    # The default caption set (the bundled shapes-t2i's) is unchanged by the option.
    a = world.make_dataset(5, 32)
    b = world.make_dataset(5, 32, caption_probs={"full": 0.6, "shape": 0.2, "colour": 0.2})
    assert a.captions == b.captions and not any(" and " in c for c in a.captions)
    assert "and" not in world.vocabulary() and {"and", "that", "is"} <= set(world.vocabulary(two_part=True))
    tok = build_tokenizer(tmp_path, model_max_length=16, two_part=True)
    ids = tok("a circle and something red", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["a</w>", "circle</w>", "and</w>", "something</w>", "red</w>"]
    assert len(tok("a circle that is red", add_special_tokens=False).input_ids) == 5


def test_oracle_flags_in_between_shapes_as_unclean():
    from superdiff.shapes import morph

    rng = np.random.default_rng(11)
    clean = oracle.classify(world.render(world.sample_scenes(rng, 64, exclude=())))
    assert clean.clean.all() and (clean.clean_fit > 0.97).all()
    # A circle morphed halfway into a plus sign, a squircle, a square pinched towards a cross:
    # the lenient argmax still names one of the four shapes, the clean flag refuses them.
    r, cx, cy = np.full(8, 9.0), np.full(8, 16.0), np.full(8, 16.0)
    for a, b in [("circle", "cross"), ("circle", "square"), ("square", "triangle")]:
        img = morph.morph_masks(a, b, np.full(8, 0.5), r, cx, cy)[:, None] * np.ones((1, 3, 1, 1), np.float32)
        res = oracle.classify(img)
        assert not res.clean.any(), (a, b, res.clean_fit)
        assert not res.matches(shape=res.shape[0], clean=True).any() and res.matches(shape=res.shape[0]).all()
    # Morphs at w = 0 and 1 are the renders themselves.
    m0 = morph.morph_masks("circle", "cross", np.zeros(3), np.full(3, 8.0), np.full(3, 15.0), np.full(3, 14.0))
    ref = world.shape_masks(["circle"] * 3, np.full(3, 8.0), np.full(3, 15.0), np.full(3, 14.0))
    np.testing.assert_array_equal(m0, ref)


@pytest.mark.slow
def test_clean_threshold_is_the_one_calibrated_on_morphs():
    from superdiff.shapes import morph

    rec = morph.calibrate_clean_threshold()
    assert abs(rec["threshold"] - oracle.CLEAN_FIT) < 2e-3
    assert rec["clean_kept"] > 0.95 and rec["in_between_rejected"] > 0.9


# --------------------------------------------------------------------------------------
# Resumable training scaffolding (superdiff.shapes.training) and the scripts built on it.
# --------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES_VAE = ROOT / "superdiff" / "bundled" / "shapes-t2i" / "vae"


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kill_after_first_checkpoint(mod, monkeypatch, argv, at_step=None):
    killed_after_checkpoint(monkeypatch, mod.Run, "save", lambda: mod.main(argv), at_step)


def test_resume_drops_a_log_line_cut_short_by_a_crash(tmp_path):
    from superdiff.shapes.training import Run

    run = Run(tmp_path)
    run.log({"step": 2, "loss": 1.0})
    run.log({"step": 4, "loss": 0.9})
    with run.log_path.open("a") as f:
        f.write('{"step": 6, "lo')  # the process died while writing this line
    run.truncate_log(4)
    assert [r["step"] for r in map(__import__("json").loads, run.log_path.read_text().splitlines())] == [2, 4]


def test_an_unreadable_checkpoint_is_named_with_the_way_out(tmp_path):
    from superdiff.shapes.training import Run

    run = Run(tmp_path)
    run.ckpt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit, match=r"checkpoint\.pt.*delete it.*--workdir"):
        run.load()


def test_a_crash_while_caching_the_training_set_leaves_no_cache(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from superdiff.shapes import training

    vae = AutoencoderKL.from_pretrained(SHAPES_VAE).eval()
    tok = build_tokenizer(tmp_path / "tok")
    run = training.Run(tmp_path / "run")
    real_save = torch.save

    def save_half_then_die(obj, path):
        Path(path).write_bytes(b"PK\x03\x04")  # the first bytes of a zip: a cut-short file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        training.load_latent_dataset(run, vae, 0, 6, tok)
    monkeypatch.setattr(torch, "save", real_save)
    assert not list(run.dir.glob("latents-*.pt"))
    blob = training.load_latent_dataset(run, vae, 0, 6, tok)  # the next run encodes afresh
    assert len(blob["ids"]) == 6 and len(list(run.dir.glob("latents-*.pt"))) == 1


def test_vae_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    vae_script = _script("train_shapes_vae")
    tiny = ["--steps", "4", "--batch", "2", "--ckpt-every", "2", "--log-every", "2"]
    # stopped right after the last checkpoint (the export is not what is compared)
    _kill_after_first_checkpoint(vae_script, monkeypatch, [*tiny, "--workdir", str(tmp_path / "straight")], at_step=4)
    _kill_after_first_checkpoint(vae_script, monkeypatch, [*tiny, "--workdir", str(tmp_path / "resumed")])
    _kill_after_first_checkpoint(vae_script, monkeypatch, [*tiny, "--workdir", str(tmp_path / "resumed")], at_step=4)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["vae"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["vae"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script,extra", [("train_shapes_halves", ["--half", "b"]), ("train_shapes_t2i", [])])
def test_diffusion_scripts_refuse_other_settings_on_resume_and_export_the_trained_ones(script, extra, tmp_path, monkeypatch):
    import json

    mod = _script(script)
    work, out = tmp_path / "w", tmp_path / "out"
    tiny = [*extra, "--steps", "3", "--batch", "2", "--dataset-size", "6", "--ckpt-every", "2", "--log-every", "100",
            "--vae", str(SHAPES_VAE), "--workdir", str(work), "--out", str(out)]
    _kill_after_first_checkpoint(mod, monkeypatch, tiny)
    with pytest.raises(SystemExit, match=r"other settings.*'lr'"):
        mod.main([*tiny, "--lr", "1e-2"])
    mod.main(tiny)  # the same command resumes; no step was logged, the log is empty
    assert json.loads((out / "training.json").read_text())["steps_trained"] == 3
    assert (out / "train_log.jsonl").read_text() == ""
    mod.main([*extra, "--export-only", "--vae", str(SHAPES_VAE), "--workdir", str(work), "--out", str(out)])
    hp = json.loads((out / "training.json").read_text())["hyperparameters"]
    assert (hp["steps"], hp["batch"], hp["dataset_size"]) == (3, 2, 6)


def test_classifier_training_resumes_bit_for_bit_and_refuses_other_settings(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    mod = _script("train_shapes_classifier")
    monkeypatch.setattr(mod, "TEST_RENDERS", 64)  # the exported accuracy's 2048 renders take seconds
    tiny = ["--steps", "4", "--batch", "8", "--dataset-size", "40", "--ckpt-every", "2", "--log-every", "1"]
    mod.main([*tiny, "--workdir", str(tmp_path / "straight"), "--out", str(tmp_path / "straight-out")])
    resumed = [*tiny, "--workdir", str(tmp_path / "resumed"), "--out", str(tmp_path / "resumed-out")]
    _kill_after_first_checkpoint(mod, monkeypatch, resumed)  # killed at step 2
    with pytest.raises(SystemExit, match=r"other settings.*'lr'"):
        mod.main([*resumed, "--lr", "1e-2"])
    mod.main(resumed)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight-out", "resumed-out"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [__import__("json").loads(x)["step"] for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_failed_classifier_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    mod = _script("train_shapes_classifier")
    monkeypatch.setattr(mod, "TEST_RENDERS", 64)  # the exported accuracy's 2048 renders take seconds
    argv = ["--steps", "2", "--batch", "8", "--dataset-size", "40", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")]
    mod.main(argv)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert sorted(before) == ["README.md", "config.json", "model.safetensors"]
    mod.main([*argv[:-4], "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "out"), "--seed", "1"])  # other weights
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != before["model.safetensors"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def config_fails(directory, record):
        raise OSError("disk full")

    monkeypatch.setattr(mod.features, "write_config", config_fails)
    with pytest.raises(OSError, match="disk full"):
        mod.main([*argv, "--export-only"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "w", "w2"]  # no staging directory left


def _fake_bundled_root(tmp_path, monkeypatch):
    """A bundled root holding a copy of shapes-half-a's JSON files and a stand-in weight file."""
    import shutil

    from safetensors.torch import save_file

    from superdiff import registry

    src, root = ROOT / "superdiff" / "bundled" / "shapes-half-a", tmp_path / "bundled"
    d = root / "shapes-half-a"
    (d / "unet").mkdir(parents=True)
    shutil.copy(src / "training.json", d / "training.json")
    save_file({"w": torch.zeros(1)}, str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    monkeypatch.setattr(registry, "BUNDLED_ROOT", root)
    return root, __import__("json").loads((src / "quality.json").read_text())


def _eval_bundled_stubbed(monkeypatch, quality):
    mod = _script("eval_bundled")
    monkeypatch.setattr(mod, "eval_oracle", lambda n, seed: {"samples": n, "reference_fit": 0.9})
    monkeypatch.setattr(mod, "eval_half", lambda name, path, args, fit, command: dict(quality, command=command))
    return mod


def test_eval_bundled_with_only_leaves_the_oracles_file_alone(tmp_path, monkeypatch):
    root, quality = _fake_bundled_root(tmp_path, monkeypatch)
    mod = _eval_bundled_stubbed(monkeypatch, quality)
    mod.main(["--only", "shapes-half-a", "--grids", str(tmp_path / "grids")])
    assert (root / "shapes-half-a" / "quality.json").is_file() and (root / "shapes-half-a" / "README.md").is_file()
    assert not (root / "oracle_quality.json").exists()  # the oracle file is the full run's
    mod.main(["--grids", str(tmp_path / "grids")])
    assert __import__("json").loads((root / "oracle_quality.json").read_text())["reference_fit"] == 0.9


def test_eval_bundled_writes_quality_and_card_atomically(tmp_path, monkeypatch):
    root, quality = _fake_bundled_root(tmp_path, monkeypatch)
    mod = _eval_bundled_stubbed(monkeypatch, quality)
    d = root / "shapes-half-a"
    mod.main(["--only", "shapes-half-a", "--grids", str(tmp_path / "grids")])
    before = {f: (d / f).read_text() for f in ("quality.json", "README.md")}
    real_write_text = Path.write_text

    def write_half_then_die(self, text, *a, **kw):
        real_write_text(self, text[: len(text) // 2])
        raise KeyboardInterrupt("killed while writing")

    for target in ("quality.json", "README.md"):
        calls = []

        def dies_on_target(self, text, *a, **kw):
            calls.append(self.name)
            if self.name.startswith(target):
                return write_half_then_die(self, text)
            return real_write_text(self, text, *a, **kw)

        monkeypatch.setattr(Path, "write_text", dies_on_target)
        with pytest.raises(KeyboardInterrupt):
            mod.main(["--only", "shapes-half-a", "--seed", "3", "--grids", str(tmp_path / "grids")])
        monkeypatch.setattr(Path, "write_text", real_write_text)
        assert any(c.startswith(target) for c in calls)
        assert (d / target).read_text() == before[target]  # whole, as before the killed run
        __import__("json").loads((d / "quality.json").read_text())
        assert sorted(p.name for p in d.iterdir()) == ["README.md", "quality.json", "training.json", "unet"]


def test_the_card_states_the_runs_log_interval(tmp_path):
    import json

    from superdiff.shapes.cards import render_card

    info = json.loads((ROOT / "superdiff" / "bundled" / "shapes-half-a" / "training.json").read_text())
    info["hyperparameters"]["log_every"] = 10
    (tmp_path / "training.json").write_text(json.dumps(info))
    assert "(one JSON line per 10 steps: step, loss, lr, cumulative CPU seconds)" in render_card(tmp_path)
