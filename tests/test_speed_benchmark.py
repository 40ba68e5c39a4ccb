"""benchmarks/speed.py's bookkeeping, on data rather than on timed runs: which profiler events
count as the step's ops and syncs, and that a GPU run's document renders (its branches run only
on a lent GPU, where a failure would waste the lease). Timings themselves are not tested."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import speed  # noqa: E402


@dataclass
class Ev:
    name: str
    cpu_parent: "Ev | None" = None


def test_count_events_counts_top_level_ops_and_syncs_outside_the_network():
    net = Ev(speed.NETWORK_LABEL)
    top = Ev("aten::mul")
    item = Ev("aten::item")
    events = [
        top,
        Ev("aten::empty", top),  # nested in an aten op: part of it, not counted
        Ev("aten::add"),
        net,
        Ev("aten::conv2d", net),  # inside the network
        item,
        Ev("aten::_local_scalar_dense", item),  # a host read under .item()
        Ev("aten::_local_scalar_dense", net),  # a read inside the network: not the step's
        Ev("cudaStreamSynchronize"),
        Ev("my_python_range"),
    ]
    cpu = speed.count_events(events)
    assert cpu == {"aten_ops": 3, "syncs": 1}  # mul, add, item; the read under item
    cuda = speed.count_events(events, cuda=True)
    assert cuda == {"aten_ops": 3, "syncs": 1}  # on CUDA the runtime's sync event counts instead


def _gpu_doc() -> dict:
    """The committed CPU results relabelled as a GPU run with an sd15 case."""
    doc = json.loads((REPO / "benchmarks/results/speed/results_cpu.json").read_text())
    doc = copy.deepcopy(doc)
    doc.update(device="NVIDIA H100 80GB HBM3 (CUDA)", gpu_available=True, dtype="float16", attention="sdpa")
    doc["results"] = doc["results"][:3]
    for r, share in zip(doc["results"], (0.02, 0.05, 0.02)):
        r["target_gpu_share"] = 0.03
        r["ours"]["outside_share"] = share
    return doc


def test_a_gpu_run_renders_its_share_target_and_no_cpu_only_line():
    md = speed.markdown(_gpu_doc())
    assert "No GPU was available" not in md
    assert "float16" in md and "sdpa" in md
    assert md.count("(3%: met)") == 2 and md.count("(3%: NOT met)") == 1
    assert len([ln for ln in md.splitlines() if ln.startswith("| sd64/")]) == 3


def test_a_cpu_run_does_not_judge_the_gpu_share():
    doc = _gpu_doc()
    doc["gpu_available"] = False
    md = speed.markdown(doc)
    assert "No GPU was available" in md and "3%:" not in md


def test_plot_of_a_gpu_run_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "speed_gpu.png"
    speed.plot(_gpu_doc(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_names_itself_in_the_benchmark_usage(capsys):
    """`superdiff bench speed --help` says how it was called, not `__main__.py`."""
    import argparse

    from superdiff.bench_cli import _speed

    with pytest.raises(SystemExit) as done:
        _speed(argparse.Namespace(speed_args=["--help"]))
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: superdiff bench speed ")


def test_the_chunked_cases_run_ours_with_max_batch_size_and_keep_the_other_keys():
    full = speed.cases()
    keys = [c.key for c in full]
    assert len(keys) == len(set(keys))
    chunked = [c for c in full if c.max_batch_size is not None]
    assert {(c.sampler, c.estimator, c.experts) for c in chunked} == {
        ("sde", "ito", 4), ("sde", "ito", 6), ("euler", "ode", 4), ("euler", "ode", 6)}
    assert all(c.key.endswith(f"/N{c.experts}/mb3") and c.rows > 3 for c in chunked)  # more rows than one chunk
    assert "sd64/sde+ito/and/N4" in keys  # the whole-batch case keeps its key
    assert set(keys) <= {c.key for c in speed.all_cases()}  # --cases finds every case
    assert not any(c.max_batch_size for c in speed.cases(quick=True))

    calls = []

    class Fake:
        size = 512
        ours = staticmethod(lambda *a, **kw: calls.append(kw))

    speed.Bench.run(Fake(), "ours", chunked[0], 3)()
    speed.Bench.run(Fake(), "ours", full[0], 3)()
    assert [kw["max_batch_size"] for kw in calls] == [3, None]


def test_plot_shows_peak_memory_with_and_without_max_batch_size(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads((REPO / "benchmarks/results/speed/results_cpu.json").read_text())
    doc["results"] = [r for r in doc["results"] if not r["case"].get("max_batch_size")]
    whole = [r for r in doc["results"] if r["key"] in ("sd64/sde+ito/and/N4", "sd64/sde+ito/and/N6")]
    assert len(whole) == 2
    for r in whole:
        c = copy.deepcopy(r)
        c["case"]["max_batch_size"] = 3
        c["key"] += "/mb3"
        c["memory_mb"]["ours"] = 7.0
        doc["results"].append(c)
    out = tmp_path / "speed_cpu.png"
    speed.plot(doc, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, ax = plt.subplots()
    chunked = [r for r in doc["results"] if r["case"].get("max_batch_size")]
    speed._plot_chunked_memory(ax, doc["results"], chunked)
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    plt.close(fig)
    assert lines["SuperDiff sde+ito, max_batch_size=3"] == [7.0, 7.0]
    assert len(lines["SuperDiff sde+ito"]) == 6 and len(lines["diffusers (EulerAncestral)"]) == 6  # N = 1..6


def test_plot_of_a_run_without_an_n2_case_writes_an_image(tmp_path):
    """`--cases` may select cases at other N only (the first panel then shows every case)."""
    pytest.importorskip("matplotlib")
    doc = json.loads((REPO / "benchmarks/results/speed/results_cpu.json").read_text())
    doc["results"] = [r for r in doc["results"] if r["key"] == "sd64/sde+ito/and/N3"]
    out = tmp_path / "speed_cpu.png"
    speed.plot(doc, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _no_bench(*args, **kwargs):
    raise AssertionError("the benchmark started: the partial file should have been refused first")


def test_resume_refuses_cases_measured_with_other_settings(tmp_path, monkeypatch):
    """--resume keeps the cases of partial_<label>.json; measured with another --steps or --dtype
    they would sit in one table with figures of the new settings, so the resume is refused and
    the message says what differs and how to go on."""
    monkeypatch.setattr(speed, "Bench", _no_bench)
    settings = {"device": "cpu", "dtype": "float32", "attention": "default", "steps": 6, "reps": 1, "threads": 1}
    speed.write_json_atomic(tmp_path / "partial_t.json", {"settings": settings, "results": [{"key": "k"}]})
    assert speed.load_partial(tmp_path / "partial_t.json", settings) == [{"key": "k"}]
    with pytest.raises(ValueError, match=r"steps 6 there, 4 now.*without --resume"):
        speed.main(["--quick", "--resume", "--steps", "4", "--device", "cpu", "--out", str(tmp_path), "--label", "t"])
    (tmp_path / "partial_t.json").write_text('[{"key": "sd64/sde+ito/and/N2", "ours": {')  # cut short by a kill
    with pytest.raises(ValueError, match="not a partial file.*delete it or run without --resume"):
        speed.main(["--quick", "--resume", "--steps", "6", "--device", "cpu", "--out", str(tmp_path), "--label", "t"])


def test_json_results_are_replaced_whole(tmp_path, monkeypatch):
    """A write that fails half-way (a killed run, a full disk) keeps the previous file."""
    path = tmp_path / "partial_t.json"
    speed.write_json_atomic(path, {"results": [1]})

    def fail(self, *args, **kwargs):
        Path.write_bytes(self, b'{"results": [')  # what a killed write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(KeyboardInterrupt):
        speed.write_json_atomic(path, {"results": [1, 2]})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"results": [1]}


def _fake_run(monkeypatch) -> list[str]:
    """speed.main with the measurement stubbed: returns the keys it ran (what is written is real)."""
    ran: list[str] = []

    class FakeBench:
        size = 512

        def __init__(self, *args, **kwargs):
            self.ours = type("Ours", (), {"vae_scale_factor": 8})

    def measure(bench, case, *args, **kwargs):
        ran.append(case.key)
        return {"key": case.key, "ours": {"outside_ms": 1.0, "syncs_per_step": 0.0},
                "diffusers": {"outside_ms": 1.0, "syncs_per_step": 0.0}}

    monkeypatch.setattr(speed, "Bench", FakeBench)
    monkeypatch.setattr(speed, "measure_case", measure)
    monkeypatch.setattr(speed, "markdown", lambda doc: "table\n")
    monkeypatch.setattr(speed, "plot", lambda doc, path: path.write_bytes(b"png"))
    return ran


@pytest.mark.parametrize("options, label", [
    ([], "cpu"),
    (["--quick"], "cpu-quick"),
    (["--model", "sd15"], "cpu-sd15"),
    (["--dtype", "float16"], "cpu-float16"),
    (["--model", "sd15", "--dtype", "float16", "--attention", "sdpa", "--quick"], "cpu-sd15-float16-sdpa-quick"),
    (["--cases", "sd64/sde+ito/and/N3"], "cpu-cases"),
])
def test_only_the_default_suite_writes_the_device_named_results(tmp_path, monkeypatch, options, label):
    """results_cpu.* are the committed default suite's: another model, dtype, attention, case
    list or the quick run is named by what differs, never written over them."""
    _fake_run(monkeypatch)
    speed.main(options + ["--device", "cpu", "--no-memory", "--steps", "3", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"results_{label}.json", f"results_{label}.md",
                                                          f"speed_{label}.png"]


@pytest.mark.parametrize("options", [["--model", "sd15"], ["--dtype", "float16"], ["--attention", "math"],
                                     ["--cases", "sd64/sde+ito/and/N3"], ["--quick"]])
def test_a_label_naming_the_default_results_is_refused_for_another_configuration(tmp_path, monkeypatch, options):
    monkeypatch.setattr(speed, "Bench", _no_bench)
    with pytest.raises(ValueError, match=r"--label cpu: that name belongs to the default suite.*another --label"):
        speed.main(options + ["--label", "cpu", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--label cpu-quick: that name belongs to the default --quick run"):
        speed.main(options + ["--model", "sd64", "--label", "cpu-quick", "--device", "cpu", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_the_gpu_check_runs_keep_their_own_labels():
    """benchmarks/gpu_check.sh names every speed.py run (gpu-*): each is accepted as it stands."""
    import argparse
    import re
    import shlex

    script = (REPO / "benchmarks/gpu_check.sh").read_text()
    runs = [shlex.split(m) for m in re.findall(r"^\s*run (--.*)$", script, flags=re.M)]
    assert len(runs) == 4
    for argv in runs:
        args = argparse.Namespace(model=None, dtype="float32", attention="default", cases=None, quick=False, label=None)
        it = iter(argv)
        for flag in it:
            key = flag[2:]
            setattr(args, key, True if key == "quick" else next(it))
        assert speed.results_label(args, "cuda") == args.label and args.label.startswith("gpu-")
        assert speed.select_cases(args.cases, args.quick, args.model)


def test_cases_outside_the_model_or_quick_selection_are_refused(tmp_path, monkeypatch):
    """--cases picks among the cases --model and --quick select; a key of another model, or
    outside the quick list, is named rather than run in their place."""
    ran = _fake_run(monkeypatch)
    base = ["--device", "cpu", "--no-memory", "--steps", "3", "--out", str(tmp_path)]
    with pytest.raises(ValueError, match=r"--cases sd64/sde\+ito/and/N2: not among the cases of --model sd15 "
                                         r"\(sd15/sde\+ito/and/N2, .*drop --model sd15"):
        speed.main(["--model", "sd15", "--cases", "sd64/sde+ito/and/N2"] + base)
    with pytest.raises(ValueError, match=r"--cases sd64/sde\+ito/and/N3: not among the cases of --quick .*drop --quick"):
        speed.main(["--quick", "--cases", "sd64/sde+ito/and/N3"] + base)
    assert ran == [] and not list(tmp_path.iterdir())
    speed.main(["--model", "sd15", "--cases", "sd15/euler+none/average/N2"] + base)
    speed.main(["--quick", "--cases", "sd64/euler+ode/and/N2,sd64/euler+ode/and/N2"] + base)
    speed.main(["--cases", "sd15/euler+none/average/N2,shapes-t2i/sde+ito/and/N2"] + base)  # no --model: any model
    assert ran == ["sd15/euler+none/average/N2", "sd64/euler+ode/and/N2", "sd15/euler+none/average/N2",
                   "shapes-t2i/sde+ito/and/N2"]
