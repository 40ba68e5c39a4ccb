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
