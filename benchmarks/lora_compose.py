"""Composing two LoRAs on one base model: SuperDiff OR / AND against the multi-LoRA baselines.

The bundled adapters lora-orange (the colour orange) and lora-outline (hollow shapes) each teach
shapes-t2i a concept it has never seen. Both are composed, on the same prompts ("a circle",
"a square", "a triangle") and the same seeds (image i: seed i), with every method behind
`operator=`, through the same `superdiff.compose.run_composition` as the CLI and the studio:

    base       no adapter (the concepts' base rate)
    orange, outline   one adapter alone (operator single)
    merge      weight merge: both adapters' deltas summed (diffusers' set_adapters)
    switch     LoRA Switch: the active adapter alternates every step
    composite  LoRA Composite: the average of each adapter's guided prediction
    or, and    SuperDiff OR / AND over the two adapter experts (one batched forward per step)

The exact concept oracle (`superdiff.shapes.oracle.concepts`) labels every image:

    both          orange AND outlined (what a composition of the two adapters should give)
    orange only, outline only, neither

plus "right shape" (the prompt's shape, on the hole-filled mask). Writes
benchmarks/results/lora_compose.{json,md} and lora_compose.png (rows: methods; columns:
the first images of each prompt).

    python benchmarks/lora_compose.py [--images 16] [--steps 25] [--out benchmarks/results]
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

PROMPTS = tuple(f"a {s}" for s in world.OUTLINE_SHAPES)
BOTH = ["lora-orange", "lora-outline"]
METHODS = {
    "base": {"operator": "single"},
    "orange": {"operator": "single", "adapters": ["lora-orange"]},
    "outline": {"operator": "single", "adapters": ["lora-outline"]},
    "merge": {"operator": "merge", "adapters": BOTH},
    "switch": {"operator": "switch", "adapters": BOTH},
    "composite": {"operator": "composite", "adapters": BOTH},
    "or": {"operator": "or", "adapters": BOTH},
    "and": {"operator": "and", "adapters": BOTH},
}


def score(images: list, prompt: str) -> dict[str, float]:
    r = oracle.concepts(images)
    orange = r.has(colour="orange")
    outline = r.has(style="outline")
    shape = r.has(shape=prompt.split()[-1])
    return {"both": float((orange & outline).mean()), "orange_only": float((orange & ~outline).mean()),
            "outline_only": float((~orange & outline).mean()), "neither": float((~orange & ~outline).mean()),
            "both_right_shape": float((orange & outline & shape).mean()), "right_shape": float(shape.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="images per prompt and method")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = ModelCache()
    rows, tiles = [], {}
    t_all = time.perf_counter()
    for name in args.methods:
        tiles[name] = []
        for prompt in PROMPTS:
            comp = Composition.from_dict({"model": "shapes-t2i", "prompts": [prompt], "steps": args.steps,
                                          "guidance_scale": args.guidance, "seed": 0,
                                          "num_images": args.images, **METHODS[name]})
            t0 = time.perf_counter()
            res = run_composition(comp, cache, progress=False)
            row = {"method": name, "prompt": prompt, "images": len(res.images), **score(res.images, prompt),
                   "seconds": round(time.perf_counter() - t0, 2),
                   "unet_forwards_per_step": res.trace.meta["forward_calls_per_network"]["unet"] / args.steps}
            rows.append(row)
            tiles[name] += res.images[:4]
            print(json.dumps(row), flush=True)
    keys = ("both", "orange_only", "outline_only", "neither", "both_right_shape", "right_shape")
    summary = {m: {k: float(np.mean([r[k] for r in rows if r["method"] == m])) for k in (*keys, "unet_forwards_per_step")}
               for m in args.methods}
    command = "python benchmarks/lora_compose.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    res = {"settings": vars(args), "prompts": list(PROMPTS), "rows": rows, "mean": summary,
           "seconds": round(time.perf_counter() - t_all, 1), "command": command.strip()}
    (out / "lora_compose.json").write_text(json.dumps(res, indent=2) + "\n")
    grid = image_grid([im for m in args.methods for im in tiles[m]], cols=4 * len(PROMPTS), scale=3,
                      row_labels=list(args.methods), col_labels=[p for p in PROMPTS for _ in range(4)])
    grid.save(out / "lora_compose.png")
    n = args.images * len(PROMPTS)
    lines = ["# Composing two LoRAs (lora-orange + lora-outline on shapes-t2i), exact oracle", "",
             f"Prompts {', '.join(PROMPTS)}; {args.images} images per prompt and method ({n} per method), "
             f"seeds 0..{args.images - 1} for every prompt and method, {args.steps} steps, guidance {args.guidance}, "
             "SDE sampler. \"both\": orange and outlined.", "",
             "| method | both | orange only | outline only | neither | both + right shape | right shape | UNet forwards / step |",
             "|---|---|---|---|---|---|---|---|"]
    for m, v in summary.items():
        lines.append(f"| {m} | {v['both']:.1%} | {v['orange_only']:.1%} | {v['outline_only']:.1%} | "
                     f"{v['neither']:.1%} | {v['both_right_shape']:.1%} | {v['right_shape']:.1%} | "
                     f"{v['unet_forwards_per_step']:g} |")
    lines += ["", "![grid](lora_compose.png)", "", f"Total time {res['seconds']} s (`{res['command']}`)."]
    (out / "lora_compose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
