"""Writes that survive a crash: data flushed to the disk before it is renamed into place.

Files and folders are written under a temporary name next to their place, flushed with these
helpers, and only then renamed over it, so a power cut, a full disk or a SIGKILL never leaves
a half-written file or folder under the real name: the reader sees the old one or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def replace_file(path: Path, data: bytes) -> None:
    """Atomically make ``path`` hold ``data``: a flushed temporary file renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_bytes(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def replace_text(path: Path, text: str) -> None:
    """``replace_file`` for text (UTF-8)."""
    replace_file(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    """``replace_file`` with ``data`` as indented JSON and a final newline."""
    replace_file(path, (json.dumps(data, indent=2) + "\n").encode())


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder``, and ``folder`` itself, to the disk."""
    for path in sorted(Path(folder).rglob("*"), key=lambda p: -len(p.parts)):
        fsync_path(path)
    fsync_path(folder)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target`` that becomes ``target`` once complete.

    On leaving the block, everything written is flushed and the folder renamed into place
    (an earlier ``target`` is moved aside first and removed after). If the block raises, the
    temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(target)
    old = target.parent / f".{target.name}.old"
    for leftover in (tmp, old):  # from a write that crashed
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def partial_name(target: Path) -> Path:
    """Where ``atomic_folder`` writes ``target`` before it is complete."""
    return target.parent / f".{target.name}.partial"
