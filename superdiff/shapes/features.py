"""Distribution metrics for shapes-world samples: a "shapes FID" and exact class statistics.

Shapes FID. A small CNN (``ShapesClassifier``: three 3x3 conv layers, global average
pooling to ``FEATURES`` features, a linear head over the 16 (shape, colour) classes) is trained
on renders of the world by ``scripts/train_shapes_classifier.py`` and shipped in
``superdiff/bundled/shapes-classifier``. Its pooled features play the role of Inception's in
FID: with feature means mu_1, mu_2 and covariances S_1, S_2 of two image sets,

    FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})

(Frechet distance of two Gaussians; ``frechet_distance``; the matrix square roots come from
symmetric eigendecompositions), computed in the top ``FD_COMPONENTS`` principal directions of
the reference set's features (``principal_projection``), since benchmark sets hold only a
few hundred images.

Class histogram distance. The oracle's shape labels of N samples against the exact class
distribution of the data (uniform over the shapes): total variation 1/2 sum_k |p_k - q_k|.

Within-class statistics. For each shape class the oracle-estimated size r = sqrt(area /
area_per_r2) and centre (centroid of the foreground) of the samples, against the same
estimates on renders of the data (the estimator's own bias cancels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .world import COLOURS, SHAPES

FEATURES: int = 64
FD_COMPONENTS: int = 16
CLASSES: int = len(SHAPES) * len(COLOURS)
CLASSIFIER_DIR: Path = Path(__file__).resolve().parents[1] / "bundled" / "shapes-classifier"


def make_classifier():
    """The shapes classifier (untrained); deterministic given ``torch.manual_seed``."""
    import torch.nn as nn

    class ShapesClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, FEATURES, 3, padding=1), nn.ReLU(),
            )
            self.head = nn.Linear(FEATURES, CLASSES)

        def features(self, x):
            """Pooled features [B, FEATURES] of images [B,3,32,32] in [0, 1]."""
            return self.body(x * 2.0 - 1.0).mean(dim=(2, 3))

        def forward(self, x):
            return self.head(self.features(x))

    return ShapesClassifier()


def class_index(shape_ids: np.ndarray, colour_ids: np.ndarray) -> np.ndarray:
    """(shape, colour) -> class id in [0, CLASSES)."""
    return np.asarray(shape_ids) * len(COLOURS) + np.asarray(colour_ids)


def load_classifier(directory: str | Path = CLASSIFIER_DIR):
    """The shipped classifier in eval mode; a clear error when it has not been trained."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no shapes classifier at {directory}; train it with "
                                "`python scripts/train_shapes_classifier.py`")
    model = make_classifier()
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


def features(images: np.ndarray, model=None, batch_size: int = 256) -> np.ndarray:
    """Classifier features float64 [N, FEATURES] of images float [N,3,H,W] (or [N,H,W,3]) in [0, 1]."""
    import torch

    from .oracle import to_numpy_images

    arr = to_numpy_images(images)
    model = model or load_classifier()
    out = []
    with torch.no_grad():
        for i in range(0, len(arr), batch_size):
            out.append(model.features(torch.from_numpy(arr[i : i + batch_size])).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, FEATURES))


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (module docstring)."""
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(f1)} and {len(f2)}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(cross))


def principal_projection(ref: np.ndarray, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], components [D, k]): the top-k principal directions of reference features.

    FD is computed in these k coordinates: with a few hundred samples per set a 64-d
    covariance is poorly estimated (the FD's bias and spread grow with D / N).
    """
    mu = ref.mean(0)
    w, v = np.linalg.eigh(np.cov(ref, rowvar=False))
    return mu, v[:, np.argsort(w)[::-1][:k]]


def project(f: np.ndarray, projection: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mu, comps = projection
    return (f - mu) @ comps


def class_tv(shape_ids: np.ndarray, target: np.ndarray | None = None) -> float:
    """Total variation between the shape histogram of ``shape_ids`` and ``target`` (default uniform)."""
    counts = np.bincount(np.asarray(shape_ids, dtype=np.int64), minlength=len(SHAPES)).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    q = np.full(len(SHAPES), 1.0 / len(SHAPES)) if target is None else np.asarray(target, dtype=np.float64)
    return float(0.5 * np.abs(p - q).sum())


def geometry(images: np.ndarray, result) -> dict[str, np.ndarray]:
    """Size r [B] (from the oracle's foreground area and named shape) and centre (x, y) [B]
    (the foreground centroid) of each image; ``result = oracle.classify(images)``."""
    from .oracle import _AREA_PER_R2, foreground, smooth, to_numpy_images

    mask = foreground(smooth(to_numpy_images(images))).astype(np.float64)
    h, w = mask.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    area = np.maximum(mask.sum(axis=(1, 2)), 1e-6)
    per = np.array([_AREA_PER_R2[SHAPES[k]] for k in result.shape_ids])
    return {"size": np.sqrt(np.asarray(result.area, dtype=np.float64) / per),
            "x": (mask * xs).sum(axis=(1, 2)) / area, "y": (mask * ys).sum(axis=(1, 2)) / area}


def within_class_stats(images: np.ndarray, result) -> dict[str, dict[str, float]]:
    """Per shape class: count, mean and sd of size, x and y (see ``geometry``)."""
    geo = geometry(images, result)
    out = {}
    for k, name in enumerate(SHAPES):
        sel = (result.shape_ids == k) & ~result.empty
        rec = {"count": int(sel.sum())}
        for key, v in geo.items():
            rec[f"{key}_mean"] = float(v[sel].mean()) if sel.any() else float("nan")
            rec[f"{key}_sd"] = float(v[sel].std()) if sel.sum() > 1 else float("nan")
        out[name] = rec
    return out


def within_class_error(stats: dict, ref: dict) -> dict[str, float]:
    """Mean over shape classes of |sample - data| for size mean/sd and position sd (pixels)."""
    keys = {"size_mean": ["size_mean"], "size_sd": ["size_sd"], "position_sd": ["x_sd", "y_sd"]}
    out = {}
    for name, ks in keys.items():
        vals = [abs(stats[c][k] - ref[c][k]) for c in SHAPES for k in ks
                if np.isfinite(stats[c][k]) and np.isfinite(ref[c][k])]
        out[name] = float(np.mean(vals)) if vals else float("nan")
    return out


def write_config(directory: str | Path, record: dict) -> None:
    Path(directory, "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
