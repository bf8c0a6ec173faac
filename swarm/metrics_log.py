"""``metrics.jsonl``: one JSON object per logged step, its one reader and its one writer.

The driver appends a line per step as training goes (``MetricsLog``); a resume and a
worker-group restart trim what came after the checkpoint they continue from (``trim``);
export and the progress summary read it (``read_metrics``). A crash can cut the last line
short: readers leave a torn line out, and the writer removes it before appending, so the
next record never lands on the end of a fragment.
"""

from __future__ import annotations

import json
from pathlib import Path

from swarm.durable import replace_text

FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The records of ``path`` in order; a torn or unreadable line is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a crash mid-write leaves half a line at the end; the rest is good
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim(path: Path, step: int) -> list[dict]:
    """Keep only records of steps up to ``step`` (atomically); return them."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    if Path(path).exists():
        replace_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class MetricsLog:
    """Appends records to a metrics file, one flushed line each."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_file() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size:
            # A torn last line: rewrite the file with the whole records only.
            replace_text(self.path, "".join(json.dumps(r) + "\n" for r in read_metrics(self.path)))
        self._file = self.path.open("a")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def trim(self, step: int) -> list[dict]:
        """Forget records after ``step`` (they will be logged again); return the ones kept."""
        self._file.close()
        kept = trim(self.path, step)
        self._file = self.path.open("a")
        return kept

    def close(self) -> None:
        self._file.close()
