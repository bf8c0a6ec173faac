"""Data sources: every entry of ``data.files`` opened as a ``datasets.Dataset`` on disk.

A source is a local file (JSON lines, JSON, Parquet, CSV, Arrow or plain text), a folder
written by ``Dataset.save_to_disk`` (or a folder of data files), or a Hugging Face Hub data
set (``hf:ORG/NAME``, or ``{hub: ORG/NAME, config, split, revision}``). Files are converted
into Arrow in a scratch folder and memory-mapped, so a corpus is never held as Python
objects: records are read in batches (``Source.batches``). Hub data sets come from the
user's Hugging Face cache; with ``HF_HUB_OFFLINE=1`` nothing is downloaded and a data set
that is not cached is an error naming the cache.

``data.columns`` renames the source's columns to the fields the format reads; a mapping to
a column the source lacks is an error naming the columns it has.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swarm.config.models import DataSection, DataSource
from swarm.errors import UserError

BATCH = 1000  # records per batch: big enough for the tokenizer, small as Python objects
_KINDS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
          ".arrow": "arrow"}


@dataclass
class Source:
    """One opened entry of ``data.files``.

    Attributes:
        label: how messages name it (the entry as the user wrote it).
        dataset: the records, memory-mapped Arrow (None when read by the JSON fallback).
        rows: the records as Python objects, only for a JSON file ``datasets`` could not
            read (to name its bad lines); None otherwise.
        text: records are lines of one plain-text document.
        hashed: the files whose bytes make the data's SHA-256, in order.
    """

    label: str
    dataset: object | None
    rows: list | None = None
    text: bool = False
    hashed: list[Path] = field(default_factory=list)
    lines: Path | None = None  # a JSON-lines file: records are named by their line, blank lines counted
    _line_numbers: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.dataset.num_rows

    def batches(self, columns: dict[str, str]) -> Iterator[list]:
        """The records in batches of ``BATCH``, as dicts with the format's field names.

        A mapped field replaces a column of the same name (``{instruction: prompt}`` reads
        ``prompt``, never a column called ``instruction``).
        """
        rename = {column: name for name, column in columns.items()}
        if self.rows is not None:
            for start in range(0, len(self.rows), BATCH):
                yield [_renamed(row, rename) for row in self.rows[start:start + BATCH]]
            return
        chunks = self.dataset.iter(batch_size=BATCH)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except UnicodeDecodeError:  # Arrow keeps a text file's bytes; decoding finds them bad
                raise UserError(f"data file {self.label} is not UTF-8 text") from None
            keys = [k for k in chunk if k in rename or k not in columns]
            names = [rename.get(k, k) for k in keys]
            yield [dict(zip(names, values)) for values in zip(*(chunk[k] for k in keys))]

    def where(self, index: int) -> str:
        """Where record ``index`` is, for a message: ``line 3`` or ``record 3``."""
        if self.rows is not None:
            return self.rows[index][0]
        if self.lines is not None:
            if self._line_numbers is None:
                with self.lines.open("rb") as f:  # datasets skips blank lines: count them back in
                    self._line_numbers = np.fromiter((n for n, line in enumerate(f, 1) if line.strip()), np.int64)
            numbers = self._line_numbers
            return f"line {numbers[index] if index < len(numbers) else index + 1}"
        return f"{'line' if self.text else 'record'} {index + 1}"


def _renamed(located_row, rename: dict[str, str]):
    _, row = located_row
    if not isinstance(row, dict) or not rename:
        return row
    fields = set(rename.values())
    return {rename.get(k, k): v for k, v in row.items() if k in rename or k not in fields}


@contextlib.contextmanager
def quiet_datasets():
    """``datasets`` without progress bars and log lines (its errors reach the user our way)."""
    import datasets

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    count = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # no ping to the Hub to count loads of local files
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = count
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _offline():
    """Local files never reach for the Hub, whatever HF_HUB_OFFLINE says."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def open_source(entry: DataSource, label: str, cfg: DataSection, scratch: Path) -> Source:
    """Open one source, check it has records and the mapped columns.

    Args:
        entry: the source.
        label: how messages name it.
        cfg: the job's ``data`` section (format, columns).
        scratch: a folder for the Arrow copies of local files, removed by the caller.

    Raises:
        UserError: a missing, empty or unreadable source, or a mapped column it lacks.
    """
    if entry.hub is not None:
        source = _open_hub(entry, label)
    else:
        path = Path(entry.path).expanduser()
        if not path.exists():
            hint = f"; for a Hugging Face data set write hf:{entry.path}" if entry.path.count("/") == 1 else ""
            raise UserError(f"data file {label} not found{hint}")
        if path.is_dir():
            source = _open_folder(path, entry.split, label, scratch)
        else:
            source = _open_file(path, label, cfg.format, scratch)
    if len(source) == 0:
        raise UserError(f"data file {label} has no records")
    if source.dataset is not None:
        missing = {name: column for name, column in cfg.columns.items() if column not in source.dataset.column_names}
        if missing:
            name, column = next(iter(missing.items()))
            raise UserError(f"data.columns maps {name} to column '{column}', which {label} does not have "
                            f"(its columns: {', '.join(source.dataset.column_names)})")
    return source


def _open_file(path: Path, label: str, fmt: str, scratch: Path) -> Source:
    if path.stat().st_size == 0:
        raise UserError(f"data file {label} is empty")
    suffix = path.suffix.lower()
    kind = _KINDS.get(suffix, "text")
    if kind == "text" and fmt != "text":
        raise UserError(f"data file {label} is plain text; format '{fmt}' needs JSON, JSON lines, Parquet, CSV "
                        "or Arrow")
    # Text files are read line by line, line breaks kept: the tokens come out as for the
    # whole file, yet the eval split can hold out lines (a file as one record could not be
    # split), and EOS goes only at the file's end, not after every line.
    options = {"keep_linebreaks": True} if kind == "text" else {}
    import datasets

    try:
        with _offline():
            ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", cache_dir=str(scratch), **options)
    except Exception as exc:  # datasets' errors are pyarrow's: find the real problem ourselves
        if kind == "json":
            return Source(label, None, rows=_parse_json(label, path), hashed=[path])
        while exc.__cause__ or exc.__context__:  # the innermost error says what is wrong
            exc = exc.__cause__ or exc.__context__
        if isinstance(exc, UnicodeDecodeError):
            raise UserError(f"data file {label} is not UTF-8 text") from None
        raise UserError(f"data file {label} cannot be read as {kind} ({type(exc).__name__}: {exc})") from None
    lines = path if suffix in (".jsonl", ".ndjson") else None
    return Source(label, ds, text=kind == "text", hashed=[path], lines=lines)


def _open_folder(path: Path, split: str | None, label: str, scratch: Path) -> Source:
    """A ``save_to_disk`` folder (Dataset or DatasetDict), or a folder of data files."""
    import datasets

    saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    if not saved and not any(p.is_file() for p in path.rglob("*")):
        raise UserError(f"data file {label} is a folder with no data in it; give a file, a save_to_disk folder "
                        "or a folder of data files")
    try:
        with _offline():
            if saved:
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path), cache_dir=str(scratch))
    except Exception as exc:  # noqa: BLE001 - one line for whatever the folder holds
        what = "a save_to_disk folder" if saved else "a folder of data files"
        raise UserError(f"data file {label} cannot be read as {what} ({type(exc).__name__}: "
                        f"{_first_line(exc)})") from None
    ds = _pick_split(ds, split, label)
    return Source(label, ds, hashed=[Path(f["filename"]) for f in ds.cache_files])


def _open_hub(entry: DataSource, label: str) -> Source:
    """A Hub data set from the user's cache (downloaded first unless HF_HUB_OFFLINE is set)."""
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    try:
        if offline and entry.revision:
            ds = _cached_revision(entry, label, cache)
        else:
            ds = datasets.load_dataset(entry.hub, entry.config, revision=entry.revision)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - not cached, no network, no such config or split
        text = _first_line(exc)
        if offline and ("Couldn't reach" in text or "not cached" in text or "Couldn't find cache" in text):
            raise UserError(f"data file {label} is not in the local cache ({cache}) and the Hub is offline "
                            "(HF_HUB_OFFLINE=1); load it once with network, or point HF_DATASETS_CACHE at "
                            "the cache that holds it") from None
        raise UserError(f"data file {label} cannot be loaded from the Hugging Face Hub "
                        f"({type(exc).__name__}: {text})") from None
    ds = _pick_split(ds, entry.split, label)
    return Source(label, ds, hashed=[Path(f["filename"]) for f in ds.cache_files])


def _cached_revision(entry: DataSource, label: str, cache: Path):
    """The cached copy of a Hub data set at one commit (offline, ``datasets`` takes the newest)."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache

    namespace, name = entry.hub.split("/")
    root = cache / f"{namespace}___{camelcase_to_snakecase(name)}"
    found = [Path(p) for p in glob.glob(str(root / (entry.config or "*") / "*" / "*")) if os.path.isdir(p)]
    matching = [p for p in found if p.name == entry.revision]
    if not matching:
        cached = sorted({p.name for p in found})
        raise UserError(f"data file {label}: revision {entry.revision} is not in the local cache ({cache}) and the "
                        f"Hub is offline (HF_HUB_OFFLINE=1); cached revisions: {', '.join(cached) or 'none'}")
    folder = matching[0]
    builder = Cache(cache_dir=str(cache), dataset_name=name, repo_id=entry.hub, config_name=folder.parts[-3],
                    version=folder.parts[-2], hash=folder.name)
    return builder.as_dataset()


def _pick_split(ds, split: str | None, label: str):
    """One split of a DatasetDict: the one asked for, ``train``, or the only one."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        if split is not None and ds.split is not None and str(ds.split) != split:
            raise UserError(f"data file {label} holds one split ({ds.split}), not {split}; leave split out")
        return ds
    names = list(ds)
    chosen = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
    if chosen not in ds:
        asked = f"has no split {split}" if split else "holds several splits"
        raise UserError(f"data file {label} {asked}; choose one with split: (its splits: {', '.join(names)})")
    return ds[chosen]


def _parse_json(label: str, path: Path) -> list[tuple[str, object]]:
    """Read a JSON or JSON-lines file with ``json``, to say which line is wrong."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {label} is not UTF-8 text (byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("["):  # an array, not JSON lines: the parser knows the line
                raise UserError(f"data file {label} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        else:
            return [(f"record {i + 1}", row) for i, row in enumerate(whole if isinstance(whole, list) else [whole])]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                rows.append((f"line {n}", Unreadable(error=f"not valid JSON ({exc.msg}, column {exc.colno})")))
    return rows


class Unreadable(dict):
    """A JSON line that did not parse; it is reported (or skipped) like a bad record."""


def sha256_of(sources: list[Source]) -> str:
    """SHA-256 over the bytes of every source's files, in order."""
    digest = hashlib.sha256()
    for source in sources:
        for path in source.hashed:
            with path.open("rb") as f:
                hashlib.file_digest(f, lambda: digest)  # goes on updating the one digest
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
