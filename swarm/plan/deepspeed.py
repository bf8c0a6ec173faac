"""The DeepSpeed config of a plan, and the training precision: pure functions, never presets.

The planner calls these once, on the driver, and the plan carries the resulting dict; the
workers pass it to ``deepspeed.initialize`` as it is. Nothing else builds a DeepSpeed
config, so the buffers the plan sized are the buffers DeepSpeed allocates.
"""

from __future__ import annotations

from typing import Any

from swarm.config.models import JobConfig
from swarm.plan.memory import ZeroKnobs
from swarm.plan.strategy import Strategy

NVME_AIO = {"block_size": 1_048_576, "queue_depth": 8, "intra_op_parallelism": 1,
            "single_submit": False, "overlap_events": True}


def deepspeed_config(job: JobConfig, strategy: Strategy, precision: str, micro_batch: int, grad_accum: int,
                     knobs: ZeroKnobs, pin_memory: bool) -> dict[str, Any]:
    """Build the DeepSpeed config dict of a plan.

    ``train_batch_size`` is left out on purpose: under Ray Train DeepSpeed would check it
    against a world size it reads too early; micro-batch and accumulation define it.

    Args:
        job: The validated job (learning rate, optimizer, clipping, NVMe folder).
        strategy: ``replicate`` (ZeRO-2) or ``shard`` (ZeRO-3) with its offload targets.
        precision: "bf16", "fp16" or "fp32", as resolved by ``resolve_precision``.
        micro_batch / grad_accum: per worker, as planned.
        knobs: DeepSpeed's buffer sizes, as the memory plan sized them.
        pin_memory: pin offload buffers in host RAM; pinned memory speeds up copies over
            PCIe and means nothing without a GPU.

    Returns:
        A dict to pass as ``config`` to ``deepspeed.initialize``.
    """
    if strategy.zero_stage == 2:
        zero = _replicate_zero(strategy, knobs, pin_memory)
    else:
        zero = _shard_zero(strategy, knobs, pin_memory, job.offload.nvme_path)
    train = job.train
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
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
        params: dict[str, Any] = {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay}
        if strategy.offload_optimizer == "none":
            # torch's AdamW rather than DeepSpeed's FusedAdam, which compiles a CUDA op on
            # first use (with nvcc, which a gaming PC rarely has); LoRA states are small.
            params["torch_adam"] = True
        # With the optimizer offloaded DeepSpeed runs this as its vectorised CPU Adam.
        config["optimizer"] = {"type": "AdamW", "params": params}
    else:
        # 8-bit AdamW and Adafactor are client optimizers that DeepSpeed has not certified
        # for ZeRO; they are safe here because only the (unsharded-size) LoRA weights train.
        config["zero_allow_untested_optimizer"] = True
    if strategy.uses_nvme:
        config["aio"] = dict(NVME_AIO)
    return config


def _replicate_zero(strategy: Strategy, knobs: ZeroKnobs, pin: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": knobs.reduce_bucket_size,
        "allgather_bucket_size": knobs.reduce_bucket_size,
    }
    if strategy.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    return zero


def _shard_zero(strategy: Strategy, knobs: ZeroKnobs, pin: bool, nvme_path: str | None) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": knobs.reduce_bucket_size,
        "stage3_prefetch_bucket_size": knobs.prefetch_bucket_size,
        "stage3_max_live_parameters": knobs.max_live_parameters,
        "stage3_max_reuse_distance": knobs.max_reuse_distance,
        "stage3_param_persistence_threshold": knobs.param_persistence_threshold,
        "sub_group_size": knobs.sub_group_size,
        # swarm saves LoRA weights itself; never gather the frozen base into one file.
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if strategy.offload_params != "none":
        target: dict[str, Any] = {"device": strategy.offload_params, "pin_memory": pin}
        if strategy.offload_params == "nvme":
            # An NVMe swap buffer must hold a whole partition of the largest parameter
            # (DeepSpeed asserts it); the planner sized it from the model's shape.
            target.update(nvme_path=nvme_path, buffer_count=knobs.param_buffer_count,
                          buffer_size=knobs.param_buffer_size)
        zero["offload_param"] = target
    if strategy.offload_optimizer != "none":
        target = {"device": strategy.offload_optimizer, "pin_memory": pin}
        if strategy.offload_optimizer == "nvme":
            target.update(nvme_path=nvme_path, buffer_count=knobs.optimizer_buffer_count)
        zero["offload_optimizer"] = target
    return zero


def resolve_precision(requested: str, gpu_capabilities: list[tuple[int, int]] | None, cpus_bf16: bool) -> str:
    """The training precision of a plan, one for every worker.

    ``auto`` means bf16 where every worker's device computes it natively: Ampere and newer
    GPUs (compute capability 8.0 and up), CPUs with AMX or AVX512-BF16; fp16 when a GPU is
    older (Turing lacks bf16); fp32 on other CPUs, where bf16 is emulated and slower.

    Args:
        requested: The job's ``train.precision``.
        gpu_capabilities: The compute capability of every worker's GPU; None or empty when
            the workers train on CPUs.
        cpus_bf16: Every CPU worker's CPU computes bf16 natively.
    """
    if requested != "auto":
        return requested
    if gpu_capabilities:
        return "bf16" if all(tuple(cc) >= (8, 0) for cc in gpu_capabilities) else "fp16"
    return "bf16" if cpus_bf16 else "fp32"
