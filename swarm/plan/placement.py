"""Where the training workers run: how many, on which machines, each with what it reserves.

Pure and tested as data. ``place_workers`` turns the job and what the Ray nodes offer into a
Ray Train scaling decision; ``spread_workers`` says how many of those workers each machine
hosts, which is what the memory plan sizes.

Each node of a swarm offers a custom Ray resource, ``swarm_worker``: one per GPU, one on a
CPU-only PC, none on a PC whose cluster-file entry says ``train: false``. Every worker
takes one, so a CPU-only PC hosts one worker and a head that only coordinates hosts none,
and nothing else is reserved (a desktop's cores are shared, not carved up).
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.cluster.constants import WORKER_SLOT_RESOURCE
from swarm.config.models import JobConfig
from swarm.errors import UserError

# Ray needs one non-zero resource per worker; a token CPU share reserves nothing real.
TOKEN_CPU = 0.01


@dataclass(frozen=True)
class NodeSlots:
    """One live Ray node, as the placement sees it."""

    node_id: str
    address: str
    slots: int  # its swarm_worker resource
    gpus: int


@dataclass(frozen=True)
class Placement:
    """How many workers, and what each reserves.

    Attributes:
        mode: ``local`` (a Ray started for this run, workers on this machine),
            ``per_gpu`` or ``per_node`` (a swarm).
        min_workers / max_workers: equal for a fixed-size run; otherwise Ray Train runs
            elastic, restarting with fewer workers when a PC drops out and growing back.
        use_gpu: each worker takes one GPU.
        capacity: workers the cluster could host when the run started.
    """

    mode: str
    min_workers: int
    max_workers: int
    use_gpu: bool
    capacity: int

    @property
    def num_workers(self) -> int | tuple[int, int]:
        """What ``ScalingConfig(num_workers=...)`` takes: an int, or (min, max) when elastic."""
        if self.min_workers == self.max_workers:
            return self.max_workers
        return (self.min_workers, self.max_workers)

    @property
    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": TOKEN_CPU}
        if self.use_gpu:
            resources["GPU"] = 1
        if self.mode != "local":
            resources[WORKER_SLOT_RESOURCE] = 1
        return resources

    @property
    def backend(self) -> str:
        """The torch process-group backend the workers join: NCCL between GPUs, else gloo."""
        return "nccl" if self.use_gpu else "gloo"

    def describe(self) -> str:
        count = (f"{self.max_workers}" if self.min_workers == self.max_workers
                 else f"{self.max_workers} (at least {self.min_workers})")
        where = {"local": "on this machine", "per_gpu": "one per GPU", "per_node": "one per node"}[self.mode]
        return f"{count} worker(s), {where}"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "min_workers": self.min_workers, "max_workers": self.max_workers,
                "use_gpu": self.use_gpu, "capacity": self.capacity, "backend": self.backend}


def place_workers(job: JobConfig, nodes: list[NodeSlots] | None, local_gpus: int) -> Placement:
    """Decide the worker count and placement, or refuse in one line.

    Args:
        job: the validated job.
        nodes: the live nodes of the swarm; None for a Ray started for this run.
        local_gpus: GPUs of this machine (used for a local Ray).

    Raises:
        UserError: the job asks for more workers than the machines offer.
    """
    train = job.train
    if nodes is None:
        use_gpu = local_gpus > 0
        wanted = train.workers if isinstance(train.workers, int) else max(1, local_gpus)
        if use_gpu and wanted > local_gpus:
            raise UserError(f"train.workers={wanted} but this machine has {local_gpus} GPU(s); "
                            "lower train.workers or set ray.address to a swarm")
        minimum = wanted if train.min_workers is None else train.min_workers
        if minimum > wanted:
            raise UserError(f"train.min_workers={minimum} but this run has {wanted} worker(s); lower train.min_workers")
        return Placement("local", minimum, wanted, use_gpu, capacity=wanted)

    trainers = [n for n in nodes if n.slots > 0]
    if not trainers:
        raise UserError(
            f"no node of the cluster at {job.ray.address} takes training workers (nodes take them when started "
            "by `swarm up` or `swarm join` without `train: false`)"
        )
    mode = train.placement
    if mode == "auto":
        mode = "per_gpu" if any(n.gpus for n in trainers) else "per_node"
    if mode == "per_gpu":
        capacity = sum(min(n.slots, n.gpus) for n in trainers)
        if capacity == 0:
            raise UserError("train.placement=per_gpu but no training node has a GPU; use train.placement=per_node")
        offer = f"{capacity} GPU(s) on {sum(1 for n in trainers if n.gpus)} node(s)"
    else:
        capacity = sum(n.slots for n in trainers)
        offer = f"{capacity} worker slot(s) on {len(trainers)} node(s)"
    wanted = train.workers if isinstance(train.workers, int) else capacity
    if wanted > capacity:
        raise UserError(f"train.workers={wanted} but the swarm offers {offer}; lower train.workers, or add a PC "
                        "with `swarm join` (`swarm status` lists the nodes)")
    minimum = wanted if train.min_workers is None else train.min_workers
    if minimum > capacity:
        raise UserError(f"train.min_workers={minimum} but the swarm offers {offer}; lower train.min_workers")
    return Placement(mode, minimum, wanted, mode == "per_gpu", capacity)


def node_capacity(placement: Placement, slots: int, gpus: int) -> int:
    """Workers one node can host under ``placement``: its GPUs (per_gpu) or its slots."""
    if placement.mode == "local":
        return placement.max_workers
    if placement.mode == "per_gpu":
        return min(slots, gpus)
    return slots


def spread_workers(workers: int, capacities: list[int]) -> list[int]:
    """How many of ``workers`` each node hosts when they fill the nodes in order.

    Ray Train packs its workers onto as few nodes as it can; the driver's node comes first
    in ``capacities``. The memory plan sizes each node for its share; the worker group that
    really starts asks for the plan of the nodes it landed on (see ``swarm.train.driver.plans``).
    """
    spread = []
    left = workers
    for capacity in capacities:
        take = min(capacity, left)
        spread.append(take)
        left -= take
    if left:
        raise ValueError(f"{workers} workers do not fit in capacities {capacities}")
    return spread
