"""Each CUDA-only decision of a worker, as data: the GPU facts go in, the decision comes out."""

from __future__ import annotations

import itertools

import pytest

from swarm.config.models import QuantizationSection
from swarm.errors import UserError
from swarm.train.worker.device import (
    collective_env,
    loading_arguments,
    memory_fraction,
    quantization_kwargs,
    worker_device,
)

GiB = 1024**3


@pytest.mark.parametrize(("quantized", "stage", "device"),
                         list(itertools.product([True, False], [2, 3], ["cpu", "cuda:0", "cuda:1"])))
def test_no_device_map_ever_meets_a_live_zero3_config(quantized, stage, device):
    """transformers raises "DeepSpeed Zero-3 is not compatible with passing a `device_map`"."""
    args = loading_arguments(quantized, stage, device)
    assert not (args.zero3_init and args.device_map is not None)
    # Whatever ZeRO-3 shards is partitioned before deepspeed.initialize, which would move a
    # whole unpartitioned model onto the card first.
    assert args.partition_after_load == (stage == 3)


def test_a_sharded_4bit_base_loads_into_host_ram_not_onto_the_card():
    args = loading_arguments(quantized=True, zero_stage=3, device="cuda:0")
    # bitsandbytes' quantizer would put the whole base on the current card without a map.
    assert args.device_map == {"": "cpu"} and not args.zero3_init


def test_a_replicated_4bit_base_is_quantized_straight_onto_the_workers_card():
    assert loading_arguments(True, 2, "cuda:1").device_map == {"": "cuda:1"}
    assert loading_arguments(True, 2, "cpu").device_map == {"": "cpu"}


def test_a_sharded_16bit_base_is_partitioned_while_it_loads():
    args = loading_arguments(quantized=False, zero_stage=3, device="cuda:0")
    assert args.zero3_init and args.device_map is None


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_a_16bit_base_sharded_within_a_diloco_pc_loads_into_host_ram_and_is_partitioned_there(device):
    # transformers' zero.Init would partition over every PC (issue 31): swarm partitions it
    # itself, over the PC's group (swarm.train.worker.model.partition_for_zero3).
    args = loading_arguments(quantized=False, zero_stage=3, device=device, per_pc=True)
    assert args.device_map == {"": "cpu"} and not args.zero3_init and args.partition_after_load
    assert loading_arguments(False, 2, device, per_pc=True).device_map == {"": device}


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_4bit_codes_are_stored_and_computed_in_the_training_dtype(precision, dtype):
    kwargs = quantization_kwargs(QuantizationSection(quant_type="nf4", double_quant=True), precision)
    assert kwargs["bnb_4bit_quant_storage"] == kwargs["bnb_4bit_compute_dtype"] == dtype
    assert kwargs["load_in_4bit"] and kwargs["bnb_4bit_quant_type"] == "nf4" and kwargs["bnb_4bit_use_double_quant"]
    # transformers accepts the names as they are.
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(**kwargs)
    assert str(config.bnb_4bit_quant_storage) == f"torch.{dtype}"


def test_a_16bit_base_has_no_quantization():
    assert quantization_kwargs(QuantizationSection(bits=None), "bf16") is None


def test_each_worker_takes_the_gpu_at_its_local_rank():
    assert worker_device(True, 0, 2) == "cuda:0" and worker_device(True, 1, 2) == "cuda:1"
    assert worker_device(False, 3, 0) == "cpu"
    with pytest.raises(UserError, match="GPU 2 of its PC, but CUDA sees 2"):
        worker_device(True, 2, 2)


def test_a_memory_cap_makes_a_large_card_behave_like_a_small_one():
    assert memory_fraction(16 * GiB, 141 * GiB) == pytest.approx(16 / 141)
    assert memory_fraction(None, 24 * GiB) is None
    assert memory_fraction(32 * GiB, 24 * GiB) is None


def test_nccl_on_a_home_pc():
    env = collective_env("nccl", [("NVIDIA GeForce RTX 3090", (8, 6))])
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_IB_DISABLE": "1"}
    assert collective_env("gloo", [("NVIDIA GeForce RTX 4090", (8, 9))] * 2) == {}


def test_several_ada_geforce_cards_in_one_pc_go_through_host_memory():
    two_4090 = collective_env("nccl", [("NVIDIA GeForce RTX 4090", (8, 9))] * 2)
    assert two_4090["NCCL_P2P_DISABLE"] == "1"
    assert "NCCL_P2P_DISABLE" not in collective_env("nccl", [("NVIDIA GeForce RTX 4090", (8, 9))])
    assert "NCCL_P2P_DISABLE" not in collective_env("nccl", [("NVIDIA RTX A6000", (8, 6))] * 2)


def test_the_ops_a_plan_loads():
    from swarm.train.ops import ops_for

    def plan(use_gpu, **zero):
        return {"placement": {"use_gpu": use_gpu}, "deepspeed": {"zero_optimization": {"stage": 3, **zero}}}

    assert ops_for(plan(True)) == []
    assert ops_for(plan(True, offload_optimizer={"device": "cpu"})) == ["cpu_adam"]
    assert ops_for(plan(True, offload_param={"device": "nvme"}, offload_optimizer={"device": "cpu"})) == [
        "cpu_adam", "async_io"]
    assert ops_for(plan(False)) == ["deepspeed_shm_comm"]


def test_a_build_lock_no_running_build_holds_is_stale(tmp_path):
    from swarm.train.ops import stale_lock

    assert stale_lock(tmp_path, running=[]) is None  # no lock
    (tmp_path / "lock").touch()
    assert stale_lock(tmp_path, running=[(1, "/"), (2, str(tmp_path / "other"))]) == tmp_path / "lock"
    assert stale_lock(tmp_path, running=[(3, str(tmp_path))]) is None  # ninja is building there


def test_swarm_processes_use_the_ninja_beside_their_python(monkeypatch):
    import os
    import sys
    from pathlib import Path

    from swarm.train.ops import pin_ninja

    here = str(Path(sys.executable).parent)
    assert (Path(here) / "ninja").is_file()  # DeepSpeed installs the pip ninja beside Python
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    pin_ninja()
    assert os.environ["PATH"].split(os.pathsep)[0] == here
    pin_ninja()  # idempotent
    assert os.environ["PATH"].count(here) == 1


def test_the_ops_of_a_diloco_plan_are_its_pcs():
    from swarm.train.ops import ops_for

    pc = {"deepspeed": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}}
    assert ops_for({"placement": {"use_gpu": True}, "deepspeed": None, "pcs": [pc, pc]}) == ["cpu_adam"]
