"""Particle and MCMC correctors on the bundled shapes model, at equal steps and at equal
network evaluations, scored with the exact shapes oracle.

For each colour-shape pair held out of training (red circle, green square, blue triangle,
yellow cross) the prompts "a <shape>" and "something <colour>" are composed by:

    joint_and   the natural joint prompt "a circle and something red" (one expert)
    average     kappa = (1/2, 1/2) (the averaging baseline)
    and         SuperDiff's equal-density AND
    product     the product of the two experts, kappa = (1, 1), no correction
                (formula '"a circle" & "something red"', and_mode product)
    smcK        the product with the SMC / Feynman-Kac corrector, K particles per image
    ula         the product with one ULA move per noise level (Du et al.)

Everything goes through `superdiff.compose.run_composition` (the CLI's and the studio's
path); image i of a pair uses seed i. Network evaluations (NFE) are counted as rows of the
batched forward per image: steps x K x (N + 1) (N experts plus the unconditional branch),
plus the MCMC moves. Equal steps: 25 steps for all. Equal NFE: about 300 rows per image
(SMC K=4 at 25 steps) for all: joint 150 steps, average / AND / product 100 steps, ULA 50.

    python benchmarks/correctors_shapes.py [--images 6] [--out benchmarks/results]

Writes correctors_shapes.{json,md,png} (quality against NFE) and image grids in
correctors_shapes/. Resumable: finished rows are kept in correctors_shapes.partial.jsonl.
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

from superdiff.compose import Composition, run_composition
from superdiff.images import image_grid
from superdiff.model_loading import ModelCache
from superdiff.correctors import make_corrector
from superdiff.shapes import oracle, world

PRODUCT = {"compose": "PRODUCT", "and_mode": "product"}
#: name -> (composition fields, steps, particles, mcmc evaluations per step)
CONFIGS = {
    "joint_and@25": ({"operator": "joint", "joint_template": "{} and {}"}, 25),
    "average@25": ({"operator": "average"}, 25),
    "and@25": ({"operator": "and"}, 25),
    "product@25": (PRODUCT, 25),
    "smc2@25": ({**PRODUCT, "corrector": "smc:2"}, 25),
    "smc4@25": ({**PRODUCT, "corrector": "smc:4"}, 25),
    "smc8@25": ({**PRODUCT, "corrector": "smc:8"}, 25),
    "ula@25": ({**PRODUCT, "corrector": "ula"}, 25),
    # equal network evaluations: about 300 rows per image, as smc4@25
    "joint_and@150": ({"operator": "joint", "joint_template": "{} and {}"}, 150),
    "average@100": ({"operator": "average"}, 100),
    "and@100": ({"operator": "and"}, 100),
    "product@100": (PRODUCT, 100),
    "ula@50": ({**PRODUCT, "corrector": "ula"}, 50),
}


def nfe(fields: dict, steps: int) -> int:
    """Rows of the batched forward per image."""
    rows = 2 if fields.get("operator") == "joint" else 3
    c = make_corrector(fields.get("corrector"))
    K = c.particles if c is not None else 1
    extra = c.evals_per_step() * (steps - 1) if c is not None else 0
    return K * rows * (steps + extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6, help="images per held-out pair and method")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the committed JSON")
    args = ap.parse_args()
    if args.plot_only:
        res = json.loads((Path(args.out) / "correctors_shapes.json").read_text())
        plot(res["summary"], Path(args.out) / "correctors_shapes.png")
        return
    torch.set_num_threads(1)
    out = Path(args.out)
    name = "correctors_shapes"
    (out / name).mkdir(parents=True, exist_ok=True)
    partial = out / f"{name}.partial.jsonl"
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("images") == args.images:
                    done[(r["pair"], r["config"])] = r
    cache = ModelCache()
    t_all = time.perf_counter()
    rows = []
    for colour, shape in world.HELD_OUT:
        pair = f"{colour} {shape}"
        for cname in args.configs:
            if (pair, cname) in done:
                rows.append(done[(pair, cname)])
                continue
            fields, steps = CONFIGS[cname]
            fields = dict(fields)
            if fields.get("compose") == "PRODUCT":
                fields["compose"] = f'"a {shape}" & "something {colour}"'
                prompts = []
            else:
                prompts = [f"a {shape}", f"something {colour}"]
            comp = Composition.from_dict({"model": "shapes-t2i", "prompts": prompts, "steps": steps,
                                          "guidance_scale": args.guidance, "seed": 0, "num_images": args.images,
                                          **fields})
            t0 = time.perf_counter()
            res = run_composition(comp, cache, progress=False)
            r = oracle.classify(res.images)
            ok_s, ok_c = r.matches(shape=shape), r.matches(colour=colour)
            tr = res.trace
            ess = tr.ess if tr is not None and getattr(tr, "ess", None) is not None else None
            row = {"pair": pair, "config": cname, "method": cname.split("@")[0], "steps": steps,
                   "nfe": nfe(fields, steps), "images": len(res.images),
                   "both": float((ok_s & ok_c).mean()), "shape_only": float((ok_s & ~ok_c).mean()),
                   "colour_only": float((~ok_s & ok_c).mean()), "neither": float((~ok_s & ~ok_c).mean()),
                   "mean_ess": float(np.mean(ess)) if ess is not None else None,
                   "resamples_per_image": float(np.asarray(tr.resampled).sum(0).mean()) if ess is not None else None,
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            with partial.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            image_grid(res.images[:8], cols=8, scale=2).save(out / name / f"{colour}_{shape}_{cname}.png")
            print(json.dumps(row), flush=True)
    summary = {}
    for cname in args.configs:
        sel = [r for r in rows if r["config"] == cname]
        n = sum(r["images"] for r in sel)
        both = float(np.mean([r["both"] for r in sel]))
        summary[cname] = {"method": sel[0]["method"], "steps": sel[0]["steps"], "nfe": sel[0]["nfe"], "images": n,
                          "both": both, "both_se": float(np.sqrt(both * (1 - both) / max(n, 1))),
                          **{k: float(np.mean([r[k] for r in sel])) for k in ("shape_only", "colour_only", "neither")},
                          "seconds_per_image": float(np.sum([r["seconds"] for r in sel]) / max(n, 1))}
    command = "python benchmarks/correctors_shapes.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    res = {"settings": vars(args), "pairs": [f"{c} {s}" for c, s in world.HELD_OUT], "rows": rows,
           "summary": summary, "command": command.strip(), "seconds": round(time.perf_counter() - t_all, 1)}
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    plot(summary, out / f"{name}.png")
    lines = ["# Correctors on the held-out shape-colour pairs (shapes-t2i, exact oracle)", "",
             f"Prompts \"a <shape>\" and \"something <colour>\" for the four pairs never seen in training, "
             f"{args.images} images per pair (seeds 0..{args.images - 1}), guidance {args.guidance}, SDE sampler. "
             "NFE: rows of the batched forward per image. 'both': the oracle sees the right shape in the "
             "right colour (+- one binomial standard error).", "",
             "| config | steps | NFE / image | both attributes | shape only | colour only | neither | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for cname, m in summary.items():
        lines.append(f"| {cname} | {m['steps']} | {m['nfe']} | {m['both']:.0%} +- {m['both_se']:.0%} | "
                     f"{m['shape_only']:.0%} | {m['colour_only']:.0%} | {m['neither']:.0%} | "
                     f"{m['seconds_per_image']:.1f} |")
    lines += ["", "Per pair (both attributes):", "", "| pair | " + " | ".join(args.configs) + " |",
              "|---|" + "---|" * len(args.configs)]
    for c, s in world.HELD_OUT:
        by = {r["config"]: r["both"] for r in rows if r["pair"] == f"{c} {s}"}
        lines.append(f"| {c} {s} | " + " | ".join(f"{by[k]:.0%}" for k in args.configs) + " |")
    lines += ["", f"Total time {res['seconds']} s (`{res['command']}`)."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    methods: dict[str, list] = {}
    for cname, m in summary.items():  # one line per method; the SMC runs (K = 2, 4, 8) form one line
        meth = "SMC product (K)" if m["method"].startswith("smc") else m["method"]
        note = "K=" + m["method"][3:] if m["method"].startswith("smc") else f"{m['steps']} st"
        methods.setdefault(meth, []).append((m["nfe"], m["both"], m["both_se"], note))
    for meth, pts in methods.items():
        pts.sort()
        x = [p[0] for p in pts]
        y = [100 * p[1] for p in pts]
        e = [100 * p[2] for p in pts]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=meth, lw=1.2)
        for p in pts:
            ax.annotate(p[3], (p[0], 100 * p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image (rows of the batched forward)")
    ax.set_ylabel("both attributes (%)")
    ax.set_title("Held-out pairs: quality against compute (shapes-t2i, oracle)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
