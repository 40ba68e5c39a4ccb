"""The composition trace: its JSON round trip and the plot (superdiff/trace.py)."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib import cbook  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from superdiff.trace import Trace  # noqa: E402


def make_trace(steps: int = 5, batch: int = 3, experts: int = 2, particles: bool = False, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    t = np.linspace(1.0, 0.0, steps + 1)
    logq = np.cumsum(rng.normal(size=(steps + 1, batch, experts)), axis=0)  # log q drifts over the steps
    return Trace(t, 2 * t, rng.random((steps, batch, experts)), logq, [f"expert {chr(65 + i)}" for i in range(experts)],
                 {"operator": "or", "operator_params": {"temperature": float("inf")}},
                 rng.random((steps, batch)) if particles else None,
                 (rng.random((steps, batch)) > 0.5) if particles else None)


def curves(ax) -> dict[str, np.ndarray]:
    """The labelled lines of an axes, by label (the zero line and helpers have none)."""
    return {ln.get_label(): np.asarray(ln.get_ydata(), dtype=float) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def test_json_round_trip_keeps_every_array_and_the_particle_record(tmp_path):
    tr = make_trace(particles=True)
    tr.logq[:, :, 1] = np.nan  # an expert whose log q was not tracked (operator single)
    back = Trace.load(tr.save(tmp_path / "trace.json"))
    for name in ("t", "sigma", "kappa", "logq", "ess", "resampled"):
        assert np.array_equal(getattr(back, name), getattr(tr, name), equal_nan=name == "logq"), name
    assert back.resampled.dtype == bool and back.expert_names == tr.expert_names
    assert back.meta["operator_params"]["temperature"] == "inf"  # strict JSON for an infinite temperature
    assert Trace.from_dict(json.loads(json.dumps(back.to_dict()))).to_dict() == back.to_dict()


def test_selecting_one_sample_by_a_numpy_integer_keeps_the_sample_axis(tmp_path):
    tr = make_trace(particles=True)
    for index in (1, np.int64(1), [1]):
        one = tr.select(index)
        assert one.batch_size == 1 and one.kappa.shape == (tr.num_steps, 1, tr.num_experts), type(index)
        assert np.array_equal(one.logq[:, 0], tr.logq[:, 1]) and one.ess.shape == (tr.num_steps, 1)
        assert Trace.load(one.save(tmp_path / "one.json")).kappa.shape == one.kappa.shape


def test_plot_draws_each_selected_sample_with_every_expert():
    tr = make_trace(batch=3, experts=3)
    fig = tr.plot(None, samples=[2, 0])
    axes = np.asarray(fig.axes).reshape(2, 2)
    assert [ax.get_title() for ax in axes[0]] == ["sample 2", "sample 0"]
    k = curves(axes[0, 0])
    assert list(k) == tr.expert_names and np.allclose(k["expert B"], tr.kappa[:, 2, 1])
    assert len(curves(axes[1, 1])["expert A"]) == tr.num_steps + 1  # log q: the prior and after every step


def test_a_single_expert_log_q_is_drawn_relative_to_its_start_not_as_a_flat_zero():
    """Relative to the mean over experts, one expert's log q would be 0 at every step."""
    tr = make_trace(batch=1, experts=1)
    fig = tr.plot(None, samples=1)
    drawn = curves(fig.axes[1])["expert A"]
    assert np.allclose(drawn, tr.logq[:, 0, 0] - tr.logq[0, 0, 0]) and np.ptp(drawn) > 0
    assert "step 0" in fig.axes[1].get_ylabel()


def test_several_experts_are_drawn_relative_to_their_mean():
    tr = make_trace(batch=1, experts=3)
    fig = tr.plot(None, samples=1)
    drawn = curves(fig.axes[1])
    mean = tr.logq[:, 0].mean(-1)
    assert all(np.allclose(drawn[n], tr.logq[:, 0, i] - mean) for i, n in enumerate(tr.expert_names))
    assert "mean" in fig.axes[1].get_ylabel()


def test_more_experts_than_colours_never_share_a_legend_style():
    tr = make_trace(batch=1, experts=14)
    fig = tr.plot(None, samples=1)
    legend = fig.axes[0].get_legend()
    styles = [(h.get_color(), h.get_linestyle()) for h in legend.get_lines()]
    assert len(styles) == 14 and len(set(styles)) == 14


def test_experts_whose_log_q_was_not_tracked_are_named_so_in_a_visible_legend():
    tr = make_trace(batch=2, experts=2)
    tr.logq[:, :, 0] = np.nan
    fig = tr.plot(None, samples=1)
    legend = fig.axes[1].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["expert A (not tracked)", "expert B"]


def test_dollar_signs_in_expert_names_and_title_are_drawn_as_written(tmp_path):
    """Prompts are plain text: "$5 and $10" must not turn into mathtext, "$\\foo$" must not fail."""
    tr = make_trace(batch=1, experts=2)
    tr.expert_names = ["a $5 and $10 bill", r"a $\foo$ sign"]
    fig = tr.plot(tmp_path / "trace.png", samples=1, title="AND: a $5 and $10 bill")
    assert (tmp_path / "trace.png").stat().st_size > 0
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()] + [fig._suptitle.get_text()]
    assert not any(cbook.is_math_text(s) for s in texts)
    assert [s.replace(r"\$", "$") for s in texts] == [*tr.expert_names, "AND: a $5 and $10 bill"]


def test_samples_that_are_not_in_the_trace_are_refused_with_the_valid_range():
    tr = make_trace(batch=3)
    with pytest.raises(ValueError, match=r"\[5\].*3 sample\(s\), numbered 0 to 2"):
        tr.plot(None, samples=[0, 5])
    with pytest.raises(ValueError, match="no samples selected"):
        tr.plot(None, samples=0)
    assert len(tr.plot(None, samples=10).axes) == 2 * 3  # a count beyond the batch shows them all
    assert tr.plot(None, samples=[-1]).axes[0].get_title() == "sample 2"


def test_a_plot_that_fails_while_writing_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "trace.png"
    make_trace().plot(path)
    good = path.read_bytes()

    def broken_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        make_trace(seed=1).plot(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["trace.png"]  # no temporary file left behind


def test_gmm_demo_refuses_bad_options_naming_them(tmp_path, capsys):
    """`superdiff gmm-demo` says which option is wrong, before sampling (not "shape=(0, 2)" or a
    FileExistsError traceback)."""
    from superdiff.cli import main

    for argv, flag in ((["--samples", "0"], "--samples"), (["--steps", "-1"], "--steps")):
        with pytest.raises(SystemExit) as done:
            main(["gmm-demo", "--out", str(tmp_path / "demo"), *argv])
        assert done.value.code == 2 and f"argument {flag}: expected a positive integer" in capsys.readouterr().err
    (tmp_path / "a file").write_text("")
    assert main(["gmm-demo", "--out", str(tmp_path / "a file"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not a folder" in err
    assert not (tmp_path / "demo").exists()


def _strict_json(text: str):
    """json.loads that refuses the NaN / Infinity literals (not JSON: browsers and jq reject them)."""
    def refuse(name):
        raise AssertionError(f"non-standard JSON literal {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_kappa_ess_and_log_q_round_trip_as_strict_json(tmp_path):
    """A kappa or ESS that went NaN or infinite (a diverged run is still worth inspecting) is
    saved, not refused: in the arrays NaN is null and an infinity "inf" / "-inf", and loading
    gives back the same values; untracked log q (NaN) stays null."""
    tr = make_trace(particles=True)
    tr.kappa[1, 0, 0], tr.kappa[2, 1, 1], tr.kappa[3, 2, 0] = np.nan, np.inf, -np.inf
    tr.ess[0, 0], tr.ess[4, 2] = np.nan, np.inf
    tr.logq[:, :, 1] = np.nan  # not tracked (operator single)
    tr.logq[5, 0, 0] = -np.inf
    d = _strict_json(tr.to_json())
    assert d["kappa"][1][0][0] is None and d["kappa"][2][1][1] == "inf" and d["kappa"][3][2][0] == "-inf"
    assert d["ess"][0][0] is None and d["ess"][4][2] == "inf"
    assert d["logq"][0][0][1] is None and d["logq"][5][0][0] == "-inf"
    assert d["meta"]["operator_params"]["temperature"] == "inf"
    text = tr.save(tmp_path / "trace.json").read_text()
    assert text == tr.to_json()
    for back in (Trace.load(tmp_path / "trace.json"), Trace.from_dict(d)):
        for name in ("t", "sigma", "kappa", "logq", "ess", "resampled"):
            assert np.array_equal(getattr(back, name), getattr(tr, name), equal_nan=name != "resampled"), name


def test_the_studio_zip_holds_the_same_strict_trace_json(tmp_path):
    """ui.jobs.zip_results writes each image's trace as Trace.save does (no NaN literal)."""
    import zipfile

    from superdiff.compose import DEFAULT_COMPOSITION
    from superdiff.ui.jobs import ResultItem, zip_results

    tr = make_trace(batch=1)
    tr.kappa[0, 0, 0] = np.nan
    tr.logq[:, :, 1] = np.nan
    png = tmp_path / "img.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    z = zipfile.ZipFile(zip_results([ResultItem("AND", "AND", str(png), DEFAULT_COMPOSITION, tr)], tmp_path / "all.zip"))
    text = z.read("img_trace.json").decode()
    assert text == tr.to_json()
    back = Trace.from_dict(_strict_json(text))
    assert np.array_equal(back.kappa, tr.kappa, equal_nan=True) and np.array_equal(back.logq, tr.logq, equal_nan=True)


def test_gmm_demo_keeps_its_previous_files_when_writing_them_fails(tmp_path, monkeypatch):
    """summary.json and samples.png are written beside themselves and renamed: a run that fails
    while writing them (a full disk, a kill) leaves the previous run's files whole."""
    from pathlib import Path

    from superdiff.demo import run_demo

    monkeypatch.setattr(Trace, "plot", lambda self, *args, **kwargs: None)  # not what is tested here (and slow)
    run_demo(tmp_path, num_samples=20, num_steps=4, progress=False)
    before = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "samples.png")}
    savefig, write_text = Figure.savefig, Path.write_text

    def failing_savefig(self, fname, *args, **kwargs):
        if "samples" in str(fname):
            Path(fname).write_bytes(b"\x89PNG\r\n")  # what a failed write leaves
            raise OSError("disk full")
        return savefig(self, fname, *args, **kwargs)

    def failing_write_text(self, text, *args, **kwargs):
        if self.name.startswith("summary"):
            write_text(self, text[:10])
            raise OSError("disk full")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        run_demo(tmp_path, num_samples=20, num_steps=4, seed=1, progress=False)
    assert (tmp_path / "samples.png").read_bytes() == before["samples.png"]
    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(OSError, match="disk full"):
        run_demo(tmp_path, num_samples=20, num_steps=4, seed=1, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "summary.json").read_bytes() == before["summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 0
    assert not list(tmp_path.glob("*.tmp"))
