"""Where the training workers run, and how they share the model: decided on the driver.

``place_workers`` turns the job and what the Ray nodes offer into a Ray Train scaling
decision; ``choose_strategy`` picks between a replicated 4-bit base (data parallel, only
LoRA gradients cross the network) and ZeRO-3 sharding across machines. Both are pure and
tested as data; ``survey_cluster`` and ``node_inventories`` are the parts that ask Ray.

Each node of a swarm offers a custom Ray resource, ``swarm_worker``: one per GPU, one on a
CPU-only PC, none on a PC whose cluster-file entry says ``train: false``. Every worker
takes one, so a CPU-only PC hosts one worker and a head that only coordinates hosts none,
and nothing else is reserved (a desktop's cores are shared, not carved up).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

    def describe(self) -> str:
        count = (f"{self.max_workers}" if self.min_workers == self.max_workers
                 else f"{self.max_workers} (at least {self.min_workers})")
        where = {"local": "on this machine", "per_gpu": "one per GPU", "per_node": "one per node"}[self.mode]
        return f"{count} worker(s), {where}"


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


@dataclass(frozen=True)
class StrategyChoice:
    """``replicate`` or ``shard``, why, and the ZeRO strategy the planner sized."""

    name: str
    reason: str
    zero_stage: int
    offload_params: str
    offload_optimizer: str

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason, "zero_stage": self.zero_stage,
                "offload_params": self.offload_params, "offload_optimizer": self.offload_optimizer}


def zero_strategy(job: JobConfig, name: str):
    """The planner's strategy for ``replicate`` (ZeRO-2) or ``shard`` (ZeRO-3 with the job's offload)."""
    from swarm.plan import Strategy

    if name == "replicate":
        # ZeRO-2 keeps the base whole on every worker; only the optimizer can go to CPU RAM.
        return Strategy(2, "none", "cpu" if job.offload.optimizer != "none" else "none")
    return Strategy(3, job.offload.params, job.offload.optimizer)


def choose_strategy(job: JobConfig, workers: int, fits_replicated) -> StrategyChoice:
    """Replicate the 4-bit base when it fits on every node, else shard it with ZeRO-3.

    Args:
        job: the validated job (``train.strategy`` may force either).
        workers: the number of workers the run starts with.
        fits_replicated: a function returning ``(fits, detail)`` for the replicated
            strategy (a plan over the nodes), called only when the choice depends on it.
    """
    forced = job.train.strategy
    if forced != "auto":
        reason = f"train.strategy={forced} in the job"
    elif workers == 1:
        forced, reason = "shard", "one worker: ZeRO-3 with the job's offload settings (nothing to replicate across)"
    else:
        fits, detail = fits_replicated()
        if fits:
            forced = "replicate"
            reason = f"the 4-bit base fits on every node ({detail}); only LoRA gradients cross the network"
        else:
            forced = "shard"
            reason = f"the base does not fit on every node when replicated ({detail}); ZeRO-3 shards it"
    s = zero_strategy(job, forced)
    return StrategyChoice(forced, reason, s.zero_stage, s.offload_params, s.offload_optimizer)


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


def node_inventories(nodes: list[NodeSlots], offload_dir: str | None) -> list:
    """Each training node's own hardware (RAM, GPUs, free offload space), asked on that node.

    The node this driver runs on comes first: the planner adds the Ray head's share there.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from swarm.plan import local_inventory

    here = ray.get_runtime_context().get_node_id()
    ordered = sorted((n for n in nodes if n.slots > 0), key=lambda n: n.node_id != here)
    ask = ray.remote(num_cpus=0)(local_inventory)
    refs = [
        ask.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(offload_dir)
        for n in ordered
    ]
    inventories = ray.get(refs, timeout=120)
    return [replace(inv, address=n.address) for inv, n in zip(inventories, ordered)]
