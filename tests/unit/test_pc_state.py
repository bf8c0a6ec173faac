"""What a diloco resume does with a checkpoint's PC state when it cannot restore each PC's own."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from swarm.train.checkpoint import join_state, split_state
from swarm.train.worker.diloco.pc_state import restore_pc_state


def trainer_state(**extra) -> dict:
    return {"step": 5, "samples_seen": 20, "optimizer_step": 5, "scheduler": {"last_epoch": 5},
            "moments": {"exp_avg": {"w": torch.ones(3)}},
            "rng": {"torch": torch.get_rng_state(), "cuda": None, "numpy": np.random.get_state(),
                    "python": random.getstate()}, **extra}


def exchange_on(addresses, pc=0):
    return SimpleNamespace(notes=[], last_exchange=5, groups=SimpleNamespace(
        addresses=addresses, pc=pc, is_leader=True, pc_ranks=[[r] for r in range(len(addresses))]))


def test_the_pcs_and_last_exchange_survive_the_checkpoint_format():
    info = {"pcs": ["10.0.0.1", "10.0.0.2"], "last_exchange": 4, "moment_keys": ["exp_avg"]}
    tensors, plain = split_state(trainer_state(extra={"pc1/adapter": torch.arange(3.0)}, diloco=info))
    back = join_state(tensors, plain)
    assert back["diloco"] == info and torch.equal(back["extra"]["pc1/adapter"], torch.arange(3.0))


def test_a_checkpoint_from_before_each_pcs_state_resumes_with_a_note():
    tensors, plain = split_state(trainer_state(extra={"outer_momentum": torch.zeros(3)}))
    plain.pop("diloco")  # trainer_state.json as swarm wrote it before issue 31
    resume = {"step": 5, "trainer": join_state(tensors, plain)}
    exchange = exchange_on(["10.0.0.1", "10.0.0.2"])
    restore_pc_state(exchange, resume)
    assert exchange.last_exchange == 5 and len(exchange.notes) == 1
    assert "inner optimizer moments of the PC that wrote it" in exchange.notes[0]


def test_other_pcs_than_the_checkpoints_resume_from_the_global_adapter_with_a_note():
    info = {"pcs": ["10.0.0.1", "10.0.0.2"], "pc_ranks": [[0], [1]], "last_exchange": 4, "moment_keys": ["exp_avg"]}
    resume = {"step": 5, "trainer": join_state(*split_state(trainer_state(diloco=info)))}
    exchange = exchange_on(["10.0.0.1"])
    restore_pc_state(exchange, resume)
    assert exchange.last_exchange == 4
    assert "are not this run's (10.0.0.1)" in exchange.notes[0] and "approximation" in exchange.notes[0]


def test_the_checkpoints_global_adapter_travels_at_its_own_size(monkeypatch):
    """add_pc_state on one PC of one worker (gloo, a world of one): the state it leaves for the
    driver pickles to about the bytes it holds. Views of the flat adapter once carried the whole
    adapter into the pickle once per tensor: 12.9 GB for SmolLM2 on two lab PCs."""
    import pickle

    from lab.nccl_rules import local_rendezvous
    from peft import LoraConfig, get_peft_model

    from swarm.train.worker import collectives
    from swarm.train.worker.diloco.exchange import Exchange
    from swarm.train.worker.diloco.groups import PcGroups
    from swarm.train.worker.diloco.pc_state import add_pc_state

    class Plain(Exchange):  # no DeepSpeed engine: the parameters are the adapter
        def _local_flat(self):
            return torch.cat([p.detach().float().flatten() for _, p in self.named])

        def set_adapter(self, flat):
            for (_, p), value in zip(self.named, self.unflatten(flat)):
                p.data.copy_(value)

    local_rendezvous()
    collectives.join("gloo", "cpu", init_method="env://", rank=0, world_size=1)
    try:
        model = get_peft_model(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)]),
                               LoraConfig(r=4, target_modules=[str(i) for i in range(8)]))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        exchange = Plain(SimpleNamespace(module=model), named, PcGroups.build(["10.0.0.1"], 0),
                         {"outer_optimizer": "average", "outer_lr": 1.0, "outer_momentum": 0.0})
        moments = {"exp_avg": {n: torch.zeros_like(p) for n, p in named}}
        state = {"adapter": {}, "trainer": {"moments": moments}}
        add_pc_state(exchange, state)
    finally:
        collectives.leave()
    held = sum(t.numel() * t.element_size() for t in state["adapter"].values())
    assert len(state["adapter"]) == 16 and len(pickle.dumps(state["adapter"])) < 2 * held + 20_000
    assert state["trainer"]["diloco"]["pcs"] == ["10.0.0.1"] and "pc0/exp_avg" in state["trainer"]["extra"]
