"""Folders an export writes: never half-written under their real name, never replacing a stranger's."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from swarm.errors import UserError
from swarm.export.card import front_matter


def check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier swarm export."""
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; remove it or choose another --out")
    readme = target / "README.md"
    tags = front_matter(readme.read_text(errors="replace")).get("tags") if readme.is_file() else None
    earlier_export = isinstance(tags, list) and "swarm" in tags
    if any(target.iterdir()) and not earlier_export:
        raise UserError(f"{target} exists and is not a swarm export; remove it or choose another --out or --name")


@contextmanager
def scratch_folder(parent: Path, stem: str):
    """A temporary folder in ``parent`` (so large merges stay on the export's disk), removed after."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
