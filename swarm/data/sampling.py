"""Which packed blocks each worker trains on at each step.

The order is a property of the job, not of the workers: blocks are visited in a seeded
permutation per epoch, and each optimizer step takes the next ``G`` positions of that
endless sequence (``G`` = micro-batch x accumulation x workers). The data position is the
number of samples seen, so a run resumed with another number of workers neither repeats
nor skips a block.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)  # consecutive steps stay within one or two epochs
def epoch_order(num_blocks: int, epoch: int, seed: int) -> np.ndarray:
    """The visiting order of blocks in ``epoch``, the same on every worker."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def micro_batch_indices(
    samples_seen: int, micro: int, rank: int, world_size: int, micro_batch: int,
    num_blocks: int, seed: int,
) -> list[int]:
    """Block indices for one micro-batch of one worker.

    Args:
        samples_seen: Samples consumed by all previous optimizer steps (the data position).
        micro: Micro-step within the accumulation window (0-based).
        rank: This worker's rank.
        world_size: Number of workers.
        micro_batch: Blocks per micro-batch per worker.
        num_blocks: Blocks in the training set.
        seed: Data seed.
    """
    first = samples_seen + (micro * world_size + rank) * micro_batch
    indices = []
    for position in range(first, first + micro_batch):
        epoch, offset = divmod(position, num_blocks)
        indices.append(int(epoch_order(num_blocks, epoch, seed)[offset]))
    return indices
