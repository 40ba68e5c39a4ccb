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
