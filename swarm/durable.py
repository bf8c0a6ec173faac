"""Writes that survive a crash: data flushed to the disk before a folder is renamed into place.

Checkpoints and exports are written under a temporary name, flushed with these helpers, and
only then renamed, so a power cut or a SIGKILL never leaves a half-written folder in place.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
