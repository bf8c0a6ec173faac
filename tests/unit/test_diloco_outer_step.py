"""diloco's outer step on a real peft adapter: Nesterov SGD on the B factors, the plain mean on the A factors."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from swarm.train.diloco import lora_a_slices, outer_step


def lora_named():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1", "2"]))
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def test_the_a_slices_are_exactly_peft_s_a_factors():
    named = lora_named()
    flat = torch.cat([p.detach().flatten() for _, p in named])
    slices = lora_a_slices(named)
    a_factors = [p for name, p in named if "lora_A" in name or "lora_embedding_A" in name]
    assert len(slices) == len(a_factors) == 3  # the embedding's and both linear layers'
    for part, p in zip(slices, a_factors):
        assert torch.equal(flat[part], p.detach().flatten())
    assert sum(s.stop - s.start for s in slices) < flat.numel()  # the B factors are outside


def test_b_factors_take_nesterov_and_a_factors_the_mean():
    named = lora_named()
    glob = torch.cat([p.detach().flatten() for _, p in named])
    delta = torch.randn_like(glob)
    buf = torch.randn_like(glob)
    slices = lora_a_slices(named)
    new, new_buf = outer_step(glob, delta, buf.clone(), lr=0.7, momentum=0.9, averaged=slices)
    is_a = torch.zeros_like(glob, dtype=torch.bool)
    for part in slices:
        is_a[part] = True
    expected_buf = 0.9 * buf + delta
    expected = glob - 0.7 * (delta + 0.9 * expected_buf)
    assert torch.allclose(new[~is_a], expected[~is_a])
    assert torch.allclose(new_buf[~is_a], expected_buf[~is_a])
    assert torch.equal(new[is_a], (glob - delta)[is_a])  # the PCs' mean A
    assert not new_buf[is_a].any()  # no momentum builds up on A


def test_lr_1_without_momentum_is_plain_averaging_everywhere():
    named = lora_named()
    glob = torch.cat([p.detach().flatten() for _, p in named])
    delta = torch.randn_like(glob)
    new, _ = outer_step(glob, delta, torch.zeros_like(glob), lr=1.0, momentum=0.0, averaged=lora_a_slices(named))
    assert torch.equal(new, glob - delta)

