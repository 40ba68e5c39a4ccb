"""`superdiff protein bench`: writes the table (Markdown + JSON), PDBs and plots; a rerun
reproduces its own table and `--check` reports any metric that moved."""

from __future__ import annotations

import json
import shutil

import pytest

from superdiff.cli import main

SMALL = ["--num", "4", "--steps", "6", "--pdb-per-method", "2", "--no-mpnn", "--quiet"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("pb1")
    assert main(["protein", "bench", "--out", str(out), *SMALL]) == 0
    return out


def test_bench_writes_table_pdbs_and_plots(first):
    res = json.loads((first / "table.json").read_text())
    assert set(res["methods"]) == {"A (helix model)", "B (strand model)", "averaging (kappa=1/2)",
                                   "SuperDiff OR, l=(0,0)", "SuperDiff OR, l=(1,0)", "SuperDiff AND"}
    for name, row in res["methods"].items():
        assert abs(row["helical"] + row["strand"] + row["mixed"] + row["other"] - 1) < 1e-6, name
        assert 0 <= row["share_kappa_A_gt_half"] <= 1
    assert res["methods"]["A (helix model)"]["share_kappa_A_gt_half"] == 1.0
    assert res["methods"]["B (strand model)"]["share_kappa_A_gt_half"] == 0.0
    # the per-expert class shares exist for OR only
    assert "helical_if_follows_A" in res["methods"]["SuperDiff OR, l=(0,0)"]
    assert "helical_if_follows_A" not in res["methods"]["SuperDiff AND"]
    md = (first / "table.md").read_text()
    assert "PROXY" in md and "| SuperDiff AND |" in md and "designability is NOT measured" in md
    for f in ("classes.png", "ss_scatter.png", "traces.png"):
        assert (first / f).stat().st_size > 1000
    pdbs = sorted((first / "samples").glob("*/*.pdb"))
    assert len(pdbs) == 6 * 2 and "ATOM" in pdbs[0].read_text()


def test_rerun_reproduces_and_check_catches_a_change(first, tmp_path, capsys, monkeypatch):
    assert main(["protein", "bench", "--out", str(tmp_path / "again"), *SMALL,
                 "--check", str(first / "table.json")]) == 0
    assert "reproduced" in capsys.readouterr().out
    ref = json.loads((first / "table.json").read_text())
    ref["methods"]["SuperDiff AND"]["helical"] += 0.25
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(ref))

    # the same run again (its tables, without sampling a third time), checked against the changed table
    def rerun(out, *args, **kwargs):
        shutil.copytree(tmp_path / "again", out)

    monkeypatch.setattr("superdiff.protein.bench.run_bench", rerun)
    assert main(["protein", "bench", "--out", str(tmp_path / "third"), *SMALL, "--check", str(changed)]) == 1
    err = capsys.readouterr().err
    assert "NOT reproduced" in err and "SuperDiff AND/helical: committed" in err
    assert err.count("\n  ") == 1  # that metric only: the rerun reproduced every other one


def test_check_reproduces_nan_metrics_and_reports_real_changes():
    """A one-sample set has no pairwise diversity (NaN in table.json): a rerun that gives NaN
    again reproduces it; a number against a NaN, or a float moved past the tolerance, does not."""
    from superdiff.protein.cli import table_diffs

    nan = float("nan")
    ref = {"methods": {"A": {"diversity": nan, "helical": 0.5, "sampling_seconds": 1.0}},
           "references": {"R": {"diversity": nan}}}
    same = {"methods": {"A": {"diversity": nan, "helical": 0.501, "sampling_seconds": 9.0}},
            "references": {"R": {"diversity": nan}}}
    assert table_diffs(ref, same) == []
    moved = {"methods": {"A": {"diversity": 0.2, "helical": 0.51}}, "references": {"R": {"diversity": nan}}}
    assert table_diffs(ref, moved) == ["methods/A/diversity: committed nan, now 0.2",
                                       "methods/A/helical: committed 0.5, now 0.51"]


@pytest.mark.parametrize("flag,value", [("--pdb-per-method", "-1"), ("--num", "0"), ("--steps", "0")])
def test_bench_refuses_bad_counts_before_running(tmp_path, capsys, flag, value):
    argv = ["protein", "bench", "--out", str(tmp_path / "b"), *SMALL]
    argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    assert flag in capsys.readouterr().err and not (tmp_path / "b").exists()
