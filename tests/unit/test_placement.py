"""Placement for `swarm train`, as data (swarm.plan.placement)."""

from __future__ import annotations

import pytest

from swarm.cluster.constants import WORKER_SLOT_RESOURCE
from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.plan.placement import NodeSlots, place_workers, spread_workers


def job(**train) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"path": "m"}, "data": {"files": ["d.txt"]}, "train": train,
        "offload": {"params": "cpu", "optimizer": "cpu"}, "ray": {"address": "10.0.0.1:6379"},
    })


def node(i: int, slots: int = 1, gpus: int = 0) -> NodeSlots:
    return NodeSlots(node_id=f"n{i}", address=f"10.0.0.{i}", slots=slots, gpus=gpus)


CPU_SWARM = [node(1, slots=0), node(2), node(3)]  # a head with `train: false`, two CPU PCs


def test_cpu_swarm_places_one_worker_per_training_node():
    p = place_workers(job(), CPU_SWARM, local_gpus=0)
    assert (p.mode, p.num_workers, p.use_gpu) == ("per_node", 2, False)
    assert p.resources_per_worker == {"CPU": 0.01, WORKER_SLOT_RESOURCE: 1}


def test_gpu_swarm_places_one_worker_per_gpu_and_a_head_without_gpu_hosts_none():
    nodes = [node(1, slots=1, gpus=0), node(2, slots=2, gpus=2), node(3, slots=1, gpus=1)]
    p = place_workers(job(), nodes, local_gpus=0)
    assert (p.mode, p.num_workers, p.use_gpu) == ("per_gpu", 3, True)
    assert p.resources_per_worker == {"CPU": 0.01, "GPU": 1, WORKER_SLOT_RESOURCE: 1}


def test_min_workers_makes_the_run_elastic():
    p = place_workers(job(min_workers=1), CPU_SWARM, local_gpus=0)
    assert p.num_workers == (1, 2)
    assert place_workers(job(workers=2, min_workers=2), CPU_SWARM, local_gpus=0).num_workers == 2


def test_more_workers_than_the_swarm_offers_is_one_clear_line():
    with pytest.raises(UserError, match=r"train.workers=3 but the swarm offers 2 worker slot\(s\) on 2 node\(s\)"):
        place_workers(job(workers=3), CPU_SWARM, local_gpus=0)
    with pytest.raises(UserError, match="no training node has a GPU"):
        place_workers(job(placement="per_gpu"), CPU_SWARM, local_gpus=0)
    with pytest.raises(UserError, match="takes training workers"):
        place_workers(job(), [node(1, slots=0)], local_gpus=0)
    with pytest.raises(UserError, match="min_workers=3"):
        place_workers(job(min_workers=3), CPU_SWARM, local_gpus=0)


def test_a_local_ray_packs_workers_on_this_machine():
    local = job().model_copy(update={"ray": job().ray.model_copy(update={"address": None})})
    p = place_workers(local, None, local_gpus=0)
    assert (p.mode, p.num_workers, p.resources_per_worker) == ("local", 1, {"CPU": 0.01})
    two = local.model_copy(update={"train": local.train.model_copy(update={"workers": 2})})
    assert place_workers(two, None, local_gpus=0).num_workers == 2
    with pytest.raises(UserError, match="this machine has 1 GPU"):
        place_workers(two, None, local_gpus=1)


def test_workers_fill_the_nodes_in_order():
    assert spread_workers(3, [2, 2, 1]) == [2, 1, 0]
    assert spread_workers(5, [2, 2, 1]) == [2, 2, 1]
    with pytest.raises(ValueError):
        spread_workers(6, [2, 2, 1])


def test_invalid_worker_settings_are_refused_by_the_config():
    with pytest.raises(ValueError, match="min_workers=3 is above train.workers=2"):
        job(workers=2, min_workers=3)
    with pytest.raises(ValueError):
        job(workers=0)
