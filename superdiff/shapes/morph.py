"""Shapes morphed between two shape classes: the validation set of the oracle's clean flag.

A shape's signed-distance-like field d_k(x, y) is negative inside and positive outside
(centre (cx, cy), half-extent r, the geometry of ``world``):

    circle    d = sqrt(X^2 + Y^2) - r
    square    d = max(|X|, |Y|) - 0.85 r
    triangle  d = max(Y - 0.8 r, |X| - (Y + r) / 1.8)
    cross     d = min(max(|X| - r, |Y| - r/3), max(|X| - r/3, |Y| - r))

so d_k <= 0 is exactly the shape of ``world.shape_masks``. The morph of shapes A and B at
weight w in [0, 1] is the region

    (1 - w) d_A + w d_B <= 0,

antialiased like ``world.render`` (fraction of SUPERSAMPLE^2 sub-pixel centres inside). w = 0
and w = 1 give the clean renders; in between are the shapes the oracle must call unclean:
circle -> square gives squircles, circle -> cross four-lobed blobs, square -> cross a
pinched square, and so on.

``calibrate_clean_threshold`` picks the oracle's ``CLEAN_FIT`` threshold on these morphs
(seeded; clean = w <= ``CLEAN_W`` or w >= 1 - ``CLEAN_W``, in-between = |w - 0.5| <=
``MIXED_HALF_WIDTH``), each rendered sharp and with the damage model samples show
(Gaussian blur of std ``DAMAGE_BLUR`` px plus pixel noise of std ``DAMAGE_NOISE``, as in
``scripts/eval_bundled.py``): the ``clean_fit`` value that maximises balanced accuracy.
"""

from __future__ import annotations

import itertools

import numpy as np

from .world import COLOUR_JITTER, COLOUR_RGB, COLOURS, RESOLUTION, SHAPES, SIZE_RANGE, SUPERSAMPLE, as_generator

#: Morph weights counted as clean (w <= CLEAN_W or w >= 1 - CLEAN_W) when calibrating.
CLEAN_W: float = 0.05
#: Morph weights counted as in-between (|w - 0.5| <= MIXED_HALF_WIDTH) when calibrating.
MIXED_HALF_WIDTH: float = 0.2
DAMAGE_BLUR: float = 0.7
DAMAGE_NOISE: float = 0.05


def shape_field(name: str, X: np.ndarray, Y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The signed-distance-like field d_k of shape ``name`` (see module docstring)."""
    if name == "circle":
        return np.sqrt(X**2 + Y**2) - r
    if name == "square":
        return np.maximum(np.abs(X), np.abs(Y)) - 0.85 * r
    if name == "triangle":
        return np.maximum(Y - 0.8 * r, np.abs(X) - (Y + r) / 1.8)
    if name == "cross":
        arm = r / 3.0
        return np.minimum(np.maximum(np.abs(X) - r, np.abs(Y) - arm), np.maximum(np.abs(X) - arm, np.abs(Y) - r))
    raise ValueError(f"unknown shape {name!r}; choose from {list(SHAPES)}")


def morph_masks(
    a: str,
    b: str,
    w: np.ndarray,
    size: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    resolution: int = RESOLUTION,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Antialiased coverage [N, H, W] of the morphs (1 - w) d_a + w d_b <= 0."""
    w, size, cx, cy = (np.asarray(v, dtype=np.float64).reshape(-1, 1, 1) for v in (w, size, cx, cy))
    fine = resolution * supersample
    coords = (np.arange(fine) + 0.5) / supersample
    X = coords.reshape(1, 1, fine) - cx
    Y = coords.reshape(1, fine, 1) - cy
    field = (1.0 - w) * shape_field(a, X, Y, size) + w * shape_field(b, X, Y, size)
    inside = field <= 0.0
    n = inside.shape[0]
    return inside.reshape(n, resolution, supersample, resolution, supersample).mean(axis=(2, 4)).astype(np.float32)


def morph_images(
    rng: np.random.Generator | int, n_per_pair: int, weights: np.ndarray
) -> tuple[np.ndarray, list[dict]]:
    """Rendered morphs for every unordered shape pair and every weight: images [M,3,H,W], labels.

    Size, position (inside the image) and colour are drawn as in ``world.sample_scenes``.
    """
    rng = as_generator(rng)
    images, labels = [], []
    for a, b in itertools.combinations(SHAPES, 2):
        for w in weights:
            n = n_per_pair
            r = rng.uniform(*SIZE_RANGE, size=n)
            u = rng.uniform(0.0, 1.0, size=(n, 2))
            lo, hi = r + 1.0, RESOLUTION - 1.0 - r
            cx, cy = lo + (hi - lo) * u[:, 0], lo + (hi - lo) * u[:, 1]
            colours = rng.integers(0, len(COLOURS), size=n)
            rgb = np.array([COLOUR_RGB[COLOURS[k]] for k in colours]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (n, 3))
            m = morph_masks(a, b, np.full(n, w), r, cx, cy)[:, None]
            images.append((m * np.clip(rgb, 0, 1)[:, :, None, None]).astype(np.float32))
            labels += [{"a": a, "b": b, "w": float(w)} for _ in range(n)]
    return np.concatenate(images), labels


def calibrate_clean_threshold(
    seed: int = 0, n_per_pair: int = 24, weights: tuple[float, ...] = tuple(np.linspace(0.0, 1.0, 11))
) -> dict:
    """Choose the oracle's clean threshold on morphs (see module docstring); returns the record.

    The threshold is the midpoint between two consecutive sorted ``fit`` values that
    maximises balanced accuracy of ``fit >= threshold`` for clean vs in-between morphs.
    """
    from . import oracle

    rng = np.random.default_rng([seed, 1])
    images, labels = morph_images(rng, n_per_pair, np.asarray(weights))
    damaged = np.clip(oracle.smooth(images, DAMAGE_BLUR) + rng.normal(0.0, DAMAGE_NOISE, images.shape), 0.0, 1.0)
    fit = oracle.classify(np.concatenate([images, damaged.astype(np.float32)])).clean_fit
    w = np.tile([lab["w"] for lab in labels], 2)
    clean = (w <= CLEAN_W + 1e-9) | (w >= 1.0 - CLEAN_W - 1e-9)
    mixed = np.abs(w - 0.5) <= MIXED_HALF_WIDTH + 1e-9
    keep = clean | mixed
    f, y = fit[keep], clean[keep]
    order = np.sort(np.unique(f))
    cands = (order[1:] + order[:-1]) / 2.0
    best, best_ba = float(cands[0]), -1.0
    for t in cands:
        ba = 0.5 * (float((f[y] >= t).mean()) + float((f[~y] < t).mean()))
        if ba > best_ba:
            best, best_ba = float(t), ba
    return {
        "threshold": best,
        "balanced_accuracy": best_ba,
        "clean_kept": float((f[y] >= best).mean()),
        "in_between_rejected": float((f[~y] < best).mean()),
        "images": int(keep.sum()),
        "seed": seed,
        "clean_w": CLEAN_W,
        "mixed_half_width": MIXED_HALF_WIDTH,
        "fit_by_w": {f"{x:.1f}": float(np.median(fit[np.isclose(w, x)])) for x in weights},
    }
