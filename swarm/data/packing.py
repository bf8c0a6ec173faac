"""Packed training data as numpy arrays, from the tokenizer to the worker's batch.

The driver appends each tokenized record to a builder (``BlockBuilder`` for supervised
formats, ``PairBuilder`` for preference pairs), which keeps compact arrays, never a Python
object per token. ``Blocks`` and ``Pairs`` travel through Ray's object store as they are
(numpy arrays are shared, not copied, by the workers of a node) and give each worker its
micro-batches as tensors.

Packing without cross-contamination (``isolate=True``): examples are placed whole into
blocks by best-fit decreasing (an example longer than a block is cut into block-sized
pieces first), and each block carries ``position_ids`` that restart at 0 for every example.
Given position ids and no attention mask, transformers keeps attention within each
example (``masking_utils.find_packed_sequence_indices`` for SDPA and eager attention, the
varlen kernel for FlashAttention-2), and rotary positions start afresh. Without isolation
the records are concatenated and cut into blocks, as usual for pre-training text.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

IGNORE = -100  # the label torch's cross-entropy skips


class _Chunks:
    """Growing int32 ids and bool loss mask: short Python lists while filling, numpy chunks after."""

    FLUSH = 1 << 18  # tokens gathered as Python ints before they become a numpy chunk

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.mask: list[np.ndarray] = []
        self._ids: list[int] = []
        self._mask: list[bool] = []
        self.length = 0

    def add(self, ids, mask) -> None:
        self._ids += ids
        self._mask += mask
        self.length += len(ids)
        if len(self._ids) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            self.ids.append(np.array(self._ids, dtype=np.int32))
            self.mask.append(np.array(self._mask, dtype=bool))
            self._ids, self._mask = [], []

    def drain(self, size: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat arrays of ``size`` (>= length, the rest padding); each chunk is freed once copied."""
        self._flush()
        ids, mask = np.empty(size, dtype=np.int32), np.zeros(size, dtype=bool)
        at = 0
        self.ids.reverse()
        self.mask.reverse()
        while self.ids:
            piece, flags = self.ids.pop(), self.mask.pop()
            ids[at:at + len(piece)], mask[at:at + len(piece)] = piece, flags
            at += len(piece)
        ids[at:] = pad
        self.length = 0
        return ids, mask


@dataclass
class Blocks:
    """One split of a supervised data set: ``len(self)`` blocks of ``seq_len`` tokens.

    Attributes:
        input_ids: [blocks, seq_len] int32.
        loss_mask: [blocks, seq_len] bool: the token is a target (its label is itself).
        real: [blocks] int32: tokens that are not padding (padding ends a block).
        position_ids: [blocks, seq_len], restarting at 0 for each example; None when the
            examples run together (positions 0..seq_len-1, the model's default).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    real: np.ndarray
    position_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        return int(self.real.sum())

    def batch(self, indices: list[int], device) -> tuple[dict, int]:
        """Model inputs of the blocks at ``indices`` and their real token count."""
        import torch

        ids = self.input_ids[indices].astype(np.int64)
        inputs = {
            "input_ids": torch.from_numpy(ids).to(device),
            "labels": torch.from_numpy(np.where(self.loss_mask[indices], ids, IGNORE)).to(device),
        }
        if self.position_ids is not None:
            inputs["position_ids"] = torch.from_numpy(self.position_ids[indices].astype(np.int64)).to(device)
        return inputs, int(self.real[indices].sum())


class BlockBuilder:
    """Collects one split's records; ``blocks`` packs them.

    Args:
        bos: the tokens that start a document ([] or [bos]).
        eos: the EOS id; a document that does not end with it gets one.
        eos_is_target: whether that added EOS is a target (it teaches stopping; chat
            templates end turns with their own token instead).
    """

    def __init__(self, bos: list[int], eos: int, eos_is_target: bool):
        self.bos, self.eos, self.eos_is_target = bos, eos, eos_is_target
        self.chunks = _Chunks()
        self.starts: list[int] = []  # where each document begins
        self._open: object = None  # the document key of the last record, while its document is open
        self._last = None

    def add(self, ids: list[int], mask: list[bool], document: object = None) -> None:
        """Append a record; records with the same non-None ``document`` key run on as one document."""
        if document is None or document != self._open:
            self._close()
            self.starts.append(self.chunks.length)
            if self.bos:
                self.chunks.add(self.bos, [False] * len(self.bos))
        self.chunks.add(ids, mask)
        self._open, self._last = document, ids[-1] if ids else self._last

    def _close(self) -> None:
        if self.starts and self._last != self.eos:
            self.chunks.add([self.eos], [self.eos_is_target])
        self._open, self._last = None, None

    def blocks(self, seq_len: int, pad: int, isolate: bool) -> Blocks | None:
        """The packed blocks (None when the split is empty); the builder is emptied."""
        self._close()
        total = self.chunks.length
        if not total:
            return None
        if not isolate:
            count = -(-total // seq_len)
            ids, mask = self.chunks.drain(count * seq_len, pad)
            real = np.minimum(seq_len, total - np.arange(count, dtype=np.int64) * seq_len).astype(np.int32)
            return Blocks(ids.reshape(count, seq_len), mask.reshape(count, seq_len), real)
        ids, mask = self.chunks.drain(total, pad)
        bounds = np.append(np.asarray(self.starts, dtype=np.int64), total)
        pieces = _pieces(bounds, seq_len)
        return _fill(ids, mask, pieces, best_fit(pieces[:, 1] - pieces[:, 0], seq_len), seq_len, pad)


def _pieces(bounds: np.ndarray, seq_len: int) -> np.ndarray:
    """[n, 2] (start, end) of every example, those longer than ``seq_len`` cut into pieces."""
    starts, ends = bounds[:-1], bounds[1:]
    cuts = -(-(ends - starts) // seq_len)
    first = np.repeat(starts, cuts) + seq_len * (np.arange(cuts.sum()) - np.repeat(np.cumsum(cuts) - cuts, cuts))
    return np.stack([first, np.minimum(first + seq_len, np.repeat(ends, cuts))], axis=1)


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the pieces (by index) of each block, longest pieces placed first.

    Each piece goes to the fullest block it still fits in; the distinct free spaces (at
    most ``capacity + 1`` values) are kept sorted, so a placement is a binary search.
    """
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free spaces that some block has
    with_free: dict[int, list[int]] = {}  # free space -> blocks with it
    for piece in np.argsort(-lengths, kind="stable").tolist():
        size = int(lengths[piece])
        at = bisect.bisect_left(free_values, size)
        if at == len(free_values):
            block, space = len(bins), capacity
            bins.append([])
        else:
            space = free_values[at]
            block = with_free[space].pop()
            if not with_free[space]:
                del with_free[space], free_values[at]
        bins[block].append(piece)
        left = space - size
        if left not in with_free:
            with_free[left] = []
            bisect.insort(free_values, left)
        with_free[left].append(block)
    return bins


def _fill(ids: np.ndarray, mask: np.ndarray, pieces: np.ndarray, bins: list[list[int]], seq_len: int,
          pad: int) -> Blocks:
    count = len(bins)
    position_dtype = np.uint16 if seq_len <= np.iinfo(np.uint16).max + 1 else np.int32
    out_ids = np.full((count, seq_len), pad, dtype=np.int32)
    out_mask = np.zeros((count, seq_len), dtype=bool)
    positions = np.empty((count, seq_len), dtype=position_dtype)
    counting = np.arange(seq_len, dtype=position_dtype)
    real = np.zeros(count, dtype=np.int32)
    for b, members in enumerate(bins):
        at = 0
        for piece in members:
            start, end = pieces[piece]
            n = int(end - start)
            out_ids[b, at:at + n], out_mask[b, at:at + n] = ids[start:end], mask[start:end]
            positions[b, at:at + n] = counting[:n]
            at += n
        positions[b, at:] = counting[:seq_len - at]  # padding: a separate sequence of its own
        real[b] = at
    return Blocks(out_ids, out_mask, real, positions)


@dataclass
class Pairs:
    """One split of a preference data set, ragged: sequence 2i is pair i's chosen answer, 2i+1 its rejected.

    Attributes:
        input_ids: every sequence's tokens, concatenated (int32).
        loss_mask: True on the answer's tokens (bool).
        offsets: [2 * pairs + 1] where each sequence starts, then the total.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 2

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices: list[int], device, pad: int = 0) -> tuple[dict, int]:
        """The chosen sequences of ``indices`` then their rejected ones, right-padded to the longest."""
        import torch

        rows = [2 * i for i in indices] + [2 * i + 1 for i in indices]
        starts, ends = self.offsets[rows], self.offsets[np.asarray(rows) + 1]
        width = int((ends - starts).max())
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        for r, (start, end) in enumerate(zip(starts, ends)):
            n = end - start
            ids[r, :n] = self.input_ids[start:end]
            labels[r, :n] = np.where(self.loss_mask[start:end], ids[r, :n], IGNORE)
            attention[r, :n] = 1
        inputs = {k: torch.from_numpy(v).to(device) for k, v in
                  (("input_ids", ids), ("labels", labels), ("attention_mask", attention))}
        return inputs, int((ends - starts).sum())


class PairBuilder:
    """Collects one split's preference pairs, each sequence cut to ``seq_len`` tokens."""

    def __init__(self, bos: list[int], seq_len: int):
        self.bos, self.seq_len = bos, seq_len
        self.chunks = _Chunks()
        self.offsets = [0]
        self.truncated = 0

    def add(self, chosen: tuple[list[int], list[bool]], rejected: tuple[list[int], list[bool]]) -> None:
        cut = False
        for ids, mask in (chosen, rejected):
            ids, mask = self.bos + ids, [False] * len(self.bos) + mask
            if len(ids) > self.seq_len:
                ids, mask, cut = *_shorten(ids, mask, self.seq_len), True
            self.chunks.add(ids, mask)
            self.offsets.append(self.chunks.length)
        self.truncated += cut

    def pairs(self) -> Pairs | None:
        if len(self.offsets) == 1:
            return None
        ids, mask = self.chunks.drain(self.chunks.length, 0)
        return Pairs(ids, mask, np.asarray(self.offsets, dtype=np.int64))


def _shorten(ids: list[int], mask: list[bool], limit: int) -> tuple[list[int], list[bool]]:
    """Fit a sequence into ``limit``: drop the prompt's oldest tokens (keeping half the room), then the answer's end."""
    answer = mask.index(True) if True in mask else len(mask)
    keep_prompt = max(min(answer, limit // 2), limit - (len(ids) - answer))
    drop = max(0, answer - keep_prompt)
    ids, mask = ids[drop:], mask[drop:]
    return ids[:limit], mask[:limit]
