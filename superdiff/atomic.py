"""Files replaced whole: written beside their final path and renamed over it (os.replace is
atomic on one file system), so a write that fails half-way (a kill, a full disk, an error
while drawing) leaves the previous file as it was and no partial one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["replacing", "write_text"]


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield PATH.tmp beside `path` to write; when the block succeeds it replaces `path`, when
    it fails it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` written to `path` whole (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
