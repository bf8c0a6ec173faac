"""The DeepSpeed config is generated from the job and the device (pure, tested as data)."""

from __future__ import annotations

import pytest

from swarm.config.models import JobConfig
from swarm.train.ds_config import deepspeed_config, resolve_precision


def job(**sections) -> JobConfig:
    raw = {"model": {"path": "m"}, "data": {"files": ["d.txt"]}}
    raw.update(sections)
    return JobConfig.model_validate(raw)


def test_zero3_without_offload_and_no_train_batch_size():
    config = deepspeed_config(job(train={"micro_batch": 3, "grad_accum": 5, "max_grad_norm": 0.5}), "bf16", True)
    assert config["zero_optimization"]["stage"] == 3
    assert "offload_param" not in config["zero_optimization"]
    assert "offload_optimizer" not in config["zero_optimization"]
    # Ray Train decides the world size; DeepSpeed must not check a global batch too early.
    assert "train_batch_size" not in config
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 5
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]


def test_cpu_offload_pins_memory_only_on_gpu():
    j = job(offload={"params": "cpu", "optimizer": "cpu"})
    on_gpu = deepspeed_config(j, "bf16", True)["zero_optimization"]
    on_cpu = deepspeed_config(j, "fp32", False)["zero_optimization"]
    assert on_gpu["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert on_gpu["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert on_cpu["offload_param"]["pin_memory"] is False


def test_nvme_offload_names_the_folder_and_sizes_buffers_for_the_largest_param():
    j = job(offload={"params": "nvme", "optimizer": "nvme", "nvme_path": "/mnt/fast"})
    config = deepspeed_config(j, "fp16", True, largest_param=1_050_673_152)
    zero = config["zero_optimization"]
    assert zero["offload_param"]["nvme_path"] == "/mnt/fast" and zero["offload_optimizer"]["nvme_path"] == "/mnt/fast"
    assert zero["offload_param"]["buffer_size"] == 1_050_673_152
    assert "aio" in config
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0


def test_optimizers():
    adamw = deepspeed_config(job(train={"lr": 1e-3, "weight_decay": 0.1}), "bf16", True)
    assert adamw["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}}
    eight_bit = deepspeed_config(job(train={"optimizer": "adamw_8bit"}), "bf16", True)
    assert "optimizer" not in eight_bit and eight_bit["zero_allow_untested_optimizer"]


@pytest.mark.parametrize(
    "requested, cuda, bf16, flags, expected",
    [
        ("auto", True, True, set(), "bf16"),  # Ampere and newer
        ("auto", True, False, set(), "fp16"),  # Turing
        ("auto", False, False, {"avx2"}, "fp32"),  # CPU without native bf16
        ("auto", False, False, {"avx2", "amx_bf16"}, "bf16"),  # Sapphire Rapids
        ("fp32", True, True, set(), "fp32"),  # asked for
    ],
)
def test_precision(requested, cuda, bf16, flags, expected):
    assert resolve_precision(requested, cuda, bf16, flags) == expected


def test_replicate_keeps_the_base_whole_with_zero2_and_optimizer_in_cpu_ram_at_most():
    offloaded = job(offload={"params": "nvme", "optimizer": "nvme", "nvme_path": "/nvme"})
    cfg = deepspeed_config(offloaded, "bf16", on_gpu=True, strategy="replicate")
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2 and "offload_param" not in zero
    # ZeRO-2 offloads the optimizer to CPU RAM only; LoRA moments need nothing more.
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "aio" not in cfg and not any(k.startswith("stage3") for k in zero)
    plain = deepspeed_config(job(), "fp32", on_gpu=False, strategy="replicate")["zero_optimization"]
    assert plain["stage"] == 2 and "offload_optimizer" not in plain
