"""Measure the bundled models with the shapes oracle; write JSON and refresh the model cards.

    .venv/bin/python scripts/eval_bundled.py                 # everything (a few CPU minutes)
    .venv/bin/python scripts/eval_bundled.py --only shapes-t2i

Measurements (all oracle-judged, seeds fixed, >= 256 samples each):
  oracle        accuracy on fresh world renders (all 16 pairs, held-out included), clean and
                with Gaussian blur + pixel noise (the kind of damage model samples show)
  shapes-t2i    diffusers StableDiffusionPipeline, full-caption prompts of the 12 training
                pairs (right shape AND colour), the 4 held-out pairs (joint success), the
                8 single-attribute prompts, and a small guidance-scale sweep
  shapes-flow   the same with diffusers StableDiffusion3Pipeline (its model_index's class)
  shapes-half-* fraction of unconditional samples whose shape is in the model's own half
Each model's figures go to superdiff/bundled/<name>/quality.json (its README.md is
re-rendered from it); the oracle's to superdiff/bundled/oracle_quality.json (only by a run
without --only: the oracle is still measured for the reference fit, but not recorded);
sample grids to outputs/eval_bundled/. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from superdiff import registry
from superdiff.shapes import oracle, world
from superdiff.shapes.cards import write_card
from superdiff.shapes.reference import load_unconditional, sample_unconditional
from superdiff.shapes.training import write_json


def blur_noise(images: np.ndarray, sigma: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = oracle.smooth(images, sigma) if sigma > 0 else images
    return np.clip(out + rng.normal(0.0, noise, images.shape), 0.0, 1.0).astype(np.float32)


def save_grid(images: np.ndarray, path: Path, ncol: int = 16) -> None:
    from PIL import Image

    n = len(images)
    nrow = (n + ncol - 1) // ncol
    h, w = images.shape[2:]
    grid = np.zeros((nrow * (h + 1), ncol * (w + 1), 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = (im.transpose(1, 2, 0) * 255).round()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def eval_oracle(n: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 11])
    data = world.make_dataset(rng, n, exclude=())
    out = {"samples": n, "includes_held_out_pairs": True}
    for label, sigma, noise in [("clean", 0.0, 0.0), ("blur0.7_noise0.05", 0.7, 0.05), ("blur1.0_noise0.1", 1.0, 0.1)]:
        res = oracle.classify(blur_noise(data.images, sigma, noise, rng))
        out[label] = oracle.accuracy(res, data.shape_ids, data.colour_ids)
    out["reference_fit"] = float(oracle.classify(data.images).fit.mean())
    return out


def run_pipe(pipe, prompts: list[str], per_prompt: int, steps: int, guidance: float, seed: int, batch: int = 64):
    """Images [N,3,H,W] in [0,1] and the prompt of each, via the stock pipeline __call__."""
    images, labels = [], []
    for k, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        left = per_prompt
        while left > 0:
            b = min(batch, left)
            out = pipe(prompt, num_images_per_prompt=b, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np")
            images.append(out.images.transpose(0, 3, 1, 2))
            labels += [prompt] * b
            left -= b
    return np.concatenate(images), labels


def score_prompts(images: np.ndarray, labels: list[str]) -> dict:
    res = oracle.classify(images)
    joint, shape_ok, colour_ok, per = [], [], [], {}
    for i, p in enumerate(labels):
        c, s = world.parse_caption(p)
        ok_s = res.matches(shape=s)[i] if s else None
        ok_c = res.matches(colour=c)[i] if c else None
        ok = res.matches(colour=c, shape=s)[i]
        joint.append(ok)
        if ok_s is not None:
            shape_ok.append(ok_s)
        if ok_c is not None:
            colour_ok.append(ok_c)
        per.setdefault(p, []).append(ok)
    return {
        "samples": len(labels),
        "joint": float(np.mean(joint)),
        "shape": float(np.mean(shape_ok)) if shape_ok else None,
        "colour": float(np.mean(colour_ok)) if colour_ok else None,
        "per_prompt": {p: float(np.mean(v)) for p, v in per.items()},
        "mean_fit": float(res.fit.mean()),
        "empty": float(res.empty.mean()),
    }


def eval_t2i(path: Path, args, reference_fit: float, command: str) -> dict:
    from diffusers import DiffusionPipeline

    # the stock diffusers class named in model_index.json (an SD3 model: without its T5)
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, **registry.absent_components(path))
    pipe.set_progress_bar_config(disable=True)
    train_pairs = world.allowed_combinations()
    full_prompts = [world.caption(c, s) for c, s in train_pairs]
    held_prompts = [world.caption(c, s) for c, s in world.HELD_OUT]
    single = [world.caption(None, s) for s in world.SHAPES] + [world.caption(c, None) for c in world.COLOURS]
    g, steps = args.guidance, args.steps
    per_full = -(-args.samples // len(full_prompts))
    imgs, labels = run_pipe(pipe, full_prompts, per_full, steps, g, args.seed)
    save_grid(imgs[:: max(1, per_full // 8)][:96], args.grids / f"{path.name}-full.png", ncol=8)
    full = score_prompts(imgs, labels)
    imgs, labels = run_pipe(pipe, held_prompts, -(-args.samples // len(held_prompts)), steps, g, args.seed + 1)
    save_grid(imgs[::8][:64], args.grids / f"{path.name}-held-out.png", ncol=8)
    held = score_prompts(imgs, labels)
    imgs, labels = run_pipe(pipe, single, -(-args.samples // len(single)), steps, g, args.seed + 2)
    sres = score_prompts(imgs, labels)
    sweep = {}
    for gs in args.sweep:
        imgs, labels = run_pipe(pipe, full_prompts, max(1, args.sweep_samples // len(full_prompts)), steps, gs, args.seed + 3)
        sweep[str(gs)] = score_prompts(imgs, labels)["joint"]
    return {
        "command": command,
        "settings": {"pipeline": f"diffusers.{type(pipe).__name__}", "guidance_scale": g, "num_inference_steps": steps, "scheduler": type(pipe.scheduler).__name__, "seed": args.seed},
        "full_caption": full,
        "held_out": held,
        "single_attribute": {"samples": sres["samples"], "accuracy": sres["joint"], "per_prompt": sres["per_prompt"]},
        "guidance_sweep": sweep,
        "guidance_sweep_samples_each": max(1, args.sweep_samples // len(full_prompts)) * len(full_prompts),
        "mean_fit": full["mean_fit"],
        "reference_fit": reference_fit,
    }


def eval_half(name: str, path: Path, args, reference_fit: float, command: str) -> dict:
    info = registry.bundled_model_info(name)
    own = set(info["shapes"])
    unet, vae, sched = load_unconditional(path)
    gen = torch.Generator().manual_seed(args.seed)
    imgs = sample_unconditional(unet, vae, sched, args.samples, num_inference_steps=args.steps, generator=gen)
    save_grid(imgs[:128], args.grids / f"{name}.png")
    res = oracle.classify(imgs)
    in_half = np.array([s in own for s in res.shape]) & ~res.empty
    return {
        "command": command,
        "settings": {"sampler": "superdiff.shapes.reference.sample_unconditional", "num_inference_steps": args.steps, "scheduler": type(sched).__name__, "seed": args.seed},
        "samples": len(imgs),
        "purity": float(in_half.mean()),
        "shape_distribution": {s: float(np.mean([x == s for x in res.shape])) for s in world.SHAPES},
        "colour_distribution": {c: float(np.mean([x == c for x in res.colour])) for c in world.COLOURS},
        "held_out_pair_rate": float(np.mean([(c, s) in world.HELD_OUT for c, s in zip(res.colour, res.shape)])),
        "empty": float(res.empty.mean()),
        "mean_fit": float(res.fit.mean()),
        "reference_fit": reference_fit,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: all bundled models)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--sweep", type=float, nargs="*", default=[1.0, 2.0, 7.5])
    ap.add_argument("--sweep-samples", type=int, default=96)
    ap.add_argument("--oracle-samples", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grids", type=Path, default=Path("outputs/eval_bundled"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python scripts/eval_bundled.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = command.strip()

    t0 = time.process_time()
    oq = eval_oracle(args.oracle_samples, args.seed)
    oq["command"] = command
    if not args.only:  # --only measures the named models; the oracle's file is the full run's
        write_json(registry.BUNDLED_ROOT / "oracle_quality.json", oq)
    print("oracle", oq, flush=True)
    for name in args.only or registry.list_bundled_models():
        path = registry.bundled_model_path(name)
        kind = registry.bundled_model_info(name)["kind"]
        t = time.process_time()
        if kind == "text-to-image":
            q = eval_t2i(path, args, oq["reference_fit"], command)
        else:
            q = eval_half(name, path, args, oq["reference_fit"], command)
        q["cpu_seconds"] = round(time.process_time() - t, 1)
        write_json(path / "quality.json", q)
        write_card(path)
        print(name, {k: v for k, v in q.items() if k not in ("settings",)}, flush=True)
    print(f"done in {time.process_time() - t0:.0f} CPU s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
