"""Train the small shapes classifier whose features define the "shapes FID".

The classifier (``superdiff.shapes.features.make_classifier``: three conv layers, 64 pooled
features, a linear head over the 16 (shape, colour) classes) sees --dataset-size renders of
every colour-shape pair, held-out pairs included (it is a measuring instrument, like
Inception for FID, not a generator), damaged afresh at every step like model samples: a
Gaussian blur of std 0, 0.4, 0.8 or 1.2 px and pixel noise of std uniform in [0, 0.08]. Cross-entropy, Adam, a fixed number
of steps; every batch is drawn from ``numpy.random.default_rng([seed, step])``.

    python scripts/train_shapes_classifier.py            # about 2 CPU minutes, 1 thread (4000 steps)

Writes superdiff/bundled/shapes-classifier/{model.safetensors,config.json,README.md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from superdiff.shapes import features, oracle, world


#: Blur levels (px) of the damage; each image gets one at random.
BLURS: tuple[float, ...] = (0.0, 0.4, 0.8, 1.2)


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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from safetensors.torch import save_file

    model = features.make_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    cpu0 = time.process_time()
    rng = np.random.default_rng([args.seed, 1])
    parts = [world.make_dataset(rng, min(1000, args.dataset_size - i), exclude=()) for i in range(0, args.dataset_size, 1000)]
    images = np.concatenate([d.images for d in parts])
    labels = np.concatenate([features.class_index(d.shape_ids, d.colour_ids) for d in parts])
    losses = []
    for step in tqdm(range(args.steps), desc="classifier", mininterval=10):
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
    model.eval()
    test = world.make_dataset(np.random.default_rng([args.seed, 2]), 2048, exclude=())
    x = damage(np.random.default_rng([args.seed, 3]), test.images)
    y = features.class_index(test.shape_ids, test.colour_ids)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    n_params = int(sum(p.numel() for p in model.parameters()))
    record = {
        "name": "shapes-classifier", "features": features.FEATURES, "classes": features.CLASSES,
        "class_order": "shape-major: class = shape_index * 4 + colour_index (world.SHAPES, world.COLOURS)",
        "parameters": n_params, "hyperparameters": vars(args) | {"out": None},
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "final_loss_last100": float(np.mean(losses[-100:])),
        "accuracy_on_2048_damaged_renders": acc,
    }
    features.write_config(out, record)
    (out / "README.md").write_text(
        "# shapes-classifier\n\nThe feature network of the \"shapes FID\" (`superdiff.shapes.features`): "
        f"{n_params} parameters, trained by `python scripts/train_shapes_classifier.py` "
        f"({record['cpu_seconds']} CPU s, {args.steps} steps of {args.batch} of {args.dataset_size} renders of all 16 "
        "colour-shape pairs, blurred by 0-1.2 px and noised by 0-0.08 afresh each step). Accuracy on 2048 fresh damaged renders: "
        f"{acc:.1%}. It is a measuring instrument (like Inception for FID), not a generator, so it sees the "
        "held-out pairs too.\n")
    print(record, flush=True)


if __name__ == "__main__":
    sys.exit(main())
