"""The studio's jobs: one cancel flag per browser session, the queue that runs one job at a
time, and the runner that writes each image as a PNG carrying its parameters, with the trace
plots, the compare-methods grid, the results zip and the per-session output folders."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from superdiff.compose import Composition, run_composition
from superdiff.images import image_grid, save_png
from superdiff.model_loading import ModelCache


# ---- cancellation ---------------------------------------------------------------------------
class CancelRegistry:
    """One cancel flag per browser session: the Cancel button sets it, the running job's
    should_stop() reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}

    def start(self, key: str) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._events[key] = ev
        return ev

    def cancel(self, key: str) -> bool:
        """Set the flag of `key`'s running job; False when none runs."""
        with self._lock:
            ev = self._events.get(key)
        if ev is None:
            return False
        ev.set()
        return True

    def finish(self, key: str, ev: threading.Event) -> None:
        with self._lock:
            if self._events.get(key) is ev:
                del self._events[key]

    def running(self, key: str) -> bool:
        with self._lock:
            return key in self._events


class JobQueue:
    """Who waits for a generation slot, per browser session, so that a queued tab can show
    its place and Cancel can withdraw it before it starts (Gradio's own queue holds the
    request; when a withdrawn one reaches a slot it returns at once without work)."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = max(1, int(slots))
        self._lock = threading.Lock()
        self._running: list[str] = []
        self._waiting: list[str] = []
        self._withdrawn: set[str] = set()

    def request(self, key: str) -> int | None:
        """Called when a tab asks for a run: its place in line (1 = next to start) when all
        slots are busy, None when it starts at once (or is already running)."""
        with self._lock:
            if key in self._running:
                return None
            self._withdrawn.discard(key)
            if key not in self._waiting:
                if len(self._running) < self.slots and not self._waiting:
                    return None
                self._waiting.append(key)
            return self._waiting.index(key) + 1

    def begin(self, key: str) -> bool:
        """The run of `key` got a slot: False when it was withdrawn meanwhile (skip it)."""
        with self._lock:
            if key in self._waiting:
                self._waiting.remove(key)
            if key in self._withdrawn:
                self._withdrawn.discard(key)
                return False
            self._running.append(key)
            return True

    def end(self, key: str) -> None:
        with self._lock:
            if key in self._running:
                self._running.remove(key)

    def withdraw(self, key: str) -> bool:
        """Take `key`'s waiting run out of line; False when it is not waiting."""
        with self._lock:
            if key not in self._waiting:
                return False
            self._waiting.remove(key)
            self._withdrawn.add(key)
            return True

    def position(self, key: str) -> int | None:
        with self._lock:
            return self._waiting.index(key) + 1 if key in self._waiting else None


# ---- running --------------------------------------------------------------------------------
@dataclass
class ResultItem:
    """One generated image: its PNG (parameters embedded), the record that reproduces it,
    and its own trace (batch axis of length 1)."""

    label: str
    method: str
    path: str
    record: Composition
    trace: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "image"


def run_jobs(jobs: Sequence[tuple[str, Composition]], cache: ModelCache, out_dir: str | os.PathLike, *,
             on_progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> Iterator[list[ResultItem]]:
    """Run each (label, composition) image by image; after every image yield all results so
    far. on_progress(fraction, text) follows every sampler step; should_stop() returning True
    raises InterruptedError after the current step (finished images stay on disk)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(c.steps * c.num_images for _, c in jobs) or 1
    done = 0
    items: list[ResultItem] = []
    for label, comp in jobs:
        for i in range(comp.num_images):
            if should_stop is not None and should_stop():
                raise InterruptedError("cancelled")
            head = f"{label}: image {i + 1}/{comp.num_images}"
            if on_progress is not None:
                on_progress(done / total, f"{head} (loading the model)" if not items else head)

            def on_step(_idx: int, step: int, n: int, _head: str = head, _done: int = done) -> None:
                if on_progress is not None:
                    on_progress(min(1.0, (_done + step) / total), f"{_head}, step {step}/{n}")

            res = run_composition(comp, cache, progress=False, on_step=on_step, should_stop=should_stop, indices=[i])
            done += comp.steps
            rec = res.records[0]
            path = save_png(res.images[0], out / f"{len(items):02d}_{_slug(label)}_seed{rec.seed}.png", rec)
            items.append(ResultItem(label=f"{label} \u00b7 seed {rec.seed}", method=label,
                                    path=str(path), record=rec, trace=res.trace,
                                    extra={"seconds": round(res.seconds, 3)}))
            yield list(items)


def _short(text: str, n: int = 28) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def render_trace_plot(item: ResultItem) -> str | None:
    """A PNG of kappa and log q per expert over the steps for one image (cached beside it),
    titled with the image's method and seed; the legend (prompt names shortened) sits below
    the panels so long prompts never cover the curves."""
    if item.trace is None:
        return None
    path = Path(item.path).with_name(Path(item.path).stem + "_trace.png")
    if path.is_file():
        return str(path)
    import matplotlib.pyplot as plt

    fig = trace_figure(item)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def trace_figure(item: ResultItem) -> Any:
    """The matplotlib figure of render_trace_plot."""
    fig = item.trace.plot(None, samples=[0], title=item.label)
    axes = fig.axes
    axes[0].set_title("kappa (weight of each expert)", fontsize=9)
    if len(axes) > 1:  # what the plot drew: relative to the experts' mean, or to step 0 (one expert, untracked ones)
        by_mean = axes[1].get_ylabel().startswith("log q - mean")
        axes[1].set_title("log q - mean over experts" if by_mean else "log q - log q at step 0", fontsize=9)
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    # the log q panel's labels: the same experts and styles, with "(not tracked)" where so
    handles, names = axes[min(1, len(axes) - 1)].get_legend_handles_labels()
    if handles:
        fig.legend(handles, [_short(n) for n in names], loc="lower center", ncol=min(3, len(handles)),
                   fontsize=8, frameon=False)
        rows = math.ceil(len(handles) / 3)
        fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    return fig


def pick_trace_item(items: Sequence[ResultItem]) -> ResultItem | None:
    """The image whose trace to show first: the first one sampled with a SuperDiff operator
    (OR / AND: kappa moves), else the first one (after "Compare methods" the joint prompt and
    averaging come first, and their traces are flat)."""
    for it in items:
        if it.record.operator in ("or", "and"):
            return it
    return items[0] if items else None


def compare_grid(items: Sequence[ResultItem], path: str | os.PathLike, base: Composition) -> str:
    """The compare-methods results as one labelled PNG, an A1111-style X/Y plot: one row per
    method, one column per seed. Its text chunks carry `base` (superdiff) and every tile's
    composition (superdiff_grid)."""
    from superdiff.images import GRID_KEY

    methods = list(dict.fromkeys(it.method for it in items))
    seeds = sorted({it.record.seed for it in items})
    by = {(it.method, it.record.seed): it for it in items}
    from PIL import Image

    first = Image.open(items[0].path)
    blank = Image.new("RGB", first.size, (255, 255, 255))
    tiles = []
    for m in methods:
        for sd in seeds:
            it = by.get((m, sd))
            tiles.append(Image.open(it.path).convert("RGB") if it else blank)
    scale = max(1, 128 // max(first.size))
    grid = image_grid(tiles, cols=len(seeds), scale=scale, row_labels=methods,
                      col_labels=[f"seed {sd}" for sd in seeds])
    records = [{"method": it.method, "seed": it.record.seed, "composition": it.record.to_dict()} for it in items]
    # the infotext names the images' generation size, not the grid canvas's
    save_png(grid, path, base, extra_text={GRID_KEY: json.dumps(records, sort_keys=True)}, size=first.size)
    return str(path)


def zip_results(items: Sequence[ResultItem], path: str | os.PathLike) -> str:
    """All PNGs, their traces (JSON) and compositions in one zip."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for it in items:
            p = Path(it.path)
            z.write(p, p.name)
            if it.trace is not None:
                z.writestr(p.stem + "_trace.json", it.trace.to_json())  # strict JSON, as Trace.save
        z.writestr("compositions.json", json.dumps(
            [{"label": it.label, "file": Path(it.path).name, "composition": it.record.to_dict()} for it in items],
            indent=2))
    return str(path)


class OutputDirs:
    """Per-run output folders under one temporary root; keeps the newest `keep`, deletes the
    rest (the studio never writes anywhere else)."""

    def __init__(self, root: str | os.PathLike | None = None, keep: int = 64) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="superdiff-studio-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, keep)
        self._lock = threading.Lock()
        self._n = 0

    def new(self) -> Path:
        with self._lock:
            self._n += 1
            d = self.root / f"run-{int(time.time() * 1000)}-{self._n:05d}"
            d.mkdir(parents=True)
            runs = sorted((p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("run-")),
                          key=lambda p: p.name)  # run-<ms>-<counter>: creation order (mtimes tie)
            for old in runs[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return d

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
