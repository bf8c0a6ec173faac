"""Inventories of other machines for planning: a hardware file the user writes, or the nodes
of the running swarm as their agents report them (this machine's own is
``swarm.hardware.inventory``).

A hardware file describes machines that need not exist yet::

    link_gbps: 1            # the network between the PCs (optional, default 1 Gb/s)
    nodes:
      - name: desktop
        gpus: [{name: "RTX 4060 Ti", vram_gb: 16}]
        ram_gb: 64
        nvme_gb: 1000       # free space for NVMe offload (optional)

VRAM and RAM are in GiB (what NVML and ``free -g`` show); NVMe space in GB (what drive
vendors print). A GPU the table in ``swarm.plan.gpus`` knows may omit ``vram_gb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm.errors import UserError
from swarm.inventory import GpuInfo, NodeInventory
from swarm.plan.gpus import find_gpu, known_names

GiB = 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuEntry(_Strict):
    name: str = Field(min_length=1)
    vram_gb: float | None = Field(None, gt=0)
    count: int = Field(1, ge=1, description="identical cards in this machine")


class NodeEntry(_Strict):
    name: str = Field(min_length=1)
    gpus: list[GpuEntry] = []
    ram_gb: float = Field(gt=0)
    nvme_gb: float | None = Field(None, ge=0)
    nvme_write_gbs: float | None = Field(None, gt=0, description="measured write speed, GB/s")


class HardwareFile(_Strict):
    nodes: list[NodeEntry] = Field(min_length=1)
    link_gbps: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> "HardwareFile":
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node names must be unique; repeated: {', '.join(dupes)}")
        return self


@dataclass(frozen=True)
class Hardware:
    """Nodes to plan for and the network between them (None: unknown, assume 1 Gb/s)."""

    nodes: list[NodeInventory]
    link_gbps: float | None = None


def load_hardware(path: str | Path) -> Hardware:
    """Read and validate a hardware file.

    Raises:
        UserError: a missing or malformed file, an unknown key, or a GPU that the table does
            not know and whose ``vram_gb`` is not given.
    """
    from swarm.config.loading import describe_validation_error

    path = Path(path)
    if not path.is_file():
        raise UserError(f"hardware file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping with a 'nodes:' list")
    try:
        spec = HardwareFile.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}") from None
    return Hardware(nodes=[_node(path, n) for n in spec.nodes], link_gbps=spec.link_gbps)


def _node(path: Path, entry: NodeEntry) -> NodeInventory:
    gpus = []
    for g in entry.gpus:
        known = find_gpu(g.name)
        if g.vram_gb is None and known is None:
            raise UserError(
                f"{path}: node {entry.name}: GPU {g.name!r} is not in swarm's table; give its vram_gb "
                f"(known: {', '.join(known_names())})"
            )
        vram = int(g.vram_gb * GiB) if g.vram_gb is not None else known.vram_bytes
        cc = known.compute_capability if known else None
        gpus += [GpuInfo(name=known.name if known else g.name, vram_bytes=vram, compute_capability=cc)] * g.count
    return NodeInventory(
        hostname=entry.name,
        ram_bytes=int(entry.ram_gb * GiB),
        gpus=tuple(gpus),
        offload_free_bytes=int(entry.nvme_gb * 1e9) if entry.nvme_gb is not None else None,
        offload_write_bytes_per_s=entry.nvme_write_gbs * 1e9 if entry.nvme_write_gbs else None,
    )


def inventory_from_cluster(insecure: bool = False) -> list[NodeInventory]:
    """The live swarm's nodes that are alive, as their agents report them; the head first.

    Args:
        insecure: the swarm runs without a secret (``swarm up --insecure``).

    Raises:
        UserError: no swarm is recorded on this PC, none of its nodes answers, or this
            install lacks the cluster parts.
    """
    no_swarm = "no running swarm; run `swarm up` or pass --hardware FILE"
    try:
        from swarm.cluster import state
        from swarm.home import resolve_secret
    except ImportError:
        raise UserError(no_swarm) from None
    if state.load_cluster_state() is None:
        raise UserError(no_swarm)
    status = state.cluster_status(resolve_secret(insecure))
    live = [n for n in status.get("nodes", []) if n.get("alive") and n.get("ram_bytes")]
    if not live:
        raise UserError(no_swarm + (f" ({status['error']})" if status.get("error") else ""))
    live.sort(key=lambda n: n.get("role") != "head")
    return [
        NodeInventory(
            hostname=n.get("hostname") or n["address"], ram_bytes=int(n["ram_bytes"]),
            gpus=tuple(GpuInfo(g["name"], int(g["vram_bytes"])) for g in n.get("gpus") or ()),
            address=n["address"], offload_free_bytes=n.get("offload_free_bytes"),
        )
        for n in live
    ]
