"""`superdiff generate` on a bundled shapes model labels every image with the exact oracle:
its lenient label and whether the shape is clean (the headline "right and clean" measure)."""

from __future__ import annotations

import json

import pytest

from superdiff.cli import main
from superdiff.shapes import oracle


def test_generate_writes_oracle_labels_with_the_clean_flag(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "--model", "shapes-t2i", "--prompt", "a circle", "--prompt", "something red",
                 "--operator", "and", "--steps", "6", "-n", "2", "--quiet", "--out", str(out)]) == 0
    rec = json.loads((out / "oracle.json").read_text())
    assert len(rec["labels"]) == len(rec["clean"]) == 2
    assert rec["counts"] == {lab: rec["labels"].count(lab) for lab in set(rec["labels"])}
    for lab, n in rec["clean_counts"].items():
        assert n == sum(c for la, c in zip(rec["labels"], rec["clean"]) if la == lab) <= rec["counts"][lab]
    from PIL import Image

    images = [Image.open(out / f"image_{i:03d}.png").convert("RGB") for i in range(2)]
    assert rec["clean"] == [bool(c) for c in oracle.classify(images).clean]
    text = capsys.readouterr().out
    assert "with a clean shape" in text and "composition.json and oracle.json in" in text


def test_non_square_images_skip_the_oracle_and_the_run_succeeds(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "oracle.json").write_text("{}")  # an earlier run's labels in the same folder
    assert main(["generate", "--height", "48", "--width", "40", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert (out / "composition.json").exists() and not (out / "oracle.json").exists()
    text = capsys.readouterr().out
    assert "oracle: skipped (the shapes oracle classifies square images)" in text and "wrote 1 image(s)" in text
    assert "and composition.json in" in text and "oracle.json" not in text.split("wrote")[1]


def test_negative_number_lists_are_taken_as_values(tmp_path):
    """`--kappa-clamp -1,2` (the documented default), negative --weights / --bias lists: values,
    not options (argparse alone refuses them)."""
    from superdiff.cli import build_parser, glue_negative_lists

    argv = ["generate", "--kappa-clamp", "-1,2", "--bias", "-1,0", "--weights", "-0.5,1.5e0", "--lift", "-2",
            "--prompt", "a", "--prompt", "b"]
    args = build_parser().parse_args(glue_negative_lists(argv))
    assert (args.kappa_clamp, args.bias, args.weights, args.lift) == ("-1,2", [-1.0, 0.0], [-0.5, 1.5], -2.0)
    assert glue_negative_lists(["--out", "-x", "--steps", "-1,2"]) == ["--out", "-x", "--steps=-1,2"]
    out = tmp_path / "o"
    assert main(["generate", "--kappa-clamp", "-1,2", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "composition.json").read_text())["kappa_clamp"] == [-1.0, 2.0]


def test_bad_settings_are_refused_with_the_field_and_the_fix(tmp_path, capsys):
    """Parameters the operator does not take, an index past the experts, a --config that is not
    an object, --config with --from-png, adapters on an unconditional model: exit 2 and a message
    naming the field and how to fix it."""
    cfg = tmp_path / "list.json"
    cfg.write_text("[1, 2]")
    cases = [
        (["--operator", "or", "--lift", "2"], "lift: operator or does not take it (it is for: and)"),
        (["--operator", "joint", "--weights", "0.3,0.7"], "weights: operator joint does not take it (it is for: average, or)"),
        (["--operator", "and", "--temperature", "3"], "temperature: operator and does not take it (it is for: or)"),
        (["--operator", "single", "--single-index", "5"], "single_index: 5 picks expert 6, but there are 2; give 0..1"),
        (["--config", str(cfg)], "expected a JSON object of composition fields"),
        (["--config", str(cfg), "--from-png", str(cfg)], "give --from-png or --config, not both"),
        (["--model", "shapes-half-a", "--extra-model", "shapes-half-b", "--lora", "lora-orange", "--lora",
          "lora-outline", "--operator", "and"], "adapters: adapter (LoRA) experts run on Stable Diffusion"),
    ]
    for argv, msg in cases:
        assert main(["generate", *argv, "--steps", "2", "--quiet", "--out", str(tmp_path / "o")]) == 2
        assert msg in capsys.readouterr().err, argv


def test_a_png_setting_the_new_operator_does_not_use_is_dropped_with_a_note(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["generate", "--operator", "and", "--lift", "1", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert main(["generate", "--from-png", str(out / "image_000.png"), "--operator", "or", "--quiet",
                 "--out", str(tmp_path / "b")]) == 0
    assert "lift (from the PNG) is not used by operator or and was dropped" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "composition.json").read_text())["lift"] is None


def test_an_out_that_cannot_be_a_folder_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    """--out naming an existing file (or a folder inside one): exit 2 with the fix, before any
    model loads, instead of a FileExistsError after every image was sampled."""
    import superdiff.compose as C

    monkeypatch.setattr(C, "run_composition", lambda *a, **k: pytest.fail("sampled before refusing"))
    f = tmp_path / "afile"
    f.write_text("x")
    for out, msg in ((f, f"--out {f} is a file, not a folder"),
                     (f / "sub", f"--out {f / 'sub'} names a folder inside {f}, which is a file")):
        assert main(["generate", "--steps", "2", "--quiet", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and "give a folder" in err and "Traceback" not in err, err
    assert f.read_text() == "x"
