"""diloco's outer optimizers (swarm.train.worker.diloco.outer) on a real peft adapter's flat layout."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from swarm.train.worker.diloco.exchange import lora_a_slices
from swarm.train.worker.diloco.outer import outer_step


def lora_named():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1", "2"]))
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def flat_and_a_mask(named):
    flat = torch.cat([p.detach().flatten() for _, p in named])
    is_a = torch.zeros_like(flat, dtype=torch.bool)
    for part in lora_a_slices(named):
        is_a[part] = True
    return flat, is_a


def test_the_a_slices_are_exactly_peft_s_a_factors():
    named = lora_named()
    flat = torch.cat([p.detach().flatten() for _, p in named])
    slices = lora_a_slices(named)
    a_factors = [p for name, p in named if "lora_A" in name or "lora_embedding_A" in name]
    assert len(slices) == len(a_factors) == 3  # the embedding's and both linear layers'
    for part, p in zip(slices, a_factors):
        assert torch.equal(flat[part], p.detach().flatten())
    assert sum(s.stop - s.start for s in slices) < flat.numel()  # the B factors are outside


def test_nesterov_b_moves_b_by_nesterov_and_sets_a_to_the_mean():
    named = lora_named()
    glob, is_a = flat_and_a_mask(named)
    delta, buf = torch.randn_like(glob), torch.randn_like(glob)
    new, new_buf = outer_step(glob, delta, buf.clone(), "nesterov-b", 0.7, 0.9, lora_a_slices(named))
    expected_buf = 0.9 * buf + delta
    expected = glob - 0.7 * (delta + 0.9 * expected_buf)
    assert torch.allclose(new[~is_a], expected[~is_a])
    assert torch.allclose(new_buf[~is_a], expected_buf[~is_a])
    assert torch.equal(new[is_a], (glob - delta)[is_a])  # the PCs' mean A
    assert not new_buf[is_a].any()  # no momentum builds up on A


def test_nesterov_moves_the_whole_adapter_as_diloco_publishes():
    named = lora_named()
    glob, _ = flat_and_a_mask(named)
    delta, buf = torch.randn_like(glob), torch.randn_like(glob)
    new, new_buf = outer_step(glob, delta, buf.clone(), "nesterov", 0.7, 0.9, lora_a_slices(named))
    assert torch.allclose(new_buf, 0.9 * buf + delta)
    assert torch.allclose(new, glob - 0.7 * (delta + 0.9 * new_buf))


@pytest.mark.parametrize("lr, momentum", [(0.7, 0.9), (1.0, 0.0)])
def test_average_is_the_mean_of_the_pcs_adapters_whatever_lr_and_momentum(lr, momentum):
    named = lora_named()
    glob, _ = flat_and_a_mask(named)
    pcs = [glob + torch.randn_like(glob) for _ in range(3)]
    delta = sum(glob - pc for pc in pcs) / 3
    buf = torch.zeros_like(glob)
    new, new_buf = outer_step(glob, delta, buf, "average", lr, momentum, lora_a_slices(named))
    assert torch.allclose(new, sum(pcs) / 3, atol=1e-6)
    assert not new_buf.any() and new_buf is not buf


def test_lr_1_without_momentum_is_plain_averaging_under_every_rule():
    named = lora_named()
    glob, _ = flat_and_a_mask(named)
    delta = torch.randn_like(glob)
    for rule in ("average", "nesterov", "nesterov-b"):
        new, _ = outer_step(glob, delta, torch.zeros_like(glob), rule, 1.0, 0.0, lora_a_slices(named))
        assert torch.equal(new, glob - delta), rule


def test_an_unknown_rule_is_refused():
    glob = torch.zeros(4)
    with pytest.raises(ValueError, match="unknown outer rule"):
        outer_step(glob, glob, glob, "adam", 0.7, 0.9)
