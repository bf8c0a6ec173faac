"""Packing: best-fit placement, examples kept apart (positions and attention), pairs batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swarm.data.packing import IGNORE, BlockBuilder, PairBuilder, best_fit

EOS, PAD = 0, 1


def build(examples: list[list[int]], seq_len: int, isolate: bool):
    builder = BlockBuilder([], EOS, eos_is_target=True)
    for ids in examples:
        builder.add(ids, [True] * len(ids))
    return builder.blocks(seq_len, PAD, isolate)


def test_best_fit_decreasing_fills_blocks_without_splitting_examples():
    lengths = np.array([6, 5, 4, 3, 2, 2, 1, 1])  # 24 tokens: three blocks of 8, if placed well
    bins = best_fit(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(sum(lengths[b]) <= 8 for b in bins)
    assert len(bins) == 3


def test_isolated_blocks_restart_positions_for_every_example():
    blocks = build([[10, 11, 12], [20, 21, 22, 23, 24], [30, 31]], seq_len=8, isolate=True)
    # With EOS: 4, 6 and 3 tokens. Longest first: 6 opens a block (2 left), 4 a second, 3 joins the 4.
    assert len(blocks) == 2 and sorted(blocks.real.tolist()) == [6, 7]
    for ids, positions, real in zip(blocks.input_ids.tolist(), blocks.position_ids.tolist(), blocks.real.tolist()):
        starts = [i for i in range(8) if positions[i] == 0]
        for a, b in zip(starts, starts[1:] + [8]):
            assert positions[a:b] == list(range(b - a))  # each example (and the padding) counts from 0
        assert all(t == PAD for t in ids[real:])
        examples = [ids[a:b] for a, b in zip(starts, starts[1:] + [8]) if a < real]
        assert all(e[-1] == EOS for e in examples)
    assert not blocks.loss_mask[np.arange(8)[None, :] >= blocks.real[:, None]].any()


def test_an_example_longer_than_a_block_is_cut_into_pieces_that_count_from_zero():
    blocks = build([list(range(100, 111))], seq_len=4, isolate=True)  # 12 tokens with EOS
    assert len(blocks) == 3 and blocks.real.tolist() == [4, 4, 4]
    assert (blocks.position_ids == np.arange(4)).all()
    assert sorted(blocks.input_ids.ravel().tolist()) == sorted([*range(100, 111), EOS])


def test_concatenated_blocks_run_examples_together():
    blocks = build([[10, 11, 12], [20, 21]], seq_len=4, isolate=False)
    assert blocks.position_ids is None
    assert blocks.input_ids.tolist() == [[10, 11, 12, EOS], [20, 21, EOS, PAD]]
    assert blocks.real.tolist() == [4, 3]
    inputs, real = blocks.batch([1, 0], "cpu")
    assert real == 7 and set(inputs) == {"input_ids", "labels"}
    assert inputs["labels"].tolist() == [[20, 21, EOS, IGNORE], [10, 11, 12, EOS]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_second_example_of_a_packed_block_does_not_see_the_first(tiny_models, attention):
    """Logits of an example packed after another equal its logits alone; concatenated, they do not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), attn_implementation=attention,
                                                 dtype=torch.float32).eval()
    model.config.use_cache = False  # as swarm.train.worker.model sets it: transformers packs only without a cache
    first, second = list(range(40, 52)), list(range(60, 69))
    isolated = build([first, second], seq_len=32, isolate=True)
    assert len(isolated) == 1
    inputs, _ = isolated.batch([0], "cpu")
    ids, positions = inputs["input_ids"], inputs["position_ids"]
    at = (ids[0] == 60).nonzero().item()  # where the second example starts in the block
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0, at:at + len(second) + 1]
        alone = model(input_ids=torch.tensor([[*second, EOS]])).logits[0]
        together = model(input_ids=ids).logits[0, at:at + len(second) + 1]
    assert torch.allclose(packed, alone, atol=1e-4)
    assert not torch.allclose(together, alone, atol=1e-2)


def test_pairs_batch_chosen_then_rejected_right_padded():
    builder = PairBuilder([], seq_len=8)
    builder.add(([1, 2, 3], [False, True, True]), ([1, 2], [False, True]))
    builder.add(([4, 5], [False, True]), ([4, 6, 7, 8], [False, True, True, True]))
    pairs = builder.pairs()
    assert len(pairs) == 2 and pairs.tokens == 11
    inputs, real = pairs.batch([1, 0], "cpu", pad=PAD)
    assert real == 11
    assert inputs["input_ids"].tolist() == [[4, 5, PAD, PAD], [1, 2, 3, PAD], [4, 6, 7, 8], [1, 2, PAD, PAD]]
    assert inputs["labels"].tolist() == [[IGNORE, 5, IGNORE, IGNORE], [IGNORE, 2, 3, IGNORE],
                                         [IGNORE, 6, 7, 8], [IGNORE, 2, IGNORE, IGNORE]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_a_long_pair_keeps_its_answer_and_the_end_of_its_prompt():
    builder = PairBuilder([], seq_len=6)
    prompt = list(range(10, 20))
    builder.add((prompt + [1, 2], [False] * 10 + [True] * 2), (prompt + [3], [False] * 10 + [True]))
    pairs = builder.pairs()
    assert builder.truncated == 1
    assert pairs.input_ids[:6].tolist() == [16, 17, 18, 19, 1, 2]
    assert pairs.input_ids[6:].tolist() == [15, 16, 17, 18, 19, 3]
