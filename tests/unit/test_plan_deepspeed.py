"""The DeepSpeed config a plan carries, and the plan's precision: built by the planner, as data.

Every config here comes from ``make_plan`` on described machines, the same call ``swarm
train`` makes on the machines it finds; the workers pass ``plan.deepspeed`` on unchanged.
"""

from __future__ import annotations

import pytest

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import GpuInfo, NodeInventory
from swarm.plan import make_plan
from swarm.plan.deepspeed import resolve_precision
from swarm.plan.shapes import load_shape

GiB = 1024**3


def job(model="llama-3.1-8b", **sections) -> JobConfig:
    raw = {"model": {"path": model}, "data": {"files": ["d.txt"], "seq_len": 1024}}
    raw.update(sections)
    return JobConfig.model_validate(raw)


def gpu_pc(name="NVIDIA GeForce RTX 4090", vram_gb=24, cc=(8, 9), ram_gb=64, nvme_gb=None) -> NodeInventory:
    return NodeInventory("pc", int(ram_gb * GiB), (GpuInfo(name, int(vram_gb * GiB), cc),),
                         offload_free_bytes=int(nvme_gb * 1e9) if nvme_gb else None)


def cpu_pc(ram_gb=64, bf16=False) -> NodeInventory:
    return NodeInventory("pc", int(ram_gb * GiB), cpu_bf16=bf16)


def test_a_gpu_plan_sets_batch_clipping_precision_and_never_a_global_batch():
    plan = make_plan(job(train={"micro_batch": 3, "grad_accum": 5, "max_grad_norm": 0.5},
                         offload={"params": "none", "optimizer": "none"}), [gpu_pc()])
    config = plan.deepspeed
    # Ray Train decides the world size; DeepSpeed must not check a global batch too early.
    assert "train_batch_size" not in config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (
        plan.micro_batch, plan.grad_accum)
    assert plan.micro_batch * plan.grad_accum == 15
    assert config["gradient_clipping"] == 0.5
    assert plan.precision == "bf16" and config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["zero_optimization"]["stage"] == plan.strategy.zero_stage
    assert plan.to_dict()["deepspeed"] == config


def test_offload_buffers_are_pinned_on_gpus_only():
    offload = {"params": "cpu", "optimizer": "cpu"}
    on_gpu = make_plan(job(offload=offload), [gpu_pc()]).deepspeed["zero_optimization"]
    on_cpu = make_plan(job(offload=offload, model="qwen2.5-0.5b"), [cpu_pc()]).deepspeed["zero_optimization"]
    assert on_gpu["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert on_gpu["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert on_cpu["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_nvme_buffers_hold_the_largest_partition_the_plan_sized():
    j = job("llama-3.1-70b", offload={"params": "nvme", "optimizer": "nvme", "nvme_path": "/mnt/fast"},
            train={"micro_batch": 1, "grad_accum": 16})
    plan = make_plan(j, [gpu_pc("NVIDIA GeForce RTX 4060 Ti", 16, (8, 9), ram_gb=64, nvme_gb=1000)])
    zero = plan.deepspeed["zero_optimization"]
    assert zero["offload_param"]["nvme_path"] == "/mnt/fast" and zero["offload_optimizer"]["nvme_path"] == "/mnt/fast"
    # Llama 3.1 70B's largest parameter is its 128256 x 8192 embedding, kept whole by one worker.
    embedding = 128_256 * 8_192
    assert max(g.weight_numel for g in load_shape("llama-3.1-70b").groups) == embedding
    assert zero["offload_param"]["buffer_size"] == plan.knobs.param_buffer_size >= embedding
    assert zero["offload_param"]["buffer_count"] == plan.knobs.param_buffer_count
    assert "aio" in plan.deepspeed


def test_a_turing_card_trains_in_fp16_with_dynamic_loss_scaling():
    plan = make_plan(job(), [gpu_pc("NVIDIA GeForce RTX 2080 Ti", 11, (7, 5))])
    assert plan.precision == "fp16"
    assert plan.deepspeed["fp16"]["enabled"] and plan.deepspeed["fp16"]["loss_scale"] == 0
    assert any("fp16" in note for note in plan.notes)


def test_optimizers():
    on_card = make_plan(job(train={"lr": 1e-3, "weight_decay": 0.1}, offload={"optimizer": "none"}), [gpu_pc()])
    # torch's AdamW: DeepSpeed's FusedAdam would need nvcc to compile on the user's PC.
    assert on_card.deepspeed["optimizer"] == {"type": "AdamW", "params": {
        "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True}}
    offloaded = make_plan(job(offload={"optimizer": "cpu"}), [gpu_pc()]).deepspeed
    assert "torch_adam" not in offloaded["optimizer"]["params"]  # DeepSpeed's CPU Adam
    eight_bit = make_plan(job(train={"optimizer": "adamw_8bit"}), [gpu_pc()])
    assert "optimizer" not in eight_bit.deepspeed and eight_bit.deepspeed["zero_allow_untested_optimizer"]
    # A device optimizer is never offloaded, whatever `auto` could have picked.
    assert eight_bit.strategy.offload_optimizer == "none"


@pytest.mark.parametrize(
    "requested, capabilities, cpus_bf16, expected",
    [
        ("auto", [(8, 9), (8, 6)], False, "bf16"),  # Ampere and newer
        ("auto", [(8, 6), (7, 5)], False, "fp16"),  # one Turing card makes the whole job fp16
        ("auto", None, False, "fp32"),  # CPU without native bf16
        ("auto", None, True, "bf16"),  # AMX or AVX512-BF16
        ("fp32", [(9, 0)], False, "fp32"),  # asked for
    ],
)
def test_precision(requested, capabilities, cpus_bf16, expected):
    assert resolve_precision(requested, capabilities, cpus_bf16) == expected


def test_cpu_workers_train_in_bf16_only_when_every_cpu_has_it():
    assert make_plan(job("qwen2.5-0.5b"), [cpu_pc(bf16=True)]).precision == "bf16"
    two = [cpu_pc(bf16=True), NodeInventory("pc2", 64 * GiB, cpu_bf16=False, address="10.0.0.2")]
    assert make_plan(job("qwen2.5-0.5b"), two).precision == "fp32"


def test_replicate_keeps_the_base_whole_with_zero2_and_the_optimizer_in_cpu_ram_at_most():
    plan = make_plan(job(train={"strategy": "replicate"}, offload={"params": "none", "optimizer": "cpu"}),
                     [gpu_pc(), gpu_pc()])
    zero = plan.deepspeed["zero_optimization"]
    assert plan.strategy.kind == "replicate" and zero["stage"] == 2 and "offload_param" not in zero
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "aio" not in plan.deepspeed and not any(k.startswith("stage3") for k in zero)
    with pytest.raises(UserError, match="train.strategy=replicate .* cannot take offload.params=nvme"):
        make_plan(job(train={"strategy": "replicate"},
                      offload={"params": "nvme", "optimizer": "cpu", "nvme_path": "/nvme"}), [gpu_pc()])
