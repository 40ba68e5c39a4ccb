"""What the studio offers to pick: the models under the allowed roots (with their kind,
description and defaults) and the LoRA adapters (bundled, and the safetensors files users
upload, stored under safe, unique names)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from superdiff.model_loading import ModelCache, check_safetensors, inside

from .forms import NO_LORA, _blank, _first_line, error_message


# ---- models ---------------------------------------------------------------------------------
def default_allow_roots(cwd: str | os.PathLike | None = None) -> list[Path]:
    """The default allow-list: ./models when it exists, else nothing (bundled models only)."""
    d = Path(cwd or os.getcwd()) / "models"
    return [d.resolve()] if d.is_dir() else []


def _looks_like_model(d: Path) -> bool:
    return (d / "model_index.json").is_file() or (d / "unet" / "config.json").is_file() or \
        ((d / "config.json").is_file() and any(d.glob("*.safetensors")))


def _loadable(d: Path, root: Path) -> bool:
    """A model folder the studio will load: inside its root once resolved (no symlink
    leaving it) and with safetensors weights (`.bin` pickles are refused)."""
    rd = d.resolve()
    if not inside(rd, (root,)):
        return False
    try:
        check_safetensors(str(rd))
    except ValueError:
        return False
    return True


def model_choices(allow_roots: Sequence[str | os.PathLike] = (), max_depth: int = 2, limit: int = 200) -> list[str]:
    """Bundled model names, then diffusers model folders found under the allow-listed roots
    (absolute paths, searched `max_depth` levels deep, hidden folders skipped)."""
    from superdiff.registry import list_bundled_models

    out = list(list_bundled_models())
    for root in allow_roots:
        root = Path(root).resolve()
        if not root.is_dir():
            continue
        frontier = [(root, 0)]
        while frontier and len(out) < limit:
            d, depth = frontier.pop(0)
            if _looks_like_model(d):
                if _loadable(d, root):
                    out.append(str(d))
                continue
            if depth >= max_depth:
                continue
            try:
                kids = sorted(k for k in d.iterdir() if k.is_dir() and not k.name.startswith("."))
            except OSError:
                continue
            frontier.extend((k, depth + 1) for k in kids)
    return out


def model_kind(name: str, cache: ModelCache) -> str | None:
    """'sd', 'sdxl', 'sd3', 'flux' or 'unet2d' for bundled and allow-listed local models (raises ValueError
    for refused paths); None for hub ids (not looked up: that would need the network)."""
    from superdiff.model_loading import model_kind

    if not isinstance(name, str) or not name.strip():
        raise ValueError("model: choose a model")
    src = cache.resolve(name.strip())
    if not Path(src).is_dir():
        return None
    check_safetensors(src)
    return model_kind(src)


def describe_model(name: str, cache: ModelCache) -> str:
    """One Markdown line about the picked model, or what is wrong with it."""
    from superdiff.registry import bundled_model_info, list_bundled_models

    try:
        kind = model_kind(name, cache)
    except Exception as e:  # noqa: BLE001  (a refused path, a broken folder)
        return f"**{error_message(e)}**"
    name = name.strip()
    if kind is None:
        return (f"Hub model `{name}`: loaded on the first run (needs the network or a local Hugging Face cache; "
                "safetensors weights only, no remote code).")
    what = {"sd": "text-to-image (Stable Diffusion family)", "sdxl": "text-to-image (SDXL)",
            "sd3": "text-to-image rectified-flow (SD3 layout: CLIP-L, CLIP-G, T5)",
            "flux": "text-to-image rectified-flow (Flux layout; guidance scale = embedded guidance, no negative "
                    "prompt, for guidance-distilled models)",
            "unet2d": "unconditional UNet2D"}[kind]
    extra = ""
    if name in list_bundled_models():
        info = bundled_model_info(name)
        shapes = info.get("data", {}).get("shapes") or info.get("shapes")
        colours = info.get("colours")
        if shapes or colours:
            extra = " Trained on " + ", ".join(filter(None, [
                "/".join(shapes) if shapes else None, "/".join(colours) if colours else None])) + "."
    if kind == "unet2d":
        hint = " No prompts: compose it with other checkpoints under *Extra models* (one expert each)."
    else:
        hint = " One expert per prompt, e.g. `a circle` and `something red`."
    return f"`{name}`: {what} model.{extra}{hint}"


def model_defaults(name: str, cache: ModelCache) -> tuple[float | None, bool]:
    """(guidance scale, whether a negative prompt applies) for the picked model: the scale a
    bundled model's card measured, else the family's diffusers default (compose.default_guidance);
    a guidance-distilled Flux model (guidance embedding) takes no negative prompt. (None, True)
    for a hub id, whose family is known only once it loads."""
    from superdiff.compose import default_guidance

    try:
        kind = model_kind(name, cache)
    except Exception:  # noqa: BLE001  (describe_model says what is wrong)
        return None, True
    if kind is None:
        return None, True
    negative = kind in ("sd", "sdxl", "sd3")
    if kind == "flux":
        cfg = Path(cache.resolve(name.strip())) / "transformer" / "config.json"
        negative = cfg.is_file() and not json.loads(cfg.read_text()).get("guidance_embeds", False)
    return default_guidance(name.strip(), kind), negative


def suggest_extra_models(model: str, current: Sequence[str] | None, cache: ModelCache) -> list[str]:
    """Extra models to preselect: for an unconditional bundled model with none chosen, the
    other bundled unconditional models (the shapes halves compose with each other)."""
    from superdiff.registry import list_bundled_models

    current = [c for c in (current or []) if c != model]
    if current or model not in list_bundled_models():
        return list(current)
    try:
        if model_kind(model, cache) != "unet2d":
            return []
        return [m for m in list_bundled_models() if m != model and model_kind(m, cache) == "unet2d"]
    except Exception:  # noqa: BLE001
        return []



# ---- adapter pickers ------------------------------------------------------------------------
#: the largest LoRA file the studio stores (a full SDXL LoRA at rank 128 is ~0.9 GB)
MAX_LORA_BYTES = 2 << 30


def bundled_adapters() -> list[str]:
    """The bundled LoRA adapters (superdiff/bundled/lora-*)."""
    from superdiff.pipelines.adapters import WEIGHT_NAMES
    from superdiff.registry import BUNDLED_ROOT

    return sorted(d.name for d in Path(BUNDLED_ROOT).glob("lora-*") if (d / WEIGHT_NAMES[0]).is_file())


def lora_choices(upload_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The rows' adapter picker: (label, value) for none, each bundled adapter, then each
    uploaded .safetensors file (value: its stored path)."""
    out = [("none", NO_LORA)] + [(f"{n} (bundled)", n) for n in bundled_adapters()]
    if upload_dir is not None and Path(upload_dir).is_dir():
        out += [(f"{p.stem} (uploaded)", str(p)) for p in sorted(Path(upload_dir).glob("*.safetensors"))]
    return out


def store_lora_upload(path: str | os.PathLike | None, upload_dir: str | os.PathLike) -> str:
    """Keep an uploaded LoRA for the pickers and return its stored path. Only a .safetensors
    file whose header reads and which holds LoRA tensors is kept (pickled .bin / .pt / .ckpt
    files can run code when loaded: refused). The file name (its adapter name) is made safe;
    another file under a taken name, or under a bundled adapter's name, gets a numbered name;
    the same file again keeps its own."""
    from superdiff.pipelines.adapters import file_sha256

    if path is None or _blank(str(path)):
        raise ValueError("adapters: no file received; choose a LoRA .safetensors file")
    src = Path(path)
    # a browser upload is named <temp>/<original name>; the original name is what the user sees
    if src.suffix.lower() != ".safetensors":
        raise ValueError(f"adapters: {src.name} is not a .safetensors file; the studio loads only safetensors "
                         "LoRAs (pickled .bin/.pt/.ckpt files can run code when loaded). Convert it first, e.g. "
                         "safetensors.torch.save_file(torch.load(f), 'lora.safetensors')")
    if not src.is_file():
        raise ValueError(f"adapters: {src.name}: the uploaded file is missing")
    if src.stat().st_size > MAX_LORA_BYTES:
        raise ValueError(f"adapters: {src.name} is larger than {MAX_LORA_BYTES >> 30} GB")
    try:
        from safetensors import safe_open

        with safe_open(str(src), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001  (any header error: not a safetensors file)
        raise ValueError(f"adapters: {src.name} is not a readable safetensors file ({_first_line(str(e), 120)})") \
            from None
    if not any("lora" in k.lower() for k in keys):
        raise ValueError(f"adapters: {src.name} holds no LoRA tensors ({len(keys)} tensors, none named lora_*): "
                         "it is not a LoRA adapter")
    dest = Path(upload_dir)
    dest.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", src.stem).strip("-") or "lora"
    sha = file_sha256(src)
    first = 2 if stem in bundled_adapters() else 1  # a bundled adapter's name would clash with it in one call
    for k in range(first, 1000):
        target = dest / (f"{stem}.safetensors" if k == 1 else f"{stem}-{k}.safetensors")
        if not target.exists():
            shutil.copyfile(src, target)
            return str(target)
        if file_sha256(target) == sha:
            return str(target)
    raise ValueError(f"adapters: too many uploads named {stem}")
