"""`superdiff generate` (one composition) and `superdiff batch` (a job file).

Only argparse is imported at module level; the work happens in compose.py and batch.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace("|", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _composition_from_args(args: argparse.Namespace):
    from .compose import Composition, read_png_composition

    if args.from_png:
        base = read_png_composition(args.from_png).to_dict()
    elif args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
        base = base.get("composition", base) if isinstance(base, dict) else base
    else:
        base = {}
    flags = {"model": args.model, "prompts": args.prompt, "operator": args.operator, "extra_models": args.extra_model,
             "weights": args.weights, "bias": args.bias, "temperature": args.temperature, "lift": args.lift,
             "estimator": args.estimator, "sampler": args.sampler, "steps": args.steps,
             "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt, "seed": args.seed,
             "num_images": args.num_images, "height": args.height, "width": args.width, "dtype": args.dtype,
             "joint_template": args.joint_template, "single_index": args.single_index}
    if args.kappa_clamp is not None:
        flags["kappa_clamp"] = False if args.kappa_clamp.lower() in ("none", "off", "false") else _floats(args.kappa_clamp)
    d = dict(base)
    d.update({k: v for k, v in flags.items() if v is not None and v != []})
    d.update(dict(args.set or []))
    if not args.from_png and not args.config and "prompts" not in d and d.get("model", "shapes-t2i") == "shapes-t2i":
        from .compose import DEFAULT_COMPOSITION

        d = {**DEFAULT_COMPOSITION.to_dict(), **d}
    return Composition.from_dict(d)


def _generate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .compose import ModelCache, image_grid, run_composition, save_png

    comp = _composition_from_args(args)
    out = Path(args.out)
    print(f"superdiff generate: {comp.describe()} on {comp.model}, {comp.num_images} image(s), "
          f"{comp.steps} steps -> {out}", file=sys.stderr)
    res = run_composition(comp, ModelCache(), progress=not args.quiet)
    paths = []
    for i, (im, rec) in enumerate(zip(res.images, res.records)):
        paths.append(save_png(im, out / f"image_{i:03d}.png", rec))
    scale = max(1, 256 // max(res.images[0].size))
    image_grid(res.images, scale=scale).save(out / "grid.png")
    res.trace.save(out / "trace.json")
    res.trace.plot(out / "trace.png", samples=min(4, len(res.images)),
                   title=f"{comp.operator.upper()}: " + " | ".join(comp.prompts or [comp.model]))
    (out / "composition.json").write_text(json.dumps(comp.to_dict(), indent=2))
    if Path(comp.model).name.startswith("shapes-"):  # the bundled shapes world has an exact oracle
        from .shapes import oracle

        r = oracle.classify(res.images)
        labels = [("(empty)" if e else f"{c} {s}") for c, s, e in zip(r.colour, r.shape, r.empty)]
        counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
        (out / "oracle.json").write_text(json.dumps({"labels": labels, "counts": counts}, indent=2))
        print("oracle: " + ", ".join(f"{lab} {n}/{len(labels)}" for lab, n in counts.items()))
    print(f"wrote {len(paths)} image(s), grid.png, trace.json, trace.png and composition.json in {out} "
          f"({res.seconds:.1f} s)")
    if args.from_png:
        same = np.array_equal(np.asarray(Image.open(args.from_png).convert("RGB")),
                              np.asarray(res.images[0].convert("RGB")))
        print(f"reproduced {args.from_png}: {'identical pixels' if same else 'PIXELS DIFFER'}")
        if not same:
            return 1
    return 0


def _batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    s = run_batch(args.jobs, args.out, progress=not args.quiet, limit=args.limit)
    if s.rank != 0:
        return 0  # process 0 reports for all
    done = s.generated + s.skipped + s.recovered
    msg = (f"superdiff batch: {s.tasks} image task(s) in {s.world_size} process(es): {s.generated} generated, "
           f"{s.skipped} already done, {s.recovered} recovered, {s.failed} failed; {s.invalid_lines} invalid "
           f"job line(s); {len(s.failed_jobs)} job/method(s) failed; {s.seconds:.1f} s")
    print(msg, file=sys.stderr)
    if s.failed_jobs:
        print("failed: " + ", ".join(s.failed_jobs), file=sys.stderr)
    if done == 0 and (s.failed or s.invalid_lines or s.tasks == 0):
        print("superdiff batch: nothing could run", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate", help="one composition: PNGs with their parameters, a grid and the trace",
        description="Generate one composition. Defaults: the bundled shapes-t2i model, "
                    "'a circle' AND 'something red'.")
    g.add_argument("--model", help="bundled model name, local diffusers directory or hub id (default shapes-t2i)")
    g.add_argument("--prompt", action="append", help="a prompt (one expert); repeat for each expert")
    g.add_argument("--extra-model", action="append", help="another UNet checkpoint as an expert; repeatable")
    g.add_argument("--operator", choices=["or", "and", "average", "single", "joint"])
    g.add_argument("--weights", type=_floats, help="OR mixture weights / average weights, e.g. 0.3,0.7")
    g.add_argument("--bias", type=_floats, help="OR log-weight bias per expert")
    g.add_argument("--temperature", type=float, help="OR temperature T (inf allowed)")
    g.add_argument("--lift", type=float, help="AND: log q_1 - log q_2 target offset")
    g.add_argument("--kappa-clamp", help="AND kappa clamp 'lo,hi' or 'none'")
    g.add_argument("--single-index", type=int, help="expert index for operator single")
    g.add_argument("--joint-template", help="joint prompt template, e.g. '{0} that looks like {1}'")
    g.add_argument("--estimator", choices=["kernel", "ito", "ode", "none"])
    g.add_argument("--sampler", choices=["sde", "ddpm", "ode", "euler", "heun"])
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float)
    g.add_argument("--negative-prompt")
    g.add_argument("--seed", type=int, help="image i uses seed + i")
    g.add_argument("--num-images", "-n", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--set", type=_kv, action="append", metavar="FIELD=VALUE",
                   help="any composition field (JSON value), e.g. --set 'kappa_clamp=[-1,2]'")
    g.add_argument("--config", help="a composition JSON (e.g. exported from the studio)")
    g.add_argument("--from-png", help="reproduce an image from the parameters in its PNG text chunks")
    g.add_argument("--out", default="outputs/generate", help="output folder (default outputs/generate)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=_generate)

    b = sub.add_parser(
        "batch", help="many compositions from a JSONL/CSV job file; resumable; shards under accelerate",
        description="Run every job of JOBS (JSONL or CSV, one composition per line, optional 'methods' "
                    "sweep) into --out. Rerun the same command to resume. Scale out with "
                    "`accelerate launch --num_processes N -m superdiff batch ...`.")
    b.add_argument("jobs", help="job file (.jsonl or .csv)")
    b.add_argument("--out", required=True, help="output folder: images/, manifest.jsonl, summary.json")
    b.add_argument("--limit", type=int, help="stop after this many tasks (per process)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_batch)
