"""Between the wire (``agent_pb2``) and swarm's own types (``NodeInventory``)."""

from __future__ import annotations

from swarm.cluster.proto import agent_pb2 as pb
from swarm.inventory import GpuInfo, NodeInventory

SERVICE = pb.DESCRIPTOR.services_by_name["Agent"]


def method_path(name: str) -> str:
    """The gRPC path of an Agent method, e.g. ``/swarm.agent.v1.Agent/Health``."""
    return f"/{SERVICE.full_name}/{name}"


def inventory_to_proto(inv: NodeInventory, offload_dir: str = "") -> pb.InventoryReply:
    """A ``NodeInventory`` as the Inventory reply carries it (None becomes -1, 0 or "")."""
    return pb.InventoryReply(
        hostname=inv.hostname,
        ram_bytes=inv.ram_bytes,
        gpus=[
            pb.GpuInfo(
                name=g.name, vram_bytes=g.vram_bytes,
                cc_major=(g.compute_capability or (0, 0))[0], cc_minor=(g.compute_capability or (0, 0))[1],
            )
            for g in inv.gpus
        ],
        address=inv.address or "",
        interface=inv.interface or "",
        offload_free_bytes=-1 if inv.offload_free_bytes is None else inv.offload_free_bytes,
        offload_write_bytes_per_s=inv.offload_write_bytes_per_s or 0.0,
        versions=dict(inv.versions),
        offload_dir=offload_dir,
    )


def inventory_from_proto(msg: pb.InventoryReply) -> NodeInventory:
    """The reverse of ``inventory_to_proto``."""
    return NodeInventory(
        hostname=msg.hostname,
        ram_bytes=msg.ram_bytes,
        gpus=tuple(
            GpuInfo(
                name=g.name, vram_bytes=g.vram_bytes,
                compute_capability=(g.cc_major, g.cc_minor) if g.cc_major else None,
            )
            for g in msg.gpus
        ),
        address=msg.address or None,
        interface=msg.interface or None,
        offload_free_bytes=None if msg.offload_free_bytes < 0 else msg.offload_free_bytes,
        offload_write_bytes_per_s=msg.offload_write_bytes_per_s or None,
        versions=dict(msg.versions),
    )
