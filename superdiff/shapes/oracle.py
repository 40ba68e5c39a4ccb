"""Analytic attribute oracle for the shapes world: per-attribute probabilities per image.

Input: a batch of RGB images, by default float in [0, 1] (pass ``value_range=(-1, 1)``
for [-1, 1]; uint8 arrays are divided by 255). Accepted layouts: torch or numpy
[B, 3, H, W] or [B, H, W, 3], a single image, or a list of PIL images.

Foreground. Images are first smoothed with a Gaussian of std ``SMOOTH`` pixels (this
suppresses per-pixel noise). The background is black, so the soft foreground mask is
    m = clip((max_c x_c - LOW) / (HIGH - LOW), 0, 1).

Colour. The mask-weighted (weights m^2) mean colour is divided by its largest channel
(brightness invariance) and compared with each palette colour, normalised the same way:
    p(colour = k) = softmax_k( -||rgb_hat - palette_hat_k||^2 / COLOUR_TEMPERATURE ).

Shape. Blur and small noise preserve a mask's mass and centroid, so for every shape
hypothesis k the oracle solves for the (centre, half-extent) that give the observed area
and centroid (exact formulas for each geometry in ``world``), renders that template at
scales ``SCALES`` around the fit, smooths it like the image, and keeps the best soft IoU
    IoU_k = sum(min(m, t_k)) / sum(max(m, t_k)),
    p(shape = k) = softmax_k( IoU_k / SHAPE_TEMPERATURE ).
``fit`` (the best IoU) says how shape-like the image is at all: clean renders score
about 0.85-0.95, empty or smeared images score low.

Clean. The argmax always names one of the four shapes, also for in-between shapes (a
circle morphed halfway into a plus sign, squircles, four-lobed blobs). ``clean_fit`` compares
the image with the named shape's template passed through the same foreground transform
as the image (brightness b = 99th percentile of the max channel, the template's coverage T
fitted to the area and centroid of the coverage max_c x_c / b near the mask, at scales
``CLEAN_SCALES`` and template blurs ``CLEAN_BLURS``):
    clean_fit = max_{s, sigma} IoU(m, clip((b * smooth_sigma(T_s) - LOW) / (HIGH - LOW), 0, 1)),
about 0.98-1.0 on clean renders. ``clean = clean_fit >= CLEAN_FIT``; the threshold is
chosen on renders morphed between two shapes (``superdiff.shapes.morph``), never on
model samples.

It is exact on renderer output (see tests) and robust to the blur and noise of model
samples; it is the single source of truth for every image-content benchmark and test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .world import ALL_COLOURS, COLOURS, RESOLUTION, SHAPES, STYLES, colour_rgb, shape_masks

SMOOTH: float = 0.7
LOW: float = 0.25
HIGH: float = 0.65
COLOUR_TEMPERATURE: float = 0.02
SHAPE_TEMPERATURE: float = 0.02
SCALES: tuple[float, ...] = (0.85, 0.92, 1.0, 1.08, 1.15)
#: Minimum foreground area (pixels) below which an image is reported as empty.
MIN_AREA: float = 4.0
CLEAN_SCALES: tuple[float, ...] = (0.94, 0.97, 1.0, 1.03, 1.06)
#: Template blurs tried for clean_fit: the oracle's own smoothing, and with the image
#: itself blurred by 0.7 px or 1 px (sqrt(SMOOTH^2 + s^2)).
CLEAN_BLURS: tuple[float, ...] = (SMOOTH, float(np.hypot(SMOOTH, 0.7)), float(np.hypot(SMOOTH, 1.0)))
#: clean_fit threshold: ``morph.calibrate_clean_threshold()`` (seed 0; tests recompute it).
CLEAN_FIT: float = 0.958

# Area of each shape as a multiple of r^2 and the centroid's offset below the centre
# (in units of r), from the geometry in world.py.
_AREA_PER_R2: dict[str, float] = {
    "circle": float(np.pi),
    "square": 1.7**2,
    "triangle": 1.8,  # base 2r, height 1.8r
    "cross": 2 * (2.0 * 2.0 / 3.0) - (2.0 / 3.0) ** 2,
}
_CENTROID_DY: dict[str, float] = {
    "circle": 0.0,
    "square": 0.0,
    "triangle": 0.2,  # mean of the vertices' y: (-1 + 0.8 + 0.8) / 3
    "cross": 0.0,
}


@dataclasses.dataclass
class OracleResult:
    """Per-image oracle output (numpy arrays with leading batch dimension B).

    shape_probs [B, len(SHAPES)], colour_probs [B, len(COLOURS)]: probabilities;
    shape, colour: argmax names; fit [B]: best template IoU; area [B]: foreground pixels;
    empty [B]: area below ``MIN_AREA`` (then the argmaxes are meaningless);
    clean_fit [B]: the named shape's sharp template IoU; clean [B]: ``clean_fit >= CLEAN_FIT``
    and not empty (the image is that shape, not an in-between one).
    """

    shape_probs: np.ndarray
    colour_probs: np.ndarray
    fit: np.ndarray
    area: np.ndarray
    clean_fit: np.ndarray | None = None

    @property
    def shape_ids(self) -> np.ndarray:
        return self.shape_probs.argmax(axis=1)

    @property
    def colour_ids(self) -> np.ndarray:
        return self.colour_probs.argmax(axis=1)

    @property
    def shape(self) -> list[str]:
        return [SHAPES[i] for i in self.shape_ids]

    @property
    def colour(self) -> list[str]:
        return [COLOURS[i] for i in self.colour_ids]

    @property
    def empty(self) -> np.ndarray:
        return self.area < MIN_AREA

    @property
    def clean(self) -> np.ndarray:
        if self.clean_fit is None:
            raise ValueError("this OracleResult has no clean_fit; build it with oracle.classify")
        return ~self.empty & (self.clean_fit >= CLEAN_FIT)

    def matches(self, colour: str | None = None, shape: str | None = None, clean: bool = False) -> np.ndarray:
        """Boolean [B]: non-empty and the argmax attributes equal the requested ones.

        ``clean=True`` also requires a clean shape (the headline "right and clean" figure).
        """
        ok = ~self.empty
        if clean:
            ok &= self.clean
        if colour is not None:
            ok &= self.colour_ids == COLOURS.index(colour)
        if shape is not None:
            ok &= self.shape_ids == SHAPES.index(shape)
        return ok


def to_numpy_images(images: Any, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Convert supported image batches to float32 numpy [B, 3, H, W] in [0, 1]."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            return np.zeros((0, 3, RESOLUTION, RESOLUTION), dtype=np.float32)
        if hasattr(images[0], "convert"):  # PIL images
            arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
            return arr.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        images = np.stack([np.asarray(_as_array(im)) for im in images])
    arr = _as_array(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"expected images of shape [B,3,H,W] or [B,H,W,3], got {arr.shape}")
    if arr.shape[1] != 3 and arr.shape[-1] == 3:
        arr = arr.transpose(0, 3, 1, 2)
    if arr.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels (RGB), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    lo, hi = value_range
    if hi <= lo:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    return ((arr.astype(np.float32) - lo) / (hi - lo)).clip(0.0, 1.0)


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        # keep uint8 as uint8 so that to_numpy_images divides it by 255, as for numpy
        return x.numpy() if str(x.dtype) == "torch.uint8" else x.float().numpy()
    if hasattr(x, "convert"):
        return np.asarray(x.convert("RGB"))
    return np.asarray(x)


def smooth(x: np.ndarray, sigma: float = SMOOTH) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (zero padding = black background)."""
    if sigma <= 0:
        return x
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    pad = [(0, 0)] * (x.ndim - 2)
    h, w = x.shape[-2:]
    y = np.pad(x, pad + [(radius, radius), (0, 0)])
    y = sum(taps[i] * y[..., i : i + h, :] for i in range(len(taps)))
    y = np.pad(y, pad + [(0, 0), (radius, radius)])
    return sum(taps[i] * y[..., :, i : i + w] for i in range(len(taps))).astype(np.float32)


def foreground(images: np.ndarray) -> np.ndarray:
    """Soft foreground mask [B, H, W] of (already smoothed) images [B, 3, H, W] in [0, 1]."""
    return np.clip((images.max(axis=1) - LOW) / (HIGH - LOW), 0.0, 1.0)


def colour_probabilities(images: np.ndarray, mask: np.ndarray, colours: Sequence[str] = COLOURS) -> np.ndarray:
    """p(colour) [B, len(colours)] from the mask-weighted, brightness-normalised colour
    (``colours``: the base palette, or e.g. ``world.ALL_COLOURS`` for ``concepts``)."""
    w = mask**2
    total = w.sum(axis=(1, 2))
    mean = (images * w[:, None]).sum(axis=(2, 3)) / np.maximum(total, 1e-6)[:, None]
    mean = mean / np.maximum(mean.max(axis=1, keepdims=True), 1e-6)
    palette = np.array([colour_rgb(c) for c in colours], dtype=np.float32)
    palette = palette / palette.max(axis=1, keepdims=True)
    d2 = ((mean[:, None, :] - palette[None]) ** 2).sum(axis=-1)
    return _softmax(-d2 / COLOUR_TEMPERATURE)


def shape_scores(mask: np.ndarray) -> np.ndarray:
    """Best soft IoU [B, len(SHAPES)] of each shape template fitted by area and centroid."""
    b, h, w = mask.shape
    area = mask.sum(axis=(1, 2))
    safe = np.maximum(area, 1e-6)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mx = (mask * xs).sum(axis=(1, 2)) / safe
    my = (mask * ys).sum(axis=(1, 2)) / safe
    scores = np.zeros((b, len(SHAPES)), dtype=np.float32)
    for k, name in enumerate(SHAPES):
        r0 = np.sqrt(safe / _AREA_PER_R2[name])
        best = np.zeros(b, dtype=np.float32)
        for s in SCALES:
            r = r0 * s
            cy = my - _CENTROID_DY[name] * r
            t = smooth(shape_masks([name] * b, r, mx, cy, resolution=h))
            inter = np.minimum(mask, t).sum(axis=(1, 2))
            union = np.maximum(mask, t).sum(axis=(1, 2))
            best = np.maximum(best, inter / np.maximum(union, 1e-6))
        scores[:, k] = best
    return scores


def clean_fits(images: np.ndarray, smoothed: np.ndarray, mask: np.ndarray, shape_ids: np.ndarray) -> np.ndarray:
    """``clean_fit`` [B] of each image against its named shape (see module docstring).

    images: raw [B,3,H,W] in [0,1]; smoothed, mask: ``smooth(images)`` and its foreground.
    """
    b, h, w = mask.shape
    if b == 0:
        return np.zeros(0, np.float32)
    bright = np.maximum(np.percentile(smoothed.max(axis=1).reshape(b, -1), 99, axis=1), 1e-3)
    # Coverage (blur keeps its mass and centroid) near the foreground only, so that
    # background noise (biased upwards by clipping at 0) does not add area.
    near = smooth((mask > 0).astype(np.float32), 1.5) > 0.01
    cover_img = np.clip(smoothed.max(axis=1) / bright[:, None, None], 0.0, 1.0) * near
    coverage = np.maximum(cover_img.sum(axis=(1, 2)), 1e-6)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mx = (cover_img * xs).sum(axis=(1, 2)) / coverage
    my = (cover_img * ys).sum(axis=(1, 2)) / coverage
    names = [SHAPES[k] for k in shape_ids]
    r0 = np.sqrt(coverage / np.array([_AREA_PER_R2[n] for n in names]))
    dy = np.array([_CENTROID_DY[n] for n in names])
    best = np.zeros(b, dtype=np.float32)
    for s in CLEAN_SCALES:
        r = r0 * s
        cover = shape_masks(names, r, mx, my - dy * r, resolution=h)
        for sigma in CLEAN_BLURS:
            t = np.clip((bright[:, None, None] * smooth(cover, sigma) - LOW) / (HIGH - LOW), 0.0, 1.0)
            inter = np.minimum(mask, t).sum(axis=(1, 2))
            union = np.maximum(mask, t).sum(axis=(1, 2))
            best = np.maximum(best, inter / np.maximum(union, 1e-6))
    return best


def classify(
    images: Any, value_range: tuple[float, float] = (0.0, 1.0), batch_size: int = 256
) -> OracleResult:
    """Run the oracle on a batch of images (see module docstring for accepted inputs)."""
    arr = to_numpy_images(images, value_range)
    if arr.shape[2] != arr.shape[3]:
        raise ValueError(f"expected square images, got {arr.shape[2]}x{arr.shape[3]}")
    parts = []
    for i in range(0, max(arr.shape[0], 1), batch_size):
        raw = arr[i : i + batch_size]
        chunk = smooth(raw)
        mask = foreground(chunk)
        scores = shape_scores(mask)
        probs = _softmax(scores / SHAPE_TEMPERATURE)
        parts.append(
            (
                probs,
                colour_probabilities(chunk, mask),
                scores.max(axis=1) if len(chunk) else np.zeros(0, np.float32),
                mask.sum(axis=(1, 2)),
                clean_fits(raw, chunk, mask, probs.argmax(axis=1)),
            )
        )
    cat = [np.concatenate([p[j] for p in parts]) for j in range(5)]
    return OracleResult(shape_probs=cat[0], colour_probs=cat[1], fit=cat[2], area=cat[3], clean_fit=cat[4])


def accuracy(
    result: OracleResult, shape_ids: Sequence[int], colour_ids: Sequence[int]
) -> dict[str, float]:
    """Shape, colour and joint accuracy of ``result`` against integer labels."""
    s = result.shape_ids == np.asarray(shape_ids)
    c = result.colour_ids == np.asarray(colour_ids)
    return {"shape": float(s.mean()), "colour": float(c.mean()), "joint": float((s & c).mean())}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------
# Concept labels: the colours and styles outside the base models' data (world.ALL_COLOURS,
# world.STYLES), the attributes the bundled LoRAs teach. ``classify`` is unchanged.
# --------------------------------------------------------------------------------------

#: Hollowness at or above which an image is an outline (clean renders: filled <= 0.12,
#: outlined circles, squares and triangles >= 0.22; see ``hollowness``).
HOLLOW_MIN: float = 0.17


def fill_holes(fg: np.ndarray) -> np.ndarray:
    """Boolean [B, H, W]: ``fg`` plus every background pixel the image border cannot reach
    through background pixels (4-connected flood fill from the border)."""
    bg = ~fg
    out = np.zeros_like(bg)
    out[:, 0, :], out[:, -1, :] = bg[:, 0, :], bg[:, -1, :]
    out[:, :, 0] |= bg[:, :, 0]
    out[:, :, -1] |= bg[:, :, -1]
    while True:
        grow = out.copy()
        grow[:, 1:] |= out[:, :-1]
        grow[:, :-1] |= out[:, 1:]
        grow[:, :, 1:] |= out[:, :, :-1]
        grow[:, :, :-1] |= out[:, :, 1:]
        grow &= bg
        if np.array_equal(grow, out):
            return ~out
        out = grow


def hollowness(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hollowness [B], the mask with its holes set to 1 [B, H, W]) of soft foreground masks.

    F = fill_holes(m > 1/2) is the shape with its holes filled;
        hollowness = sum_F (1 - m) / |F|,
    the share of the filled shape that is background: about 0 for filled shapes, the hole's
    share of the shape for outlines.
    """
    filled = fill_holes(mask > 0.5)
    size = filled.sum(axis=(1, 2))
    hollow = ((1.0 - mask) * filled).sum(axis=(1, 2)) / np.maximum(size, 1)
    holes = filled & (mask <= 0.5)
    return hollow.astype(np.float32), np.where(holes, np.float32(1.0), mask).astype(np.float32)


@dataclasses.dataclass
class ConceptResult:
    """Per-image concept labels (numpy arrays with leading batch dimension B).

    colour_probs [B, len(ALL_COLOURS)]: ``colour_probabilities`` over the base and extra
    colours; hollowness [B] and style ("outline" when hollowness >= ``HOLLOW_MIN``, else
    "filled"); shape_probs [B, len(SHAPES)]: ``shape_scores`` of the hole-filled mask (so an
    outlined circle is a circle); area [B]: foreground pixels.
    """

    colour_probs: np.ndarray
    hollowness: np.ndarray
    shape_probs: np.ndarray
    area: np.ndarray

    @property
    def empty(self) -> np.ndarray:
        return self.area < MIN_AREA

    @property
    def colour(self) -> list[str]:
        return [ALL_COLOURS[i] for i in self.colour_probs.argmax(axis=1)]

    @property
    def style(self) -> list[str]:
        return [STYLES[int(h >= HOLLOW_MIN)] for h in self.hollowness]

    @property
    def shape(self) -> list[str]:
        return [SHAPES[i] for i in self.shape_probs.argmax(axis=1)]

    def has(self, colour: str | None = None, style: str | None = None, shape: str | None = None) -> np.ndarray:
        """Boolean [B]: non-empty and every requested attribute equals the image's."""
        ok = ~self.empty
        for want, got in ((colour, self.colour), (style, self.style), (shape, self.shape)):
            if want is not None:
                ok &= np.array([g == want for g in got], dtype=bool)
        return ok


def concepts(images: Any, value_range: tuple[float, float] = (0.0, 1.0)) -> ConceptResult:
    """Colour (over ``world.ALL_COLOURS``), style and shape of a batch of images (the inputs
    ``classify`` accepts)."""
    arr = to_numpy_images(images, value_range)
    chunk = smooth(arr)
    mask = foreground(chunk)
    hollow, filled = hollowness(mask)
    return ConceptResult(
        colour_probs=colour_probabilities(chunk, mask, ALL_COLOURS),
        hollowness=hollow,
        shape_probs=_softmax(shape_scores(filled) / SHAPE_TEMPERATURE),
        area=mask.sum(axis=(1, 2)),
    )
