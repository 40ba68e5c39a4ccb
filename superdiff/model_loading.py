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
from typing import Any, Iterable, Sequence

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
            # a bare model folder (config.json) or a pipeline folder without model_index.json:
            # its network's class tells a flow transformer (an extra of an SD3 / Flux model)
            # from a UNet
            for sub in ("transformer", ".", "unet"):
                conf = local / sub / "config.json"
                try:
                    net = json.loads(conf.read_text()).get("_class_name", "") if conf.is_file() else None
                except (ValueError, AttributeError):
                    net = None
                if net == "SD3Transformer2DModel":
                    return "sd3"
                if net == "FluxTransformer2DModel":
                    return "flux"
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


def inside(path: Path, roots: Iterable[Path]) -> bool:
    """Whether the resolved `path` is one of the (resolved) `roots` or lies under one."""
    return any(path == r or r in path.parents for r in roots)


#: pipeline components ModelCache never loads (their weights may stay pickled)
_NOT_LOADED = ("safety_checker",)


def _pickle_only(files: Sequence[str], cfg: Any) -> list[str]:
    """The `.bin` files (relative posix paths) of each folder that is loaded on its own (the
    pipeline's components, or a bare model's folder) and has no safetensors: a UNet checkpoint
    with unet/*.bin next to vae/*.safetensors would otherwise load the pickle (the UNet2D and
    extra-UNet loaders fall back to .bin)."""
    if isinstance(cfg, dict):  # the safety checker is not loaded (safety_checker=None, as the pipelines pass it)
        parts = [k for k, v in cfg.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                 and v[0] is not None and v[1] is not None and k not in _NOT_LOADED]
    else:
        parts = ["", "unet", "vae", "transformer"]
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(f.rpartition("/")[0], []).append(f)
    bins = []
    for part in parts:
        here = by_dir.get(part, [])
        if not any(f.endswith(".safetensors") for f in here):
            bins += sorted(f for f in here if f.endswith(".bin"))
    return bins


def _hub_files(repo: str) -> tuple[list[str], Any] | None:
    """(files, model_index.json) of a hub id: the hub's listing when it answers, else the local
    Hugging Face cache's snapshot; None when neither is known."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        cfg = DiffusionPipeline.load_config(repo, local_files_only=True)
    except Exception:  # noqa: BLE001  (a bare model repo, not cached)
        cfg = None
    if not hub_unreachable():
        try:
            return list(list_repo_files(repo)), cfg
        except Exception:  # noqa: BLE001  (loading it says what is wrong)
            pass
    try:
        snap = Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001
        return None
    return [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()], cfg


def check_safetensors(path: str) -> None:
    """Refuse, in one line, a model (a local folder, or a hub id as the hub or the local
    Hugging Face cache lists it) with a component whose weights are only pickled `.bin`
    files: only safetensors are loaded (pickles can run code)."""
    d = Path(path)
    if d.is_dir():
        index = d / "model_index.json"
        try:
            cfg = json.loads(index.read_text()) if index.is_file() else None
        except ValueError:
            cfg = None
        bins = _pickle_only([p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()], cfg)
    else:
        listed = _hub_files(path)
        bins = [] if listed is None else _pickle_only(*listed)
    if bins:
        raise ValueError(f"model: {d.name if d.is_dir() else path} has only .bin weights ({', '.join(bins[:3])}); "
                         "only safetensors are "
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
        self.allow_roots = None if allow_roots is None else [Path(r).expanduser().resolve() for r in allow_roots]
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

        if name in list_bundled_models() or (name.rstrip("/") in list_bundled_models() and not Path(name).exists()):
            return resolve_bundled(name.rstrip("/"))  # "shapes-t2i/", as a shell completes a folder name
        p = Path(name).expanduser()
        if name.startswith((".", "/", "~")) or p.exists():
            rp = p.resolve()
            if self.allow_roots is not None and not inside(rp, self.allow_roots):
                raise ValueError(f"{what}: {name} is outside the allowed model folders "
                                 f"({', '.join(map(str, self.allow_roots)) or 'none configured'})")
            if not rp.is_dir():
                raise ValueError(f"{what}: {name} is not a directory")
            if self.allow_roots is not None:
                away = self._link_leaving_roots(rp)
                if away is not None:
                    raise ValueError(f"{what}: {name} is outside the allowed model folders: {away[0]} is a "
                                     f"symlink to {away[1]} (allowed: "
                                     f"{', '.join(map(str, self.allow_roots)) or 'none configured'})")
            return str(rp)
        if not self.allow_hub:
            raise ValueError(f"{what}: unknown model {name!r}; give a bundled model "
                             f"({', '.join(list_bundled_models())}) or a folder under the allowed roots "
                             "(hub ids are switched off: --no-hub)")
        if name.count("/") != 1 or not all(name.split("/")) or any(ch in name for ch in " \\:"):
            raise ValueError(f"{what}: {name!r} is not a bundled model ({', '.join(list_bundled_models())}), "
                             "an existing directory, or a hub id of the form 'org/name'")
        return name

    def _link_leaving_roots(self, folder: Path) -> tuple[Path, Path] | None:
        """(link, target) of the first symlink inside `folder` (a component folder or weight
        file) that leads outside the allowed roots, or None. Links inside the roots (a Hugging
        Face cache snapshot's links to its blobs) are followed."""
        roots = self.allow_roots or []
        seen, todo = {folder}, [folder]
        while todo:
            d = todo.pop()
            try:
                children = list(d.iterdir())
            except OSError:
                continue
            for c in children:
                target = c.resolve() if c.is_symlink() else c
                if c.is_symlink() and not inside(target, roots):
                    return c, target
                if target.is_dir() and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return None

    def pipeline(self, model: str, extra_models: Sequence[str] = (), dtype: str = "float32") -> tuple[Any, str, list[str]]:
        """(pipeline, kind, resolved extra models). For UNet2D models the extra checkpoints are
        part of the pipeline; for text-to-image models they are passed per call."""
        import torch

        src = self.resolve(model)
        extras = [self.resolve(m, "extra_models") for m in extra_models]
        kind = model_kind(src)
        if kind in FLOW_KINDS and Path(src).is_dir() and not (Path(src) / "model_index.json").is_file():
            raise ValueError(f"model: {model.strip()} is a bare {kind} transformer checkpoint, not a pipeline "
                             "folder (model_index.json with its text encoders, VAE and scheduler); give it as an "
                             "extra model of an SD3 / Flux pipeline, or load a whole pipeline folder as the model")
        for m, d in zip(extra_models, extras):  # flow and epsilon models never mix: refuse before loading
            if Path(d).is_dir() and (model_kind(d) in FLOW_KINDS) != (kind in FLOW_KINDS):
                from .pipelines._checkpoints import mixed_families_message

                raise ValueError("extra_models: " + mixed_families_message(
                    f"{m} (a {model_kind(d)} model)", f"{model.strip()} (a {kind} model)"))
        if kind != "unet2d":  # loaded by the pipeline at each call
            for d in extras:
                check_safetensors(d)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        key = (src, tuple(extras) if kind == "unet2d" else (), dtype, device)
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key], kind, extras
        for d in (src, *extras) if kind == "unet2d" else (src,):  # a hub id's check may ask the hub: once
            check_safetensors(d)
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
