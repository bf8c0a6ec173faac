"""Standard run names, and the rules every run name (generated or user-given) must follow.

A generated name has five fixed parts joined by hyphens::

    {base-model}-{method}-{dataset}-r{rank}-{yyyymmdd}
    llama-3.1-8b-qlora-alpaca-r16-20261128

- ``base-model``: the last component of ``model.path`` (a hub id loses its organisation, a
  local folder its parents; a Hugging Face cache folder ``models--org--name/snapshots/<sha>``
  gives ``name``), slugged, with packaging suffixes that say nothing about the model dropped:
  ``-hf``, ``-bnb-4bit``, ``-4bit``, ``-8bit``, ``-safetensors`` (so ``Llama-2-7b-hf`` gives
  ``llama-2-7b``). Size, version and variant (``8b``, ``3.1``, ``instruct``) are kept.
- ``method``: ``qlora`` when the base is quantized to 4 bits (``quantization.bits == 4``),
  else ``lora``.
- ``dataset``: the stem of the first data file with its data extensions removed
  (``alpaca.jsonl.gz`` gives ``alpaca``, ``v1.2.json`` gives ``v1.2``), shard counters dropped (``train-00000-of-00004``
  gives ``train``); a generic stem (``train``, ``data``, ``test``, ...) is replaced by the name
  of the file's folder (``dolly/train.jsonl`` gives ``dolly``); a Hugging Face data set gives
  its name (``hf:tatsu-lab/alpaca`` gives ``alpaca``). Several files with different stems add
  ``-mix`` (``alpaca-mix``).
- ``r{rank}``: the LoRA rank, ``lora.r``.
- ``yyyymmdd``: the date the run started.

When the whole exceeds 96 characters, the base-model part (then the dataset part) is
shortened, so method, rank and date always survive.

Rules for every name, checked by :func:`validate_name` (a user's ``output.name`` or
``swarm export --name`` must pass them; they are Hugging Face's repository-name rules, made
stricter so that a name is also a safe folder name everywhere):

1. 1 to 96 characters (the hub's limit for a repository name).
2. Only lowercase letters, digits, ``.`` and ``-``.
3. Starts and ends with a letter or a digit.
4. No ``--`` or ``..`` (the hub reserves both).

An export of the checkpoint at step N is named ``{run name}-step{N}`` unless given a name.

A user-given name need not have the five parts: a name chosen on purpose (``my-support-bot``)
is kept as is; the parts are what swarm picks when nobody chose.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import PurePath, PurePosixPath

from swarm.errors import UserError

MAX_LENGTH = 96
_NOISE_SUFFIXES = ("-hf", "-bnb-4bit", "-4bit", "-8bit", "-safetensors")
_GENERIC_STEMS = {"train", "training", "data", "dataset", "test", "eval", "valid", "validation", "all"}
_DATA_EXTENSIONS = {
    ".jsonl", ".json", ".txt", ".text", ".md", ".csv", ".tsv", ".parquet", ".arrow",
    ".gz", ".bz2", ".xz", ".zst", ".zip",
}
_SHARD_COUNTER = re.compile(r"-\d+-of-\d+$")
_ALLOWED = re.compile(r"[a-z0-9.-]+")


def slugify(text: str) -> str:
    """``text`` in slug form: lowercase, runs of other characters as one ``-``, no ``..``.

    The result passes :func:`validate_name` unless it is empty or too long.
    """
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower())
    # A dot next to a hyphen reads as noise ("v1.-x"): a run of both becomes one hyphen.
    slug = re.sub(r"[.-]*-[.-]*", "-", slug)
    slug = re.sub(r"\.{2,}", ".", slug)
    return slug.strip("-.")


def base_model_part(model_path: str) -> str:
    """The ``base-model`` part of a standard name, from ``model.path`` (hub id or folder)."""
    parts = [p for p in PurePosixPath(model_path.replace("\\", "/")).parts if p not in ("/", ".", "..")]
    last = parts[-1] if parts else ""
    # A folder inside the Hugging Face cache ends in a commit hash; the repository is named
    # in the "models--org--name" component above it.
    for part in reversed(parts):
        if part.startswith("models--"):
            last = part.split("--")[-1]
            break
    slug = slugify(last)
    stripped = True
    while stripped:
        stripped = False
        for suffix in _NOISE_SUFFIXES:
            if slug.endswith(suffix) and len(slug) > len(suffix):
                slug = slug[: -len(suffix)].rstrip("-.")
                stripped = True
    return slug or "model"


def dataset_part(files: list[str]) -> str:
    """The ``dataset`` part of a standard name, from ``data.files``."""
    stems = [file_stem(f) for f in files]
    part = stems[0]
    if len(set(stems)) > 1:
        part += "-mix"
    return part


def file_stem(file: str) -> str:
    """The slugged stem of one data file (or ``hf:ORG/NAME`` data set), as described in the module docstring."""
    if file.startswith("hf:"):  # a Hub data set: its name, without the organisation
        return slugify(file.removeprefix("hf:").split(" ")[0].split("/")[-1]) or "data"
    path = PurePath(file.replace("\\", "/"))
    name = path.name
    # Remove extensions one by one ("x.jsonl.gz"), but keep dots that belong to the name ("v1.2").
    while PurePath(name).suffix.lower() in _DATA_EXTENSIONS:
        name = name[: -len(PurePath(name).suffix)]
    stem = slugify(_SHARD_COUNTER.sub("", name))
    if stem in _GENERIC_STEMS and path.parent.name not in ("", ".", ".."):
        stem = slugify(path.parent.name) or stem
    return stem or "data"


def run_name(job, date: dt.date | dt.datetime | None = None) -> str:
    """The standard name of a run of ``job`` started on ``date`` (today when not given).

    Args:
        job: the resolved ``swarm.config.JobConfig``.
        date: the day the run started; a datetime counts by its own (local) date.

    Returns:
        ``{base-model}-{method}-{dataset}-r{rank}-{yyyymmdd}``, valid by :func:`validate_name`.
    """
    date = date or dt.date.today()
    method = "qlora" if job.quantization.bits == 4 else "lora"
    base = base_model_part(job.model.path)
    dataset = dataset_part(job.data.labels)
    tail = f"-r{job.lora.r}-{date:%Y%m%d}"
    room = MAX_LENGTH - len(tail) - len(method) - 2  # two hyphens around the method
    # Shorten the dataset to at most a third of the room only when both do not fit, then
    # give the base model whatever is left.
    if len(base) + len(dataset) > room:
        dataset = _cut(dataset, max(room // 3, room - len(base)))
        base = _cut(base, room - len(dataset))
    name = f"{base}-{method}-{dataset}{tail}"
    validate_name(name)
    return name


def checkpoint_name(name: str, step: int) -> str:
    """The name of an export made from the checkpoint at ``step`` of run ``name``.

    ``{name}-step{step}``, with ``name`` shortened when the whole would be too long, so
    that a checkpoint's export never takes the place of the final one.
    """
    suffix = f"-step{step}"
    return _cut(name, MAX_LENGTH - len(suffix)) + suffix


def _cut(part: str, length: int) -> str:
    return part[:length].rstrip("-.") or part[:1]


def validate_name(name: str) -> str:
    """Check ``name`` against the rules in this module's docstring.

    Returns:
        ``name``, unchanged, when it follows every rule.

    Raises:
        UserError: one line naming the first rule broken and, where one exists, a valid
            name close to the given one.
    """
    hint = _hint(name)
    if not name:
        raise UserError("run name is empty; use lowercase letters, digits, '.' and '-'")
    if len(name) > MAX_LENGTH:
        raise UserError(f"run name {name!r} is {len(name)} characters long; the limit is {MAX_LENGTH}")
    if not _ALLOWED.fullmatch(name):
        bad = sorted({c for c in name if not re.fullmatch(r"[a-z0-9.-]", c)})
        others = " ".join(repr(c) for c in bad if not c.isupper())
        what = " and ".join(
            (["upper-case letters"] if any(c.isupper() for c in bad) else [])
            + ([f"the characters {others}"] if others else [])
        )
        raise UserError(
            f"run name {name!r} has {what}; only lowercase letters, digits, '.' and '-' are allowed{hint}"
        )
    if not (name[0].isalnum() and name[-1].isalnum()):
        raise UserError(f"run name {name!r} must start and end with a letter or a digit{hint}")
    if "--" in name or ".." in name:
        raise UserError(f"run name {name!r} contains '--' or '..', which Hugging Face reserves{hint}")
    return name


def _hint(name: str) -> str:
    suggestion = slugify(name)[:MAX_LENGTH].rstrip("-.")
    if suggestion and suggestion != name:
        return f"; e.g. {suggestion!r}"
    return ""
