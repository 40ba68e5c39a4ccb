"""Joint prompt vs averaging vs SuperDiff OR vs AND on a bundled shapes text-to-image model.

For each colour-shape pair held out of training (red circle, green square, blue triangle,
yellow cross) the two single-attribute prompts "a <shape>" and "something <colour>" are
composed with every method on the same seeds (image i: seed i), through the same
`superdiff.compose.run_composition` as the CLI and the studio. The exact oracle labels
every image:

    both     right shape AND right colour (what AND should give)
    shape    right shape only, colour     right colour only (what OR should split between)
    neither

"both" also appears as "both_clean" (the oracle's clean-shape flag, `oracle.matches(clean=True)`).
Methods (--methods): joint (the held-out caption "a red circle"), joint_and (the two prompts
joined as a user writes them, "a circle and something red"; fair for a model trained on such
two-part captions of seen pairs), average, or, and.

Writes benchmarks/results/<name>.{json,md} and a grid per pair and method in <name>/ (name:
compose_shapes for shapes-t2i, compose_shapes_flow for shapes-flow, ...).

    python benchmarks/compose_shapes.py [--images 32] [--steps 25] [--out benchmarks/results]
    python benchmarks/compose_shapes.py --model shapes-flow --methods joint joint_and average or and
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
from superdiff.shapes import oracle, world

METHODS = {
    "joint": {"operator": "joint", "joint_template": "a {1} {0}"},  # on the bare words: "a red circle"
    "joint_and": {"operator": "joint", "joint_template": "{} and {}"},  # "a circle and something red"
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
    ap.add_argument("--model", default="shapes-t2i", help="bundled text-to-image model")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["joint", "average", "or", "and"])
    ap.add_argument("--name", help="output name (default compose_shapes, or compose_shapes_<model without shapes->)")
    args = ap.parse_args()
    name_out = args.name or ("compose_shapes" if args.model == "shapes-t2i" else "compose_shapes_" + args.model.removeprefix("shapes-"))
    methods = {m: METHODS[m] for m in args.methods}
    torch.set_num_threads(1)
    out = Path(args.out)
    (out / name_out).mkdir(parents=True, exist_ok=True)
    cache = ModelCache()
    pairs = list(world.HELD_OUT)
    rows = []
    t_all = time.perf_counter()
    for colour, shape in pairs:
        for name, over in methods.items():
            prompts = [shape, colour] if name == "joint" else [f"a {shape}", f"something {colour}"]
            comp = Composition.from_dict({"model": args.model, "prompts": prompts, "steps": args.steps,
                                          "guidance_scale": args.guidance, "seed": 0,
                                          "num_images": args.images, **over})
            t0 = time.perf_counter()
            res = run_composition(comp, cache, progress=False)
            r = oracle.classify(res.images)
            ok_s, ok_c = r.matches(shape=shape), r.matches(colour=colour)
            row = {"pair": f"{colour} {shape}", "method": name, "images": len(res.images),
                   "both": float((ok_s & ok_c).mean()),
                   "both_clean": float(r.matches(shape=shape, colour=colour, clean=True).mean()),
                   "shape_only": float((ok_s & ~ok_c).mean()),
                   "colour_only": float((~ok_s & ok_c).mean()), "neither": float((~ok_s & ~ok_c).mean()),
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            image_grid(res.images[:16], cols=8, scale=2).save(out / name_out / f"{colour}_{shape}_{name}.png")
            print(json.dumps(row), flush=True)
    summary = {}
    for name in methods:
        sel = [r for r in rows if r["method"] == name]
        summary[name] = {k: float(np.mean([r[k] for r in sel])) for k in ("both", "both_clean", "shape_only", "colour_only", "neither")}
    res = {"settings": vars(args), "pairs": [f"{c} {s}" for c, s in pairs], "rows": rows, "mean": summary,
           "seconds": round(time.perf_counter() - t_all, 1)}
    command = "python benchmarks/compose_shapes.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    res["command"] = command.strip()
    (out / f"{name_out}.json").write_text(json.dumps(res, indent=2))
    joint = {"joint": "the held-out caption itself (\"a red circle\")",
             "joint_and": "the two prompts joined as a user writes them (\"a circle and something red\")"}
    lines = [f"# Composition methods on held-out pairs ({args.model}, exact oracle)", "",
             f"Prompts \"a <shape>\" and \"something <colour>\" for the four pairs never seen in training; "
             f"{args.images} images per pair and method, seeds 0..{args.images - 1}, {args.steps} steps, "
             f"guidance {args.guidance}, SDE sampler. "
             + " ".join(f"The {m} prompt is {joint[m]}." for m in methods if m in joint), "",
             "| method | both attributes | both, clean shape | shape only | colour only | neither |",
             "|---|---|---|---|---|---|"]
    for name, m in summary.items():
        lines.append(f"| {name} | {m['both']:.1%} | {m['both_clean']:.1%} | {m['shape_only']:.1%} | "
                     f"{m['colour_only']:.1%} | {m['neither']:.1%} |")
    lines += ["", "Per pair (both attributes):", "", "| pair | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for c, s in pairs:
        by = {r["method"]: r["both"] for r in rows if r["pair"] == f"{c} {s}"}
        lines.append(f"| {c} {s} | " + " | ".join(f"{by[m]:.1%}" for m in methods) + " |")
    lines += ["", f"Total time {res['seconds']} s (`{res['command']}`)."]
    (out / f"{name_out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
