"""The plan of each worker group: the driver plans, the workers ask and use the answer as it is.

Ray Train may start a run's worker group more than once: after a failure, and, when the job
is elastic (``train.min_workers``), with fewer workers when a PC drops out and more when it
returns. Each group needs the plan for the machines it landed on: ZeRO partitions, memory
per worker and possibly the strategy change with the group. So the first thing a group does
is ask for its plan by the shape of the group (workers per node address); the driver
answers from the nodes' inventories, with ``swarm.plan.make_plan`` as for the first group,
and refuses, in one line, a group on which the job no longer fits. The answer travels
through the run's mailbox actor (``swarm.train.mailbox``, keyed by ``group_key``); the
workers' side of it is ``swarm.train.worker.driver_link``.
"""

from __future__ import annotations

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import NodeInventory
from swarm.plan import Plan, make_plan
from swarm.plan.placement import NodeSlots, Placement, node_capacity, place_workers, spread_workers
from swarm.train.mailbox import GroupKey
from swarm.train.ops import check_build_tools

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
