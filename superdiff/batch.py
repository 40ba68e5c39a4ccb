"""Batch generation: many compositions from a JSONL/CSV job file, resumable and sharded.

Work is split into tasks, one per (job, method, image index). Every task is independent
(image i of a composition uses seed + i in its own pipeline call, see compose.py), so

- resume: a task is done exactly when its PNG exists and the composition recorded in it (the
  PNG's `superdiff` text chunk, read without decoding the pixels) is the one the task would
  record. PNGs (and their trace JSON, written first) are renamed into place atomically and
  the manifest line is appended only after the rename: a kill at any moment loses at most
  the images in flight, never leaves a truncated PNG or a manifest line without its file,
  and a rerun neither repeats finished images nor writes them twice. A PNG found without its
  manifest line (a kill between the two) gets its line on the next run, marked "recovered".
  A PNG made with other settings (the job was edited, or a line inserted or removed above a
  job without an id moved its default id) is regenerated, each file named on stderr, its new
  manifest line marked "regenerated" (it follows the earlier line of the same key).
  `limit` counts only the tasks left to do, so repeating a limited run makes progress.
- scale-out: task k goes to process k mod world_size (RANK / WORLD_SIZE as set by
  `accelerate launch` or torchrun). Images are byte-identical to a one-process run; each
  process appends to its own manifest part, merged into manifest.jsonl by process 0 at the
  end, so no two processes ever write the same file.

Job lines: the fields of `superdiff.compose.Composition`, plus
    id       a name for the job's folder (default job0001, job0002, ... by line)
    methods  a list of methods to run the same composition with (the paper's sweep): an
             operator name ("joint", "average", "or", "and", "single"), "single:<i>", or an
             object of overrides with an optional "name", e.g. {"name": "and_lift", "lift": 1}.
             An operator parameter on the line (weights, bias, temperature, lift, kappa_clamp,
             single_index, joint_template, switch_every) is dropped, with a note, for the
             methods whose operator does not use it; one set in a method's own overrides (or
             on a line without methods) that its operator does not use is refused on its line,
             as `superdiff generate` refuses it.
An id or method name is a folder name inside OUT/images: characters other than letters,
digits, "_", "-" and "." become "_" (so "/" and "\\" never make a path), and a name that
starts with "." ("." and ".." included) or is longer than 255 characters is refused on its line.
Job files are UTF-8, with or without a byte order mark (Excel's "CSV UTF-8", PowerShell).
CSV: a header row of those field names; list fields (prompts, extra_models, methods,
weights, bias, kappa_clamp, adapters as "PATH[:SCALE]") separated by "|"; an empty cell
means the field is not given.

Every (job, method) is built as `superdiff generate` builds its composition
(superdiff.compose.prepare_composition, with the operator the line or the method names):
A1111's "a AND b:0.7" prompt syntax expanded and "<lora:name:0.8>" tags made adapter experts,
one expert and no operator sampled alone (operator single, with a note), and AND / OR /
average of one expert refused. Seed -1 draws a seed (compose.draw_seed), once per job
(per method where a method sets it), kept in OUT/drawn_seeds.json so that a resumed or
multi-process run uses the same seed, and recorded in every PNG and manifest line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .atomic import write_text
from .compose import (OPERATOR_CHOICES, Composition, draw_seed, prepare_composition, run_composition,
                      split_foreign_params)
from .images import read_png_record, save_png
from .model_loading import ModelCache

__all__ = ["Task", "JobError", "parse_jobs", "expand_tasks", "run_batch", "BatchSummary"]

_LIST_FIELDS = {"prompts", "extra_models", "methods", "weights", "bias", "kappa_clamp", "adapters"}
_NUM_LIST_FIELDS = {"weights", "bias", "kappa_clamp"}
_EXTRA_FIELDS = {"id", "methods"}
_ID_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_NAME_MAX = 255  # bytes in one folder name (Linux, macOS and Windows file systems)
SEEDS_FILE = "drawn_seeds.json"


def _safe_name(raw: Any, what: str) -> str:
    """`raw` as one folder name inside OUT/images: other characters than letters, digits,
    "_", "-" and "." become "_"; a name starting with "." (".", "..") is refused."""
    name = _ID_RE.sub("_", str(raw).strip())
    if not name or name.startswith("."):
        raise ValueError(f"{what}: {raw!r} cannot name a folder (it must not be empty or start with '.'); use "
                         "letters, digits, '_', '-' and '.'")
    if len(name) > _NAME_MAX:  # ASCII once sanitized: characters are bytes
        raise ValueError(f"{what}: {str(raw)[:40]!r}... is {len(name)} characters long; a folder name can have at most "
                         f"{_NAME_MAX}; give a shorter one")
    return name


@dataclass
class JobError:
    line: int  # 1-based line in the job file (CSV: counting the header)
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class Task:
    job: str
    method: str
    index: int
    line: int
    composition: Composition = field(compare=False)  # of the whole (job, method)

    @property
    def key(self) -> str:
        return f"{self.job}/{self.method}/{self.index:04d}"

    def image_path(self, out: Path) -> Path:
        for what, name in (("id", self.job), ("method", self.method)):  # never a path outside OUT/images
            if _safe_name(name, what) != name:
                raise ValueError(f"{what}: {name!r} cannot name a folder; use letters, digits, '_', '-' and '.'")
        return out / "images" / self.job / self.method / f"{self.index:04d}.png"


def _scalar(text: str) -> Any:
    t = text.strip()
    if t == "":
        return None
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _csv_rows(text: str) -> Iterable[tuple[int, dict[str, Any] | JobError]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
    str_fields = {"model", "operator", "sampler", "estimator", "negative_prompt", "joint_template", "id", "dtype"}
    end = reader.line_num
    for row in reader:  # a row's line is the one it starts on (a quoted cell may span lines)
        line, end = end + 1, reader.line_num
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            yield line, JobError(line, f"{len(row)} columns but the header has {len(header)}")
            continue
        d: dict[str, Any] = {}
        for name, cell in zip(header, row):
            if name in _LIST_FIELDS:
                parts = [p for p in cell.split("|") if p.strip() != ""]
                if name in _NUM_LIST_FIELDS:
                    d[name] = [_scalar(p) for p in parts] if parts else None
                    if name == "kappa_clamp" and cell.strip().lower() == "false":
                        d[name] = False
                else:  # an empty cell: the field is not given (like an empty number list)
                    d[name] = [p.strip() for p in parts] if parts else None
            elif name in str_fields:
                d[name] = cell if cell.strip() else None
            else:
                d[name] = _scalar(cell)
        yield line, {k: v for k, v in d.items() if v is not None}


def _jsonl_rows(text: str) -> Iterable[tuple[int, dict[str, Any] | JobError]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            yield line, JobError(line, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(d, dict):
            yield line, JobError(line, f"expected a JSON object, got {type(d).__name__}")
            continue
        yield line, d


def _method_overrides(m: Any, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(m, str):
        name = m.strip().lower()
        if name.startswith("single:"):
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"{where}: bad method {m!r}; use single:<expert index>") from None
            # "single: 1" becomes "single_1": a method name is a folder name
            return _safe_name(name.replace(":", ""), f"{where}: name"), {"operator": "single", "single_index": index}
        if name not in OPERATOR_CHOICES:
            raise ValueError(f"{where}: unknown method {m!r}; use one of {', '.join(OPERATOR_CHOICES)}, "
                             "single:<i>, or an object of overrides")
        return name, {"operator": name}
    if isinstance(m, dict):
        over = dict(m)
        name = over.pop("name", None) or str(over.get("operator", "method"))
        return _safe_name(name, f"{where}: name"), over
    raise ValueError(f"{where}: a method must be a name or an object, got {m!r}")


def _drop_foreign(d: dict[str, Any], over: dict[str, Any], method: str | None, notes: list[str]) -> dict[str, Any]:
    """The fields of one (job, method) (`d` the line's, `over` the method's) less the operator
    parameters its operator does not use, as `superdiff generate` treats them: set by the
    method itself (or on a line without methods) they are refused; set on the line of a sweep
    they are meant for its other methods, and dropped for this one with a note."""
    merged = {**d, **over}
    op = str(merged.get("operator", "and")).lower().strip()
    fields, dropped = split_foreign_params(merged, merged if method is None else over,
                                           "" if method is None else " for this method")
    notes += [f"{k} (from the job line) is not used by operator {op}; dropped for this method (it is for: {uses})"
              for k, uses in dropped]
    return fields


def _prepare(d: dict[str, Any], job_id: str, method: str | None, seeds: dict[str, int],
             notes: list[str], seed_notes: list[str]) -> Composition:
    """One (job, method) as `superdiff generate` builds its composition
    (compose.prepare_composition, with the operator the line or method names), seed -1 drawn
    once per job, or per method where the method sets it (`seeds` keeps the draws)."""
    d = dict(d)
    seed, drawn = draw_seed(d.get("seed"))
    if drawn:
        key = job_id if method is None else f"{job_id}/{method}"
        if key not in seeds:  # else drawn earlier (by this line's first method, an earlier run or process 0)
            seeds[key] = seed
            seed_notes.append(f"seed -1: drew seed {seed} (recorded in the PNGs and the manifest)")
        d["seed"] = seeds[key]
    comp, more = prepare_composition(d, d.get("operator") is not None)
    notes.extend(more)
    return comp


def parse_jobs(path: str | os.PathLike, cache: ModelCache | None = None, *,
               seeds: dict[str, int] | None = None, notes: list[JobError] | None = None
               ) -> tuple[list[tuple[int, str, str, Composition]], list[JobError]]:
    """(line, job id, method, composition) for every valid (job, method), and the errors of
    the lines that were skipped. Models are resolved up front (a bundled name, an existing
    directory or a hub id), so that an unknown model is reported with its line. Each
    composition is checked as `superdiff generate` checks its own (see the module
    docstring). `seeds` (job id or "job/method" -> seed) holds the seeds drawn for seed -1:
    those present are reused, new draws are added. `notes` receives what is worth saying
    about a valid line (a drawn seed, an expert left unused)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"job file {path} does not exist")
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a byte order mark (Excel's "CSV UTF-8", PowerShell)
    try:
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as read_text() reads it
    except UnicodeDecodeError as e:
        line, column = data[:e.start].count(b"\n") + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(f"job file {path} line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                         "save it as UTF-8 (Excel: \"CSV UTF-8\")") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(text)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(text)
    else:
        raise ValueError(f"job file {path}: expected a .jsonl or .csv file")
    cache = cache or ModelCache()
    seeds = {} if seeds is None else seeds
    out: list[tuple[int, str, str, Composition]] = []
    errors: list[JobError] = []
    seen_ids: dict[str, tuple[int, Any]] = {}  # folder name -> (line, the id as written; None: a default id)
    for line, row in rows:
        if isinstance(row, JobError):
            errors.append(row)
            continue
        try:
            d = dict(row)
            raw_id = d.pop("id", None)
            raw_id = None if raw_id in (None, "") else raw_id
            job_id = f"job{line:04d}" if raw_id is None else _safe_name(raw_id, "id")
            if job_id in seen_ids:
                raise ValueError(_id_taken(raw_id, job_id, *seen_ids[job_id]))
            methods = d.pop("methods", None)
            unknown = sorted(set(d) - set(Composition.field_names()))
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}; known fields: "
                                 f"{', '.join(Composition.field_names() + sorted(_EXTRA_FIELDS))}")
            sweep: list[tuple[str | None, dict[str, Any]]] = []
            if methods is None:
                sweep.append((None, {}))
            else:
                if isinstance(methods, str):
                    methods = [methods]
                if not isinstance(methods, list) or not methods:
                    raise ValueError("methods: give a non-empty list of methods")
                for k, m in enumerate(methods):  # every name checked before any composition is built
                    name, over = _method_overrides(m, f"methods[{k}]")
                    if name in [n for n, _ in sweep]:
                        raise ValueError(f"methods[{k}]: method name {name!r} appears twice; give it a distinct 'name'")
                    bad = sorted(set(over) - set(Composition.field_names()))
                    if bad:
                        raise ValueError(f"methods[{k}]: unknown field(s) {', '.join(bad)}")
                    sweep.append((name, over))
            variants: list[tuple[str, Composition, list[str]]] = []
            for k, (name, over) in enumerate(sweep):
                said: list[str] = []
                seed_said: list[str] = []  # of the whole job where its seed is the line's own
                try:
                    fields = _drop_foreign(d, over, name, said)
                    comp = _prepare(fields, job_id, name if "seed" in over else None, seeds, said, seed_said)
                    cache.resolve(comp.model)
                    for m in comp.extra_models:
                        cache.resolve(m, "extra_models")
                except ValueError as e:
                    raise ValueError(str(e) if name is None else f"methods[{k}] ({name}): {e}") from None
                if name is not None and "seed" in over:
                    said, seed_said = seed_said + said, []
                variants.append((comp.operator if name is None else name, comp,
                                 seed_said + (said if name is None else [f"{name}: {n}" for n in said])))
            seen_ids[job_id] = (line, raw_id)
            for name, comp, said in variants:
                out.append((line, job_id, name, comp))
                if notes is not None:
                    notes.extend(JobError(line, n) for n in said)
        except ValueError as e:
            errors.append(JobError(line, str(e)))
    return out, errors


def _id_taken(raw: Any, job_id: str, line: int, earlier: Any) -> str:
    """Why a line's folder name `job_id` (from its id `raw`, None: none given) is refused:
    the job on `line` (with id `earlier`) already has it."""
    other = f"line {line}" + ("" if earlier is None or str(earlier) == job_id else f" (id {earlier!r})")
    if raw is None:
        return (f"this line has no id, and its default id {job_id!r} (from its line number) is already used on "
                f"{other}; give this line an id")
    if str(raw) != job_id:
        return (f"id: {raw!r} becomes the folder name {job_id!r} (characters other than letters, digits, '_', '-' "
                f"and '.' become '_'), which {other} already uses; give each job an id that stays distinct")
    return f"id: {job_id!r} is already used on {other}; give each job its own id"


def expand_tasks(jobs: Sequence[tuple[int, str, str, Composition]]) -> list[Task]:
    """All tasks in a fixed order (file order, then method, then image index)."""
    return [Task(job, method, i, line, comp) for line, job, method, comp in jobs for i in range(comp.num_images)]


@dataclass
class BatchSummary:
    tasks: int = 0
    generated: int = 0
    skipped: int = 0  # already done by an earlier run
    recovered: int = 0  # done earlier, manifest line added now
    regenerated: int = 0  # of `generated`: replaced an image an earlier run made with other settings
    failed: int = 0
    invalid_lines: int = 0
    failed_jobs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1
    rank: int = 0  # of the process returning this summary (only rank 0 reports)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Manifest:
    """Append-only JSONL; each line flushed and fsynced before the next task starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        cut = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._f = open(path, "a", encoding="utf-8")
        if cut:  # a line cut short by a kill: end it, so the next record starts on its own line
            self._f.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _manifest_keys(out: Path) -> set[str]:
    keys = set()
    for p in [out / "manifest.jsonl", *sorted(out.glob("manifest.rank*.jsonl"))]:
        if not p.is_file():
            continue
        for raw in p.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: its task is judged by its PNG
            if r.get("status") == "ok" and "key" in r:
                keys.add(r["key"])
    return keys


def _recorded(path: Path) -> dict[str, Any] | None:
    """The composition record of an existing PNG (images.read_png_record: the pixels are not
    decoded), or None when it carries none or cannot be read (not the task's image)."""
    try:
        return read_png_record(path)
    except ValueError:
        return None


def _changed_fields(task: Task, recorded: dict[str, Any] | None) -> list[str] | None:
    """The composition fields in which an existing PNG's record differs from what `task`
    would write (["(no superdiff record)"] when it carries none); None when it is the task's
    image. What run_composition adds to the record is not a difference: model_kind, the
    default guidance scale where the job gives none, and each adapter's resolved name and
    sha256 where the job names none; nor is a field the record lacks (an older version wrote
    it) where the task has its default."""
    if recorded is None:
        return ["(no superdiff record)"]
    from .trace import json_safe

    def as_json(c: Composition) -> dict[str, Any]:
        return json.loads(json.dumps(json_safe(c.to_dict())))

    want = as_json(task.composition.image_record(task.index))
    default = as_json(Composition())
    have = {k: recorded.get(k, default[k]) for k in want}
    have.pop("model_kind", None)
    want.pop("model_kind", None)
    if want.get("guidance_scale") is None and "guidance_scale" in have:
        have["guidance_scale"] = None
    if isinstance(have.get("adapters"), list) and isinstance(want.get("adapters"), list) \
            and len(have["adapters"]) == len(want["adapters"]):
        have["adapters"] = [{k: v for k, v in h.items() if k in w or k not in ("name", "sha256")}
                            if isinstance(h, dict) and isinstance(w, dict) else h
                            for h, w in zip(have["adapters"], want["adapters"])]
    diff = sorted(k for k in want if want[k] != have[k])
    return diff or None


def _load_seeds(path: Path) -> dict[str, int]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(d, dict):
        return {}
    return {str(k): v for k, v in d.items() if isinstance(v, int) and not isinstance(v, bool)}


def _save_seeds(path: Path, seeds: dict[str, int]) -> None:
    """Written to a temporary file and renamed: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(seeds, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dist_state() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by `accelerate launch` / torchrun (RANK,
    WORLD_SIZE, LOCAL_RANK). With more than one process a gloo process group is joined for the
    final barrier and the summary gather (tiny messages; the images never cross processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def run_batch(jobs_path: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True,
              cache: ModelCache | None = None, limit: int | None = None,
              log=print) -> BatchSummary:
    """Run (or resume) every task of the job file into `out`; see the module docstring.
    `limit`: generate at most this many images (per process); finished ones do not count."""
    from tqdm.auto import tqdm

    out = Path(out)
    rank, world, local_rank = _dist_state()
    if cache is None:
        import torch

        cache = ModelCache(device=f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    if world > 1:
        import torch.distributed as dist
    notes: list[JobError] = []
    if world > 1 and rank != 0:
        dist.barrier()  # process 0 draws the seeds for seed -1 first; every process then uses them
    try:
        seeds = _load_seeds(out / SEEDS_FILE)  # drawn by an earlier run: a resume keeps them
        before = dict(seeds)
        jobs, errors = parse_jobs(jobs_path, cache, seeds=seeds, notes=notes)
        if rank == 0 and seeds != before:
            _save_seeds(out / SEEDS_FILE, seeds)
    finally:
        if world > 1 and rank == 0:
            dist.barrier()
    summary = BatchSummary(invalid_lines=len(errors), world_size=world, rank=rank)
    if rank == 0:
        for e in errors:
            log(f"superdiff batch: skipping {jobs_path} {e}", file=sys.stderr)
        for n in notes:
            log(f"superdiff batch: note: {jobs_path} {n}", file=sys.stderr)
    tasks = expand_tasks(jobs)
    summary.tasks = len(tasks)
    mine = [t for k, t in enumerate(tasks) if k % world == rank]
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # parts left by a killed multi-process run: fold them in before anyone writes
        _merge_parts(out)
    if world > 1:
        dist.barrier()
    listed = _manifest_keys(out)
    manifest = _Manifest(out / ("manifest.jsonl" if world == 1 else f"manifest.rank{rank}.jsonl"))
    failed_combo: dict[tuple[str, str], str] = {}
    bar = None
    try:
        # finished images first: a PNG whose record is this task's composition is done; one made
        # with other settings (an edited job, a line moved so that its default id changed) is
        # not, and is regenerated, with a message. --limit counts only the tasks left to do.
        todo: list[tuple[Task, list[str] | None]] = []
        for task in mine:
            path = task.image_path(out)
            changed = _changed_fields(task, _recorded(path)) if path.is_file() else None
            if path.is_file() and changed is None:
                if task.key in listed:
                    summary.skipped += 1
                else:
                    manifest.write({**_base(task, path, out, rank), "status": "ok", "recovered": True})
                    summary.recovered += 1
            else:
                todo.append((task, changed))
        if limit is not None:
            todo = todo[:max(0, limit)]
        bar = tqdm(todo, desc=f"images (process {rank + 1}/{world})" if world > 1 else "images",
                   disable=not progress, unit="img")
        for task, changed in bar:
            path = task.image_path(out)
            base = _base(task, path, out, rank)
            for stale in path.parent.glob(f".{path.stem}.*.tmp"):  # left by a killed run
                stale.unlink(missing_ok=True)
            combo = (task.job, task.method)
            if combo in failed_combo:
                manifest.write({**base, "status": "error", "error": failed_combo[combo]})
                summary.failed += 1
                continue
            if changed is not None:  # never replaced without saying so
                why = ("it carries no readable superdiff record of its settings" if changed == ["(no superdiff record)"] else
                       f"it was made with other settings than line {task.line} now gives ({_shown(changed)} differ)")
                log(f"superdiff batch: {base['image']}: {why}; regenerating it", file=sys.stderr)
            bar.set_postfix_str(f"{task.job}/{task.method}")
            started = time.time()
            t1 = time.perf_counter()
            try:
                res = run_composition(task.composition, cache, progress=progress, indices=[task.index])
                record = res.records[0]
                res.trace.save(path.with_suffix(".trace.json"))
                save_png(res.images[0], path, record)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001  (record and go on)
                msg = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
                failed_combo[combo] = msg
                manifest.write({**base, "status": "error", "error": msg})
                summary.failed += 1
                log(f"superdiff batch: {task.key} (line {task.line}) failed: {msg}"
                    + (f" ({base['image']} still holds the image of the earlier settings)" if changed else ""),
                    file=sys.stderr)
                if not isinstance(e, ValueError):
                    log(traceback.format_exc(limit=3), file=sys.stderr)
                continue
            manifest.write({**base, "status": "ok", "started": round(started, 3),
                            "seconds": round(time.perf_counter() - t1, 4),
                            **({"regenerated": True} if changed is not None else {})})
            summary.generated += 1
            summary.regenerated += changed is not None
    finally:
        if bar is not None:
            bar.close()
        manifest.close()
    summary.failed_jobs = sorted({f"{j}/{m}" for j, m in failed_combo})
    summary.seconds = round(time.perf_counter() - t0, 3)
    if world > 1:
        summary = _gather(summary, out, rank, world)
    if rank == 0:
        d = summary.to_dict()
        d.pop("rank")
        # a kill while writing keeps the previous summary whole
        write_text(out / "summary.json", json.dumps({**d, "invalid": [str(e) for e in errors]}, indent=2))
    return summary


def _shown(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _base(task: Task, path: Path, out: Path, rank: int) -> dict[str, Any]:
    """The fields of a task's manifest line."""
    return {"key": task.key, "job": task.job, "line": task.line, "method": task.method, "index": task.index,
            "image": str(path.relative_to(out)), "seed": task.composition.seed + task.index, "rank": rank}


def _gather(summary: BatchSummary, out: Path, rank: int, world: int) -> BatchSummary:
    """Wait for every process, merge the manifest parts (process 0 only) and sum the counts."""
    import torch.distributed as dist

    counts = [None] * world
    dist.all_gather_object(counts, summary.to_dict())  # also a barrier: every part is complete
    total = BatchSummary(world_size=world, rank=rank)
    for c in counts:
        for k in ("generated", "skipped", "recovered", "regenerated", "failed"):  # per-process counts
            setattr(total, k, getattr(total, k) + c[k])
        total.failed_jobs = sorted(set(total.failed_jobs) | set(c["failed_jobs"]))
        total.seconds = max(total.seconds, c["seconds"])
    total.tasks, total.invalid_lines = summary.tasks, summary.invalid_lines
    if rank == 0:
        _merge_parts(out)
    dist.barrier()
    return total


def _last_byte(path: Path) -> bytes:
    """The last byte of a non-empty file (not the whole file read for it)."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _merge_parts(out: Path) -> None:
    """Append every per-process manifest part to manifest.jsonl, then remove the parts (a
    line cut short by a kill is completed with a newline; resume judges tasks by their PNG)."""
    parts = sorted(out.glob("manifest.rank*.jsonl"))
    if not parts:
        return
    target = out / "manifest.jsonl"
    cut = target.is_file() and target.stat().st_size > 0 and _last_byte(target) != b"\n"
    with open(target, "a", encoding="utf-8") as f:
        if cut:  # its last line was cut by a kill: end it, so that the first merged record stays whole
            f.write("\n")
        for part in parts:
            text = part.read_text(encoding="utf-8")
            f.write(text if not text or text.endswith("\n") else text + "\n")
        f.flush()
        os.fsync(f.fileno())
    for part in parts:
        part.unlink(missing_ok=True)
