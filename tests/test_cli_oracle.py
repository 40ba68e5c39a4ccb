"""`superdiff generate` on a bundled shapes model labels every image with the exact oracle:
its lenient label and whether the shape is clean (the headline "right and clean" measure)."""

from __future__ import annotations

import json

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
    assert "with a clean shape" in capsys.readouterr().out


def test_non_square_images_skip_the_oracle_and_the_run_succeeds(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "--height", "48", "--width", "40", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert (out / "composition.json").exists() and not (out / "oracle.json").exists()
    text = capsys.readouterr().out
    assert "oracle: skipped (the shapes oracle classifies square images)" in text and "wrote 1 image(s)" in text


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
