"""benchmarks/step_breakdown.py: exclusive per-part time of a SuperDiff step. The bookkeeping is
checked on a fake clock, the instrumentation on a real (bundled, small) pipeline run by the
calls it counts per step and by leaving the library as it found it. Timings are not tested."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import step_breakdown as sb  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_parts_time_excludes_the_parts_it_calls_and_counts_only_while_active(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(sb.time, "perf_counter", clock)
    parts = sb.Parts()

    def leaf():
        clock.now += 3.0

    def middle():
        clock.now += 2.0
        inner()
        clock.now += 1.0

    inner = parts.wrap(leaf, "leaf")
    outer = parts.wrap(middle, "middle")
    outer()  # not active: nothing recorded
    assert not parts.time
    parts.active = True
    outer()
    outer()
    assert parts.time == {"middle": 6.0, "leaf": 6.0}  # middle: 2 + 1 per call, leaf 3 per call
    assert parts.calls == {"middle": 2, "leaf": 2}

    def failing():
        clock.now += 5.0
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        parts.wrap(failing, "leaf")()  # an exception still closes the part
    assert parts.time["leaf"] == 11.0 and not parts._stack


@pytest.fixture(scope="module")
def bench():
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return sb.speed.Bench("shapes-t2i", torch.device("cpu"))


def test_instrumenting_a_run_counts_each_part_per_step_and_restores_the_library(bench):
    from superdiff import estimators, operators, sampling, step

    before = (sampling.superdiff_step, step._evaluate, estimators.ODEEstimator.__dict__["divergence_fd"],
              operators.solve_and, operators.AndOperator.__dict__["kappa"], bench.ours.unet.forward)
    case = {c.key: c for c in sb.speed.all_cases()}["shapes-t2i/euler+ode/and/N2"]
    res = sb.breakdown_case(bench, case, steps=3, reps=1)
    after = (sampling.superdiff_step, step._evaluate, estimators.ODEEstimator.__dict__["divergence_fd"],
             operators.solve_and, operators.AndOperator.__dict__["kappa"], bench.ours.unet.forward)
    assert after == before
    assert bench.ours.progress_bar is bench.clock and not bench.timer.stub
    for mode in ("stub", "network"):
        calls = res[f"{mode}_calls_per_step"]
        # euler + ode with the finite-difference JVP: the step's forward and one more at x + eps z
        assert calls["network"] == 2.0
        assert calls["divergence"] == calls["probes"] == calls["AND solve"] == calls["linear model"] == 1.0
        assert calls["AND proposals and A"] == 1.0 and calls["rest of the step"] == 1.0
        assert "clamp projection" not in calls  # two experts: the clamp is inside the closed form
        us = res[mode]
        assert us["outside"] > 0 and us["diffusers_outside"] > 0
        assert us["outside"] == pytest.approx(us["step"] - us["network"])
    text = sb.markdown({"device": "cpu", "command": "x", "steps_per_call": 3, "reps": 1, "results": [res]})
    assert "| AND solve (" in text and "| divergence (" in text and "clamp projection" not in text


def test_an_unknown_case_key_is_refused_with_the_keys_format():
    with pytest.raises(ValueError, match="keys look like"):
        sb.main(["--cases", "sd64/euler+ode/and/N9", "--out", "/nonexistent"])


def test_the_cli_runs_it_under_its_own_name(capsys):
    import argparse

    from superdiff.bench_cli import _breakdown

    with pytest.raises(SystemExit) as done:
        _breakdown(argparse.Namespace(breakdown_args=["--help"]))
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: superdiff bench breakdown ")


def test_a_thread_count_below_one_is_refused_with_the_option_name():
    """torch.set_num_threads(0) fails with a RuntimeError that `superdiff bench breakdown` shows
    as a traceback; the option is checked with the others, before any work."""
    with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
        sb.main(["--threads", "0", "--out", "/nonexistent"])


def test_the_scripts_refuse_bad_options_in_one_line_without_a_traceback(capsys):
    """`python benchmarks/step_breakdown.py --threads 0` (and speed.py, report.py) exit with 2
    and the message, as `superdiff bench ...` does, through superdiff.cli.reporting_errors."""
    from superdiff.cli import reporting_errors

    assert reporting_errors(lambda: sb.main(["--threads", "0", "--out", "/nonexistent"]), "step_breakdown.py") == 2
    assert capsys.readouterr().err == "step_breakdown.py: error: --threads must be >= 1, got 0\n"
    for script in ("speed.py", "report.py", "step_breakdown.py"):
        text = (REPO / "benchmarks" / script).read_text()
        assert f'sys.exit(reporting_errors(main, "{script}"))' in text, script


def test_a_case_key_given_twice_runs_once(tmp_path, monkeypatch):
    """--cases A,B,A measures A and B once each: one row per case in the table."""
    ran = []
    monkeypatch.setattr(sb.speed, "Bench", lambda model, device: object())
    monkeypatch.setattr(sb, "breakdown_case", lambda bench, case, steps, reps: ran.append(case.key) or {"key": case.key})
    monkeypatch.setattr(sb, "markdown", lambda doc: "table\n")
    a, b = "sd64/euler+ode/and/N2", "sd64/sde+ito/and/N2"
    sb.main(["--cases", f"{a},{b},{a}", "--device", "cpu", "--out", str(tmp_path), "--label", "t"])
    assert ran == [a, b]
    import json

    assert [r["key"] for r in json.loads((tmp_path / "breakdown_t.json").read_text())["results"]] == [a, b]


def test_only_the_default_cases_write_the_device_named_breakdown():
    """The committed breakdown_cpu.* holds the six default cases: other --cases get their own
    name, and --label cpu for them is refused instead of overwriting the committed figures."""
    import json

    committed = json.loads((REPO / "benchmarks" / "results" / "speed" / "breakdown_cpu.json").read_text())
    assert tuple(r["key"] for r in committed["results"]) == sb.DEFAULT_CASES
    assert sb.breakdown_label(None, "cpu", list(sb.DEFAULT_CASES)) == "cpu"
    assert sb.breakdown_label(None, "cpu", ["sd64/euler+ode/and/N3"]) == "cpu-cases"
    assert sb.breakdown_label("mine", "cpu", ["sd64/euler+ode/and/N3"]) == "mine"
    with pytest.raises(ValueError, match="--label cpu: that name belongs to the default cases"):
        sb.breakdown_label("cpu", "cpu", ["sd64/euler+ode/and/N3"])
