"""Loading the models a composition names: which family a checkpoint is (`model_kind`), the
safety checks before any weights load (safetensors only, no remote code, allowed folders),
and `ModelCache`, the loaded pipelines shared by the command line, the batch runner, the
studio and the benchmarks (least recently used evicted).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

__all__ = ["MODEL_KINDS", "TEXT_KINDS", "FLOW_KINDS", "model_kind", "check_safetensors", "hub_unreachable",
           "ModelCache"]

#: what `model_kind` tells apart: Stable Diffusion 1.x/2.x, SDXL, SD3 / SD3.5, Flux, UNet2D
MODEL_KINDS = ("sd", "sdxl", "sd3", "flux", "unet2d")
TEXT_KINDS = ("sd", "sdxl", "sd3", "flux")
#: the rectified-flow (flow-matching transformer) kinds; they compose only with each other
FLOW_KINDS = ("sd3", "flux")


def model_kind(path_or_id: str) -> str:
    """'sd', 'sdxl', 'sd3', 'flux' or 'unet2d' from the model's model_index.json / unet config."""
    from diffusers import DiffusionPipeline

    local = Path(path_or_id)
    if local.is_dir():
        index = local / "model_index.json"
        cfg = json.loads(index.read_text()) if index.is_file() else None
        if cfg is None:
            if (local / "unet").is_dir() or (local / "config.json").is_file():
                return "unet2d"
            raise ValueError(f"model: {path_or_id} is neither a diffusers pipeline directory (model_index.json) "
                             "nor a UNet2D checkpoint (unet/ or config.json)")
    else:
        try:  # the local Hugging Face cache first: no network, no retries
            cfg = DiffusionPipeline.load_config(path_or_id, local_files_only=True)
        except Exception:  # noqa: BLE001
            cfg = None
        if cfg is None:
            unreachable = hub_unreachable()
            if unreachable:
                raise ValueError(f"model: {path_or_id!r} is not a bundled model, a local directory or in the local "
                                 f"Hugging Face cache, and {unreachable}; use a bundled model or a local folder "
                                 "(or download it once where the hub is reachable)")
        try:
            cfg = cfg or DiffusionPipeline.load_config(path_or_id)
        except Exception as e:  # noqa: BLE001  (network, missing repo, ...)
            raise ValueError(f"model: {path_or_id!r} is not a bundled model or a local directory, and loading it "
                             f"as a hub id failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                             "Check the name, or the network / HF cache") from None
    cls = str(cfg.get("_class_name", ""))
    transformer = cfg.get("transformer")
    transformer = str(transformer[1]) if isinstance(transformer, (list, tuple)) and len(transformer) == 2 else ""
    if transformer == "SD3Transformer2DModel" or "StableDiffusion3" in cls:
        return "sd3"
    if transformer == "FluxTransformer2DModel" or cls in ("FluxPipeline", "SuperDiffFluxPipeline"):
        return "flux"
    if "XL" in cls:
        return "sdxl"
    if "text_encoder" in cfg and "unet" in cfg:
        return "sd"
    if "unet" in cfg:
        return "unet2d"
    raise ValueError(f"model: {path_or_id} is a {cls or 'unknown'} pipeline; SuperDiff composes Stable Diffusion "
                     "(1.x/2.x, XL, 3), Flux and UNet2D models")


def check_safetensors(path: str) -> None:
    """Refuse, in one line, a local model folder whose weights are only pickled `.bin`
    files: only safetensors are loaded (pickles can run code)."""
    d = Path(path)
    if not d.is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) checks it
    if any(d.rglob("*.safetensors")):
        return
    bins = sorted(p.relative_to(d).as_posix() for p in d.rglob("*.bin"))
    if bins:
        raise ValueError(f"model: {d.name} has only .bin weights ({', '.join(bins[:3])}); only safetensors are "
                         "loaded. Convert them once, e.g. DiffusionPipeline.from_pretrained(dir, "
                         "use_safetensors=False).save_pretrained(dir, safe_serialization=True)")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, or no connection within
    `timeout` seconds), or None when it answers. Saves the ~20 s of retries that end in
    "does not appear to have a file named model_index.json" when offline."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "hub access is switched off (HF_HUB_OFFLINE=1)"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"the Hugging Face hub ({host}) is not reachable ({e.strerror or type(e).__name__})"
    return None


class _quiet_loading:
    """Hide diffusers' per-component loading bars and deprecation chatter while loading."""

    def __enter__(self) -> None:
        import warnings

        from diffusers.utils import logging as dlog

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.filterwarnings("ignore", category=FutureWarning)
        self._bars = dlog.is_progress_bar_enabled()
        dlog.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        from diffusers.utils import logging as dlog

        if self._bars:
            dlog.enable_progress_bar()
        self._w.__exit__(*exc)


class ModelCache:
    """Loaded pipelines, keyed by (model, extra UNet2D checkpoints, dtype, device), least
    recently used evicted beyond `max_models`.

    allow_roots: when given, local directories must lie under one of them (resolved, so
        `..` and symlinks cannot escape); bundled names are always allowed.
    allow_hub: whether names that are neither bundled nor local may be loaded as hub ids.
    Weights are loaded from safetensors only; no remote code is ever trusted.
    """

    def __init__(self, max_models: int = 2, allow_roots: Sequence[str | os.PathLike] | None = None,
                 allow_hub: bool = True, device: str | None = None) -> None:
        self.max_models = max(1, int(max_models))
        self.allow_roots = None if allow_roots is None else [Path(r).resolve() for r in allow_roots]
        self.allow_hub = allow_hub
        self.device = device
        self._pipes: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._call_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
        self.loads = 0  # how many times a model was actually loaded (not served from the cache)

    def resolve(self, name: str, what: str = "model") -> str:
        """A bundled name -> its directory; a local path -> checked against allow_roots;
        otherwise a hub id (if allowed)."""
        from .registry import list_bundled_models, resolve as resolve_bundled

        if name in list_bundled_models():
            return resolve_bundled(name)
        p = Path(name).expanduser()
        if name.startswith((".", "/", "~")) or p.exists():
            rp = p.resolve()
            if self.allow_roots is not None and not any(rp == r or r in rp.parents for r in self.allow_roots):
                raise ValueError(f"{what}: {name} is outside the allowed model folders "
                                 f"({', '.join(map(str, self.allow_roots)) or 'none configured'})")
            if not rp.is_dir():
                raise ValueError(f"{what}: {name} is not a directory")
            return str(rp)
        if not self.allow_hub:
            raise ValueError(f"{what}: unknown model {name!r}; give a bundled model "
                             f"({', '.join(list_bundled_models())}) or a folder under the allowed roots "
                             "(hub ids are switched off: --no-hub)")
        if name.count("/") != 1 or any(ch in name for ch in " \\:"):
            raise ValueError(f"{what}: {name!r} is not a bundled model ({', '.join(list_bundled_models())}), "
                             "an existing directory, or a hub id of the form 'org/name'")
        return name

    def pipeline(self, model: str, extra_models: Sequence[str] = (), dtype: str = "float32") -> tuple[Any, str, list[str]]:
        """(pipeline, kind, resolved extra models). For UNet2D models the extra checkpoints are
        part of the pipeline; for text-to-image models they are passed per call."""
        import torch

        src = self.resolve(model)
        extras = [self.resolve(m, "extra_models") for m in extra_models]
        kind = model_kind(src)
        for m, d in zip(extra_models, extras):  # flow and epsilon models never mix: refuse before loading
            if Path(d).is_dir() and (model_kind(d) in FLOW_KINDS) != (kind in FLOW_KINDS):
                from .pipelines._checkpoints import mixed_families_message

                raise ValueError("extra_models: " + mixed_families_message(
                    f"{m} (a {model_kind(d)} model)", f"{model.strip()} (a {kind} model)"))
        for d in (src, *extras):
            check_safetensors(d)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        key = (src, tuple(extras) if kind == "unet2d" else (), dtype, device)
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key], kind, extras
        torch_dtype = getattr(torch, dtype)
        if torch_dtype != torch.float32 and device == "cpu":
            raise ValueError(f"dtype: {dtype} needs a GPU; use float32 on the CPU")
        from .pipelines import (SuperDiffFluxPipeline, SuperDiffStableDiffusion3Pipeline,
                                SuperDiffStableDiffusionPipeline, SuperDiffStableDiffusionXLPipeline,
                                SuperDiffUNet2DPipeline)
        from .registry import absent_components

        with _quiet_loading():
            if kind == "unet2d":
                pipe = SuperDiffUNet2DPipeline.from_checkpoints([src, *extras], torch_dtype=torch_dtype)
            elif kind in FLOW_KINDS:
                cls = SuperDiffStableDiffusion3Pipeline if kind == "sd3" else SuperDiffFluxPipeline
                pipe = cls.from_pretrained(src, torch_dtype=torch_dtype, use_safetensors=True,
                                           **absent_components(src))
            else:
                cls = SuperDiffStableDiffusionXLPipeline if kind == "sdxl" else SuperDiffStableDiffusionPipeline
                kw: dict[str, Any] = {"torch_dtype": torch_dtype, "use_safetensors": True}
                if kind == "sd":
                    kw.update(safety_checker=None, requires_safety_checker=False)
                pipe = cls.from_pretrained(src, **kw)
        pipe = pipe.to(device)
        with self._lock:
            self.loads += 1
            self._pipes[key] = pipe
            while len(self._pipes) > self.max_models:
                self._pipes.popitem(last=False)
        return pipe, kind, extras

    def call_lock(self, pipe: Any) -> threading.Lock:
        """The lock to hold around each call of `pipe`: a pipeline is shared by every job that
        names its model (the studio runs several at once), and a call changes its state while
        it runs (LoRA adapters routed per row and their scales, the interrupt flag, the
        callback's properties), so two calls on one pipeline at once would sample under each
        other's state."""
        with self._lock:
            lock = self._call_locks.get(pipe)
            if lock is None:
                lock = self._call_locks[pipe] = threading.Lock()
            return lock

    def clear(self) -> None:
        with self._lock:
            self._pipes.clear()
