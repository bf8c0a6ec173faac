"""The plan of each worker group: the driver plans, the workers ask and use the answer as it is.

Ray Train may start a run's worker group more than once: after a failure, and, when the job
is elastic (``train.min_workers``), with fewer workers when a PC drops out and more when it
returns. Each group needs the plan for the machines it landed on: ZeRO partitions, memory
per worker and possibly the strategy change with the group. So the first thing a group does
is ask for its plan by the shape of the group (workers per node address); the driver
answers from the nodes' inventories, with ``swarm.plan.make_plan`` as for the first group,
and refuses, in one line, a group on which the job no longer fits. The answer travels
through the run's mailbox actor (``swarm.train.mailbox``).
"""

from __future__ import annotations

import time
from collections import Counter

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import NodeInventory
from swarm.plan import Plan, make_plan
from swarm.plan.placement import NodeSlots, Placement, node_capacity, place_workers, spread_workers
from swarm.train.ops import check_build_tools

# The shape of a worker group: ((node address, workers there), ...), sorted; "local" for a
# run on a Ray started for it, whose single node is the driver's.
GroupKey = tuple


def group_key(addresses: list[str], local: bool) -> GroupKey:
    """The key of a worker group from each rank's node address."""
    if local:
        return (("local", len(addresses)),)
    return tuple(sorted(Counter(addresses).items()))


class GroupPlanner:
    """Driver side: the plan of every worker group of one run.

    Args:
        job: the job as the run trains it.
        inventories: every training node's hardware, the driver's node first.
        capacities: how many workers each of those nodes can host.
        placement: the run's placement (its mode, limits and devices stay for every group).
        link_gbps: the network between nodes, when known.
        data_tokens: tokens of the prepared data (the driver's share of the head's RAM).
    """

    def __init__(self, job: JobConfig, inventories: list[NodeInventory], capacities: list[int],
                 placement: Placement, link_gbps: float | None = None, data_tokens: int = 0):
        self.job, self.placement, self.link_gbps = job, placement, link_gbps
        self.data_tokens = data_tokens
        self.inventories, self.capacities = inventories, capacities
        self.current: Plan | None = None

    def first_key(self) -> GroupKey:
        """The group the run starts with: its workers fill the nodes in order."""
        counts = spread_workers(self.placement.max_workers, self.capacities)
        if self.placement.mode == "local":
            return (("local", counts[0]),)
        return tuple(sorted((inv.address, n) for inv, n in zip(self.inventories, counts) if n))

    def plan_for(self, key: GroupKey) -> Plan:
        """The plan of the group ``key``; it becomes ``current`` when it fits.

        Raises:
            UserError: workers on a node the run never surveyed.
        """
        if self.placement.mode == "local":
            [(_, workers)] = key
            nodes, counts = self.inventories[:1], [workers]
        else:
            wanted = dict(key)
            unknown = sorted(set(wanted) - {inv.address for inv in self.inventories})
            if unknown:
                raise UserError(f"workers started on {', '.join(unknown)}, which the run did not plan for; "
                                "restart `swarm train` so it asks the swarm again")
            # Keep the driver's node first: the planner counts the Ray head's share there.
            nodes = [inv for inv in self.inventories if inv.address in wanted]
            counts = [wanted[inv.address] for inv in nodes]
        plan = make_plan(self.job, nodes, placement=self.placement, workers_per_node=counts,
                         link_gbps=self.link_gbps, data_tokens=self.data_tokens)
        if plan.fits:
            self.current = plan
        return plan

    def answer(self, key: GroupKey) -> dict:
        """What a worker group that asks for ``key`` receives: its plan, or why it is refused."""
        try:
            plan = self.plan_for(key)
        except UserError as exc:
            return {"refused": str(exc)}
        if not plan.fits:
            where = ", ".join(f"{n.name} ({n.workers})" for n in plan.nodes)
            return {"refused": f"the worker group changed to {plan.workers} worker(s) on {where}, and the job does "
                               f"not fit it: {plan.reason}"}
        return plan.to_dict()


def run_planner(job: JobConfig, nodes: list[NodeSlots] | None, inventories: list[NodeInventory],
                data_tokens: int = 0) -> GroupPlanner:
    """The planner of a run, holding the plan of its first worker group.

    Args:
        job: the job.
        nodes: the swarm's live nodes as Ray offers them, or None for a Ray started for this run.
        inventories: the hardware of each node that takes workers, the driver's first (for a
            local run: this machine's).
        data_tokens: tokens of the prepared data.

    Raises:
        UserError: the machines cannot host the workers, or the job does not fit them.
    """
    if nodes is None:
        placement = place_workers(job, None, local_gpus=len(inventories[0].gpus))
        capacities = [placement.max_workers]
    else:
        placement = place_workers(job, nodes, local_gpus=0)
        by_address = {n.address: n for n in nodes}
        capacities = [node_capacity(placement, by_address[inv.address].slots, by_address[inv.address].gpus)
                      for inv in inventories]
    planner = GroupPlanner(job, inventories, capacities, placement, data_tokens=data_tokens)
    plan = planner.plan_for(planner.first_key())
    if not plan.fits:
        raise UserError(f"this job does not fit: {plan.reason}; `swarm plan JOB` shows the figures")
    check_build_tools(plan.to_dict(), inventories)
    return planner


def receive_group_plan(mailbox, key: GroupKey, ask, timeout_s: float = 300.0) -> dict:
    """Rank 0's side: the plan (``Plan.to_dict()``) of its group, or ``{"refused": line}``.

    Args:
        mailbox: the run's mailbox actor.
        key: this group's key.
        ask: sends the driver a request for ``key`` (only called when the mailbox has none).
        timeout_s: how long to wait for the driver's answer.
    """
    import ray

    from swarm.train.mailbox import unpack

    packed = ray.get(mailbox.plan.remote(key))
    if packed is None:
        ask()
        deadline = time.monotonic() + timeout_s
        while packed is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the driver did not plan worker group {key} within {timeout_s:.0f} s")
            time.sleep(0.2)
            packed = ray.get(mailbox.plan.remote(key))
    return unpack(packed)


def plan_of_pc(plan: dict, address: str) -> dict:
    """What a worker of a ``diloco`` run uses: its PC's own plan inside the run's plan.

    Its PC's DeepSpeed config, strategy, micro-batch and accumulation replace the run's;
    the precision, placement and the exchange (``sync``) stay the run's.
    """
    pcs = plan["pcs"]
    # A run on its own Ray has one PC, whose address the plan never learned.
    [pc] = pcs if len(pcs) == 1 else [pc for pc in pcs if pc["address"] == address]
    return {**plan, "deepspeed": pc["deepspeed"], "strategy": pc["strategy"], "micro_batch": pc["micro_batch"],
            "grad_accum": pc["grad_accum"], "pc": pc["name"]}
