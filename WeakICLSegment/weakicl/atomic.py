"""Atomic file replacement: readers never see a half-written output, and a failure leaves nothing."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` (same file system) that replaces `path` when the block succeeds."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=".weakicl-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
