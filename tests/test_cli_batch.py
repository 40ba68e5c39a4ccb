"""`superdiff generate` and `superdiff batch` on the bundled models (issue 5).

Specification: PNG metadata reproduces an image exactly; a batch killed with SIGKILL and
rerun loses nothing and repeats nothing; a two-process `accelerate launch` run writes the
same files, byte for byte, as one process; bad job lines are reported by line and field
and skipped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from superdiff.batch import parse_jobs
from superdiff.cli import main
from superdiff.compose import Composition, read_png_composition

STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}

JOBS = [
    {"prompts": ["a circle", "something red"], "methods": ["joint", "average", "or", "and"], "steps": STEPS,
     "num_images": 2, "seed": 3},
    {"id": "halves", "model": "shapes-half-a", "extra_models": ["shapes-half-b"], "operator": "or",
     "steps": STEPS, "num_images": 2},
]


def write_jobs(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "superdiff", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run of JOBS: the ground truth for the other tests."""
    d = tmp_path_factory.mktemp("ref")
    jobs = write_jobs(d / "jobs.jsonl", JOBS)
    r = run_cli("batch", str(jobs), "--out", str(d / "out"), "--quiet")
    assert r.returncode == 0, r.stderr
    return jobs, d / "out"


def test_generate_writes_images_grid_trace_and_png_metadata_round_trip(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a square", "--prompt", "something blue", "--operator", "or",
                 "--steps", str(STEPS), "-n", "2", "--seed", "7", "--out", str(out), "--quiet"]) == 0
    for name in ("image_000.png", "image_001.png", "grid.png", "trace.json", "trace.png", "composition.json"):
        assert (out / name).is_file(), name
    with Image.open(out / "image_001.png") as im:
        text = dict(im.text)
    meta = json.loads(text["superdiff"])
    import superdiff

    assert meta["superdiff_version"] == superdiff.__version__
    assert meta["seed"] == 8 and meta["num_images"] == 1 and meta["prompts"] == ["a square", "something blue"]
    assert set(Composition.field_names()) <= set(meta)
    rec = read_png_composition(out / "image_001.png")
    assert rec.operator == "or" and rec.steps == STEPS
    # reproduce image 1 from its PNG alone: identical pixels
    out2 = tmp_path / "again"
    assert main(["generate", "--from-png", str(out / "image_001.png"), "--out", str(out2), "--quiet"]) == 0
    assert "identical pixels" in capsys.readouterr().out
    a = np.asarray(Image.open(out / "image_001.png"))
    b = np.asarray(Image.open(out2 / "image_000.png"))
    np.testing.assert_array_equal(a, b)


def test_generate_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["generate", "--set", "colour=red", "--out", str(tmp_path)]) == 2
    assert "unknown field(s) colour" in capsys.readouterr().err
    assert main(["generate", "--from-png", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2


def test_batch_reports_and_skips_malformed_lines(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompts": ["a circle"], "operator": "single", "steps": STEPS},
        '{"prompts": ["a circle"], "steps": ',
        {"prompts": ["a square"], "operatr": "or"},
        {"model": "shapes-t2x", "prompts": ["a circle"]},
        {"prompts": ["a circle", "a square"], "operator": "xor"},
        {"prompts": ["a circle"], "methods": ["and", "frobnicate"]},
        {"prompts": ["a circle"], "steps": "many"},
        {"model": "shapes-half-a", "prompts": ["a circle"], "steps": STEPS},  # fails at run time
    ])
    r = run_cli("batch", str(jobs), "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 0, r.stderr  # one job could run
    err = r.stderr
    for needle in ("line 2: not valid JSON", "line 3: unknown field(s) operatr", "line 4: model: 'shapes-t2x'",
                   "line 5: operator: unknown operator 'xor'", "line 6: methods[1]: unknown method 'frobnicate'",
                   "line 7: steps: must be an integer", "(line 8) failed: prompts:", "6 invalid job line(s)",
                   "1 failed"):
        assert needle in err, (needle, err)
    m = manifest(tmp_path / "out")
    assert [r["status"] for r in m] == ["ok", "error"]
    assert (tmp_path / "out" / m[0]["image"]).is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["generated"] == 1 and summary["failed"] == 1 and summary["invalid_lines"] == 6
    # nothing runnable at all: non-zero exit
    bad = write_jobs(tmp_path / "bad.jsonl", [{"prompts": ["a"], "nope": 1}])
    r = run_cli("batch", str(bad), "--out", str(tmp_path / "out2"), "--quiet")
    assert r.returncode == 1 and "nothing could run" in r.stderr


def test_csv_jobs_expand_like_jsonl(tmp_path):
    csv = tmp_path / "jobs.csv"
    csv.write_text("id,prompts,methods,steps,num_images,weights\n"
                   "pair,a circle|something red,or|and,3,2,0.3|0.7\n"
                   "bad,a circle,or,3,two,\n")
    jobs, errors = parse_jobs(csv)
    assert [(j[1], j[2]) for j in jobs] == [("pair", "or"), ("pair", "and")]
    assert jobs[0][3].prompts == ["a circle", "something red"] and jobs[0][3].weights == [0.3, 0.7]
    assert len(errors) == 1 and errors[0].line == 3 and "num_images" in errors[0].message


def test_resume_after_kill_loses_nothing_and_repeats_nothing(tmp_path, reference):
    jobs, ref_out = reference
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "superdiff", "batch", str(jobs), "--out", str(out), "--quiet"],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    mf = out / "manifest.jsonl"
    while time.time() < deadline and p.poll() is None:
        if mf.is_file() and len(mf.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the batch finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = images(out)
    assert 3 <= len(before) < len(images(ref_out))
    listed = {r["key"] for r in manifest(out)}
    for r in manifest(out):  # no manifest line without its file
        assert (out / r["image"]).is_file()
    mtimes = {k: (out / k).stat().st_mtime_ns for k in before}
    r = run_cli("batch", str(jobs), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    total = len(images(ref_out))
    assert s["skipped"] + s["recovered"] == len(before) and s["generated"] == total - len(before)
    assert s["skipped"] == len(listed & set(k.replace("images/", "")[:-4] for k in before))
    after = images(out)
    assert after == images(ref_out)  # same bytes as the uninterrupted run
    assert all((out / k).stat().st_mtime_ns == t for k, t in mtimes.items())  # finished images untouched
    keys = [r["key"] for r in manifest(out) if r["status"] == "ok"]
    assert len(keys) == len(set(keys)) == total
    assert not list(out.rglob("*.tmp"))
    # a third run has nothing left to do
    r = run_cli("batch", str(jobs), "--out", str(out), "--quiet")
    assert r.returncode == 0 and json.loads((out / "summary.json").read_text())["skipped"] == total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run_equals_one_process(tmp_path, reference):
    jobs, ref_out = reference
    out = tmp_path / "acc"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "superdiff", "batch", str(jobs), "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "in 2 process(es)" in r.stderr
    assert images(out) == images(ref_out)  # file for file, byte for byte
    m = manifest(out)
    assert {r["rank"] for r in m} == {0, 1}
    keys = [r["key"] for r in m]
    assert len(keys) == len(set(keys)) == len(images(ref_out))  # no file written twice
    assert not list(out.glob("manifest.rank*.jsonl"))


def test_manifest_parts_and_cut_lines_from_a_killed_run_are_folded_in(tmp_path):
    """A multi-process run killed before its merge leaves manifest.rank*.jsonl parts (one
    with a half-written last line); the next run folds them into manifest.jsonl and goes on."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompts": ["a circle"], "operator": "single", "steps": 2,
                                                 "num_images": 2}])
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--out", str(out), "--quiet", "--limit", "1"]) == 0
    first = manifest(out)[0]
    (out / "manifest.jsonl").unlink()
    (out / "manifest.rank1.jsonl").write_text(json.dumps(first) + "\n" + '{"key": "job0001/sin')
    assert main(["batch", str(jobs), "--out", str(out), "--quiet"]) == 0
    assert not list(out.glob("manifest.rank*.jsonl"))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    ok = [json.loads(x) for x in lines if x.startswith("{") and x.endswith("}")]
    assert sorted(r["key"] for r in ok if r["status"] == "ok") == ["job0001/single/0000", "job0001/single/0001"]
    assert json.loads((out / "summary.json").read_text())["generated"] == 1  # image 0 was not redone
