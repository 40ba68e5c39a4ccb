"""The report's metrics (shapes FID, class histogram, within-class statistics) and its checks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from superdiff.shapes import features, oracle, world

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("report_under_test", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # Sample sets whose empirical covariances are exactly diagonal: +-1 patterns (orthogonal columns).
    h = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=np.float64)
    z = np.concatenate([h[:, 1:], -h[:, 1:]])  # mean 0, covariance diag(8/7)
    mu1, s1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 0.5])
    mu2, s2 = np.array([1.0, 1.0, 0.0]), np.array([3.0, 2.0, 1.5])
    f1, f2 = mu1 + z * s1, mu2 + z * s2
    c = 8.0 / 7.0
    expected = ((mu1 - mu2) ** 2).sum() + c * ((s1 - s2) ** 2).sum()
    assert features.frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-9)
    assert features.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        features.frechet_distance(f1[:1], f2)


def test_class_histogram_distance_is_total_variation_to_uniform():
    assert features.class_tv([0, 1, 2, 3]) == 0.0
    assert features.class_tv([0, 0, 0, 0]) == pytest.approx(0.75)
    assert features.class_tv([0, 0, 1, 1]) == pytest.approx(0.5)
    assert features.class_tv([0, 1], target=[0.5, 0.5, 0, 0]) == 0.0


def test_within_class_statistics_recover_the_rendered_sizes_and_positions():
    data = world.make_dataset(4, 400)
    r = oracle.classify(data.images)
    geo = features.geometry(data.images, r)
    true_r = np.array([s.size for s in data.scenes])
    cx = np.array([s.cx for s in data.scenes])
    assert np.abs(geo["size"] - true_r).mean() < 0.3
    circles = np.array([s.shape == "circle" for s in data.scenes])  # centroid = centre
    assert np.abs(geo["x"][circles] - cx[circles]).max() < 0.1
    stats = features.within_class_stats(data.images, r)
    assert sum(v["count"] for v in stats.values()) == 400
    err = features.within_class_error(stats, stats)
    assert err == {"size_mean": 0.0, "size_sd": 0.0, "position_sd": 0.0}


def test_shipped_classifier_separates_all_sixteen_classes():
    data = world.make_dataset(9, 256, exclude=())
    clf = features.load_classifier()
    import torch

    with torch.no_grad():
        logits = clf(torch.from_numpy(data.images))
    acc = (logits.argmax(1).numpy() == features.class_index(data.shape_ids, data.colour_ids)).mean()
    assert acc > 0.95
    f = features.features(data.images, clf)
    assert f.shape == (256, features.FEATURES)
    # Renders of the same distribution are close; one half of the shapes alone is far.
    ref = features.features(world.make_dataset(10, 256).images, clf)
    half = features.features(world.make_dataset(11, 256, shapes=world.SHAPE_HALVES["a"]).images, clf)
    assert features.frechet_distance(ref, half) > 3 * features.frechet_distance(ref, f)


def test_quick_check_flags_figures_outside_the_tolerances():
    rep = _report()
    committed = ROOT / "benchmarks" / "results" / "report" / "quick" / "report.json"
    old = rep._json_keys_to_int(json.loads(committed.read_text()))
    assert rep.compare(old, old) == []
    new = json.loads(json.dumps(old))
    new = rep._json_keys_to_int(new)
    m = "SuperDiff OR"
    new["or_halves"]["summary"][m]["fid"]["mean"] *= 1 + 2 * rep.TOLERANCES["fid_rel"]
    new["and"]["summary"]["SuperDiff AND"]["both_clean"] += 2 * rep.TOLERANCES["rate_abs"]
    bad = rep.compare(new, old)
    assert len(bad) == 2 and "FID" in bad[0] and "AND" in bad[1]


def test_committed_reports_state_the_paper_comparisons():
    for path in [ROOT / "benchmarks/results/report/report.md", ROOT / "benchmarks/results/report/quick/report.md"]:
        text = path.read_text()
        for heading in ["## 1. OR of two half-data models", "## 2. AND of two prompts", "## 3. Steps to quality"]:
            assert heading in text
        assert "paper FID" in text and "paper TIFA" in text


@pytest.mark.slow
def test_quick_mode_reproduces_its_committed_figures():
    p = subprocess.run([sys.executable, "benchmarks/report.py", "--quick", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_bench_report_subcommand_forwards_its_options():
    from superdiff.cli import build_parser

    args = build_parser().parse_args(["bench", "report", "--full", "--sections", "or,and", "--skip-existing"])
    assert args.func.__name__ == "_report" and args.full and args.sections == "or,and" and args.skip_existing
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "report", "--quick", "--full"])



def _refuse_to_run(*args, **kwargs):
    raise AssertionError("the report ran: the options should have been refused first")


def test_check_never_writes_over_nor_compares_against_the_committed_quick_figures(tmp_path, monkeypatch):
    """--check reruns quick mode and compares it with the committed quick figures: an --out that
    is the committed folder would delete its section files, overwrite report.json and then
    compare the new run with itself. Refused before anything runs or is deleted."""
    rep = _report()
    committed = tmp_path / "report" / "quick"  # a copy of the committed folder stands in for it
    committed.mkdir(parents=True)
    for name in ("report.json", "section_or.json"):
        (committed / name).write_text((rep.OUT_QUICK / name).read_text())
    monkeypatch.setattr(rep, "OUT_QUICK", committed)
    monkeypatch.setattr(rep, "run", _refuse_to_run)
    before = {p.name: p.read_bytes() for p in committed.iterdir()}
    for out in (str(committed), str(committed) + "/", str(committed / ".." / "quick")):
        with pytest.raises(SystemExit):
            rep.main(["--check", "--out", out])
    assert {p.name: p.read_bytes() for p in committed.iterdir()} == before


def test_check_refuses_models_other_than_the_committed_ones(capsys, monkeypatch):
    """The committed quick figures are of the default models: another --full-model or --and-model
    has other table rows, so the comparison could not be made (it failed with a KeyError)."""
    rep = _report()
    monkeypatch.setattr(rep, "run", _refuse_to_run)
    for flag, model in (("--full-model", "shapes-half-a"), ("--and-model", "shapes-t2i")):
        with pytest.raises(SystemExit):
            rep.main(["--check", flag, model])
        err = capsys.readouterr().err
        assert flag in err and "--check" in err


def test_links_to_the_other_benchmarks_resolve_from_any_output_folder(tmp_path, monkeypatch):
    """The report links the other benchmarks' outputs relative to its own folder: under a custom
    --out they still reach the files, as they do from the committed folder."""
    import re

    rep = _report()
    res = rep._json_keys_to_int(json.loads((rep.OUT_FULL / "report.json").read_text()))
    assert res.get("existing")
    for out in (tmp_path / "custom", tmp_path / "a" / "b" / "c" / "d" / "e"):
        out.mkdir(parents=True)
        rep.write_markdown(res, out / "report.md", "full")
        links = re.findall(r"\]\(([^)]*\.md)\)", (out / "report.md").read_text())
        assert len(links) == len(res["existing"])
        assert all((out / link).resolve().is_file() for link in links), links
    written = {}
    monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **kw: written.__setitem__(self, text))
    rep.write_markdown(res, rep.OUT_FULL / "report.md", "full")  # captured, not written
    links = re.findall(r"\]\(([^)]*\.md)\)", written[rep.OUT_FULL / "report.md"])
    assert links == ["../estimator_accuracy.md", "../compose_shapes.md", "../protein_bench/table.md"]
    assert all((rep.OUT_FULL / link).resolve().is_file() for link in links)
