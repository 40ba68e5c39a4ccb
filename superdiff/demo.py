"""The 2-D Gaussian-mixture OR/AND demo of the paper's Figure 2.

Two experts in R^2: expert A has modes {left, top}, expert B {right, top}; top is shared.
OR (T = 1, equal weights) samples the mixture of A and B (all three modes, top twice as
likely); AND samples where both densities agree (the shared top mode). Writes a scatter
plot of both with the exact mixture densities as contours, a trace plot of kappa and log q,
and a JSON summary measured against the exact densities (each file written beside itself and
renamed into place, so a failed write keeps the previous one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import replacing, write_text
from .experts import GaussianMixtureExpert
from .sampling import sample
from .schedules import VESigma, make_betas

__all__ = ["figure2_experts", "run_demo"]


def figure2_experts() -> tuple[list[GaussianMixtureExpert], torch.Tensor]:
    """Experts A = {left, top}, B = {right, top} (std 0.5); returns (experts, centres [3, 2])."""
    left, right, top = [-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]
    a = GaussianMixtureExpert([left, top], 0.25)
    b = GaussianMixtureExpert([right, top], 0.25)
    return [a, b], torch.tensor([left, right, top], dtype=torch.float64)


def run_demo(out_dir: str | Path = "outputs/demo", num_samples: int = 2000, num_steps: int = 100,
             seed: int = 0, estimator: str | None = None, progress: bool = True) -> dict:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    experts, centres = figure2_experts()
    schedule = VESigma.from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear"))
    results, summary = {}, {"num_samples": num_samples, "num_steps": num_steps, "seed": seed}
    names = ["left (A only)", "right (B only)", "top (shared)"]
    for op in ["or", "and"]:
        res = sample(experts, schedule, num_steps, operator=op, estimator=estimator, shape=(num_samples, 2),
                     generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                     expert_names=["A", "B"], progress=progress)
        x = res.samples
        assign = torch.cdist(x, centres).argmin(1)
        frac = {n: float((assign == i).double().mean()) for i, n in enumerate(names)}
        summary[op] = {"mode_fractions": frac, "estimator": res.trace.meta["estimator"],
                       "forward_calls": res.trace.meta["forward_calls"]}
        results[op] = res
        res.trace.save(out / f"trace_{op}.json")
        res.trace.plot(out / f"trace_{op}.png", samples=4,
                       title=f"SuperDiff {op.upper()} on the 2-D mixtures: kappa and log q per expert")

    # scatter with exact density contours of each expert
    g = np.linspace(-7, 7, 200)
    xx, yy = np.meshgrid(g, g)
    pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], -1))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for e, c, lab in zip(experts, ["tab:blue", "tab:orange"], ["A", "B"]):
        z = e.log_prob(pts, 1e-3, schedule).exp().reshape(xx.shape).numpy()
        axes[0].contour(xx, yy, z, levels=5, colors=c)
        axes[0].plot([], [], color=c, label=f"expert {lab}")
    axes[0].set_title("experts (exact densities)")
    axes[0].legend(loc="lower center")
    for ax, op in zip(axes[1:], ["or", "and"]):
        x = results[op].samples.numpy()
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.4, color="tab:green" if op == "and" else "tab:purple")
        fr = summary[op]["mode_fractions"]
        ax.set_title(f"SuperDiff {op.upper()}: " + ", ".join(f"{k.split()[0]} {v:.0%}" for k, v in fr.items()), fontsize=9)
    for ax in axes:
        ax.set_xlim(-7, 7), ax.set_ylim(-7, 7), ax.set_aspect("equal")
    fig.suptitle(f"Superposition of two Gaussian-mixture experts ({num_samples} samples, {num_steps} steps)")
    fig.tight_layout()
    try:  # written whole (superdiff.atomic), as the traces are: a failed write keeps the previous file
        with replacing(out / "samples.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
