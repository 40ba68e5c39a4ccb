"""Offline registry of the models bundled with the package (``superdiff/bundled/<name>/``).

The registry only resolves names to local directories; loading always goes through the
ordinary diffusers ``from_pretrained(path)`` code path, exactly as for a hub checkpoint:

    from diffusers import StableDiffusionPipeline
    from superdiff.registry import bundled_model_path
    pipe = StableDiffusionPipeline.from_pretrained(bundled_model_path("shapes-t2i"))

A bundled model is a directory with ``training.json`` (written by its training script)
and diffusers weights: ``model_index.json`` for a pipeline, or ``unet/`` for a bare
unconditional model (``unet/``, ``vae/``, ``scheduler/``). ``shapes-flow`` is a Stable
Diffusion 3 pipeline without T5; diffusers wants the absent encoder named at load time:

    StableDiffusion3Pipeline.from_pretrained(bundled_model_path("shapes-flow"), **absent_components(path))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BUNDLED_ROOT: Path = Path(__file__).resolve().parent / "bundled"

_TRAIN_HINT = (
    "bundled weights are produced by scripts/train_shapes_vae.py, scripts/train_shapes_t2i.py, "
    "scripts/train_shapes_flow.py and scripts/train_shapes_halves.py (see superdiff/bundled/<name>/README.md)"
)


def _is_model_dir(d: Path) -> bool:
    # a dot-directory is an export in progress or left by a killed one (training.replacing_dir)
    return not d.name.startswith(".") and d.is_dir() and (d / "training.json").is_file() and ((d / "model_index.json").is_file() or (d / "unet").is_dir())


def list_bundled_models() -> list[str]:
    """Names of the bundled models, sorted."""
    if not BUNDLED_ROOT.is_dir():
        return []
    return sorted(d.name for d in BUNDLED_ROOT.iterdir() if _is_model_dir(d))


def bundled_model_path(name: str) -> Path:
    """The local directory of bundled model ``name``, ready for ``from_pretrained``.

    Raises ``ValueError`` naming the available models when ``name`` is unknown, and
    ``FileNotFoundError`` when the directory exists but a weight file is missing or is a
    Git LFS pointer instead of real safetensors data.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    names = list_bundled_models()
    if name not in names:
        raise ValueError(
            f"unknown bundled model {name!r}; available: {', '.join(names) or '(none)'}. "
            f"Pass one of these names, or a diffusers directory / hub id to from_pretrained directly."
        )
    path = BUNDLED_ROOT / name
    weights = list(path.rglob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"bundled model {name!r} at {path} has no .safetensors weights; {_TRAIN_HINT}")
    for w in weights:
        with w.open("rb") as f:
            head = f.read(64)
        if head.startswith(b"version https://git-lfs"):
            raise FileNotFoundError(f"{w} is a Git LFS pointer, not weights; run `git lfs pull` or retrain ({_TRAIN_HINT})")
    return path


def bundled_model_info(name: str) -> dict[str, Any]:
    """The model's ``training.json`` (kind, data, hyperparameters, CPU time) and, if measured,
    its ``quality.json`` under the key ``"quality"``."""
    path = bundled_model_path(name)
    info = json.loads((path / "training.json").read_text())
    q = path / "quality.json"
    if q.is_file():
        info["quality"] = json.loads(q.read_text())
    return info


def resolve(name_or_path: str | Path) -> str:
    """A bundled model's directory if ``name_or_path`` names one, else the argument unchanged
    (a local directory or hub id for ``from_pretrained``)."""
    if isinstance(name_or_path, str) and name_or_path in list_bundled_models():
        return str(bundled_model_path(name_or_path))
    return str(name_or_path)


def absent_components(path: str | Path) -> dict[str, None]:
    """``{name: None}`` for each component a local pipeline's ``model_index.json`` lists as
    null (e.g. ``text_encoder_3`` / ``tokenizer_3`` of an SD3 model without T5). diffusers
    refuses to load such a directory unless these are passed explicitly, so
    ``Pipeline.from_pretrained(path, **absent_components(path))`` loads it; ``{}`` when there
    is no local ``model_index.json`` (a hub id, a bare UNet)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    cfg = json.loads(index.read_text())
    return {k: None for k, v in cfg.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None
            and k not in ("safety_checker", "feature_extractor", "image_encoder")}
