"""Training data: read local files, tokenize per format, hold out eval records, pack.

Files are read with the ``datasets`` library (JSON lines, JSON, Parquet, plain text),
offline and into memory: nothing is downloaded, nothing is cached in the user's home.
Every record is checked before any token is made; one without the fields its format
needs is an error naming the file and line (``skip_bad_records`` skips and counts it).

Formats, and where the loss falls (labels are -100 elsewhere):

- ``text``: a ``text`` field; loss on every token.
- ``instruction``: alpaca-style ``instruction``, optional ``input``, ``output``, in the
  plain template below rather than the tokenizer's chat template, so one data set gives
  the same text for every model (``chat`` is for chat-tuned ones); loss on the output
  and the EOS after it.
- ``chat``: a ``messages`` list of ``{role, content}`` in the tokenizer's chat template;
  loss on assistant turns only.

Every example ends with EOS; examples are concatenated and cut into ``seq_len`` blocks
(no attention barrier between examples, as usual for packing). The last partial block is
padded rather than dropped, so that a tiny data set still trains.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swarm.config.models import DataSection
from swarm.errors import UserError

log = logging.getLogger(__name__)

IGNORE = -100  # the label torch's cross-entropy skips
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_NEEDS = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",)}
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class DataStats:
    """What went in: usable ``records`` (train + eval), ``skipped`` bad ones, real (not
    padding) tokens per split, and ``sha256`` over the files' raw bytes, in order."""

    files: list[str]
    records: int
    skipped: int
    train_tokens: int
    eval_tokens: int
    sha256: str


@dataclass
class PreparedData:
    """Blocks of ``input_ids``, ``labels`` and ``attention_mask`` lists, each ``seq_len`` long."""

    train: list[dict]
    eval: list[dict]
    stats: DataStats


@dataclass
class _Record:
    file: int  # index into cfg.files
    where: str  # "line 3" or "record 3"
    row: dict
    line_of_text: bool  # a line of a text file: the file, not the line, is the document


class _Unreadable(dict):
    """A JSON line that did not parse; it is reported (or skipped) like a bad record."""


def prepare_data(cfg: DataSection, tokenizer) -> PreparedData:
    """Read, check, tokenize, split and pack the job's data files.

    Args:
        cfg: the job's ``data`` section.
        tokenizer: a fast transformers tokenizer (with a chat template for ``chat``).

    Returns:
        Train and eval blocks of exactly ``cfg.seq_len`` tokens, and what went in.

    Raises:
        UserError: a missing or empty file, a malformed record (unless skipped), or a
            tokenizer that cannot serve the format.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; packing needs one to separate examples")
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    paths = [_existing(name) for name in cfg.files]
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)

    records, bad = [], []
    for index, (name, path) in enumerate(zip(cfg.files, paths)):
        rows, is_text = _read(name, path, cfg.format)
        for where, row in rows:
            problem = _problem(row, cfg.format)
            if problem:
                bad.append(f"data file {name} {where}: {problem}")
                if not cfg.skip_bad_records:
                    raise UserError(bad[-1])
            else:
                records.append(_Record(index, where, row, is_text))
    tokenized = _tokenize(records, cfg, tokenizer, bad) if records else []
    records, tokenized = [r for r, t in zip(records, tokenized) if t], [t for t in tokenized if t]
    if bad:
        log.warning("skipped %d bad record(s); the first: %s", len(bad), bad[0])
    if not records:
        raise UserError(f"data files {', '.join(cfg.files)} hold no usable records ({len(bad)} skipped)")

    held_out = _eval_indices(len(records), cfg.eval_fraction, cfg.seed)
    bos = [] if cfg.format == "chat" else _bos(tokenizer)  # chat templates write their own BOS
    eos_label = IGNORE if cfg.format == "chat" else eos  # chat: the template's end of turn teaches stopping
    parts: dict[bool, list] = {False: [], True: []}
    for i, pair in enumerate(zip(records, tokenized)):
        parts[i in held_out].append(pair)
    train, train_tokens = _pack(parts[False], cfg.seq_len, bos, eos, eos_label, pad)
    evals, eval_tokens = _pack(parts[True], cfg.seq_len, bos, eos, eos_label, pad)
    stats = DataStats(list(cfg.files), len(records), len(bad), train_tokens, eval_tokens, digest.hexdigest())
    return PreparedData(train=train, eval=evals, stats=stats)


def _existing(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"data file {name} not found")
    if not path.is_file():
        raise UserError(f"data file {name} is not a file; list the data files themselves")
    if path.stat().st_size == 0:
        raise UserError(f"data file {name} is empty")
    return path


def _read(name: str, path: Path, fmt: str) -> tuple[list[tuple[str, dict]], bool]:
    """The (location, row) pairs of one file, and whether it is plain text."""
    suffix = path.suffix.lower()
    kind = "json" if suffix in (".jsonl", ".ndjson", ".json") else "parquet" if suffix == ".parquet" else "text"
    if kind == "text" and fmt != "text":
        raise UserError(f"data file {name} is plain text; format '{fmt}' needs JSON, JSON lines or Parquet")
    # Text files are read line by line, line breaks kept: the tokens come out as for the
    # whole file, yet the eval split can hold out lines (a file as one record could not be
    # split), and EOS goes only at the file's end (see _pack), not after every line.
    options = {"keep_linebreaks": True} if kind == "text" else {}
    try:
        with _datasets_offline() as load:
            ds = load(kind, data_files=[str(path)], split="train", **options).to_list()  # row by row is slow
    except Exception as exc:  # datasets' errors are pyarrow's: find the real problem ourselves
        if kind == "json":
            rows = _parse_json(name, path)
        else:
            while exc.__cause__ or exc.__context__:  # the innermost error says what is wrong
                exc = exc.__cause__ or exc.__context__
            if isinstance(exc, UnicodeDecodeError):
                raise UserError(f"data file {name} is not UTF-8 text") from None
            raise UserError(f"data file {name} cannot be read as {kind} ({type(exc).__name__}: {exc})") from None
    else:
        if kind == "text" and not any(row["text"].strip() for row in ds):
            raise UserError(f"data file {name} has no text")
        if suffix in (".jsonl", ".ndjson"):  # datasets skips blank lines: count them back in
            with path.open("rb") as f:
                lines = [n for n, line in enumerate(f, 1) if line.strip()]
            rows = [(f"line {lines[i] if i < len(lines) else i + 1}", row) for i, row in enumerate(ds)]
        else:
            unit = "line" if kind == "text" else "record"
            rows = [(f"{unit} {i + 1}", row) for i, row in enumerate(ds)]
    if not rows:
        raise UserError(f"data file {name} has no records")
    return rows, kind == "text"


@contextlib.contextmanager
def _datasets_offline():
    """Yield ``load_dataset``: quiet, offline, in memory, with a throw-away cache folder."""
    import datasets

    # load_dataset pings the hub to count downloads of packaged loaders unless told not to.
    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user our way
    try:
        with tempfile.TemporaryDirectory(prefix="swarm-data-") as cache:
            yield functools.partial(datasets.load_dataset, cache_dir=cache, keep_in_memory=True)
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _parse_json(name: str, path: Path) -> list[tuple[str, dict]]:
    """Read a JSON or JSON-lines file with ``json``, to say which line is wrong."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {name} is not UTF-8 text (byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("["):  # an array, not JSON lines: the parser knows the line
                raise UserError(f"data file {name} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        else:
            return [(f"record {i + 1}", row) for i, row in enumerate(whole if isinstance(whole, list) else [whole])]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                rows.append((f"line {n}", _Unreadable(error=f"not valid JSON ({exc.msg}, column {exc.colno})")))
    return rows


def _problem(row, fmt: str) -> str | None:
    """Why ``row`` cannot serve as a ``fmt`` example, or None."""
    if isinstance(row, _Unreadable):
        return row["error"]
    if not isinstance(row, dict):
        return f"record is {_kind(row)}, not an object"
    for field in _NEEDS[fmt]:
        if row.get(field) is None:
            return f"record has no '{field}' field (format '{fmt}' needs {' and '.join(_NEEDS[fmt])})"
    if fmt != "chat":
        for field in (*_NEEDS[fmt], "input") if fmt == "instruction" else _NEEDS[fmt]:
            if row.get(field) is not None and not isinstance(row[field], str):
                return f"'{field}' must be a string, not {_kind(row[field])}"
        return None
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty list of {{role, content}} objects, not {_kind(messages)}"
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return f"message {i} must be a {{role, content}} object, not {_kind(message)}"
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                what = "has no" if message.get(field) is None else "has a non-string"
                return f"message {i} {what} '{field}' field (format 'chat' needs messages with role and content)"
    return None


def _kind(value) -> str:
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _tokenize(records: list[_Record], cfg: DataSection, tokenizer, bad: list[str]) -> list:
    """(input_ids, labels) per record, in batches; None for a record skipped here."""
    rows = [r.row for r in records]
    if cfg.format == "text":
        return [(ids, list(ids)) for ids in _encode(tokenizer, [r["text"] for r in rows])]
    if cfg.format == "instruction":
        prompts = [(PROMPT_WITH_INPUT if r.get("input") else PROMPT).format(**r) for r in rows]
        heads, tails = _encode(tokenizer, prompts), _encode(tokenizer, [r["output"] for r in rows])
        return [(h + t, [IGNORE] * len(h) + t) for h, t in zip(heads, tails)]
    if not tokenizer.chat_template:
        raise UserError("format 'chat' needs a tokenizer with a chat template; this one has none")
    # Keys that Arrow filled in as null (for messages that lacked them) would reach the template.
    convs = [[{k: v for k, v in m.items() if v is not None} for m in r["messages"]] for r in rows]
    try:
        return _tokenize_chat(convs, tokenizer)
    except UserError:
        raise
    except Exception as exc:  # the template refused a conversation: find which, and name it
        result = []
        for record, conv in zip(records, convs):
            try:
                result += _tokenize_chat([conv], tokenizer)
            except UserError:
                raise
            except Exception as one:
                bad.append(f"data file {cfg.files[record.file]} {record.where}: chat template failed ({one})")
                if not cfg.skip_bad_records:
                    raise UserError(bad[-1]) from None
                result.append(None)
        if None not in result:
            raise exc
        return result


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # Prompt and answer are encoded apart, so the mask's edge is exact; BOS is added once
    # per document by _pack, not once per piece.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _tokenize_chat(convs: list[list[dict]], tokenizer) -> list[tuple[list[int], list[int]]]:
    template = tokenizer.chat_template
    if _GENERATION.search(template if isinstance(template, str) else json.dumps(template)):
        enc = tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        pairs = zip(enc["input_ids"], enc["assistant_masks"])
        return [(ids, [t if m else IGNORE for t, m in zip(ids, mask)]) for ids, mask in pairs]
    # Without {% generation %} markers transformers cannot mask; find each assistant turn's
    # characters by rendering the conversation up to it, then map characters to tokens.
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in convs]
    spans = [
        [_turn_span(tokenizer, conv, i, text) for i, m in enumerate(conv) if m["role"] == "assistant"]
        for conv, text in zip(convs, texts)
    ]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    result = []
    for ids, offsets, turns in zip(enc["input_ids"], enc["offset_mapping"], spans):
        inside = [any(a <= start < b for a, b in turns) for start, _ in offsets]
        result.append((ids, [t if k else IGNORE for t, k in zip(ids, inside)]))
    return result


def _turn_span(tokenizer, conv: list[dict], i: int, text: str) -> tuple[int, int]:
    """Characters of assistant turn ``i`` in ``text`` (the whole conversation rendered)."""
    end = tokenizer.apply_chat_template(conv[: i + 1], tokenize=False)
    heads = []
    if i == 0:  # transformers will not render an empty conversation: start at the content
        heads.append(end[: max(end.find(conv[0]["content"].strip()), 0)])
    for header in (False, True):  # the assistant header, if any, is prompt, not answer
        with contextlib.suppress(Exception):  # some refuse one that does not end with a user turn
            heads.insert(0, tokenizer.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=header))
    for head in heads:
        if text.startswith(end) and end.startswith(head):
            return len(head), len(end)
    raise UserError(
        "the tokenizer's chat template has no {% generation %} markers and does not render "
        "conversations incrementally, so assistant turns cannot be found; add the markers"
    )


def _bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself starts text with it (Llama's does, GPT-2's does not)."""
    bos = tokenizer.bos_token_id
    plain, special = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    return [bos] if bos is not None and special[:1] == [bos] and plain[:1] != [bos] else []


def _eval_indices(n: int, fraction: float, seed: int) -> set[int]:
    """Which records to hold out: a seeded sample, at least one, never all."""
    if fraction <= 0 or n < 2:
        return set()
    return set(random.Random(seed).sample(range(n), min(n - 1, max(1, round(n * fraction)))))


def _pack(chosen, seq_len: int, bos: list[int], eos: int, eos_label: int, pad: int) -> tuple[list[dict], int]:
    """Concatenate examples, BOS and EOS at document edges, into padded blocks; count real tokens."""
    ids: list[int] = []
    labels: list[int] = []
    starts_doc = True
    for k, (record, (tokens, targets)) in enumerate(chosen):
        if starts_doc:
            ids += bos
            labels += [IGNORE] * len(bos)
        ids += tokens
        labels += targets
        following = chosen[k + 1][0] if k + 1 < len(chosen) else None
        starts_doc = not (record.line_of_text and following is not None and following.file == record.file)
        if starts_doc and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos_label)
    real = len(ids)
    size = -(-real // seq_len) * seq_len  # whole blocks: the tail is padded, not dropped
    columns = {}
    for key, values, fill in (("input_ids", ids, pad), ("labels", labels, IGNORE), ("attention_mask", [1] * real, 0)):
        column = np.full(size, fill, dtype=np.int64)
        column[:real] = values
        columns[key] = column.reshape(-1, seq_len).tolist()
    return [dict(zip(columns, row)) for row in zip(*columns.values())], real
