"""NCCL's rules hold for every torch collective swarm makes, checked on the CPU.

``lab.nccl_rules.NcclStandIn`` plays a PC with one card and NCCL as the backend (see its
docstring). Each test runs swarm's own call sites under it: joining the process group as a
Ray Train worker does, the group's plan and the hosts' facts, the per-step sums, the
tokens of a PC, and a diloco exchange (its groups, its sums, its pseudo-gradients, the new
global adapter sent to the PC's workers, the checksums). A static check keeps every other
module of swarm away from torch.distributed.
"""

from __future__ import annotations

import ast
import datetime as dt
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lab.nccl_rules import OBJECT_COLLECTIVES, NcclStandIn, local_rendezvous

SWARM = Path(__file__).resolve().parents[2] / "swarm"


@pytest.fixture
def stand_in(monkeypatch):
    """Worker 1 of a PC with two cards, NCCL as the backend, in a world of one (gloo underneath);
    torch's state restored after."""
    import ray.train
    import ray.util

    import swarm.hardware

    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(
        get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 1,
        get_local_world_size=lambda: 2, get_node_rank=lambda: 0))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "198.18.0.2")
    monkeypatch.setattr(swarm.hardware, "gpus", lambda: [])
    recorder = NcclStandIn(monkeypatch, gpus=2)
    local_rendezvous()
    yield recorder
    if dist.is_initialized():
        dist.destroy_process_group()
    collectives = sys.modules.get("swarm.train.worker.collectives")
    if collectives is not None:
        collectives.leave()


def join_as_a_ray_worker() -> None:
    from swarm.train.driver.trainer import join_process_group

    local_rendezvous()
    join_process_group(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), "nccl", 60)


class PlainExchange:
    """diloco's ``Exchange`` on plain parameters (no DeepSpeed engine): its collectives as they are."""

    @staticmethod
    def make(named, groups, lr, momentum):
        from swarm.train.worker.diloco.exchange import Exchange

        class Plain(Exchange):
            def _local_flat(self):
                return torch.cat([p.detach().float().flatten() for _, p in self.named])

            def set_adapter(self, flat):
                offset = 0
                for _, p in self.named:
                    p.data.copy_(flat[offset:offset + p.numel()].view(p.shape))
                    offset += p.numel()

        return Plain(None, named, groups, {"outer_optimizer": "nesterov-b", "outer_lr": lr, "outer_momentum": momentum})


def test_a_second_card_is_set_before_the_process_group_and_the_group_plan(stand_in, monkeypatch):
    import swarm.train.worker.driver_link
    from swarm.train.worker.driver_link import group_plan

    plan = {"strategy": {"name": "shard"}, "micro_batch": (2, 3)}
    monkeypatch.setattr(swarm.train.worker.driver_link, "receive_group_plan", lambda mailbox, key, ask: plan)
    join_as_a_ray_worker()
    answer, addresses = group_plan(None, None, 0, 1, local=False)

    assert stand_in.violations == []
    assert stand_in.events[:2] == [("set_device", "cuda:1"), ("init_process_group", "nccl")]
    assert {name for name, _, _ in stand_in.collectives()} == {"all_gather", "broadcast"}
    assert answer == {"strategy": {"name": "shard"}, "micro_batch": [2, 3]} and addresses == ["198.18.0.2"]


def test_the_hosts_facts_cross_as_json_on_the_card(stand_in):
    from swarm.train.worker.driver_link import gather_hosts

    join_as_a_ray_worker()
    hosts = gather_hosts(False)
    assert stand_in.violations == []
    assert hosts[0]["address"] == "198.18.0.2" and hosts[0]["ram_bytes"] > 0
    assert all(set(devices) == {"cuda:1"} for _, _, devices in stand_in.collectives())


def test_a_pcs_tokens_are_summed_on_the_card(stand_in):
    from swarm.train.worker.diloco.groups import PcGroups

    join_as_a_ray_worker()
    groups = PcGroups.build(["198.18.0.2"], 0)
    exchange = PlainExchange.make([("layer.lora_B.default.weight", torch.nn.Parameter(torch.ones(2, 2)))],
                                  groups, lr=0.7, momentum=0.9)
    before = len(stand_in.collectives())  # the start's broadcasts
    exchange.tokens = 96
    assert exchange.pc_tokens() == 96.0
    assert stand_in.violations == []
    assert stand_in.collectives()[before:] == [("all_reduce", "nccl", ["cuda:1"])]


def test_the_step_sums_run_on_the_card(stand_in):
    from swarm.train.worker import collectives

    join_as_a_ray_worker()
    assert collectives.reduce_numbers([1.5, 2.0, 0.0]) == [1.5, 2.0, 0.0]
    assert collectives.reduce_numbers([4.0], "max") == [4.0]
    assert stand_in.violations == []
    assert stand_in.collectives() == [("all_reduce", "nccl", ["cuda:1"])] * 2


def test_a_diloco_exchange_keeps_nccls_rules_and_crosses_pcs_on_host_memory(stand_in):
    from swarm.train.worker.diloco.groups import PcGroups
    from swarm.train.worker.diloco.outer import outer_step

    join_as_a_ray_worker()
    groups = PcGroups.build(["198.18.0.2"], 0)
    torch.manual_seed(0)
    named = [("layer.lora_A.default.weight", torch.nn.Parameter(torch.randn(4, 8))),
             ("layer.lora_B.default.weight", torch.nn.Parameter(torch.randn(8, 4)))]
    exchange = PlainExchange.make(named, groups, lr=0.7, momentum=0.9)
    start = exchange.global_flat.clone()
    with torch.no_grad():
        for _, p in named:
            p.add_(0.25)
    local = exchange._local_flat()
    exchange.tokens = 64.0
    figures = exchange.sync(step=8)

    assert stand_in.violations == []
    backends = {backend for _, backend, _ in stand_in.collectives()}
    assert backends == {"nccl", "gloo"}  # the PC's broadcast on the card, the PCs' exchange on the host
    assert any(name == "broadcast" and devices == ["cuda:1"] for name, _, devices in stand_in.collectives())
    delta = (start - local).to(torch.bfloat16).float()
    expected, _ = outer_step(start, delta, torch.zeros_like(start), "nesterov-b", 0.7, 0.9, [slice(0, 32)])
    assert torch.allclose(exchange._local_flat(), expected)
    assert figures.checksums == [pytest.approx(float(expected.double().sum()), rel=1e-6)]


def test_a_collective_before_joining_is_refused(stand_in):
    from swarm.train.worker import collectives

    dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1, timeout=dt.timedelta(seconds=30))
    with pytest.raises(collectives.CollectiveOrderError, match="before swarm.train.worker.collectives.join"):
        collectives.reduce_numbers([1.0])


def test_the_stand_in_catches_what_nccl_refuses(stand_in):
    """The rules are not vacuous: a CPU tensor on an NCCL group and an object collective are caught."""
    join_as_a_ray_worker()
    dist.all_reduce(torch.ones(2))
    dist.all_gather_object([None], "x")
    assert any("not cuda:1" in v for v in stand_in.violations)
    assert any("all_gather_object" in v for v in stand_in.violations)


def torch_distributed_users() -> list[str]:
    """Modules of swarm, other than the helper, that import or name torch.distributed."""
    found = []
    for path in sorted(SWARM.rglob("*.py")):
        if path.name == "collectives.py" and path.parent.name == "worker":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
                names = [f"torch.{node.attr}"]
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                found.append(f"{path.relative_to(SWARM.parent)}:{node.lineno}")
    return found


def test_only_the_helper_calls_torch_distributed():
    assert torch_distributed_users() == []


def test_nothing_in_swarm_calls_an_unpickling_collective():
    hits = []
    for path in sorted(SWARM.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            named = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name)
                     else None)
            if named in OBJECT_COLLECTIVES:
                hits.append(f"{path.relative_to(SWARM.parent)}:{node.lineno}: {named}")
    assert hits == []
