"""Choosing a strategy: realistic answers, the never-over-memory invariant, job constraints."""

from __future__ import annotations

import json

import pytest

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import GpuInfo, NodeInventory
from swarm.plan import memory as mem
from swarm.plan.decide import make_plan

GiB = 1024**3


def job(model="llama-3.1-8b", seq_len=2048, micro_batch=4, grad_accum=4, **sections) -> JobConfig:
    raw = {"model": {"path": model}, "data": {"files": ["train.jsonl"], "seq_len": seq_len},
           "train": {"micro_batch": micro_batch, "grad_accum": grad_accum, **sections.pop("train", {})}}
    return JobConfig.model_validate({**raw, **sections})


def pc(name="desktop", gpus=(("RTX 4060 Ti", 16),), ram_gb=32, nvme_gb=None) -> NodeInventory:
    return NodeInventory(
        hostname=name, ram_bytes=ram_gb * GiB, gpus=tuple(GpuInfo(n, int(v * GiB)) for n, v in gpus),
        offload_free_bytes=int(nvme_gb * 1e9) if nvme_gb is not None else None,
    )


def test_8b_on_one_16gb_card_with_32gb_ram_fits_without_offload():
    plan = make_plan(job("meta-llama/Llama-3.1-8B-Instruct"), [pc(ram_gb=32)])
    assert plan.fits
    assert plan.strategy.offload_params == "none" and plan.strategy.offload_optimizer == "none"
    assert plan.micro_batch * plan.grad_accum == 16
    assert plan.nodes[0].gpu_bytes <= 16 * GiB


def test_70b_on_one_16gb_card_needs_offload_and_says_which():
    plan = make_plan(job("llama-3.1-70b"), [pc(ram_gb=64, nvme_gb=1000)])
    assert plan.fits
    assert plan.strategy.zero_stage == 3 and plan.strategy.offload_params in ("cpu", "nvme")
    assert plan.to_dict()["strategy"]["offload_params"] == plan.strategy.offload_params
    # Without offload the 4-bit base alone (about 32 GiB) is twice the card: every such candidate says so.
    for c in plan.candidates:
        if c.strategy.offload_params == "none":
            assert not c.fits and "GPU" in c.problem


def test_70b_on_two_pcs_with_24gb_cards_trains_each_pc_alone_and_exchanges_adapters():
    """Issue 17: two RTX 3090 PCs on 1 Gb/s, the job of configs/llama-70b-swarm.yaml."""
    nodes = [pc("pc1", (("RTX 3090", 24),), 64), pc("pc2", (("RTX 3090", 24),), 64)]
    swarm_job = job("llama-3.1-70b", 1024, 1, 8, offload={"params": "cpu", "optimizer": "cpu"})
    plan = make_plan(swarm_job, nodes)
    assert plan.fits and plan.workers == 2 and plan.strategy.kind == "diloco"
    one_pc = make_plan(swarm_job, nodes[:1])
    assert plan.tokens_per_s >= 1.8 * one_pc.tokens_per_s
    assert max(n.step.bytes_sent for n in plan.nodes) <= 1e9
    sharded = next(c for c in plan.candidates if c.strategy.kind == "shard")
    assert sharded.step_seconds > 10 * plan.step_seconds  # ZeRO-3 gathers the base over the link
    # Each PC is its own single-PC plan, with the job's offload inside it.
    assert [p.strategy.name for p in plan.pcs] == ["shard-params-cpu-opt-cpu"] * 2
    assert all(p.workers == 1 and p.deepspeed["zero_optimization"]["stage"] == 3 for p in plan.pcs)
    # The exchange (3.7 s) costs under 5% of a step even after every step: plain averaging (the
    # default) exchanges every step; a Nesterov rule keeps 8 steps between (momentum's margin).
    assert plan.sync.every == 1 and plan.to_dict()["sync"]["bytes_per_worker"] == plan.sync.bytes_per_worker
    assert plan.to_dict()["sync"]["outer_optimizer"] == "average"
    nesterov = make_plan(job("llama-3.1-70b", 1024, 1, 8, offload={"params": "cpu", "optimizer": "cpu"},
                             train={"outer_optimizer": "nesterov-b"}), nodes)
    assert nesterov.sync.every == 8


@pytest.mark.parametrize(("exchange_s", "step_s", "max_steps", "momentum", "every"), [
    (3.7, 138.0, 500, 0.9, 8),    # a cheap exchange: the floor, with momentum
    (3.7, 138.0, 500, 0.0, 1),    # plain averaging may exchange every step
    (60.0, 10.0, 500, 0.9, 120),  # a slow link: the exchange within 5% of the training time
    (60.0, 10.0, 200, 0.9, 50),   # but at least 4 exchanges in the run
    (3.7, 138.0, 16, 0.9, 4),     # a short run keeps its 4 exchanges over the floor
])
def test_proposed_sync_every(exchange_s, step_s, max_steps, momentum, every):
    from swarm.plan.diloco import propose_every

    assert propose_every(exchange_s, step_s, max_steps, momentum) == every


def test_a_users_sync_every_is_kept_below_the_proposed_floor():
    nodes = [pc("pc1", (("RTX 3090", 24),), 64), pc("pc2", (("RTX 3090", 24),), 64)]
    offload = {"params": "cpu", "optimizer": "cpu"}
    nesterov = {"outer_optimizer": "nesterov-b"}
    proposed = make_plan(job("llama-3.1-70b", 1024, 1, 8, offload=offload, train=nesterov), nodes)
    assert proposed.sync.every == 8 and any("every 8 step(s) (proposed" in n for n in proposed.notes)
    chosen = make_plan(job("llama-3.1-70b", 1024, 1, 8, offload=offload, train={"sync_every": 2, **nesterov}), nodes)
    assert chosen.sync.every == 2 and any("every 2 step(s) (train.sync_every)" in n for n in chosen.notes)


def test_70b_forced_to_shard_over_two_pcs():
    nodes = [pc("pc1", (("RTX 3090", 24),), 64), pc("pc2", (("RTX 3090", 24),), 64)]
    plan = make_plan(job("llama-3.1-70b", train={"strategy": "shard"}), nodes)
    assert plan.fits and plan.strategy.zero_stage == 3 and plan.deepspeed["zero_optimization"]["stage"] == 3
    assert all(n.step.bytes_sent > 0 for n in plan.nodes)


def test_nothing_fits_gives_one_line_naming_the_term():
    plan = make_plan(job("llama-3.1-70b"), [pc(gpus=(("RTX 3060", 12),), ram_gb=16)])
    assert not plan.fits
    assert "\n" not in plan.reason and "largest:" in plan.reason


def test_job_offload_section_forces_the_strategy():
    plan = make_plan(job(offload={"params": "cpu", "optimizer": "cpu"}), [pc(ram_gb=64)])
    assert [c.strategy.name for c in plan.candidates] == ["shard-params-cpu-opt-cpu"]
    assert plan.deepspeed["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert plan.strategy_reason == ("one worker; the job's offload settings need sharded base, ZeRO-3, "
                                    "parameters in CPU RAM, optimizer in CPU RAM")


def test_offload_none_means_none_and_auto_lets_the_planner_choose():
    none = make_plan(job(offload={"params": "none", "optimizer": "none"}), [pc(ram_gb=64)])
    assert {(c.strategy.offload_params, c.strategy.offload_optimizer) for c in none.candidates} == {("none", "none")}
    auto = make_plan(job(), [pc(ram_gb=64)])
    assert {c.strategy.offload_params for c in auto.candidates} == {"none", "cpu"}  # NVMe needs offload.nvme_path
    with_path = make_plan(job(offload={"nvme_path": "/mnt/nvme"}), [pc(ram_gb=64, nvme_gb=100)])
    assert "nvme" in {c.strategy.offload_params for c in with_path.candidates}


def test_device_optimizers_rule_out_optimizer_offload():
    plan = make_plan(job(train={"optimizer": "adamw_8bit"}), [pc()])
    assert all(c.strategy.offload_optimizer == "none" for c in plan.candidates)


def test_nvme_choice_carries_path_and_buffers():
    j = job("llama-3.1-70b", offload={"params": "nvme", "optimizer": "nvme", "nvme_path": "/mnt/nvme/swarm"})
    plan = make_plan(j, [pc(ram_gb=64, nvme_gb=1000)])
    zero = plan.deepspeed["zero_optimization"]
    assert zero["offload_param"]["nvme_path"] == "/mnt/nvme/swarm"
    # DeepSpeed asserts that a swap buffer holds the largest partition: the 128256 x 8192 embedding.
    assert zero["offload_param"]["buffer_size"] >= 128256 * 8192
    assert plan.nodes[0].nvme_bytes > 35 * GiB


def test_a_gpu_worker_loads_a_sharded_4bit_base_whole_into_ram_first():
    """transformers loads a quantized base whole (no zero.Init); the worker partitions it after."""
    for offload in ({}, {"nvme_path": "/mnt/nvme"}):
        plan = make_plan(job("llama-3.1-70b", offload=offload), [pc(ram_gb=32, nvme_gb=1000)])
        assert not plan.fits and "largest: loading: whole 4-bit base in RAM" in plan.reason
    plan = make_plan(job("llama-3.1-70b", offload={"nvme_path": "/mnt/nvme"}), [pc(ram_gb=64, nvme_gb=1000)])
    assert plan.fits and plan.strategy.offload_params in ("cpu", "nvme")


def test_turing_card_makes_the_job_fp16():
    plan = make_plan(job(), [pc(gpus=(("RTX 2080 Ti", 11),), ram_gb=64)])
    assert plan.precision == "fp16"


def test_more_workers_than_devices_is_refused():
    with pytest.raises(UserError, match="train.workers=3 but this machine has 1 GPU"):
        make_plan(job(train={"workers": 3}), [pc()])


def test_cpu_node_figures_for_calibration():
    plan = make_plan(job("qwen2.5-0.5b", seq_len=128, micro_batch=1, grad_accum=1), [pc(gpus=(), ram_gb=24)])
    node = plan.nodes[0]
    assert plan.fits and node.gpu_bytes == 0 and node.device == "CPU"
    assert mem.OVERHEADS.cpu_worker_process < node.worker_ram_bytes < node.ram_bytes


def test_plan_is_json_serialisable():
    data = json.loads(json.dumps(make_plan(job(), [pc()]).to_dict()))
    assert data["fits"] is True and data["strategy"]["name"] and data["nodes"][0]["worker_terms"]


def test_the_json_plan_says_cpu_step_times_are_rough_as_the_table_does():
    on_gpu = make_plan(job(), [pc()]).to_dict()
    on_cpu = make_plan(job("qwen2.5-0.5b", seq_len=128, micro_batch=1, grad_accum=1), [pc(gpus=(), ram_gb=24)]).to_dict()
    assert on_gpu["step_seconds_caveat"] is None
    assert "rough on CPUs" in on_cpu["step_seconds_caveat"]


@pytest.mark.parametrize("mb, accum", [(3, 4), (8, 1)])
def test_samples_per_step_are_kept_when_the_micro_batch_shrinks(mb, accum):
    plan = make_plan(job("qwen2.5-7b", 4096, mb, accum), [pc(gpus=(("RTX 3060", 12),), ram_gb=32)])
    assert plan.micro_batch * plan.grad_accum == mb * accum
