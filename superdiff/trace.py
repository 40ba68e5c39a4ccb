"""The composition trace: per step and sample, time, sigma, kappa and log q per expert
(and, under a particle corrector, the ESS and the resampling events; superdiff.correctors).

Small (float64 arrays of [steps, batch, experts]), serialisable to JSON, and plotted by
`plot_trace` for the UI, the CLI and the benchmarks.

JSON (`Trace.to_dict` / `to_json` / `save`, read back by `from_dict` / `load`) is strict: no
NaN or Infinity literals. In the arrays (t, sigma, kappa, logq, ess) a NaN is `null` (log q of
the experts a run did not track, operator "single"; or a kappa / ESS that went NaN) and an
infinity the string "inf" or "-inf"; loading gives back the same NaN and infinities. In meta,
non-finite floats are the strings "nan", "inf", "-inf" (`json_safe`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .atomic import replacing, write_text

__all__ = ["Trace", "plot_trace"]


def encode_array(a: Any) -> list:
    """a as nested lists of strict JSON: NaN as None (null), +-inf as the strings "inf" / "-inf";
    np.asarray(..., dtype=np.float64) reads all three back."""
    a = np.asarray(a, dtype=np.float64)
    out = a.astype(object)
    out[np.isnan(a)] = None
    out[np.isposinf(a)] = "inf"
    out[np.isneginf(a)] = "-inf"
    return out.tolist()


def json_safe(v: Any) -> Any:
    """v with every non-finite float written as the string "inf", "-inf" or "nan", so that it
    is strict JSON (an OR temperature of inf; Composition and float() read the strings back)."""
    if isinstance(v, float) and not np.isfinite(v):
        return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


@dataclass
class Trace:
    t: np.ndarray  # [n + 1] schedule times of the grid
    sigma: np.ndarray  # [n + 1]
    kappa: np.ndarray  # [n, B, M] weights used for step k
    logq: np.ndarray  # [n + 1, B, M] tracked log q_i(x_k) (index 0: the prior)
    expert_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: particle corrector (superdiff.correctors), else None: ESS / K of each image's particles
    #: after step k's reweighting [n, B], and whether they were resampled at step k [n, B]
    ess: np.ndarray | None = None
    resampled: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self.kappa)

    @property
    def batch_size(self) -> int:
        return self.logq.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logq.shape[2]

    def select(self, index: int | Sequence[int] | slice) -> "Trace":
        """The trace of a subset of the samples."""
        idx = [int(index)] if isinstance(index, (int, np.integer)) else index
        return Trace(self.t, self.sigma, self.kappa[:, idx], self.logq[:, idx], list(self.expert_names), dict(self.meta),
                     None if self.ess is None else self.ess[:, idx],
                     None if self.resampled is None else self.resampled[:, idx])

    @classmethod
    def concat(cls, traces: Sequence["Trace"]) -> "Trace":
        """Join traces of separate runs on the same grid along the sample axis."""
        if not traces:
            raise ValueError("no traces to join")
        first = traces[0]
        for tr in traces[1:]:
            if tr.t.shape != first.t.shape or not np.allclose(tr.t, first.t) or tr.num_experts != first.num_experts:
                raise ValueError("traces on different time grids or with different experts cannot be joined")
        particles = [tr.ess is not None for tr in traces]
        if any(particles) and not all(particles):
            raise ValueError("traces with and without a particle corrector cannot be joined")
        return cls(first.t, first.sigma, np.concatenate([tr.kappa for tr in traces], axis=1),
                   np.concatenate([tr.logq for tr in traces], axis=1), list(first.expert_names), dict(first.meta),
                   np.concatenate([tr.ess for tr in traces], axis=1) if all(particles) else None,
                   np.concatenate([tr.resampled for tr in traces], axis=1) if all(particles) else None)

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready: NaN as null, +-inf as "inf" / "-inf" (see the module doc)."""
        d = {
            "t": encode_array(self.t),
            "sigma": encode_array(self.sigma),
            "kappa": encode_array(self.kappa),
            # null where log q was not tracked (operator "single": the experts not evaluated)
            "logq": encode_array(self.logq),
            "expert_names": list(self.expert_names),
            "meta": json_safe(self.meta),
        }
        if self.ess is not None:
            d["ess"] = encode_array(self.ess)
            d["resampled"] = np.asarray(self.resampled, dtype=bool).tolist()
        return d

    def to_json(self, **kwargs: Any) -> str:
        """The trace as strict JSON text (what `save` writes and `load` reads)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trace":
        try:
            return cls(np.asarray(d["t"], dtype=np.float64), np.asarray(d["sigma"], dtype=np.float64),
                       # null -> nan, "inf" / "-inf" -> +-inf
                       np.asarray(d["kappa"], dtype=np.float64), np.asarray(d["logq"], dtype=np.float64),
                       list(d.get("expert_names", [])), dict(d.get("meta", {})),
                       None if d.get("ess") is None else np.asarray(d["ess"], dtype=np.float64),
                       None if d.get("resampled") is None else np.asarray(d["resampled"], dtype=bool))
        except KeyError as e:
            raise ValueError(f"not a superdiff trace: missing field {e}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, path: str | Path | None = None, samples: int | Sequence[int] = 4, title: str | None = None):
        return plot_trace(self, path, samples, title)


def _plain(text: str) -> str:
    """text drawn as written: matplotlib reads $...$ as mathtext, which would drop the dollar
    signs of a prompt ("a $5 and $10 bill") or fail on one that does not parse ("$\\foo$")."""
    return str(text).replace("$", r"\$")


def _names(trace: Trace) -> list[str]:
    M = trace.num_experts
    names = list(trace.expert_names)[:M]
    return [_plain(x) for x in names + [f"expert {i}" for i in range(len(names), M)]]


def _sample_indices(trace: Trace, samples: int | Sequence[int]) -> list[int]:
    B = trace.batch_size
    if isinstance(samples, (int, np.integer)):
        idx = list(range(min(int(samples), B)))
    else:
        idx = [int(b) for b in samples]
        bad = [b for b in idx if not -B <= b < B]
        if bad:
            raise ValueError(f"samples {bad} are not in this trace: it has {B} sample(s), numbered 0 to {B - 1}")
        idx = [b % B for b in idx]  # -1: the last one, titled with its own number
    if not idx:
        raise ValueError(f"no samples selected to plot: give a count >= 1 or indices from 0 to {B - 1}")
    return idx


def plot_trace(trace: Trace, path: str | Path | None = None, samples: int | Sequence[int] = 4,
               title: str | None = None):
    """Two panels per shown sample: kappa_i and log q_i (relative to the mean over experts;
    relative to its value at step 0 for a single expert or when some experts' log q was not
    tracked) against the step (a third with the ESS and the resampling events under a particle
    corrector). samples: the first n samples, or a list of their indices. Expert names and the
    title are drawn as plain text (a "$" stays a dollar sign). Writes the figure when path is
    given (PNG unless its suffix names another format; the previous file stays in place if
    drawing fails); returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    idx = _sample_indices(trace, samples)
    names = _names(trace)
    n = len(idx)
    rows = 3 if trace.ess is not None else 2
    fig, axes = plt.subplots(rows, n, figsize=(3.2 * n + 0.8, 2.6 * rows), squeeze=False, sharex=True)
    steps_k = np.arange(trace.num_steps)
    steps_q = np.arange(trace.num_steps + 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # more experts than colours: the next round of colours gets another line style, so that no
    # two experts share a legend entry
    styles = ["-", "--", ":", "-."]
    # experts whose log q was not tracked (operator "single" evaluates one expert) are NaN:
    # then each tracked curve is drawn relative to its own start instead of the experts' mean
    all_tracked = not np.isnan(trace.logq).any()
    by_mean = all_tracked and trace.num_experts > 1
    for c, b in enumerate(idx):
        ak, aq = axes[0, c], axes[1, c]
        lq = trace.logq[:, b, :]
        # one expert: its log q minus the mean over experts is 0 at every step, so it is drawn
        # relative to its start as well
        rel = lq - lq.mean(-1, keepdims=True) if by_mean else lq - lq[:1]
        for i, name in enumerate(names):
            col, ls = colors[i % len(colors)], styles[(i // len(colors)) % len(styles)]
            ak.plot(steps_k, trace.kappa[:, b, i], color=col, ls=ls, label=name, lw=1.4)
            untracked = bool(np.isnan(lq[:, i]).all())
            aq.plot(steps_q, rel[:, i], color=col, ls=ls, label=name + (" (not tracked)" if untracked else ""), lw=1.4)
        ak.set_title(f"sample {b}", fontsize=10)
        ak.axhline(0, color="0.8", lw=0.6, zorder=0)
        aq.axhline(0, color="0.8", lw=0.6, zorder=0)
        aq.set_xlabel("step")
        if c == 0:
            ak.set_ylabel("kappa")
            aq.set_ylabel("log q - mean (nats)" if by_mean else "log q - log q at step 0 (nats)")
        if trace.ess is not None:
            ae = axes[2, c]
            ae.plot(steps_k, trace.ess[:, b], color="0.25", lw=1.4, label="ESS / K")
            ev = np.nonzero(np.asarray(trace.resampled[:, b], dtype=bool))[0]
            if len(ev):
                ae.plot(ev, trace.ess[ev, b], "v", color="crimson", ms=4, label="resampled")
            ae.set_ylim(0, 1.05)
            ae.set_title("ESS / K (triangles: resampled)", fontsize=9)
            ae.set_xlabel("step")
            if c == 0:
                ae.set_ylabel("ESS / K")
                ae.legend(fontsize=8, loc="lower left")
    axes[0, 0].legend(fontsize=8, loc="best")
    if not all_tracked:  # the kappa legend does not say which experts' log q is missing
        axes[1, 0].legend(fontsize=8, loc="best")
    op = trace.meta.get("operator")
    fig.suptitle(_plain(title) if title else (f"SuperDiff trace ({op})" if op else "SuperDiff trace"), fontsize=11)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # written beside it and renamed: a plot that fails half-way keeps the previous file
            with replacing(path) as tmp:
                fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower() or plt.rcParams["savefig.format"])
        finally:
            plt.close(fig)
    return fig


def stack_steps(values: list[torch.Tensor]) -> np.ndarray:
    """[steps, ...] float64 array of per-step tensors (one stack on their device, one copy back)."""
    return torch.stack(values).detach().to(device="cpu", dtype=torch.float64).numpy()
