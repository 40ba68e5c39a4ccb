"""A procedural, captioned shapes world: the data behind every bundled model.

Each image is one flat-coloured shape on a black background, rendered at ``RESOLUTION``
(32x32) with ``SUPERSAMPLE``x``SUPERSAMPLE`` supersampling (box-filter antialiasing).

Attributes
    shape   one of ``SHAPES``  (circle, square, triangle, cross)
    colour  one of ``COLOURS`` (red, green, blue, yellow), each channel jittered by
            +-``COLOUR_JITTER`` around the base RGB in ``COLOUR_RGB``
    size    half-extent ``r`` uniform in ``SIZE_RANGE`` pixels
    centre  uniform over the positions that keep the whole shape inside the image

Geometry, with centre (cx, cy) and half-extent r (pixel units, y grows downwards):
    circle    (x-cx)^2 + (y-cy)^2 <= r^2
    square    |x-cx| <= 0.85 r  and  |y-cy| <= 0.85 r
    triangle  upright isosceles, vertices (cx, cy-r), (cx-r, cy+0.8r), (cx+r, cy+0.8r)
    cross     a plus sign: (|x-cx| <= r and |y-cy| <= r/3) or (|x-cx| <= r/3 and |y-cy| <= r)

Held-out combinations (``HELD_OUT``) form a Latin-square diagonal: every shape and every
colour is still seen in training, but these four pairs never are. ``sample_scenes``
excludes them by default, and every training script in ``scripts/`` uses that default,
so compositional prompts such as "a red circle" ask for something no model has seen.

Captions name all or some attributes (``CAPTION_MODES``):
    full    "a red circle"
    shape   "a circle"
    colour  "something red"
Two-part captions (``TWO_PART_MODES``, opt-in through ``caption_probs``, used only by the
``shapes-t2i-pairs`` variant) join the two single-attribute prompts the way a user writes a
joint prompt (``TWO_PART_TEMPLATES``), always for a seen pair:
    shape_and_colour      "a circle and something red"
    colour_and_shape      "something red and a circle"
    shape_that_is_colour  "a circle that is red"

Everything is deterministic given a seed or a ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

RESOLUTION: int = 32
SUPERSAMPLE: int = 4
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.80, 0.18),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
}
COLOUR_JITTER: float = 0.05
SIZE_RANGE: tuple[float, float] = (6.0, 11.0)
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)

#: (colour, shape) pairs that never appear in any training data.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "cross"),
)

CAPTION_MODES: tuple[str, ...] = ("full", "shape", "colour")

#: The joint-prompt templates a user writes to join two prompts (filled by position).
TWO_PART_TEMPLATES: dict[str, str] = {"and": "{} and {}", "that is": "{} that is {}"}
#: Caption modes that join the shape prompt and the colour prompt in one sentence.
TWO_PART_MODES: tuple[str, ...] = ("shape_and_colour", "colour_and_shape", "shape_that_is_colour")
#: Words the two-part captions add to the vocabulary.
TWO_PART_WORDS: tuple[str, ...] = ("and", "that", "is")

#: The two disjoint halves of the shape classes used by the half-data models.
SHAPE_HALVES: dict[str, tuple[str, ...]] = {
    "a": ("circle", "square"),
    "b": ("triangle", "cross"),
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image's attributes; ``rgb`` is the jittered fill colour in [0, 1]."""

    shape: str
    colour: str
    size: float
    cx: float
    cy: float
    rgb: tuple[float, float, float]


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    """Return ``rng`` itself, or a fresh ``numpy.random.Generator`` seeded with the int."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"expected a numpy.random.Generator or an int seed, got {type(rng).__name__}; "
        "pass e.g. seed=0 or rng=numpy.random.default_rng(0)"
    )


def _check_names(names: Iterable[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    if not names:
        raise ValueError(f"need at least one {what}; choose from {list(allowed)}")
    return names


def allowed_combinations(
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    exclude: Iterable[tuple[str, str]] = HELD_OUT,
) -> list[tuple[str, str]]:
    """All (colour, shape) pairs over ``colours`` x ``shapes`` minus ``exclude``."""
    shapes = _check_names(shapes, SHAPES, "shape")
    colours = _check_names(colours, COLOURS, "colour")
    excluded = set(exclude)
    combos = [(c, s) for s in shapes for c in colours if (c, s) not in excluded]
    if not combos:
        raise ValueError(
            f"every combination of shapes {list(shapes)} and colours {list(colours)} "
            "is excluded; pass exclude=() to allow held-out pairs"
        )
    return combos


def sample_scenes(
    rng: np.random.Generator | int,
    n: int,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    exclude: Iterable[tuple[str, str]] = HELD_OUT,
    combos: Sequence[tuple[str, str]] | None = None,
) -> list[Scene]:
    """Draw ``n`` scenes, uniform over the allowed (colour, shape) combinations.

    ``combos`` (a list of (colour, shape) pairs, repeats allowed) overrides the
    shapes/colours/exclude selection; use it to request e.g. only held-out pairs.
    """
    rng = as_generator(rng)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if combos is None:
        combos = allowed_combinations(shapes, colours, exclude)
    else:
        combos = [(c, s) for c, s in combos]
        _check_names([s for _, s in combos], SHAPES, "shape")
        _check_names([c for c, _ in combos], COLOURS, "colour")
    which = rng.integers(0, len(combos), size=n)
    sizes = rng.uniform(*SIZE_RANGE, size=n)
    # Keep the shape inside the image with a one-pixel margin.
    u = rng.uniform(0.0, 1.0, size=(n, 2))
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(n, 3))
    scenes = []
    for i in range(n):
        colour, shape = combos[which[i]]
        r = float(sizes[i])
        lo, hi = r + 1.0, RESOLUTION - 1.0 - r
        cx = lo + (hi - lo) * float(u[i, 0])
        cy = lo + (hi - lo) * float(u[i, 1])
        rgb = np.clip(np.asarray(COLOUR_RGB[colour]) + jitter[i], 0.0, 1.0)
        scenes.append(Scene(shape, colour, r, cx, cy, tuple(float(v) for v in rgb)))
    return scenes


def shape_masks(
    shapes: Sequence[str],
    size: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    resolution: int = RESOLUTION,
    supersample: int = SUPERSAMPLE,
    inset: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Antialiased coverage masks, float32 [N, resolution, resolution] in [0, 1].

    Pixel (i, j) covers [j, j+1] x [i, i+1]; coverage is the fraction of the
    ``supersample``^2 sub-pixel centres inside the shape (see module docstring).
    ``inset`` (pixels, scalar or [N]) moves every edge inwards by that distance (each
    half-plane of the square and triangle, each arm of the cross, the circle's radius);
    the inset shape lies inside the shape, which ``outline_masks`` relies on. 0 is the shape.
    """
    size = np.asarray(size, dtype=np.float64).reshape(-1, 1, 1)
    cx = np.asarray(cx, dtype=np.float64).reshape(-1, 1, 1)
    cy = np.asarray(cy, dtype=np.float64).reshape(-1, 1, 1)
    n = size.shape[0]
    inset_all = np.broadcast_to(np.asarray(inset, dtype=np.float64).reshape(-1, 1, 1), (n, 1, 1))
    if not (len(shapes) == n == cx.shape[0] == cy.shape[0]):
        raise ValueError("shapes, size, cx and cy must all have the same length")
    fine = resolution * supersample
    coords = (np.arange(fine) + 0.5) / supersample
    x = coords.reshape(1, 1, fine)
    y = coords.reshape(1, fine, 1)
    shapes_arr = np.asarray(shapes)
    out = np.zeros((n, fine, fine), dtype=bool)
    for name in set(shapes):
        idx = np.nonzero(shapes_arr == name)[0]
        r, X, Y = size[idx], x - cx[idx], y - cy[idx]
        w = inset_all[idx]  # every comparison below is unchanged (bit for bit) when w == 0
        if name == "circle":
            inside = X**2 + Y**2 <= (r - w) ** 2
        elif name == "square":
            inside = (np.abs(X) <= 0.85 * r - w) & (np.abs(Y) <= 0.85 * r - w)
        elif name == "triangle":
            # Base y <= 0.8 r; two sides through the apex (0, -r) and (+-r, 0.8 r):
            # the side x = +-(Y + r) * r / (1.8 r)  ->  |X| <= (Y + r) / 1.8; a side
            # moved inwards by w along its unit normal: |X| <= (Y + r - w sqrt(1 + 1.8^2)) / 1.8.
            inside = (Y <= 0.8 * r - w) & (np.abs(X) <= (Y + r - w * _TRIANGLE_SIDE_NORM) / 1.8)
        elif name == "cross":
            arm = r / 3.0
            inside = ((np.abs(X) <= r - w) & (np.abs(Y) <= arm - w)) | (
                (np.abs(X) <= arm - w) & (np.abs(Y) <= r - w)
            )
        else:
            raise ValueError(f"unknown shape {name!r}; choose from {list(SHAPES)}")
        out[idx] = inside
    cover = out.reshape(n, resolution, supersample, resolution, supersample).mean(axis=(2, 4))
    return cover.astype(np.float32)


_TRIANGLE_SIDE_NORM: float = float(np.sqrt(1.0 + 1.8**2))


def render(scenes: Sequence[Scene], resolution: int = RESOLUTION) -> np.ndarray:
    """Render scenes to float32 images [N, 3, H, W] in [0, 1] (channels first)."""
    if len(scenes) == 0:
        return np.zeros((0, 3, resolution, resolution), dtype=np.float32)
    masks = shape_masks(
        [s.shape for s in scenes],
        np.array([s.size for s in scenes]),
        np.array([s.cx for s in scenes]),
        np.array([s.cy for s in scenes]),
        resolution=resolution,
    )[:, None]
    rgb = np.array([s.rgb for s in scenes], dtype=np.float32)[:, :, None, None]
    bg = np.asarray(BACKGROUND, dtype=np.float32)[None, :, None, None]
    return (masks * rgb + (1.0 - masks) * bg).astype(np.float32)


def caption(colour: str | None, shape: str | None) -> str:
    """The caption naming the given attributes; ``None`` leaves that attribute out.

    ``caption("red", "circle") == "a red circle"``, ``caption(None, "circle") ==
    "a circle"``, ``caption("red", None) == "something red"``, ``caption(None, None) == ""``.
    """
    if colour is not None:
        _check_names([colour], COLOURS, "colour")
    if shape is not None:
        _check_names([shape], SHAPES, "shape")
    if colour and shape:
        return f"a {colour} {shape}"
    if shape:
        return f"a {shape}"
    if colour:
        return f"something {colour}"
    return ""


def two_part_caption(colour: str, shape: str, mode: str) -> str:
    """A joint prompt naming both attributes in two parts (one of ``TWO_PART_MODES``).

    ``two_part_caption("red", "circle", "shape_and_colour") == "a circle and something red"``,
    ``"colour_and_shape"`` -> ``"something red and a circle"``,
    ``"shape_that_is_colour"`` -> ``"a circle that is red"``.
    """
    _check_names([colour], COLOURS, "colour")
    _check_names([shape], SHAPES, "shape")
    if mode == "shape_and_colour":
        return TWO_PART_TEMPLATES["and"].format(caption(None, shape), caption(colour, None))
    if mode == "colour_and_shape":
        return TWO_PART_TEMPLATES["and"].format(caption(colour, None), caption(None, shape))
    if mode == "shape_that_is_colour":
        return TWO_PART_TEMPLATES["that is"].format(caption(None, shape), colour)
    raise ValueError(f"unknown two-part caption mode {mode!r}; choose from {list(TWO_PART_MODES)}")


def scene_caption(scene: Scene, mode: str) -> str:
    """Caption ``scene`` in one of ``CAPTION_MODES`` or ``TWO_PART_MODES``."""
    if mode == "full":
        return caption(scene.colour, scene.shape)
    if mode == "shape":
        return caption(None, scene.shape)
    if mode == "colour":
        return caption(scene.colour, None)
    if mode in TWO_PART_MODES:
        return two_part_caption(scene.colour, scene.shape, mode)
    raise ValueError(f"unknown caption mode {mode!r}; choose from {list(CAPTION_MODES + TWO_PART_MODES)}")


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """Inverse of ``caption``: the (colour, shape) a caption names, ``None`` if absent."""
    words = text.lower().replace(",", " ").split()
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    if len(colours) > 1 or len(shapes) > 1:
        raise ValueError(f"caption {text!r} names more than one colour or shape")
    return (colours[0] if colours else None, shapes[0] if shapes else None)


def vocabulary(two_part: bool = False) -> list[str]:
    """Every word any caption can contain, in a fixed order (used to build the tokenizer).

    ``two_part=True`` adds the joining words of ``TWO_PART_MODES`` ("and", "that", "is");
    the default is the vocabulary of the bundled ``shapes-t2i`` tokenizer.
    """
    return ["a", "something", *SHAPES, *COLOURS, *(TWO_PART_WORDS if two_part else ())]


@dataclasses.dataclass
class Dataset:
    """A batch of rendered scenes: images float32 [N,3,H,W] in [0,1], labels, captions."""

    images: np.ndarray
    shape_ids: np.ndarray
    colour_ids: np.ndarray
    captions: list[str]
    scenes: list[Scene]


def make_dataset(
    rng: np.random.Generator | int,
    n: int,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    exclude: Iterable[tuple[str, str]] = HELD_OUT,
    caption_probs: dict[str, float] | None = None,
) -> Dataset:
    """Sample, render and caption ``n`` scenes.

    ``caption_probs`` maps caption modes (``CAPTION_MODES`` or ``TWO_PART_MODES``) to
    probabilities (default: full 0.6, shape 0.2, colour 0.2). Labels index ``SHAPES`` and
    ``COLOURS``.
    """
    rng = as_generator(rng)
    probs = caption_probs or {"full": 0.6, "shape": 0.2, "colour": 0.2}
    modes = list(probs)
    for m in modes:
        if m not in CAPTION_MODES + TWO_PART_MODES:
            raise ValueError(f"unknown caption mode {m!r}; choose from {list(CAPTION_MODES + TWO_PART_MODES)}")
    p = np.asarray([probs[m] for m in modes], dtype=np.float64)
    if np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"caption_probs must be non-negative and not all zero, got {probs}")
    scenes = sample_scenes(rng, n, shapes, colours, exclude)
    mode_ids = rng.choice(len(modes), size=n, p=p / p.sum())
    return Dataset(
        images=render(scenes),
        shape_ids=np.array([SHAPES.index(s.shape) for s in scenes], dtype=np.int64),
        colour_ids=np.array([COLOURS.index(s.colour) for s in scenes], dtype=np.int64),
        captions=[scene_caption(s, modes[k]) for s, k in zip(scenes, mode_ids)],
        scenes=scenes,
    )


# --------------------------------------------------------------------------------------
# Concepts no bundled base model has seen: the bundled LoRAs teach them (issue 12).
# They extend the world without changing any render, caption or label above.
# --------------------------------------------------------------------------------------

#: Colours outside ``COLOURS``: no base model's training data contains them.
EXTRA_COLOUR_RGB: dict[str, tuple[float, float, float]] = {"orange": (0.95, 0.50, 0.10)}
#: Every colour the world can render: the base palette, then the extra colours.
ALL_COLOURS: tuple[str, ...] = (*COLOURS, *EXTRA_COLOUR_RGB)
#: Rendering styles. "filled" is every base model's data; "outline" (a hollow shape: the
#: shape minus the shape inset by ``OUTLINE_WIDTH * r``) is new.
STYLES: tuple[str, ...] = ("filled", "outline")
#: Stroke width of the outline style, as a fraction of the half-extent r.
OUTLINE_WIDTH: float = 0.3
#: Shapes the outline style is defined for: a cross's arms (half-width r/3) are too thin at
#: 32x32 to keep a visible hole inside a stroke.
OUTLINE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


def colour_rgb(colour: str) -> tuple[float, float, float]:
    """Base RGB of any colour in ``ALL_COLOURS``."""
    _check_names([colour], ALL_COLOURS, "colour")
    return COLOUR_RGB[colour] if colour in COLOUR_RGB else EXTRA_COLOUR_RGB[colour]


def sample_concept_scenes(
    rng: np.random.Generator | int,
    n: int,
    colours: Sequence[str] = ALL_COLOURS,
    shapes: Sequence[str] = SHAPES,
) -> list[Scene]:
    """``n`` scenes uniform over ``colours`` x ``shapes`` (any of ``ALL_COLOURS``, nothing
    held out), with the size, position and colour jitter of ``sample_scenes``."""
    colours = _check_names(colours, ALL_COLOURS, "colour")
    shapes = _check_names(shapes, SHAPES, "shape")
    rng = as_generator(rng)
    # Draw with the base palette's machinery, then recolour: same geometry law.
    base = sample_scenes(rng, n, combos=[("red", s) for s in shapes])
    which = rng.integers(0, len(colours), size=n)
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(n, 3))
    out = []
    for i, sc in enumerate(base):
        colour = colours[which[i]]
        rgb = np.clip(np.asarray(colour_rgb(colour)) + jitter[i], 0.0, 1.0)
        out.append(dataclasses.replace(sc, colour=colour, rgb=tuple(float(v) for v in rgb)))
    return out


def outline_masks(shapes: Sequence[str], size: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                  resolution: int = RESOLUTION) -> np.ndarray:
    """Coverage [N, H, W] of the outline style: shape(r) minus shape(r) inset by
    ``OUTLINE_WIDTH * r``. The inset shape lies inside the shape, so per sub-pixel the
    difference of the two coverages is exactly the coverage of the stroke."""
    size = np.asarray(size, dtype=np.float64)
    full = shape_masks(shapes, size, cx, cy, resolution=resolution)
    hole = shape_masks(shapes, size, cx, cy, resolution=resolution, inset=OUTLINE_WIDTH * size)
    return full - hole


def render_styled(scenes: Sequence[Scene], style: str = "filled", resolution: int = RESOLUTION) -> np.ndarray:
    """``render`` in one of ``STYLES``; scenes may use any colour of ``ALL_COLOURS``."""
    _check_names([style], STYLES, "style")
    if style == "filled" or len(scenes) == 0:
        return render(scenes, resolution)
    _check_names([s.shape for s in scenes], OUTLINE_SHAPES, "shape for the outline style")
    masks = outline_masks([s.shape for s in scenes], np.array([s.size for s in scenes]),
                          np.array([s.cx for s in scenes]), np.array([s.cy for s in scenes]),
                          resolution=resolution)[:, None]
    rgb = np.array([s.rgb for s in scenes], dtype=np.float32)[:, :, None, None]
    bg = np.asarray(BACKGROUND, dtype=np.float32)[None, :, None, None]
    return (masks * rgb + (1.0 - masks) * bg).astype(np.float32)
