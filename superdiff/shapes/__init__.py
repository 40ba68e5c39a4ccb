"""The shapes world: a seeded, captioned image generator and its exact attribute oracle.

``world``  renders 32x32 RGB images of coloured shapes with captions; some colour-shape
           pairs (``HELD_OUT``) never appear in training data.
``oracle`` returns per-attribute probabilities for any batch of images.
"""

from .oracle import OracleResult, classify
from .world import (
    CAPTION_MODES,
    COLOURS,
    HELD_OUT,
    RESOLUTION,
    SHAPE_HALVES,
    SHAPES,
    Dataset,
    Scene,
    allowed_combinations,
    caption,
    make_dataset,
    parse_caption,
    render,
    sample_scenes,
)

__all__ = [
    "CAPTION_MODES",
    "COLOURS",
    "HELD_OUT",
    "RESOLUTION",
    "SHAPE_HALVES",
    "SHAPES",
    "Dataset",
    "OracleResult",
    "Scene",
    "allowed_combinations",
    "caption",
    "classify",
    "make_dataset",
    "parse_caption",
    "render",
    "sample_scenes",
]
