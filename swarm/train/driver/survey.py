"""Asking the Ray cluster what it offers: its live nodes and each training node's hardware.

The edge of the placement decision (``swarm.plan.placement`` is the pure part): these
functions talk to Ray, the planner takes their answers as input.
"""

from __future__ import annotations

from dataclasses import replace

from swarm.cluster.constants import WORKER_SLOT_RESOURCE
from swarm.inventory import NodeInventory
from swarm.plan.placement import NodeSlots


def survey_cluster() -> list[NodeSlots]:
    """The live nodes of the Ray cluster this process is connected to."""
    import ray

    return [
        NodeSlots(
            node_id=n["NodeID"], address=n["NodeManagerAddress"],
            slots=int(n["Resources"].get(WORKER_SLOT_RESOURCE, 0)), gpus=int(n["Resources"].get("GPU", 0)),
        )
        for n in ray.nodes() if n.get("Alive")
    ]


def node_inventories(nodes: list[NodeSlots], offload_dir: str | None) -> list[NodeInventory]:
    """Each training node's own hardware (GPUs, RAM, CPU, free offload space), asked on that node.

    The task asks for no GPU, so Ray hides the node's GPUs from CUDA in it
    (``CUDA_VISIBLE_DEVICES`` is empty); ``swarm.hardware`` reads them through NVML, which
    sees the card whatever that variable says. A node offers Ray only some of its GPUs
    when it was started so; the inventory keeps as many as Ray offers.

    The node this driver runs on comes first: the planner adds the Ray head's share there.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from swarm.hardware import inventory

    here = ray.get_runtime_context().get_node_id()
    ordered = sorted((n for n in nodes if n.slots > 0), key=lambda n: n.node_id != here)
    ask = ray.remote(num_cpus=0)(lambda folder: inventory(offload=folder))
    refs = [
        ask.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(offload_dir)
        for n in ordered
    ]
    inventories = ray.get(refs, timeout=120)
    return [as_ray_offers(inv, n) for inv, n in zip(inventories, ordered)]


def as_ray_offers(inv: NodeInventory, node: NodeSlots) -> NodeInventory:
    """The inventory of ``node`` with its Ray address and no more GPUs than Ray offers there."""
    return replace(inv, address=node.address, gpus=inv.gpus[: node.gpus])
