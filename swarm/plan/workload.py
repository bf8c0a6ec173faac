"""What one worker computes: the planner's view of a job, read from it by
``swarm.plan.decide.workload_from_job`` and used by every figure (memory, activations, speed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """What one worker computes, read from the job (see ``swarm.plan.decide.workload_from_job``)."""

    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = "all-linear"
    bits: int | None = 4
    double_quant: bool = True
    optimizer: str = "adamw"
    compute_bytes: int = 2  # bf16/fp16; 4 for fp32
    eager_attention: bool = False
    object_store_bytes: int = 512 * 1024**2
    # Preference training: a sample is a pair of sequences (chosen, rejected), and DPO runs a
    # forward pass without gradients through the base with the adapter off (the reference).
    sequences: int = 1
    reference_passes: int = 0
    dora: bool = False  # DoRA: each adapted layer builds its whole weight to take its norm
    partition_per_pc: bool = False  # a diloco PC: ZeRO-3 partitions over the PC, after a whole load
    data_tokens: int = 0  # tokens the driver prepares (train + eval)
