"""The DeepSpeed config of a job: generated from the job and the device, never a preset.

Pure functions only, so the config can be tested as data. The worker calls
``deepspeed_config`` with the precision it resolved on its own device (a cluster may mix
Turing cards, which lack bf16, with newer ones).
"""

from __future__ import annotations

from typing import Any

from swarm.config.models import JobConfig

# ZeRO-3 bucket sizes. DeepSpeed's defaults (5e8 elements) are tuned for datacenter GPUs;
# on a 16 GB card they alone would take gigabytes, so scale them down. With QLoRA the
# gathered (4-bit) parameters are small, and only the LoRA weights have gradients.
PREFETCH_ELEMENTS = 50_000_000
MAX_LIVE_ELEMENTS = 100_000_000
REDUCE_BUCKET_ELEMENTS = 50_000_000
# Parameters smaller than this stay whole on every rank (norms, small LoRA matrices):
# gathering them costs more latency than the memory they would save.
PERSISTENCE_THRESHOLD = 100_000
SUB_GROUP_ELEMENTS = 100_000_000
NVME_PARAM_BUFFER_ELEMENTS = 100_000_000  # DeepSpeed's default; raised for bigger params


def deepspeed_config(job: JobConfig, precision: str, on_gpu: bool, largest_param: int = 0,
                     strategy: str = "shard") -> dict[str, Any]:
    """Build the DeepSpeed config dict for ``job`` trained in ``precision``.

    ``train_batch_size`` is left out on purpose: under Ray Train DeepSpeed would check it
    against a world size it reads too early; micro-batch and accumulation define it.

    Args:
        job: The validated job.
        precision: "bf16", "fp16" or "fp32", as resolved by ``resolve_precision``.
        on_gpu: Whether the worker trains on a GPU; offload buffers are pinned only then
            (pinned host memory speeds up PCIe copies and means nothing on a CPU).
        largest_param: Elements of the model's largest parameter, once it is loaded. An
            NVMe swap buffer must hold a whole parameter (a 70B model's embedding has a
            billion elements), so parameter offload to NVMe sizes its buffers by it.
        strategy: "shard" (ZeRO-3: the base is partitioned across workers, offloaded as
            the job says) or "replicate" (ZeRO-2: every worker holds the whole 4-bit base;
            only the LoRA gradients and weights cross the network, and the LoRA optimizer
            state is partitioned, in CPU RAM when the job offloads the optimizer).

    Returns:
        A dict to pass as ``config`` to ``deepspeed.initialize``.
    """
    if strategy == "replicate":
        zero = _replicate_zero(job.offload.optimizer != "none", on_gpu)
    else:
        zero = _shard_zero(job, on_gpu, largest_param)
    return _with_zero(job, precision, zero)


def _replicate_zero(offload_optimizer: bool, on_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
        "allgather_bucket_size": REDUCE_BUCKET_ELEMENTS,
    }
    if offload_optimizer:
        # ZeRO-2 offloads the optimizer to CPU RAM only; LoRA moments are small anyway.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return zero


def _shard_zero(job: JobConfig, on_gpu: bool, largest_param: int) -> dict[str, Any]:
    offload = job.offload
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
        "stage3_prefetch_bucket_size": PREFETCH_ELEMENTS,
        "stage3_max_live_parameters": MAX_LIVE_ELEMENTS,
        "stage3_max_reuse_distance": MAX_LIVE_ELEMENTS,
        "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
        "sub_group_size": SUB_GROUP_ELEMENTS,
        # swarm saves LoRA weights itself; never gather the frozen base into one file.
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if offload.params != "none":
        zero["offload_param"] = _offload_target(offload.params, offload.nvme_path, "params", on_gpu, largest_param)
    if offload.optimizer != "none":
        zero["offload_optimizer"] = _offload_target(offload.optimizer, offload.nvme_path, "optimizer", on_gpu, 0)
    return zero


def _with_zero(job: JobConfig, precision: str, zero: dict[str, Any]) -> dict[str, Any]:
    train = job.train
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # swarm prints its own progress; DeepSpeed's periodic prints would break the bar.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train.optimizer == "adamw":
        # With the optimizer offloaded DeepSpeed runs this as its vectorised CPU Adam.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay},
        }
    else:
        # 8-bit AdamW and Adafactor are client optimizers that DeepSpeed has not certified
        # for ZeRO; they are safe here because only the (unsharded-size) LoRA weights train.
        config["zero_allow_untested_optimizer"] = True
    if "nvme" in (zero.get("offload_param", {}).get("device"), zero.get("offload_optimizer", {}).get("device")):
        config["aio"] = {
            "block_size": 1_048_576,
            "queue_depth": 8,
            "intra_op_parallelism": 1,
            "single_submit": False,
            "overlap_events": True,
        }
    return config


def _offload_target(device: str, nvme_path: str | None, what: str, pin: bool, largest_param: int) -> dict[str, Any]:
    target: dict[str, Any] = {"device": device, "pin_memory": pin}
    if device == "nvme":
        target["nvme_path"] = nvme_path
        # Buffers for swapping in and out of NVMe; more buffers overlap more I/O.
        target["buffer_count"] = 5 if what == "params" else 4
        if what == "params":
            target["buffer_size"] = max(NVME_PARAM_BUFFER_ELEMENTS, largest_param)
    return target


def resolve_precision(requested: str, cuda_available: bool, cuda_bf16: bool, cpu_flags: set[str]) -> str:
    """Pick the training precision for this device.

    ``auto`` means bf16 where the device computes it natively: Ampere and newer GPUs, and
    CPUs with AMX or AVX512-BF16; fp16 on older GPUs (Turing); fp32 on other CPUs, where
    bf16 is emulated and slower than fp32.

    Args:
        requested: The job's ``train.precision``.
        cuda_available: Whether this worker has a CUDA device.
        cuda_bf16: Whether that device supports bf16.
        cpu_flags: The CPU feature flags (from /proc/cpuinfo) when there is no GPU.
    """
    if requested != "auto":
        return requested
    if cuda_available:
        return "bf16" if cuda_bf16 else "fp16"
    return "bf16" if cpu_flags & {"amx_bf16", "avx512_bf16"} else "fp32"
