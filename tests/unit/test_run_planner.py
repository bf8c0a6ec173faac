"""The driver's plans for a run, fed as a swarm run feeds them: Ray's nodes and their inventories.

``run_planner`` is what ``swarm train`` calls once it has asked Ray for the live nodes
(``survey_cluster``) and each node for its hardware (``node_inventories``: a Ray task that
reads NVML on the node). Only the GPUs themselves are fixture data here.
"""

from __future__ import annotations

import sys
import types

import pytest

from swarm import hardware
from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import GpuInfo, NodeInventory
from swarm.plan.placement import NodeSlots
from swarm.train.driver.plans import run_planner
from swarm.train.driver.survey import as_ray_offers
from swarm.train.mailbox import group_key

GiB = 1024**3
RTX_3090 = GpuInfo("NVIDIA GeForce RTX 3090", 24 * GiB, (8, 6))


def job(model="llama-3.1-70b", offload=None, **train) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"path": model}, "data": {"files": ["d.jsonl"], "seq_len": 1024},
        "train": {"micro_batch": 1, "grad_accum": 8, **train}, "offload": offload or {},
        "ray": {"address": "10.0.0.1:6379"},
    })


def swarm_of(*gpu_counts: int) -> tuple[list[NodeSlots], list[NodeInventory]]:
    nodes, inventories = [], []
    for i, count in enumerate(gpu_counts, 1):
        address = f"10.0.0.{i}"
        nodes.append(NodeSlots(f"node{i}", address, slots=count or 1, gpus=count))
        inventories.append(NodeInventory(f"pc{i}", 64 * GiB, (RTX_3090,) * count, address=address))
    return nodes, inventories


def test_a_node_whose_inventory_has_gpus_is_planned_as_a_gpu_node():
    nodes, inventories = swarm_of(1, 1)
    plan = run_planner(job(), nodes, inventories).current
    assert plan.placement.mode == "per_gpu" and plan.placement.use_gpu and plan.placement.backend == "nccl"
    assert plan.precision == "bf16" and plan.strategy.kind == "diloco"
    assert [n.device for n in plan.nodes] == ["1x NVIDIA GeForce RTX 3090"] * 2
    assert all(n.gpu_capacity == 24 * GiB and n.gpu_bytes > 0 for n in plan.nodes)
    for pc in plan.pcs:  # each PC's own plan, on its card, offload buffers pinned for its copies
        assert pc.placement.use_gpu and pc.deepspeed["bf16"]["enabled"]
        zero = pc.deepspeed["zero_optimization"]
        assert all(v["pin_memory"] for k, v in zero.items() if k.startswith("offload_"))
    assert [p["address"] for p in plan.to_dict()["pcs"]] == ["10.0.0.1", "10.0.0.2"]
    assert plan.to_dict()["placement"]["use_gpu"] is True


def test_cpu_only_nodes_are_planned_as_cpu_workers_in_fp32():
    nodes, inventories = swarm_of(0, 0)
    plan = run_planner(job("qwen2.5-0.5b"), nodes, inventories).current
    assert plan.placement.mode == "per_node" and not plan.placement.use_gpu and plan.placement.backend == "gloo"
    assert plan.precision == "fp32" and [n.device for n in plan.nodes] == ["CPU", "CPU"]


def test_ray_task_inventories_keep_only_the_gpus_ray_offers():
    node = NodeSlots("n", "10.0.0.9", slots=1, gpus=1)
    inv = NodeInventory("pc", 64 * GiB, (RTX_3090, RTX_3090))
    offered = as_ray_offers(inv, node)
    assert offered.gpus == (RTX_3090,) and offered.address == "10.0.0.9"


def test_a_job_that_does_not_fit_the_swarm_is_refused_before_loading():
    nodes, inventories = swarm_of(1)
    with pytest.raises(UserError, match="this job does not fit: nothing fits"):
        run_planner(job(), nodes, [NodeInventory("pc1", 16 * GiB, (RTX_3090,), address="10.0.0.1")])


def test_a_group_that_shrinks_below_what_the_job_needs_is_refused_in_one_line():
    """Qwen2.5 14B in 4 bits, offload off: sharded over two 12 GB cards it fits, on one it does not."""
    rtx_3060 = GpuInfo("NVIDIA GeForce RTX 3060", 12 * GiB, (8, 6))
    nodes, _ = swarm_of(1, 1)
    inventories = [NodeInventory(f"pc{i}", 32 * GiB, (rtx_3060,), address=f"10.0.0.{i}") for i in (1, 2)]
    planner = run_planner(job("qwen2.5-14b", {"params": "none", "optimizer": "none"}, min_workers=1),
                          nodes, inventories)
    first = planner.current
    assert first.workers == 2 and first.fits and first.strategy.kind == "shard"
    assert planner.first_key() == group_key(["10.0.0.1", "10.0.0.2"], local=False)

    answer = planner.answer(group_key(["10.0.0.1"], local=False))
    assert set(answer) == {"refused"} and "\n" not in answer["refused"]
    assert answer["refused"].startswith("the worker group changed to 1 worker(s) on pc1 (1), and the job does not fit")
    assert "GPU" in answer["refused"]
    assert planner.current is first  # the last plan that fits stays the run's plan

    back = planner.answer(group_key(["10.0.0.2", "10.0.0.1"], local=False))
    assert back["workers"] == 2 and back["deepspeed"] == first.deepspeed


def test_a_group_that_shrinks_and_still_fits_is_replanned_for_its_size():
    nodes, inventories = swarm_of(1, 1)
    planner = run_planner(job("llama-3.1-8b", min_workers=1), nodes, inventories)
    two = planner.current
    one = planner.answer(group_key(["10.0.0.2"], local=False))
    assert one["workers"] == 1 and [n["name"] for n in one["nodes"]] == ["pc2"]
    assert one["micro_batch"] * one["grad_accum"] == two.micro_batch * two.grad_accum
    assert planner.current.workers == 1


def test_workers_on_a_node_the_run_never_surveyed_are_refused():
    nodes, inventories = swarm_of(1, 1)
    planner = run_planner(job("llama-3.1-8b", min_workers=1), nodes, inventories)
    assert "did not plan for" in planner.answer(group_key(["10.0.0.7"], local=False))["refused"]


def test_a_local_run_is_one_group_whatever_its_address():
    planner = run_planner(job("qwen2.5-0.5b", workers=2).model_copy(update={"ray": job().ray.model_copy(
        update={"address": None})}), None, [NodeInventory("me", 64 * GiB)])
    assert planner.first_key() == group_key(["192.0.2.2", "192.0.2.2"], local=True) == (("local", 2),)
    assert planner.answer((("local", 2),))["workers"] == 2


@pytest.fixture
def nvml_with_one_card(monkeypatch):
    """NVML as the driver of a PC with one H200 reports it (a GPU we do not have)."""
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=141 * GiB),
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlSystemGetCudaDriverVersion_v2=lambda: 13000,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def test_gpus_come_from_nvml_and_a_cap_makes_a_card_look_smaller(nvml_with_one_card, monkeypatch):
    assert hardware.gpus() == (GpuInfo("NVIDIA H200", 141 * GiB, (9, 0)),)
    monkeypatch.setenv(hardware.GPU_MEMORY_CAP_ENV, "16")
    [gpu] = hardware.inventory().gpus
    assert gpu.vram_bytes == 16 * GiB and gpu.compute_capability == (9, 0)


def test_the_cpus_bf16_flags():
    assert hardware.computes_bf16({"avx2", "avx512_bf16"}) and hardware.computes_bf16({"amx_bf16"})
    assert not hardware.computes_bf16({"avx2", "avx512f"})
