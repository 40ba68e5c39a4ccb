"""Joint prompt vs averaging vs SuperDiff OR vs AND on the bundled shapes-t2i model.

For each colour-shape pair held out of training (red circle, green square, blue triangle,
yellow cross) the two single-attribute prompts "a <shape>" and "something <colour>" are
composed with every method on the same seeds (image i: seed i), through the same
`superdiff.compose.run_composition` as the CLI and the studio. The exact oracle labels
every image:

    both     right shape AND right colour (what AND should give)
    shape    right shape only, colour     right colour only (what OR should split between)
    neither

Writes benchmarks/results/compose_shapes.{json,md} and a grid per pair and method.

    python benchmarks/compose_shapes.py [--images 32] [--steps 25] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from superdiff.compose import Composition, ModelCache, image_grid, run_composition
from superdiff.shapes import oracle, world

METHODS = {
    "joint": {"operator": "joint", "joint_template": "a {1} {0}"},  # on the bare words: "a red circle"
    "average": {"operator": "average"},
    "or": {"operator": "or"},
    "and": {"operator": "and"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per pair and method")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "compose_shapes").mkdir(parents=True, exist_ok=True)
    cache = ModelCache()
    pairs = list(world.HELD_OUT)
    rows = []
    t_all = time.perf_counter()
    for colour, shape in pairs:
        for name, over in METHODS.items():
            prompts = [shape, colour] if name == "joint" else [f"a {shape}", f"something {colour}"]
            comp = Composition.from_dict({"model": "shapes-t2i", "prompts": prompts, "steps": args.steps,
                                          "guidance_scale": args.guidance, "seed": 0,
                                          "num_images": args.images, **over})
            t0 = time.perf_counter()
            res = run_composition(comp, cache, progress=False)
            r = oracle.classify(res.images)
            ok_s, ok_c = r.matches(shape=shape), r.matches(colour=colour)
            row = {"pair": f"{colour} {shape}", "method": name, "images": len(res.images),
                   "both": float((ok_s & ok_c).mean()), "shape_only": float((ok_s & ~ok_c).mean()),
                   "colour_only": float((~ok_s & ok_c).mean()), "neither": float((~ok_s & ~ok_c).mean()),
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            image_grid(res.images[:16], cols=8, scale=2).save(out / "compose_shapes" / f"{colour}_{shape}_{name}.png")
            print(json.dumps(row), flush=True)
    summary = {}
    for name in METHODS:
        sel = [r for r in rows if r["method"] == name]
        summary[name] = {k: float(np.mean([r[k] for r in sel])) for k in ("both", "shape_only", "colour_only", "neither")}
    res = {"settings": vars(args), "pairs": [f"{c} {s}" for c, s in pairs], "rows": rows, "mean": summary,
           "seconds": round(time.perf_counter() - t_all, 1)}
    (out / "compose_shapes.json").write_text(json.dumps(res, indent=2))
    lines = ["# Composition methods on held-out pairs (shapes-t2i, exact oracle)", "",
             f"Prompts \"a <shape>\" and \"something <colour>\" for the four pairs never seen in training; "
             f"{args.images} images per pair and method, seeds 0..{args.images - 1}, {args.steps} steps, "
             f"guidance {args.guidance}, SDE sampler. The joint prompt is the held-out caption itself "
             "(\"a red circle\").", "",
             "| method | both attributes | shape only | colour only | neither |", "|---|---|---|---|---|"]
    for name, m in summary.items():
        lines.append(f"| {name} | {m['both']:.1%} | {m['shape_only']:.1%} | {m['colour_only']:.1%} | {m['neither']:.1%} |")
    lines += ["", "Per pair (both attributes):", "", "| pair | " + " | ".join(METHODS) + " |",
              "|---|" + "---|" * len(METHODS)]
    for c, s in pairs:
        by = {r["method"]: r["both"] for r in rows if r["pair"] == f"{c} {s}"}
        lines.append(f"| {c} {s} | " + " | ".join(f"{by[m]:.1%}" for m in METHODS) + " |")
    lines += ["", f"Total time {res['seconds']} s (`python benchmarks/compose_shapes.py`)."]
    (out / "compose_shapes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
