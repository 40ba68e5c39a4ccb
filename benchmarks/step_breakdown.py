"""Where a SuperDiff step's time outside the network goes, part by part.

    python benchmarks/step_breakdown.py [--cases KEY,KEY] [--steps 12] [--reps 3] [--out DIR]
    superdiff bench breakdown ...                    # the same, from the command line

benchmarks/speed.py says how long the step takes around the network against diffusers; this
says which part of the step that time is spent in. It runs the same pipelines on the same
components (`speed.Bench`, case keys as in speed.py, e.g. sd64/euler+ode/and/N3) and times,
with a wall clock around each call, the functions the step is made of:

    experts' batch in/out   step._evaluate: the rows' inputs and outputs around the forward
    network                 the UNet's forward (the stub's microseconds when stubbed)
    divergence              the ODE estimator's J z products around its extra forward
    probes                  drawing the Hutchinson probes
    linear model            the estimator's (W, b) of Delta log q = <x', W> + b
    AND proposals and A     each expert's would-be step x'_j and A_ij = <x'_j, W_i>
    AND solve               solve_and: kappa from (A, b); clamp projection separately
    combine, monitor, delta the combined prediction, the NaN/inf monitor, Delta log q
    the rest of the step    guidance, the update, the noise: superdiff_step's own lines
    the loop                sample's and the pipeline's own per-step work (the clock's
                            interval minus everything above)

Time is exclusive: a part's time excludes the parts it calls. Steps 2..n of each call count
(the first one makes per-call constants). Each case runs with the network stubbed out
(speed.NetworkTimer.stub, the cleaner figure) and with the network (whose caches the step
then finds cold); diffusers' own time outside the network is measured the same way for
reference. The wrappers cost about a microsecond per call, which is in the figures. Writes
breakdown_<label>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

from superdiff.atomic import write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

ROOT = speed.ROOT
#: (label, what it is) in the order of the table; "loop" is what the clock sees beyond the parts
PARTS = [
    ("experts' batch in/out", "step._evaluate without the network and the estimator"),
    ("network", "the UNet's forward calls"),
    ("divergence", "ODE estimator: J z products around its extra forward"),
    ("probes", "ODE estimator: Rademacher probe draw"),
    ("linear model", "estimator.linear: (W, b)"),
    ("AND proposals and A", "x'_j and A_ij = <x'_j, W_i> (the step's linear_model)"),
    ("operator", "operator.kappa's own lines (feedback, offsets; OR softmax)"),
    ("AND solve", "operators.solve_and without the clamp"),
    ("clamp projection", "operators._project_sorted (three or more experts)"),
    ("combine", "step.combine: sum_i kappa_i p_i (+ rest)"),
    ("monitor", "FiniteMonitor.experts / .delta"),
    ("delta", "estimator.delta: Delta log q of the step taken"),
    ("rest of the step", "superdiff_step's own lines: guidance, update, noise"),
    ("loop", "sample's and the pipeline's own per-step work"),
]
LABELS = [p[0] for p in PARTS]


class Parts:
    """Exclusive wall time per label, accumulated only while `active` (steps 2..n)."""

    def __init__(self) -> None:
        self.active = False
        self.time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []  # [start, children's time] of the open calls

    def wrap(self, fn: Callable, label: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame[0]
                if self._stack:
                    self._stack[-1][1] += elapsed
                if self.active:
                    self.time[label] += elapsed - frame[1]
                    self.calls[label] += 1

        return timed


def _patch(owner: Any, name: str, parts: Parts, label: str, undo: list) -> None:
    fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    undo.append((owner, name, fn))
    setattr(owner, name, parts.wrap(fn, label))


def instrument(bench: "speed.Bench", parts: Parts) -> Callable[[], None]:
    """Wrap the step's parts (module functions and methods, looked up where they are called) and
    the network; returns the function that undoes it."""
    from superdiff import estimators, operators, sampling, step

    undo: list = []
    _patch(sampling, "superdiff_step", parts, "rest of the step", undo)
    _patch(step, "_evaluate", parts, "experts' batch in/out", undo)
    _patch(step, "combine", parts, "combine", undo)
    for m in ("experts", "delta"):
        _patch(step.FiniteMonitor, m, parts, "monitor", undo)
    _patch(estimators.ODEEstimator, "divergence_fd", parts, "divergence", undo)
    _patch(estimators.ODEEstimator, "divergence_at", parts, "divergence", undo)
    _patch(estimators, "rademacher", parts, "probes", undo)
    for cls in estimators.ESTIMATORS.values():
        for m in ("linear", "delta"):
            if m in cls.__dict__:
                _patch(cls, m, parts, "linear model" if m == "linear" else "delta", undo)
    _patch(operators, "solve_and", parts, "AND solve", undo)
    _patch(operators, "_project_sorted", parts, "clamp projection", undo)
    for cls in operators.OPERATORS.values():
        if "kappa" in cls.__dict__:
            inner = cls.__dict__["kappa"]

            def kappa(self: Any, state: Any, _inner: Callable = inner) -> Any:
                if state.linear_model is not None:  # the step's closure: proposals and A
                    state = operators.StepState(state.logq, state.step, state.num_steps,
                                                parts.wrap(state.linear_model, "AND proposals and A"))
                return _inner(self, state)

            undo.append((cls, "kappa", inner))
            cls.kappa = parts.wrap(kappa, "operator")
    _patch(bench.ours.unet, "forward", parts, "network", undo)  # the instance's own (speed.NetworkTimer's)

    def restore() -> None:
        for owner, name, fn in reversed(undo):
            setattr(owner, name, fn)

    return restore


class PartsClock(speed.StepClock):
    """The step clock, switching `parts` on after the first step and off after the last."""

    def __init__(self, parts: Parts, steps: int) -> None:
        super().__init__()
        self.parts, self.steps = parts, steps

    def __call__(self, iterable: Any = None, total: int | None = None) -> "PartsClock":
        self.parts.active = False  # a new call: off until its first step is done
        super().__call__(iterable, total)
        return self

    def update(self, n: int = 1) -> None:
        super().update(n)
        self.parts.active = 1 <= len(self.stamps) < self.steps


def breakdown_case(bench: "speed.Bench", case: "speed.Case", steps: int, reps: int) -> dict[str, Any]:
    """Per-step exclusive microseconds of each part (median over calls), stubbed and not."""
    out: dict[str, Any] = {"key": case.key}
    for mode, stub in (("stub", True), ("network", False)):
        bench.timer.stub = stub
        parts = Parts()
        restore = instrument(bench, parts)
        clock = PartsClock(parts, steps)
        bench.ours.progress_bar = clock
        per: dict[str, list[float]] = defaultdict(list)
        calls: dict[str, float] = {}
        try:
            with torch.no_grad():
                bench.run("ours", case, 2)()  # warm-up
                for _ in range(reps):
                    parts.time.clear()
                    parts.calls.clear()
                    bench.run("ours", case, steps)()
                    total = clock.stamps[-1] - clock.stamps[0]
                    n = len(clock.stamps) - 1
                    for label in LABELS[:-1]:
                        per[label].append(1e6 * parts.time.get(label, 0.0) / n)
                    per["loop"].append(1e6 * (total - sum(parts.time.values())) / n)
                    per["step"].append(1e6 * total / n)
                    calls = {k: v / n for k, v in parts.calls.items()}  # calls per step (the same every call)
        finally:
            restore()
            bench.ours.progress_bar = bench.clock
            bench.timer.stub = False
        us = {k: statistics.median(v) for k, v in per.items()}
        us["outside"] = us["step"] - us["network"]
        # diffusers' own time outside the network, the same clock (wall time)
        ref = []
        bench.timer.stub = stub
        try:
            for _ in range(reps):
                ref += [1e6 * (r[0] - r[1]) for r in bench.time_steps("diffusers", case, steps)]
        finally:
            bench.timer.stub = False
        us["diffusers_outside"] = statistics.median(ref)
        out[mode] = us
        out[f"{mode}_calls_per_step"] = calls
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Where a SuperDiff step's time outside the network goes: {doc['device']}", "",
             f"`{doc['command']}` ({doc['steps_per_call']} steps per call, median of {doc['reps']} calls; "
             "exclusive wall-clock microseconds per step; steps 2..n).", ""]
    for r in doc["results"]:
        s, w = r["stub"], r["network"]
        lines += [f"## {r['key']}", "",
                  "| part | stubbed network, us | share | with the network, us | share |", "|---|---|---|---|---|"]
        for label, what in PARTS:
            if label == "network":
                continue
            a, b = s.get(label, 0.0), w.get(label, 0.0)
            if a < 0.5 and b < 0.5:
                continue  # a part this path does not have
            lines.append(f"| {label} ({what}) | {a:.0f} | {a / s['outside']:.0%} | {b:.0f} | {b / w['outside']:.0%} |")
        lines += [f"| **ours outside the network** | **{s['outside']:.0f}** | | **{w['outside']:.0f}** | |",
                  f"| diffusers outside the network | {s['diffusers_outside']:.0f} | | {w['diffusers_outside']:.0f} | |",
                  f"| ratio | {s['outside'] / s['diffusers_outside']:.1f} | | "
                  f"{w['outside'] / w['diffusers_outside']:.1f} | |", ""]
    return "\n".join(lines) + "\n"


#: the cases of the committed breakdown (benchmarks/results/speed/breakdown_cpu.*)
DEFAULT_CASES: tuple[str, ...] = ("sd64/euler+ode/and/N2", "sd64/euler+ode/and/N3", "sd64/euler+ode/and/N6",
                                  "sd64/heun+ode/and/N3", "sd64/sde+ito/and/N3", "sd64/euler+none/average/N3")


def breakdown_label(label: str | None, device_type: str, keys: list[str]) -> str:
    """The name of a run's files (breakdown_<label>.*): `<device>` belongs to the default cases
    (the committed figures), other cases are `<device>-cases` unless --label names them; a
    --label taking the default name for other cases is refused (it would overwrite them)."""
    own = device_type if tuple(keys) == DEFAULT_CASES else f"{device_type}-cases"
    if label is None:
        return own
    if label == device_type and own != device_type:
        raise ValueError(f"--label {label}: that name belongs to the default cases (breakdown_{label}.*), which "
                         f"this run's --cases would overwrite with other figures; give another --label or leave it "
                         f"out (default here: {own})")
    return label


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help="comma-separated case keys of benchmarks/speed.py (default: the committed breakdown's six: "
                         "euler + ode AND at N = 2, 3, 6, heun + ode and sde + ito AND at N = 3, no estimator at N = 3)")
    ap.add_argument("--steps", type=int, default=12, help="steps per call (default 12; the first is not counted)")
    ap.add_argument("--reps", type=int, default=3, help="calls per case and mode (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as speed.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed"))
    ap.add_argument("--label", default=None, help="name of the results (default: the device type for the default "
                                                    "cases, which are the committed figures, else DEVICE-cases)")
    args = ap.parse_args(argv)
    if args.steps < 3:
        raise ValueError(f"--steps must be >= 3 (the first step is not counted), got {args.steps}")
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    speed.quiet_libraries()
    torch.set_num_threads(args.threads)
    known = {c.key: c for c in speed.all_cases()}
    keys = list(dict.fromkeys(k for k in args.cases.split(",") if k))  # a key given twice runs once
    bad = [k for k in keys if k not in known]
    if bad or not keys:
        raise ValueError(f"unknown case key(s) {bad or args.cases!r}; keys look like {next(iter(known))!r} "
                         "(see benchmarks/speed.py --help)")
    device = torch.device(args.device)
    from tqdm.auto import tqdm

    results = []
    benches: dict[str, speed.Bench] = {}
    for key in tqdm(keys, desc="breakdown cases"):
        case = known[key]
        if case.model not in benches:
            benches.clear()
            benches[case.model] = speed.Bench(case.model, device)
        results.append(breakdown_case(benches[case.model], case, args.steps, args.reps))
    doc = {"device": speed.device_label(device), "torch": torch.__version__, "steps_per_call": args.steps,
           "reps": args.reps, "command": "python benchmarks/step_breakdown.py " +
           " ".join(argv if argv is not None else sys.argv[1:]), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = breakdown_label(args.label, device.type, keys)
    text = markdown(doc)
    for path, body in ((out / f"breakdown_{label}.json", json.dumps(doc, indent=1)), (out / f"breakdown_{label}.md", text)):
        write_text(path, body)  # a failed write keeps the previous file
    print(text)
    return 0


if __name__ == "__main__":
    from superdiff.cli import reporting_errors

    sys.exit(reporting_errors(main, "step_breakdown.py"))
