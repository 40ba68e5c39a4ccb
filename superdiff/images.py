"""Images on disk: PNGs that carry the composition that made them (as superdiff JSON and as
Automatic1111's infotext), written atomically, read back for `--from-png` and the studio's
import, and labelled grids of images.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .compose import Composition

__all__ = ["PNG_KEY", "GRID_KEY", "png_metadata", "save_png", "read_png_composition", "image_grid"]

#: the PNG text chunk holding the composition as JSON (the source of truth)
PNG_KEY = "superdiff"
GRID_KEY = "superdiff_grid"


def png_metadata(record: Composition, size: tuple[int, int] | None = None) -> dict[str, str]:
    """Text chunks: the composition as JSON under 'superdiff' (with the package version; the
    source of truth) and under 'parameters' the same in Automatic1111's infotext layout
    (`superdiff.a1111.infotext`: prompt, 'Negative prompt:', 'Steps: ..., Sampler: ...'),
    which A1111's PNG Info and image browsers read. Nothing time-dependent: files are
    byte-identical across runs."""
    from . import __version__
    from .a1111 import infotext

    from .trace import json_safe

    d = json_safe(record.to_dict())
    d["superdiff_version"] = __version__
    return {PNG_KEY: json.dumps(d, sort_keys=True, allow_nan=False),
            "parameters": infotext(record, size=size, version=__version__),
            "Software": f"superdiff {__version__}"}


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def save_png(image: Any, path: str | os.PathLike, record: Composition,
             extra_text: dict[str, str] | None = None, size: tuple[int, int] | None = None) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a truncated PNG. The file
    gets the user's umask like any other new file (0644 under the usual 022), not the 0600 of
    a private temp file. `extra_text`: further text chunks (a grid's tile records). `size`:
    the generation size (width, height) the infotext names (default: the image's own size; a
    grid passes its tiles' size, not the canvas's)."""
    from PIL import PngImagePlugin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for k, v in {**png_metadata(record, size=tuple(size) if size is not None else image.size), **(extra_text or {})}.items():
        info.add_text(k, v)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_record(path: str | os.PathLike) -> dict[str, Any]:
    """The composition record (JSON fields, without `superdiff_version`) of a PNG written by
    superdiff; a ValueError saying why when it has none. save_png writes its text chunks before
    the image data, so they are read without decoding the pixels (a chunk after them, which
    other tools may write, is found through Pillow's `text`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = {k: v for k, v in im.info.items() if isinstance(v, str)}
            if PNG_KEY not in text and im.format == "PNG":
                text = dict(getattr(im, "text", {}) or {})
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable PNG ({e})") from None
    name = Path(path).name
    if PNG_KEY not in text:
        if "parameters" in text or "prompt" in text:
            src = "Automatic1111-style parameters" if "parameters" in text else "a ComfyUI workflow"
            raise ValueError(f"{name} carries {src} but no superdiff composition; only PNGs written by "
                             "superdiff (generate, batch or the studio) can be imported")
        raise ValueError(f"{name} carries no superdiff parameters; only PNGs written by superdiff "
                         "(generate, batch or the studio) can be imported")
    try:
        d = json.loads(text[PNG_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"the superdiff chunk of {name} is not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ValueError(f"the superdiff chunk of {name}: a composition must be a JSON object, got "
                         f"{type(d).__name__}")
    d.pop("superdiff_version", None)
    return d


def read_png_composition(path: str | os.PathLike) -> Composition:
    """The composition stored in a PNG written by superdiff (one image: seed already offset;
    a grid.png: the whole run)."""
    from .compose import Composition

    return Composition.from_dict(read_png_record(path))


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text + "\u2026"


def image_grid(images: Sequence[Any], cols: int | None = None, pad: int = 2, scale: int = 1,
               labels: Sequence[str] | None = None, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None) -> Any:
    """A PIL grid of equally sized images (nearest-neighbour upscaled by `scale`).

    labels: one caption under each tile; row_labels / col_labels: headers left of each row
    and above each column (an X/Y plot: e.g. methods x seeds)."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    w, h = w * scale, h * scale
    n = len(images)
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    fs = max(10, min(16, w // 8))
    font = _font(fs)
    cap = fs + 6 if labels else 0
    top = fs + 8 if col_labels else 0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 0
    if row_labels:
        left = min(int(max(probe.textlength(str(t), font=font) for t in row_labels)) + 10, max(3 * w, 160))
    cw, ch = w + pad, h + cap + pad
    grid = Image.new("RGB", (left + cols * cw + pad, top + rows * ch + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        im = im.convert("RGB")
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        r, c = divmod(k, cols)
        x, y = left + pad + c * cw, top + pad + r * ch
        grid.paste(im, (x, y))
        if labels and k < len(labels):
            draw.text((x + 1, y + h + 2), _fit(draw, str(labels[k]), font, w - 2), fill=(0, 0, 0), font=font)
    for c, t in enumerate(col_labels or []):
        draw.text((left + pad + c * cw + 1, 3), _fit(draw, str(t), font, w - 2), fill=(0, 0, 0), font=font)
    for r, t in enumerate(row_labels or []):
        draw.text((3, top + pad + r * ch + h // 2 - fs // 2), _fit(draw, str(t), font, left - 6), fill=(0, 0, 0),
                  font=font)
    return grid
