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


def _pngs_outside(root: Path, out: Path) -> list[Path]:
    return [p for p in root.rglob("*.png") if (out / "images") not in p.parents]


def test_job_ids_and_method_names_never_leave_the_output_folder(tmp_path, capsys):
    """An id or method name is one folder name inside OUT/images: other characters than
    letters, digits, '_', '-' and '.' become '_', and a name starting with '.' ('.', '..')
    is refused on its line; no PNG is ever written outside OUT/images."""
    pair = {"prompts": ["a circle", "something red"], "steps": 2}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "..", **pair, "operator": "or"},
        {"id": ".", **pair, "operator": "or"},
        {"id": "../escape", **pair, "operator": "or"},
        {"id": "sweep", **pair, "methods": [{"name": "..", "operator": "or"}]},
        {"id": "sweep2", **pair, "methods": [{"name": "../../up", "operator": "or"}]},
        {"id": "a/../../b", **pair, "methods": ["or", {"name": "x/y\\z", "operator": "and"}]},
    ])
    out = tmp_path / "deep" / "out"
    assert main(["batch", str(jobs), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    for needle in ("line 1: id: '..' cannot name a folder", "line 2: id: '.' cannot name a folder",
                   "line 3: id: '../escape' cannot name a folder",
                   "line 4: methods[0]: name: '..' cannot name a folder",
                   "line 5: methods[0]: name: '../../up' cannot name a folder", "5 invalid job line(s)"):
        assert needle in err, (needle, err)
    assert _pngs_outside(tmp_path, out) == []
    m = manifest(out)
    assert sorted(r["key"] for r in m) == ["a_.._.._b/or/0000", "a_.._.._b/x_y_z/0000"]
    for r in m:
        assert all(part not in ("", ".", "..") for part in r["key"].split("/"))
        assert (out / r["image"]).resolve().parent.parent.parent == (out / "images").resolve()
    with pytest.raises(ValueError, match="id: .* cannot name a folder"):  # a Task built by hand is checked too
        from superdiff.batch import Task

        Task("..", "or", 0, 1, Composition.from_dict(pair)).image_path(out)


def test_csv_empty_list_cells_mean_the_field_is_not_given(tmp_path):
    """An empty list-field cell (methods, prompts, extra_models, adapters, weights, ...) means
    'not given', as if the column were absent: an empty methods cell runs the line's own operator."""
    csv = tmp_path / "jobs.csv"
    csv.write_text("id,model,prompts,operator,methods,extra_models,adapters,weights,steps\n"
                   "sweep,,a circle|something red,,joint|and,,,,2\n"
                   "plain,,a circle|something red,or,,,,,2\n"
                   "halves,shapes-half-a,,or,,shapes-half-b,,,2\n")
    jobs, errors = parse_jobs(csv)
    assert errors == []
    assert [(j[1], j[2]) for j in jobs] == [("sweep", "joint"), ("sweep", "and"), ("plain", "or"), ("halves", "or")]
    plain, halves = jobs[2][3], jobs[3][3]
    assert plain.operator == "or" and plain.extra_models == [] and plain.adapters == [] and plain.weights is None
    assert halves.prompts == [] and halves.extra_models == ["shapes-half-b"]


def test_batch_jobs_are_checked_and_expanded_as_generate_does(tmp_path, capsys):
    """Each (job, method) goes through generate's checks: AND / OR / average of one expert is
    refused (on its line, with generate's message), A1111's 'a AND b:0.7' prompt syntax makes
    one expert per part and needs a named method, and one expert with no operator is sampled
    alone (operator single) with a note."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "one", "prompts": ["a circle"], "operator": "and"},
        {"id": "half", "model": "shapes-half-a", "operator": "or"},
        {"id": "sweep1", "prompts": ["a circle"], "methods": ["single", "average"]},
        {"id": "a1111", "prompts": ["a circle AND something red"], "operator": "and"},
        {"id": "a1111w", "prompts": ["a circle:0.3 AND something red:0.7"], "methods": ["or", "average"]},
        {"id": "unnamed", "prompts": ["a circle AND something red"]},
        {"id": "andw", "prompts": ["a circle:0.3 AND something red:0.7"], "operator": "and"},
        {"id": "alone", "prompts": ["a circle"]},
        {"id": "unused", "prompts": ["a circle", "something red"], "operator": "single", "single_index": 1},
    ])
    valid, errors = parse_jobs(jobs)
    by_line = {e.line: e.message for e in errors}
    assert sorted(by_line) == [1, 2, 3, 6, 7]
    assert by_line[1].startswith("prompts: AND composes two or more experts, got 1")
    assert by_line[2].startswith("prompts: OR composes two or more experts, got 1")
    assert by_line[3].startswith("methods[1] (average): prompts: AVERAGE composes two or more experts, got 1")
    assert "A1111's 'AND' syntax; name the method explicitly" in by_line[6]
    assert "operator 'and' takes none" in by_line[7]
    got = {(job, method): comp for _, job, method, comp in valid}
    assert sorted(got) == [("a1111", "and"), ("a1111w", "average"), ("a1111w", "or"), ("alone", "single"),
                           ("unused", "single")]
    assert got["a1111", "and"].prompts == ["a circle", "something red"]
    assert got["a1111w", "or"].weights == got["a1111w", "average"].weights == [0.3, 0.7]
    assert got["alone", "single"].operator == "single"
    notes: list = []
    parse_jobs(jobs, notes=notes)  # what is worth saying about the valid lines
    said = {(n.line, n.message) for n in notes}
    assert (8, "one expert and no operator: sampling it alone (operator single)") in said
    assert any(line == 9 and "the other 1 expert(s) are not used" in msg for line, msg in said)
    # generate refuses the same composition with the same message
    assert main(["generate", "--prompt", "a circle", "--operator", "and", "--steps", "2",
                 "--out", str(tmp_path / "g")]) == 2
    assert by_line[1] in capsys.readouterr().err


def test_seed_minus_one_draws_one_seed_per_job_recorded_and_kept_on_resume(tmp_path, capsys):
    """seed -1 draws a seed, as generate does: once per job (every method of a sweep uses it),
    recorded in each PNG and manifest line, kept in OUT/drawn_seeds.json so that a resumed run
    goes on with the same seed."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "rand", "prompts": ["a circle", "something red"], "methods": ["or", "and"], "seed": -1,
         "num_images": 2, "steps": 2},
    ])
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--out", str(out), "--quiet", "--limit", "1"]) == 0
    seed = json.loads((out / "drawn_seeds.json").read_text())["rand"]
    assert isinstance(seed, int) and seed >= 0
    assert f"line 1: seed -1: drew seed {seed}" in capsys.readouterr().err
    assert main(["batch", str(jobs), "--out", str(out), "--quiet"]) == 0  # resume
    assert "drew seed" not in capsys.readouterr().err
    m = {r["key"]: r for r in manifest(out)}
    assert sorted(m) == ["rand/and/0000", "rand/and/0001", "rand/or/0000", "rand/or/0001"]
    for key, r in m.items():
        assert r["status"] == "ok" and r["seed"] == seed + r["index"]
        assert read_png_composition(out / r["image"]).seed == seed + r["index"]
    # parse_jobs alone (and a CSV cell of -1) accepts it too
    csv = tmp_path / "jobs.csv"
    csv.write_text("prompts,operator,seed\na circle|something red,or,-1\n")
    valid, errors = parse_jobs(csv)
    assert errors == [] and valid[0][3].seed >= 0


def test_resume_regenerates_images_whose_job_changed(tmp_path, capsys):
    """A rerun with an edited job file does not take a PNG of another composition for done:
    a line removed above jobs without an id (their default ids move) and a job with an id
    whose steps changed are regenerated, each file named on stderr and counted; a PNG whose
    record matches its task stays as it is ("already done")."""
    out = tmp_path / "out"
    pair = {"operator": "and", "steps": 2}
    first = write_jobs(tmp_path / "jobs1.jsonl", [
        {"prompts": ["a circle", "something red"], **pair},
        {"prompts": ["a square", "something blue"], **pair},
        {"id": "kept", "prompts": ["a square", "something blue"], **pair},
        {"id": "edited", "prompts": ["a circle", "something red"], **pair},
    ])
    assert main(["batch", str(first), "--out", str(out), "--quiet"]) == 0
    kept = out / "images" / "kept" / "and" / "0000.png"
    mtime = kept.stat().st_mtime_ns
    capsys.readouterr()
    second = write_jobs(tmp_path / "jobs2.jsonl", [  # line 1 removed, a new line 2, steps of "edited" changed
        {"prompts": ["a square", "something blue"], **pair},
        {"prompts": ["a triangle", "something green"], **pair},
        {"id": "kept", "prompts": ["a square", "something blue"], **pair},
        {"id": "edited", "prompts": ["a circle", "something red"], "operator": "and", "steps": 3},
    ])
    assert main(["batch", str(second), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    for needle in ("images/job0001/and/0000.png: it was made with other settings than line 1 now gives "
                   "(prompts differ); regenerating it", "images/job0002/and/0000.png: it was made",
                   "images/edited/and/0000.png: it was made with other settings than line 4 now gives "
                   "(steps differ)", "3 generated, 1 already done"):
        assert needle in err, (needle, err)
    assert "kept/and" not in err and kept.stat().st_mtime_ns == mtime
    s = json.loads((out / "summary.json").read_text())
    assert (s["generated"], s["regenerated"], s["skipped"]) == (3, 3, 1)
    assert read_png_composition(out / "images" / "job0001" / "and" / "0000.png").prompts == ["a square",
                                                                                          "something blue"]
    assert read_png_composition(out / "images" / "job0002" / "and" / "0000.png").prompts == ["a triangle",
                                                                                          "something green"]
    assert read_png_composition(out / "images" / "edited" / "and" / "0000.png").steps == 3
    last = {r["key"]: r for r in manifest(out)}  # the last line of a key describes its file
    assert last["job0002/and/0000"]["regenerated"] is True and "regenerated" not in last["kept/and/0000"]
    assert main(["batch", str(second), "--out", str(out), "--quiet"]) == 0  # now all done
    assert "regenerating" not in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["skipped"] == 4


def test_sweep_drops_line_parameters_a_method_does_not_use_and_refuses_its_own(tmp_path, capsys):
    """Operator parameters on a sweep's line (weights for average / OR) are dropped, with a
    note, for the methods whose operator does not use them (joint, AND), which then run; set
    in a method's own overrides, or on a line without methods, they are refused on the line
    before any model loads, naming the field and the method."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "w", "prompts": ["a circle", "something red"], "weights": [0.3, 0.7],
         "methods": ["joint", "average", "or", "and"], "steps": 1},
        {"id": "own", "prompts": ["a circle", "something red"],
         "methods": ["or", {"name": "and_w", "operator": "and", "weights": [0.3, 0.7]}], "steps": 1},
        {"id": "plain", "prompts": ["a circle", "something red"], "operator": "and", "temperature": 0.5},
    ])
    notes: list = []
    valid, errors = parse_jobs(jobs, notes=notes)
    got = {(job, method): comp for _, job, method, comp in valid}
    assert sorted(got) == [("w", "and"), ("w", "average"), ("w", "joint"), ("w", "or")]
    assert got["w", "or"].weights == got["w", "average"].weights == [0.3, 0.7]
    assert got["w", "joint"].weights is None and got["w", "and"].weights is None
    said = {(n.line, n.message) for n in notes}
    for m in ("joint", "and"):
        assert (1, f"{m}: weights (from the job line) is not used by operator {m}; dropped for this method "
                   "(it is for: average, or)") in said, said
    by_line = {e.line: e.message for e in errors}
    assert by_line[2].startswith("methods[1] (and_w): weights: operator and does not take it (it is for: "
                                 "average, or)"), by_line
    assert by_line[3].startswith("temperature: operator and does not take it (it is for: or)"), by_line
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "4 generated" in err and "0 failed" in err and "2 invalid job line(s)" in err, err
    assert sorted(r["key"] for r in manifest(out) if r["status"] == "ok") == [
        "w/and/0000", "w/average/0000", "w/joint/0000", "w/or/0000"]


def test_job_files_with_a_utf8_byte_order_mark_are_read(tmp_path):
    """A UTF-8 byte order mark (Excel's "CSV UTF-8", PowerShell's Out-File) is not part of
    the first field name or of the first JSON line."""
    csv = tmp_path / "jobs.csv"
    csv.write_bytes("\ufeffid,prompts,operator,steps\npair,a circle|something red,or,2\n".encode("utf-8"))
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_bytes(("\ufeff" + json.dumps({"id": "pair", "prompts": ["a circle", "something red"],
                                              "operator": "or", "steps": 2}) + "\n").encode("utf-8"))
    for path in (csv, jsonl):
        valid, errors = parse_jobs(path)
        assert errors == [], (path.name, errors)
        assert [(j[1], j[2]) for j in valid] == [("pair", "or")]
        assert valid[0][3].prompts == ["a circle", "something red"] and valid[0][3].steps == 2


def test_limit_counts_only_the_tasks_left_to_do(tmp_path, capsys):
    """--limit N generates at most N images that are not done yet: repeating the same
    limited command makes progress until every image exists."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "rc", "prompts": ["a circle", "something red"],
                                                 "operator": "and", "steps": 1, "num_images": 3}])
    out = tmp_path / "out"
    for k in range(3):
        assert main(["batch", str(jobs), "--out", str(out), "--quiet", "--limit", "1"]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert (s["generated"], s["skipped"]) == (1, k)
    assert sorted(p.name for p in (out / "images" / "rc" / "and").glob("*.png")) == ["0000.png", "0001.png",
                                                                                   "0002.png"]
    assert main(["batch", str(jobs), "--out", str(out), "--quiet", "--limit", "1"]) == 0
    assert "0 generated, 3 already done" in capsys.readouterr().err


def test_unsafe_method_names_and_overlong_ids_are_refused_or_fixed_on_their_line(tmp_path, capsys):
    """"single: 1" (a space after the colon) is a folder name like any other method name (it
    becomes single_1) instead of stopping the whole batch; an id longer than a folder name can
    be is refused on its line before any model runs, not failed image by image."""
    pair = {"prompts": ["a circle", "something red"], "steps": 1}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "s", **pair, "methods": ["single: 1", "or"]},
        {"id": "x" * 300, **pair, "operator": "or"},
        {"id": "x" * 255, **pair, "operator": "or"},
    ])
    valid, errors = parse_jobs(jobs)
    assert [(e.line, e.message) for e in errors] == [
        (2, f"id: {'x' * 40!r}... is 300 characters long; a folder name can have at most 255; give a shorter one")]
    assert [(j[1], j[2]) for j in valid] == [("s", "single_1"), ("s", "or"), ("x" * 255, "or")]
    out = tmp_path / "out"
    main(["batch", str(jobs), "--out", str(out), "--quiet", "--limit", "0"])  # --limit 0: nothing runs (fast)
    err = capsys.readouterr().err
    assert "error:" not in err and "3 image task(s)" in err and "1 invalid job line(s)" in err, err


def test_duplicate_id_messages_name_both_lines_and_the_fix(tmp_path):
    """A line refused because its folder name is taken says why: its default id (from its line
    number) clashes with an earlier explicit id, or its id becomes the same folder name as an
    earlier one once sanitized."""
    pair = {"prompts": ["a circle", "something red"], "steps": 1, "operator": "or"}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "job0002", **pair}, pair, {"id": "日本", **pair}, {"id": "中国", **pair}, {"id": "job0002", **pair}])
    _, errors = parse_jobs(jobs)
    by_line = {e.line: e.message for e in errors}
    assert by_line[2] == ("this line has no id, and its default id 'job0002' (from its line number) is already used "
                          "on line 1; give this line an id")
    assert by_line[4].startswith("id: '中国' becomes the folder name '_' (characters other than letters")
    assert "which line 3 (id '日本') already uses; give each job an id that stays distinct" in by_line[4]
    assert by_line[5] == "id: 'job0002' is already used on line 1; give each job its own id"


def test_parts_merged_onto_a_manifest_cut_by_a_kill_stay_whole_lines(tmp_path):
    """A single-process run killed in the middle of a manifest line, resumed under several
    processes (or with parts left by a killed multi-process run): the merge starts the parts on
    a line of their own, so no record is glued to the cut line and lost."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "c", "prompts": ["a circle"], "operator": "single",
                                                 "steps": 1}])
    out = tmp_path / "out"
    out.mkdir()
    whole = {"key": "c/single/0000", "job": "c", "method": "single", "index": 0, "status": "ok", "rank": 1}
    (out / "manifest.jsonl").write_text('{"key": "c/sin')  # cut by a kill
    (out / "manifest.rank1.jsonl").write_text(json.dumps(whole) + "\n")
    assert main(["batch", str(jobs), "--out", str(out), "--quiet", "--limit", "0"]) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert lines[0] == '{"key": "c/sin' and json.loads(lines[1]) == whole, lines


def test_a_job_file_that_is_not_utf8_names_its_line_and_the_fix(tmp_path, capsys):
    """Excel's plain "CSV" (cp1252 on Windows) is refused with the file, the line and how to
    save it, not with a bare codec error."""
    csv = tmp_path / "jobs.csv"
    csv.write_bytes("id,prompts,operator,steps\ncafé,a circle|something red,or,1\n".encode("cp1252"))
    assert main(["batch", str(csv), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"job file {csv} line 2: not UTF-8 (byte 0xe9 at column 4); save it as UTF-8 (Excel: \"CSV UTF-8\")" in err
    csv.write_bytes("\ufeffid,prompts,operator,steps\r\ncafé,a circle|something red,or,1\r\n".encode("utf-8"))
    valid, errors = parse_jobs(csv)  # with a byte order mark and CRLF line ends: read as before
    assert errors == [] and [(j[1], j[2]) for j in valid] == [("caf_", "or")]


def test_csv_rows_with_a_cell_over_several_lines_are_named_by_their_first_line(tmp_path):
    """A quoted CSV cell may span lines (Excel writes one for a cell with a line break): the
    row's errors and its default id name the line it starts on, as in a JSONL file."""
    csv = tmp_path / "jobs.csv"
    csv.write_text('prompts,operator,steps,negative_prompt\n'
                   'a circle|something red,or,1,"blurry\nugly"\n'
                   'a circle|something red,or,x,"dark\n\nnoisy"\n'
                   'a circle|something red,or,1,\n')
    valid, errors = parse_jobs(csv)
    assert [(j[0], j[1]) for j in valid] == [(2, "job0002"), (7, "job0007")]
    assert valid[0][3].negative_prompt == "blurry\nugly"
    assert [(e.line, e.message) for e in errors] == [(4, "steps: must be an integer, got 'x'")]


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompts": ["a circle"], "operator": "single", "steps": 1}])
    (tmp_path / "out").write_text("not a folder")
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"--out {tmp_path / 'out'} is a file, not a folder" in capsys.readouterr().err
    assert main(["batch", str(jobs), "--out", str(tmp_path / "new"), "--limit", "-1", "--quiet"]) == 2
    assert "--limit must be >= 0 (images to generate in this run), got -1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
