"""Small helpers shared across the package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path next to ``path``, then rename it onto ``path``.

    A reader never sees a half-written file, and an exception (or an interrupt) while writing
    leaves the previous file, if any, untouched: the temporary file is removed.

    Args:
        path: the file to write; its folder is created when missing.

    Example::

        >>> with atomic_path("outputs/metrics.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
