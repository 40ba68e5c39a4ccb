"""Distance of every composition method to the exact target, on analytic Gaussian mixtures (d <= 2).

Targets (exact: closed-form Gaussian mixtures, or quadrature on a 400^d grid):

    product-1d   q_A q_B, 1-D, modes whose widths differ between the experts
    product-2d   q_A q_B, 2-D
    anneal       q^beta of one 2-D mixture, beta = 2 (closed form) and beta = 0.5 (grid)
    cfg          q_u^(1-w) q_c^w, w = 3 (CFG as a geometric average; grid)
    nested       "A" & ("B" | "C") = q_A (q_B + q_C), and ("A" & "B"):30 | "C" = 30 q_A q_B + q_C

Methods: averaging (kappa 1/2, 1/2), SuperDiff AND (equal density; not a density, measured
against the product anyway), the plain drift of the target (K = 1), SMC with K = 2, 4, 8, 16
particles, ULA (2 moves per level) and unadjusted HMC (1 move of 3 leapfrog steps). Metrics:
total variation of the mode weights (nearest-mode cells), |mean error|, ||covariance error||_F;
each mean +- sd over seeds, with the noise floor of the same number of exact samples.

    python benchmarks/correctors_exact.py [--samples 2000] [--steps 50] [--seeds 3]

Writes benchmarks/results/correctors_exact.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from superdiff import GaussianMixtureExpert, VESigma, make_betas
from superdiff.experts import ExpertList
from superdiff.formula import FormulaOperator, compile_formula, formula_gmm, grid_moments
from superdiff.operators import AverageOperator
from superdiff.sampling import sample

F64 = torch.float64
VE = VESigma.from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear"))


def mixture(means, variances, weights=None):
    return GaussianMixtureExpert(means, variances, weights)


def gmm_target(root, leaves):
    m, v, lw = formula_gmm(root, leaves)
    w = torch.softmax(lw, 0)
    T = GaussianMixtureExpert(m, v, w)
    mean = (w[:, None] * m).sum(0)
    second = (w[:, None, None] * (torch.diag_embed(v) + m[:, :, None] * m[:, None, :])).sum(0)
    return {"sampler": T, "mean": mean, "cov": second - mean[:, None] * mean[None], "centres": m[w > 0.01]}


def grid_target(logp, d, centres, lo=-8.0, hi=8.0):
    g = grid_moments(logp, [lo] * d, [hi] * d, n=400 if d == 2 else 4000, centres=centres)
    return {"mean": g["mean"], "cov": g["cov"], "centres": centres, "mode_weights": g["mode_weights"]}


def mode_weights(x, centres):
    lab = torch.cdist(x.to(F64), centres.to(F64)).argmin(-1)
    return torch.bincount(lab, minlength=len(centres)).to(F64) / len(x)


def distances(x, target):
    x = x.to(F64)
    if "mode_weights" not in target:  # closed form: the cell masses from 400k exact samples
        xe, _ = target["sampler"].sample(400_000, torch.Generator().manual_seed(12345))
        target["mode_weights"] = mode_weights(xe, target["centres"])
    cov = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    return {"tv": 0.5 * float((mode_weights(x, target["centres"]) - target["mode_weights"]).abs().sum()),
            "mean": float((x.mean(0) - target["mean"]).norm()),
            "cov": float((cov - target["cov"]).norm())}


def problems():
    """name -> (experts, target, {method: (operator, corrector, guidance)})."""
    out = {}
    QA = mixture([[-2.0], [2.0]], [0.3, 0.3])
    QB = mixture([[-2.0], [2.0]], [2.0, 0.2])
    PA = mixture([[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3])
    PB = mixture([[-2.0, 0.5], [2.0, 0.5]], [1.5, 1.5], [0.85, 0.15])
    prod = compile_formula('"A" & "B"', ["A", "B"], and_mode="product")
    for name, (a, b) in {"product-1d": (QA, QB), "product-2d": (PA, PB)}.items():
        methods = {"averaging": (AverageOperator(), None), "SuperDiff AND": ("and", None),
                   "product drift (K=1)": (AverageOperator([1.0, 1.0]), None)}
        for K in (2, 4, 8, 16):
            methods[f"SMC K={K}"] = (AverageOperator([1.0, 1.0]), {"particles": K})
        methods["ULA (2 moves)"] = (AverageOperator([1.0, 1.0]), {"mcmc": "ula", "mcmc_steps": 2})
        methods["HMC (1 move, 3 leapfrog)"] = (AverageOperator([1.0, 1.0]), {"mcmc": "hmc"})
        out[name] = ([a, b], gmm_target(prod.root, [a, b]), methods, 1.0)
    # annealing q^beta of one mixture
    Q = mixture([[-2.0, -1.0], [2.0, 1.0], [0.0, 3.0]], [0.6, 1.0, 0.4], [0.5, 0.3, 0.2])
    centres = Q.means
    for beta in (2.0, 0.5):
        if beta == 2.0:
            target = gmm_target(compile_formula('"Q" & "Q"', ["Q", "R"], and_mode="product").root, [Q, Q])
            target["centres"] = centres
        else:
            target = grid_target(lambda x: beta * Q.log_prob(x, 0.0, VE), 2, centres)
        methods = {"plain drift (K=1)": (AverageOperator([beta]), None)}
        for K in (2, 4, 8, 16):
            methods[f"SMC K={K}"] = (AverageOperator([beta]), {"particles": K})
        methods["ULA (2 moves)"] = (AverageOperator([beta]), {"mcmc": "ula", "mcmc_steps": 2})
        out[f"anneal beta={beta:g}"] = ([Q], target, methods, 1.0)
    # CFG as a geometric average: q_u^(1 - w) q_c^w
    U = mixture([[0.0, 0.0]], 4.0)
    Cc = mixture([[-1.5, 0.0], [1.5, 0.5]], [0.5, 0.5], [0.6, 0.4])
    w = 3.0
    target = grid_target(lambda x: (1 - w) * U.log_prob(x, 0.0, VE) + w * Cc.log_prob(x, 0.0, VE), 2, Cc.means)
    methods = {"plain CFG (K=1)": ("single", None)}
    for K in (2, 4, 8, 16):
        methods[f"SMC K={K}"] = ("single", {"particles": K})
    out["cfg w=3"] = (ExpertList([Cc], uncond=U), target, methods, w)
    # nested formulas
    EA = mixture([[-2.5, 0.0], [2.5, 0.0]], [0.4, 0.4])
    EB = mixture([[-2.5, 0.5], [2.5, 0.5]], [1.2, 1.2], [0.8, 0.2])
    EC = mixture([[2.5, -1.0]], 0.2)
    EC2 = mixture([[0.0, 3.0]], 0.3)
    for text, leaves in (('"A" & ("B" | "C")', [EA, EB, EC]), ('("A" & "B"):30 | "C"', [EA, EB, EC2])):
        f = compile_formula(text, ["A", "B", "C"], and_mode="product")
        op = FormulaOperator(f)
        methods = {"formula drift (K=1)": (op, None)}
        for K in (2, 4, 8, 16):
            methods[f"SMC K={K}"] = (op, {"particles": K})
        out[f"nested {text}"] = (leaves, gmm_target(f.root, leaves), methods, 1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", nargs="*", help="problem names to run (default all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    probs = problems()
    results: dict = {}
    todo = [(p, m) for p, v in probs.items() if not args.only or p in args.only for m in v[2]]
    bar = tqdm(total=len(todo) * args.seeds, desc="correctors_exact")
    for pname, (experts, target, methods, w) in probs.items():
        if args.only and pname not in args.only:
            continue
        d = int(target["mean"].numel())
        res = {}
        floor = []
        sampler = target.get("sampler")
        for s in range(args.seeds):
            if sampler is not None:
                xe, _ = sampler.sample(args.samples, torch.Generator().manual_seed(1000 + s))
                floor.append(distances(xe, target))
        for mname, (op, corr) in methods.items():
            runs = []
            t0 = time.perf_counter()
            for s in range(args.seeds):
                out = sample(experts, VE, args.steps, operator=op, integrator="em", shape=(args.samples, d),
                             guidance_scale=w, generator=torch.Generator().manual_seed(s), dtype=F64,
                             progress=False, corrector=corr)
                runs.append(distances(out.samples, target))
                bar.update()
            res[mname] = {k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))]
                          for k in ("tv", "mean", "cov")}
            res[mname]["seconds"] = round(time.perf_counter() - t0, 2)
            tqdm.write(f"{pname:32s} {mname:26s} " + " ".join(f"{k} {v[0]:.3f}" for k, v in res[mname].items()
                                                              if k != "seconds"))
        results[pname] = {"methods": res, "noise_floor": {k: float(np.mean([f[k] for f in floor])) for k in
                                                          ("tv", "mean", "cov")} if floor else None,
                          "target_mode_weights": [round(float(v), 4) for v in target["mode_weights"]]}
    bar.close()
    command = "python benchmarks/correctors_exact.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"settings": vars(args), "results": results, "command": command.strip(),
           "seconds": round(time.perf_counter() - t_all, 1)}
    (out_dir / "correctors_exact.json").write_text(json.dumps(doc, indent=2))
    lines = ["# Correctors against exact targets (Gaussian mixtures, d <= 2)", "",
             f"{args.samples} samples per run, {args.steps} Euler-Maruyama steps (SD's VE sigmas), "
             f"{args.seeds} seeds; mean +- sd over seeds. TV: total variation of the mode weights "
             "(nearest-mode cells); mean: |mean error|; cov: ||covariance error||_F. The noise floor is "
             "the distance of as many exact samples.", ""]
    for pname, r in results.items():
        lines += [f"## {pname}", "", f"Exact mode weights: {r['target_mode_weights']}", "",
                  "| method | mode-weight TV | mean error | covariance error | seconds |", "|---|---|---|---|---|"]
        for mname, m in r["methods"].items():
            lines.append(f"| {mname} | {m['tv'][0]:.3f} +- {m['tv'][1]:.3f} | {m['mean'][0]:.3f} +- {m['mean'][1]:.3f} "
                         f"| {m['cov'][0]:.3f} +- {m['cov'][1]:.3f} | {m['seconds']} |")
        if r["noise_floor"]:
            nf = r["noise_floor"]
            lines.append(f"| *exact samples (noise floor)* | {nf['tv']:.3f} | {nf['mean']:.3f} | {nf['cov']:.3f} | |")
        lines.append("")
    lines.append(f"Total time {doc['seconds']} s (`{doc['command']}`).")
    (out_dir / "correctors_exact.md").write_text("\n".join(lines) + "\n")
    plot(results, out_dir / "correctors_exact.png")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 0.6, 3.4), squeeze=False)
    for ax, pname in zip(axes[0], names):
        ms = results[pname]["methods"]
        ks = [(int(m.split("K=")[1]), v) for m, v in ms.items() if m.startswith("SMC")]
        base = [v for m, v in ms.items() if "K=1" in m]
        pts = ([(1, base[0])] if base else []) + ks
        x = [p[0] for p in pts]
        for key, col in (("tv", "C0"), ("cov", "C1")):
            ax.errorbar(x, [p[1][key][0] for p in pts], yerr=[p[1][key][1] for p in pts], marker="o", color=col,
                        label="mode-weight TV" if key == "tv" else "cov. error", capsize=2, lw=1.2)
            nf = results[pname]["noise_floor"]
            if nf:
                ax.axhline(nf[key], color=col, ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("particles K")
        ax.set_title(pname, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_ylabel("distance to the exact target")
    fig.suptitle("SMC distance to the exact target against K (dotted: exact-sample noise floor)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
