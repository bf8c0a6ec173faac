"""The strategies a job may train with: what each keeps where, and which the job's settings
allow (why the planner chose one: ``swarm.plan.candidates.strategy_reason``).

A :class:`Strategy` names how the work is spread over the workers (ZeRO stage, offload
targets, or DiLoCo); ``STRATEGIES`` lists every one the planner sizes (``swarm.plan.memory``
counts their memory, ``swarm.plan.speed`` their step time, ``swarm.plan.deepspeed`` writes
their config).
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.config.models import JobConfig
from swarm.errors import UserError

OFFLOAD_TARGETS = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class Strategy:
    """How the work is spread over the workers, and where ZeRO keeps what.

    Two kinds, one name each across planner and trainer:

    - ``replicate`` (ZeRO-2): every worker holds the whole 4-bit base; only LoRA gradients
      and weights cross the network, and the LoRA optimizer state is partitioned, in CPU
      RAM when ``offload_optimizer`` is ``cpu`` (ZeRO-2 offloads nowhere else).
    - ``shard`` (ZeRO-3): the base is partitioned over the workers, its partitions kept on
      the device, in CPU RAM or on NVMe (``offload_params``), the optimizer state likewise.
    - ``diloco``: each PC trains on its own with one of the two above inside it (each PC's
      own plan says which) and the PCs exchange adapters every few steps (``swarm.plan.diloco``);
      ``zero_stage`` is 0 here, as the stage is each PC's.
    """

    zero_stage: int
    offload_params: str = "none"
    offload_optimizer: str = "none"
    diloco: bool = False

    def __post_init__(self):
        if self.diloco:
            if (self.zero_stage, self.offload_params, self.offload_optimizer) != (0, "none", "none"):
                raise ValueError("diloco's ZeRO stage and offload are each PC's own")
            return
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 (replicate) or 3 (shard), not {self.zero_stage}")
        if self.offload_params not in OFFLOAD_TARGETS or self.offload_optimizer not in OFFLOAD_TARGETS:
            raise ValueError("offload targets are none, cpu or nvme")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError("parameter offload needs ZeRO stage 3 (shard)")
        if self.offload_optimizer == "nvme" and self.zero_stage != 3:
            raise ValueError("ZeRO-2 (replicate) offloads the optimizer to CPU RAM only")

    @property
    def kind(self) -> str:
        if self.diloco:
            return "diloco"
        return "replicate" if self.zero_stage == 2 else "shard"

    @property
    def name(self) -> str:
        name = self.kind
        if self.offload_params != "none":
            name += f"-params-{self.offload_params}"
        if self.offload_optimizer != "none":
            name += f"-opt-{self.offload_optimizer}"
        return name

    @property
    def label(self) -> str:
        if self.diloco:
            return "each PC trains on its own, adapters exchanged every few steps (DiLoCo)"
        where = {"cpu": "CPU RAM", "nvme": "NVMe"}
        parts = ["replicated 4-bit base, ZeRO-2" if self.zero_stage == 2 else "sharded base, ZeRO-3"]
        if self.offload_params != "none":
            parts.append(f"parameters in {where[self.offload_params]}")
        if self.offload_optimizer != "none":
            parts.append(f"optimizer in {where[self.offload_optimizer]}")
        return ", ".join(parts)

    @property
    def uses_nvme(self) -> bool:
        return "nvme" in (self.offload_params, self.offload_optimizer)

    def to_dict(self) -> dict:
        return {"name": self.kind, "variant": self.name, "zero_stage": self.zero_stage,
                "offload_params": self.offload_params, "offload_optimizer": self.offload_optimizer,
                "label": self.label}


# Every strategy the planner knows, preferred first when two are estimated equally fast.
# For QLoRA the optimizer state covers only the adapters, so the NVMe choices matter for
# the parameters.
STRATEGIES = (
    Strategy(2),
    Strategy(2, "none", "cpu"),
    Strategy(3),
    Strategy(3, "none", "cpu"),
    Strategy(3, "cpu", "none"),
    Strategy(3, "cpu", "cpu"),
    Strategy(3, "nvme", "cpu"),
    Strategy(3, "nvme", "nvme"),
)


def allowed_strategies(job: JobConfig) -> list[Strategy]:
    """The strategies this job's settings allow, in the planner's order of preference.

    ``train.strategy`` picks the kind (``auto``: both); ``offload.params`` and
    ``offload.optimizer`` pick the offload targets (``auto``: any, NVMe only when
    ``offload.nvme_path`` names a folder); only AdamW runs off the device (DeepSpeed's CPU Adam);
    DoRA on a 4-bit base runs only without ZeRO-3.

    Raises:
        UserError: the settings exclude every strategy.
    """
    offload, train = job.offload, job.train
    if train.strategy == "diloco":
        return []  # each PC of a diloco run is planned on its own (swarm.plan.diloco)
    kinds = ("replicate", "shard") if train.strategy == "auto" else (train.strategy,)

    def allows(setting: str, target: str) -> bool:
        if setting == "auto":
            return target != "nvme" or bool(offload.nvme_path)
        return setting == target

    allowed = [
        s for s in STRATEGIES
        if s.kind in kinds and allows(offload.params, s.offload_params) and allows(offload.optimizer, s.offload_optimizer)
        and (s.offload_optimizer == "none" or train.optimizer == "adamw")
        and not (s.zero_stage == 3 and dora_needs_whole_4bit_weights(job))
    ]
    if not allowed and dora_needs_whole_4bit_weights(job):
        raise UserError(DORA_ZERO3)
    if not allowed:
        raise UserError(
            f"train.strategy={train.strategy} keeps the whole 4-bit base on every worker and offloads only the "
            f"optimizer, to CPU RAM; it cannot take offload.params={offload.params} with "
            f"offload.optimizer={offload.optimizer}; use train.strategy=shard or change the offload settings"
        )
    return allowed


DORA_ZERO3 = (
    "lora.use_dora with a 4-bit base cannot train under ZeRO-3 (train.strategy=shard, or offload.params cpu or "
    "nvme): peft's DoRA reads each whole 4-bit weight, which ZeRO-3 keeps partitioned; use train.strategy=replicate "
    "with offload.params=none, quantization.bits=none, or lora.use_dora=false"
)


def dora_needs_whole_4bit_weights(job: JobConfig) -> bool:
    """DoRA on a 4-bit base: peft dequantizes every whole weight, which ZeRO-3 partitions (tested: it fails)."""
    return job.lora.use_dora and job.quantization.bits == 4
