"""Concepts outside the base models' data (the bundled LoRAs' concepts): an extra colour and
the outline style, rendered by the world and labelled exactly by the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from superdiff.shapes import oracle, world


def test_extra_colours_and_styles_extend_the_world_without_changing_it():
    assert world.ALL_COLOURS[: len(world.COLOURS)] == world.COLOURS
    assert set(world.EXTRA_COLOUR_RGB).isdisjoint(world.COLOURS)
    # The bundled tokenizer's vocabulary and every caption stay as they were.
    assert not set(world.EXTRA_COLOUR_RGB) & set(world.vocabulary())
    # inset=0 is the shape itself, bit for bit.
    rng = np.random.default_rng(3)
    r, cx, cy = rng.uniform(6, 11, 12), rng.uniform(12, 20, 12), rng.uniform(12, 20, 12)
    names = [world.SHAPES[i % 4] for i in range(12)]
    np.testing.assert_array_equal(world.shape_masks(names, r, cx, cy), world.shape_masks(names, r, cx, cy, inset=0.0))


def test_concept_scenes_are_seeded_and_cover_the_requested_colours():
    a = world.sample_concept_scenes(4, 400)
    assert a == world.sample_concept_scenes(np.random.default_rng(4), 400)
    assert {s.colour for s in a} == set(world.ALL_COLOURS) and {s.shape for s in a} == set(world.SHAPES)
    orange = world.sample_concept_scenes(5, 50, colours=("orange",))
    base = np.asarray(world.EXTRA_COLOUR_RGB["orange"])
    assert all(np.abs(np.asarray(s.rgb) - base).max() <= world.COLOUR_JITTER + 1e-9 for s in orange)
    with pytest.raises(ValueError, match="purple"):
        world.sample_concept_scenes(0, 3, colours=("purple",))


@pytest.mark.parametrize("shape", world.OUTLINE_SHAPES)
def test_outline_is_the_shape_minus_its_inset(shape):
    r = np.full(6, 9.0)
    c = np.linspace(13.0, 19.0, 6)
    full = world.shape_masks([shape] * 6, r, c, c[::-1])
    stroke = world.outline_masks([shape] * 6, r, c, c[::-1])
    hole = full - stroke
    assert stroke.min() >= 0 and hole.min() >= 0  # the inset lies inside the shape
    w = world.OUTLINE_WIDTH * 9.0
    if shape == "circle":  # exact annulus area pi (r^2 - (r - w)^2)
        np.testing.assert_allclose(stroke.sum(axis=(1, 2)), np.pi * (81.0 - (9.0 - w) ** 2), rtol=0.03)
    if shape == "square":  # (1.7 r)^2 - (1.7 r - 2 w)^2 (axis-aligned edges: 1/8-px sampling error)
        np.testing.assert_allclose(stroke.sum(axis=(1, 2)), 15.3**2 - (15.3 - 2 * w) ** 2, rtol=0.05)
    with pytest.raises(ValueError, match="outline"):
        world.render_styled([world.Scene("cross", "red", 8.0, 16.0, 16.0, (0.9, 0.1, 0.1))], "outline")


def test_concept_oracle_labels_renders_exactly():
    scenes = world.sample_concept_scenes(11, 300, shapes=world.OUTLINE_SHAPES)
    for style in world.STYLES:
        res = oracle.concepts(world.render_styled(scenes, style))
        assert res.colour == [s.colour for s in scenes]
        assert res.style == [style] * len(scenes)
        assert res.shape == [s.shape for s in scenes]
        assert res.has(style=style).all()
    # Filled crosses and every base-palette render: filled, never an extra colour.
    data = world.make_dataset(12, 200, exclude=())
    res = oracle.concepts(data.images)
    assert set(res.style) == {"filled"}
    assert res.colour == [world.COLOURS[i] for i in data.colour_ids]
    # ... and the base oracle (classify) agrees with the concept oracle on base renders.
    assert oracle.classify(data.images).shape == res.shape


def test_concept_oracle_is_robust_to_blur_and_noise():
    rng = np.random.default_rng(8)
    scenes = world.sample_concept_scenes(rng, 300, shapes=world.OUTLINE_SHAPES)
    for style in world.STYLES:
        img = world.render_styled(scenes, style)
        damaged = np.clip(oracle.smooth(img, 1.0) + rng.normal(0, 0.1, img.shape), 0, 1)
        res = oracle.concepts(damaged)
        assert np.mean([c == s.colour for c, s in zip(res.colour, scenes)]) >= 0.98
        assert np.mean([s == style for s in res.style]) >= 0.97
    empty = oracle.concepts(np.zeros((2, 3, 32, 32), np.float32))
    assert empty.empty.all() and not empty.has(style="filled").any()


def test_fill_holes_fills_only_enclosed_background():
    fg = np.zeros((1, 7, 7), bool)
    fg[0, 1:6, 1:6] = True
    fg[0, 2:5, 2:5] = False  # a closed ring: its inside is a hole
    filled = oracle.fill_holes(fg)
    assert filled[0, 2:5, 2:5].all() and not filled[0, 0].any()
    fg[0, 3, 1] = False  # open the ring to the border: no hole any more
    assert not oracle.fill_holes(fg)[0, 3, 3]
