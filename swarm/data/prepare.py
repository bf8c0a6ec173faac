"""Training data: read the sources, check every record, tokenize, hold out eval records, pack.

Two passes over the sources (``swarm.data.sources``: local files, ``save_to_disk``
folders, Arrow files, Hugging Face Hub data sets), each a batch of records at a time:

1. every record is checked (``swarm.data.records``) before any token is made; one
   without what its format needs is an error naming the file and line
   (``skip_bad_records`` skips and counts it);
2. the good records are tokenized (``swarm.data.tokenize``) and appended to the train or
   eval builder (``swarm.data.packing``), which keep numpy arrays, never a Python object
   per token.

Every document starts with BOS (when the tokenizer adds one) and ends with EOS; the lines
of a text file are one document. Supervised formats are packed into blocks of ``seq_len``
tokens (examples kept apart when ``data.isolate_examples`` says so); the last block is
padded rather than dropped, so that a tiny data set still trains. Preference pairs are
kept as pairs of sequences.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swarm.config.models import DataSection
from swarm.data.packing import BlockBuilder, Blocks, PairBuilder, Pairs
from swarm.data.records import normalize, problem
from swarm.data.sources import Source, open_source, quiet_datasets, sha256_of
from swarm.data.tokenize import RecordError, bos_of, tokenize, tokenize_pairs
from swarm.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What went in: usable ``records`` (train + eval), ``skipped`` bad ones, real (not
    padding) tokens per split, ``sha256`` over the sources' bytes in order, and preference
    pairs cut to ``seq_len`` (``truncated``)."""

    files: list[str]
    records: int
    skipped: int
    train_tokens: int
    eval_tokens: int
    sha256: str
    truncated: int = 0


@dataclass
class PreparedData:
    """The train and eval splits (``Blocks``, or ``Pairs`` for preference data; eval may be None)."""

    train: Blocks | Pairs | None
    eval: Blocks | Pairs | None
    stats: DataStats


def prepare_data(cfg: DataSection, tokenizer) -> PreparedData:
    """Read, check, tokenize, split and pack the job's data.

    Args:
        cfg: the job's ``data`` section.
        tokenizer: a fast transformers tokenizer (with a chat template for chat,
            sharegpt and conversational preference data).

    Returns:
        The train and eval splits and what went in.

    Raises:
        UserError: a missing, empty or unreadable source, a mapped column it lacks, a
            malformed record (unless skipped), or a tokenizer that cannot serve the format.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; packing needs one to separate examples")
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    labels = cfg.labels
    with quiet_datasets(), tempfile.TemporaryDirectory(prefix="swarm-data-") as scratch:
        sources = [open_source(entry, label, cfg, Path(scratch)) for entry, label in zip(cfg.sources, labels)]
        usable, bad = _check(sources, cfg)
        total = sum(int(u.sum()) for u in usable)
        if not total:
            raise UserError(f"data files {', '.join(labels)} hold no usable records ({len(bad)} skipped)")
        held_out = _eval_mask(total, cfg.eval_fraction, cfg.seed)
        bos = [] if cfg.format in ("chat", "sharegpt") else bos_of(tokenizer)  # chat templates write their own
        if cfg.format == "preference":
            builders = [PairBuilder(bos, cfg.seq_len) for _ in range(2)]
        else:
            # chat: the template's end of turn teaches stopping, the EOS added after it does not.
            builders = [BlockBuilder(bos, eos, cfg.format not in ("chat", "sharegpt")) for _ in range(2)]
        kept = _tokenize_into(sources, usable, held_out, builders, cfg, tokenizer, bad)
        sha256 = sha256_of(sources)
        sources.clear()  # unmaps the Arrow files before the blocks are built
    if bad:
        log.warning("skipped %d bad record(s); the first: %s", len(bad), bad[0])
    if not kept:
        raise UserError(f"data files {', '.join(labels)} hold no usable records ({len(bad)} skipped)")
    if cfg.format == "preference":
        train, evals = (b.pairs() for b in builders)
        truncated = sum(b.truncated for b in builders)
        if truncated:
            log.warning("%d preference pair(s) were longer than data.seq_len=%d and were cut", truncated, cfg.seq_len)
    else:
        train, evals = (b.blocks(cfg.seq_len, pad, cfg.isolates) for b in builders)
        truncated = 0
    stats = DataStats(labels, kept, len(bad), train.tokens if train is not None else 0,
                      evals.tokens if evals is not None else 0, sha256, truncated)
    return PreparedData(train=train, eval=evals, stats=stats)


def _check(sources: list[Source], cfg: DataSection) -> tuple[list[np.ndarray], list[str]]:
    """Pass 1: which records of each source are usable; the bad ones, described."""
    usable, bad = [], []
    for source in sources:
        good = np.zeros(len(source), dtype=bool)
        index, any_text = 0, False
        for rows in source.batches(cfg.columns):
            for row in rows:
                issue = problem(row, cfg.format)
                if issue:
                    bad.append(f"data file {source.label} {source.where(index)}: {issue}")
                    if not cfg.skip_bad_records:
                        raise UserError(bad[-1])
                else:
                    good[index] = True
                    any_text = any_text or (source.text and bool(row["text"].strip()))
                index += 1
        if source.text and not any_text:
            raise UserError(f"data file {source.label} has no text")
        usable.append(good)
    return usable, bad


def _tokenize_into(sources, usable, held_out, builders, cfg: DataSection, tokenizer, bad: list[str]) -> int:
    """Pass 2: tokenize the usable records into the train (0) and eval (1) builders; count those kept."""
    position = kept = 0  # position: among usable records, for the eval split
    for number, (source, good) in enumerate(zip(sources, usable)):
        index = 0
        for rows in source.batches(cfg.columns):
            picked = [i for i in range(index, index + len(rows)) if good[i]]
            records = [normalize(rows[i - index], cfg.format) for i in picked]
            index += len(rows)
            if not records:
                continue
            if cfg.format == "preference":
                results = tokenize_pairs(records, tokenizer)
            else:
                results = tokenize(records, cfg.format, tokenizer)
            for i, result in zip(picked, results):
                split = builders[int(held_out[position])]
                position += 1
                if isinstance(result, RecordError):
                    bad.append(f"data file {source.label} {source.where(i)}: {result}")
                    if not cfg.skip_bad_records:
                        raise UserError(bad[-1])
                    continue
                kept += 1
                if cfg.format == "preference":
                    split.add(*result)
                else:
                    split.add(*result, document=number if source.text else None)
    return kept


def _eval_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of ``n`` usable records to hold out: a seeded sample, at least one, never all."""
    mask = np.zeros(n, dtype=bool)
    if fraction > 0 and n >= 2:
        mask[random.Random(seed).sample(range(n), min(n - 1, max(1, round(n * fraction))))] = True
    return mask
