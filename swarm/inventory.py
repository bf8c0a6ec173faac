"""What one machine offers to a job: the shared vocabulary of the agent and the planner.

The agent fills these from the live machine (``swarm.hardware``); the planner reads them,
either from the live cluster or from a hardware file a user writes. Sizes are in bytes so
that arithmetic never mixes units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML (or a hardware file) describes it."""

    name: str
    vram_bytes: int
    compute_capability: tuple[int, int] | None = None  # (8, 9) for an RTX 4090


@dataclass(frozen=True)
class NodeInventory:
    """One machine of the swarm."""

    hostname: str
    ram_bytes: int
    gpus: tuple[GpuInfo, ...] = ()
    cpu_bf16: bool = False  # the CPU computes bf16 natively (AMX or AVX512-BF16)
    address: str | None = None  # the address other nodes reach it at
    offload_free_bytes: int | None = None  # free space in the offload (NVMe) folder
    offload_write_bytes_per_s: float | None = None  # measured write speed of that folder
    interface: str | None = None  # network interface that reaches the head
    versions: dict[str, str] = field(default_factory=dict)  # python, torch, ray, swarm, ...
    # What it lacks to build DeepSpeed's ops, and the ops it therefore cannot load (those not
    # compiled into its DeepSpeed): swarm.hardware.missing_build_tools, unbuildable_ops
    missing_build_tools: tuple[str, ...] = ()
    unbuildable_ops: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NodeInventory":
        gpus = tuple(
            GpuInfo(
                name=g["name"],
                vram_bytes=int(g["vram_bytes"]),
                compute_capability=tuple(g["compute_capability"]) if g.get("compute_capability") else None,
            )
            for g in data.get("gpus", ())
        )
        return cls(**{**data, "gpus": gpus, "versions": dict(data.get("versions") or {}),
                      "missing_build_tools": tuple(data.get("missing_build_tools") or ()),
                      "unbuildable_ops": tuple(data.get("unbuildable_ops") or ())})
