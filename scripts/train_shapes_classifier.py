"""Train the small shapes classifier whose features define the "shapes FID".

The classifier (``superdiff.shapes.features.make_classifier``: three conv layers, 64 pooled
features, a linear head over the 16 (shape, colour) classes) sees --dataset-size renders of
every colour-shape pair, held-out pairs included (it is a measuring instrument, like
Inception for FID, not a generator), damaged afresh at every step like model samples: a
Gaussian blur of std 0, 0.4, 0.8 or 1.2 px and pixel noise of std uniform in [0, 0.08]. Cross-entropy, Adam, a fixed number
of steps; every batch is drawn from ``numpy.random.default_rng([seed, step])``.

    python scripts/train_shapes_classifier.py            # about 2 CPU minutes, 1 thread (4000 steps)

Re-running the same command resumes from <workdir>/checkpoint.pt (default
outputs/train/shapes-classifier; other settings are refused, ``--export-only`` exports the
checkpoint with its saved settings). Writes superdiff/bundled/shapes-classifier/
{model.safetensors,config.json,README.md}, built beside it and swapped in only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from superdiff.shapes import features, oracle, world
from superdiff.shapes.training import NOT_SETTINGS, Run, reconcile_settings, replacing_dir


#: Blur levels (px) of the damage; each image gets one at random.
BLURS: tuple[float, ...] = (0.0, 0.4, 0.8, 1.2)
#: Fresh damaged renders the exported accuracy is measured on.
TEST_RENDERS: int = 2048


def damage(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
    """Blur each image by one of ``BLURS`` at random and add noise of std uniform in [0, 0.08]."""
    level = rng.integers(0, len(BLURS), size=len(images))
    out = images.copy()
    for k, s in enumerate(BLURS):
        if s > 0 and (level == k).any():
            out[level == k] = oracle.smooth(images[level == k], s)
    noise = rng.uniform(0.0, 0.08, size=len(images))
    out = out + rng.normal(0.0, 1.0, out.shape) * noise[:, None, None, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(features.CLASSIFIER_DIR))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dataset-size", type=int, default=16000, help="fixed renders, damaged afresh every step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="outputs/train/shapes-classifier")
    ap.add_argument("--log-every", type=int, default=500)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint and exit")
    args = ap.parse_args(argv)
    run = Run(args.workdir)
    state = run.load()
    settings = reconcile_settings(run, state, {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS},
                                  args, args.export_only)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from safetensors.torch import save_file

    model = features.make_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, losses = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], list(state["losses"])
        run.resume(start, args.export_only)
    steps = 0 if args.export_only else args.steps
    if start < steps:
        rng = np.random.default_rng([args.seed, 1])
        parts = [world.make_dataset(rng, min(1000, args.dataset_size - i), exclude=()) for i in range(0, args.dataset_size, 1000)]
        images = np.concatenate([d.images for d in parts])
        labels = np.concatenate([features.class_index(d.shape_ids, d.colour_ids) for d in parts])
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="classifier", mininterval=10):
        rng = np.random.default_rng([args.seed, step])
        idx = rng.integers(0, len(labels), size=args.batch)
        x, y = damage(rng, images[idx]), labels[idx]
        for g in opt.param_groups:
            g["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            run.log({"step": step + 1, "loss": float(np.mean(losses[-args.log_every:])), "cpu_s": run.cpu_seconds})
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            run.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1, "losses": losses,
                      "settings": settings})
    final = run.load()
    if final is None:
        raise SystemExit(f"no checkpoint in {run.dir}; train first")
    model.load_state_dict(final["model"])
    model.eval()
    test = world.make_dataset(np.random.default_rng([args.seed, 2]), TEST_RENDERS, exclude=())
    x = damage(np.random.default_rng([args.seed, 3]), test.images)
    y = features.class_index(test.shape_ids, test.colour_ids)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    n_params = int(sum(p.numel() for p in model.parameters()))
    record = {
        "name": "shapes-classifier", "features": features.FEATURES, "classes": features.CLASSES,
        "class_order": "shape-major: class = shape_index * 4 + colour_index (world.SHAPES, world.COLOURS)",
        "parameters": n_params,
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS} | {"out": None, "threads": args.threads},
        "steps_trained": final["step"],
        "cpu_seconds": round(float(final["cpu_seconds"]), 1),
        "final_loss_last100": float(np.mean(final["losses"][-100:])),
        f"accuracy_on_{TEST_RENDERS}_damaged_renders": acc,
    }
    out = Path(args.out)
    with replacing_dir(out) as stage:  # the previous classifier stays until this one is complete
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stage / "model.safetensors"))
        features.write_config(stage, record)
        (stage / "README.md").write_text(
            "# shapes-classifier\n\nThe feature network of the \"shapes FID\" (`superdiff.shapes.features`): "
            f"{n_params} parameters, trained by `python scripts/train_shapes_classifier.py` "
            f"({record['cpu_seconds']} CPU s, {final['step']} steps of {args.batch} of {args.dataset_size} renders of all 16 "
            f"colour-shape pairs, blurred by 0-1.2 px and noised by 0-0.08 afresh each step). Accuracy on {TEST_RENDERS} fresh damaged renders: "
            f"{acc:.1%}. It is a measuring instrument (like Inception for FID), not a generator, so it sees the "
            "held-out pairs too.\n")
    print(record, flush=True)


if __name__ == "__main__":
    sys.exit(main())
