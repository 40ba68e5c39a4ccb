"""Estimator accuracy and operator fidelity against exact Gaussian-mixture densities.

    python benchmarks/estimator_accuracy.py [--out benchmarks/results] [--quick] [--family ve-vp|flow]

Writes estimator_accuracy.json, estimator_accuracy.md and estimator_accuracy.png
(--family flow: estimator_accuracy_flow.*, the same three measurements on the rectified flow
of SD3/Flux, every trajectory starting at t = 1 exactly as diffusers' FlowMatch schedulers do,
with and without SD3's shift 3 (the Euler-Maruyama rows), plus the ODE estimator with one
Hutchinson probe, its cost at image sizes (ODE rows at 10 and 30 steps), and the ablation
"em-first-only": the posterior kernel on the first step only, then plain Euler-Maruyama;
docs/flow.md):
  1. mean |tracked - exact log q_i| (nats) at the end of OR trajectories of two mixtures in
     d = 64, for every valid (estimator, integrator) pair, vs the number of steps, on the VE
     (SD scaled_linear) and VP (DDPM linear) schedules;
  2. OR with bias log(0.3, 0.7): |fraction in expert 1's mode - 0.3| vs steps (d = 64);
  3. AND shared-mode rate vs steps (d = 64, two experts) in two geometries: the private
     modes as far from each other as from the shared one ("circle"), and mutually orthogonal
     modes, where the private modes' midpoint is a second equal-density point ("orthogonal").
Seeds are fixed; rerunning reproduces the numbers up to floating-point nondeterminism.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _gmm import shared_mode_experts, tracked_error, two_mixtures  # noqa: E402

from superdiff.experts import GaussianMixtureExpert  # noqa: E402
from superdiff.estimators import ODEEstimator  # noqa: E402
from superdiff.integrators import EulerMaruyama  # noqa: E402
from superdiff.operators import OrOperator  # noqa: E402
from superdiff.sampling import sample  # noqa: E402
from superdiff.schedules import RectifiedFlow, VESigma, VPDiscrete, make_betas  # noqa: E402

PAIRS = [("ito", "em"), ("kernel", "em"), ("kernel", "ddpm"), ("ode", "euler"), ("ode", "heun")]


class EMFirstStepOnly(EulerMaruyama):
    """Ablation for the flow rows: the posterior kernel only on the step from alpha = 0 (where
    f and g are infinite), Euler-Maruyama on every later step (superdiff-math.md 7 as written)."""

    @staticmethod
    def posterior_step(schedule, t, t_next):
        return not bool(torch.isfinite(schedule.f(t)) and torch.isfinite(schedule.g2(t)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="fewer step counts (a smoke run)")
    ap.add_argument("--family", choices=["ve-vp", "flow"], default="ve-vp",
                    help="the diffusion schedules (default) or the rectified flow of SD3/Flux")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = 64
    steps_sde = [10, 30, 100] if args.quick else [10, 30, 100, 300, 1000]
    steps_ode = [10, 30] if args.quick else [10, 30, 100]
    flow = args.family == "flow"
    kind = "flow" if flow else "epsilon"
    if flow:
        schedules = {"flow": RectifiedFlow(), "flow-shift3": RectifiedFlow(shift=3.0)}
        pairs = PAIRS + [("ode1", "euler"), ("ode1", "heun"), ("ito", "em-first-only"), ("kernel", "em-first-only")]
        stem = "estimator_accuracy_flow"
    else:
        schedules = {
            "ve": VESigma.from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear")),
            "vp": VPDiscrete(make_betas(1000, 1e-4, 0.02, "linear"), timestep_spacing="linspace"),
        }
        pairs, stem = PAIRS, "estimator_accuracy"
    res: dict = {"d": d, "family": args.family, "estimator_error": {}, "or_weight_error": {},
                 "and_shared_rate": {}, "seconds": {}}
    t_start = time.time()
    for sname, sch in schedules.items():
        for est, integ in pairs:
            if sname == "flow-shift3" and (est.startswith("ode") or integ != "em"):
                continue  # the shifted grid: only the Euler-Maruyama rows
            key = f"{sname}/{est}+{integ}"
            rows = []
            for n in ((steps_ode[:2] if flow else steps_ode) if est.startswith("ode") else steps_sde):
                if n > 999 and sname == "vp":
                    n = 999  # the discrete VP process has 1000 timesteps: n + 1 grid points
                batch = 8 if est.startswith("ode") else 32
                # "ode1": the divergence by one Rademacher probe (Hutchinson), its cost at image sizes
                estimator = ODEEstimator(probes=1) if est == "ode1" else est
                t0 = time.time()
                integrator = EMFirstStepOnly() if integ == "em-first-only" else integ
                err, _ = tracked_error(two_mixtures(d, kind), sch, n, estimator, integrator, d, batch=batch)
                rows.append({"steps": n, "mean_abs_error": float(err.abs().mean()),
                             "std_error": float(err.std()), "seconds": time.time() - t0})
                print(key, rows[-1], flush=True)
            res["estimator_error"][key] = rows

    sch = schedules["flow" if flow else "ve"]
    g = torch.Generator().manual_seed(5)
    a, b = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0].T * 4
    e1 = GaussianMixtureExpert(a[None], 0.25, prediction_type=kind)
    e2 = GaussianMixtureExpert(b[None], 0.25, prediction_type=kind)
    for est in ["ito", "kernel"]:
        rows = []
        for n in ([10, 30, 100] if args.quick else [10, 30, 100, 300]):
            o = sample([e1, e2], sch, n, operator=OrOperator(weights=[0.3, 0.7]), estimator=est, integrator="em",
                       shape=(4000, d), generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
            frac = float(((o.samples - a).norm(dim=1) < (o.samples - b).norm(dim=1)).double().mean())
            rows.append({"steps": n, "fraction_expert_1": frac, "abs_error": abs(frac - 0.3)})
            print("or", est, rows[-1], flush=True)
        res["or_weight_error"][est] = rows

    geoms = {"circle": shared_mode_experts(d, 2, kind)}
    q = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0].T * 4
    geoms["orthogonal"] = ([GaussianMixtureExpert(torch.stack([q[0], q[2]]), 0.25, prediction_type=kind),
                            GaussianMixtureExpert(torch.stack([q[1], q[2]]), 0.25, prediction_type=kind)],
                           torch.stack([q[0], q[1], q[2]]))
    for gname, (experts, centres) in geoms.items():
        for est in ["ito", "kernel"]:
            rows = []
            for n in ([10, 30, 100] if args.quick else [10, 30, 100, 300]):
                o = sample(experts, sch, n, operator="and", estimator=est, integrator="em", shape=(500, d),
                           generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
                comp = torch.cat([e.component_log_prob(o.samples, 1e-3, sch) for e in experts], -1)
                rate = float(torch.isin(comp.argmax(-1), torch.tensor([1, 3])).double().mean())
                rows.append({"steps": n, "shared_mode_rate": rate})
                print("and", gname, est, rows[-1], flush=True)
            res["and_shared_rate"][f"{gname}/{est}"] = rows
    res["seconds"]["total"] = time.time() - t_start
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    _markdown(res, out / f"{stem}.md")
    _plot(res, out / f"{stem}.png")
    print(f"wrote {out}/{stem}.{{json,md,png}} in {res['seconds']['total']:.0f} s")


def _markdown(res: dict, path: Path) -> None:
    flow = res.get("family") == "flow"
    where = "rectified flow from t = 1, Euler-Maruyama" if flow else "VE, EM"
    lines = [f"# Estimator accuracy (d = {res['d']}, exact Gaussian-mixture densities"
             + (", rectified flow)" if flow else ")"), "",
             "Mean |tracked - exact log q_i| in nats at the end of OR trajectories (both experts)"
             + (", every trajectory from t = 1 (alpha = 0); ode1 = one Hutchinson probe." if flow else "."), ""]
    steps = sorted({r["steps"] for rows in res["estimator_error"].values() for r in rows})
    lines.append("| schedule / estimator+integrator | " + " | ".join(str(s) for s in steps) + " |")
    lines.append("|---|" + "---|" * len(steps))
    for key, rows in res["estimator_error"].items():
        by = {r["steps"]: r["mean_abs_error"] for r in rows}
        lines.append(f"| {key} | " + " | ".join(f"{by[s]:.2f}" if s in by else "" for s in steps) + " |")
    lines += ["", f"OR with weights (0.3, 0.7): |fraction in expert 1's mode - 0.3| (4000 samples, {where})", ""]
    for est, rows in res["or_weight_error"].items():
        lines.append(f"- {est}: " + ", ".join(f"{r['steps']} steps {r['abs_error']:.3f}" for r in rows))
    lines += ["", f"AND shared-mode rate (500 samples, {where})", ""]
    for key, rows in res["and_shared_rate"].items():
        lines.append(f"- {key}: " + ", ".join(f"{r['steps']} steps {r['shared_mode_rate']:.3f}" for r in rows))
    lines += ["", f"Total time {res['seconds']['total']:.0f} s."]
    path.write_text("\n".join(lines) + "\n")


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for key, rows in res["estimator_error"].items():
        ls = "--" if key.startswith(("vp", "flow-shift3")) else "-"
        axes[0].loglog([r["steps"] for r in rows], [r["mean_abs_error"] for r in rows], ls, marker="o", ms=3, label=key)
    axes[0].set_xlabel("steps"), axes[0].set_ylabel("mean |error| (nats)")
    axes[0].set_title(f"log-density tracking error, d = {res['d']}")
    axes[0].legend(fontsize=7)
    for est, rows in res["or_weight_error"].items():
        axes[1].semilogx([r["steps"] for r in rows], [r["abs_error"] for r in rows], marker="o", label=est)
    axes[1].axhline(0.03, color="0.6", ls=":", label="3 points")
    axes[1].set_xlabel("steps"), axes[1].set_title("OR: |mixture weight error|"), axes[1].legend()
    for key, rows in res["and_shared_rate"].items():
        axes[2].semilogx([r["steps"] for r in rows], [r["shared_mode_rate"] for r in rows], marker="o", label=key)
    axes[2].axhline(0.9, color="0.6", ls=":")
    axes[2].set_ylim(0, 1.02), axes[2].set_xlabel("steps"), axes[2].set_title("AND: shared-mode rate"), axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
