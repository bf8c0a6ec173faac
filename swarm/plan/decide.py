"""The plan of a job: one frozen answer from the machines to the run.

``make_plan(job, nodes)`` is the public entry point. It places the workers, builds the
model's shape from its config (no weights), tries each strategy the job allows (see
``swarm.plan.strategy``) with the job's micro-batch and, when that does not fit, smaller
ones that keep the samples per step (the accumulation grows to match), and picks the
fitting candidate with the shortest estimated step. The resulting :class:`Plan` holds the
placement, strategy and why, precision, micro-batch and accumulation, the exact DeepSpeed
config, and the memory figures per node. ``swarm plan`` prints it, ``swarm train`` writes
it to RUN/plan.json, and the workers initialise DeepSpeed with its config as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import NodeInventory
from swarm.plan import diloco
from swarm.plan import memory as mem
from swarm.plan.candidates import Candidate, NodeFigures, node_figures, strategy_reason
from swarm.plan.deepspeed import deepspeed_config, resolve_precision
from swarm.plan.gpus import UNKNOWN_GPU, find_gpu
from swarm.plan.placement import NodeSlots, Placement, node_capacity, place_workers, spread_workers
from swarm.plan.shapes import ModelShape, load_shape
from swarm.plan.speed import CPU_STEP_CAVEAT
from swarm.plan.strategy import Strategy, allowed_strategies
from swarm.plan.workload import Workload


@dataclass(frozen=True)
class Plan:
    """The one answer to "how does this job run here": ``swarm plan`` prints it,
    ``swarm train`` refuses to start when ``fits`` is false, and the workers use it verbatim.

    Attributes:
        fits: the chosen candidate fits on every node.
        placement: how many workers, where, what each reserves.
        strategy: the chosen strategy (the closest candidate when nothing fits).
        strategy_reason: why this strategy, one line.
        micro_batch / grad_accum: per worker; their product is the job's samples per step.
        precision: bf16, fp16 (a card without bf16) or fp32.
        deepspeed: the DeepSpeed config the workers initialise with, exactly.
        reason: one line saying why nothing fits; None when it fits.
        nodes: per-node figures of the chosen candidate (nodes that host workers).
        candidates: every strategy tried.
        workers: training workers in all.
        notes: things the user should know for the plan to hold.
    """

    fits: bool
    placement: Placement
    strategy: Strategy
    strategy_reason: str
    micro_batch: int
    grad_accum: int
    precision: str
    deepspeed: dict
    reason: str | None
    nodes: tuple[NodeFigures, ...]
    candidates: tuple[Candidate, ...]
    model: ModelShape
    workload: Workload
    knobs: mem.ZeroKnobs
    workers: int
    seq_len: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    pcs: tuple["Plan", ...] = ()  # diloco: each PC's own plan, in the order of ``nodes``
    sync: "diloco.SyncPlan | None" = None  # diloco: the exchange between the PCs
    addresses: tuple[str | None, ...] = ()  # each node's address, in the order of ``nodes``

    @property
    def step_seconds(self) -> float:
        return max(n.step.seconds for n in self.nodes)

    @property
    def tokens_per_s(self) -> float:
        return self.workers * self.micro_batch * self.grad_accum * self.seq_len / self.step_seconds

    def to_dict(self) -> dict:
        """The plan as JSON data: RUN/plan.json, ``swarm plan --json``, what the workers receive."""
        m = self.model
        return {
            "fits": self.fits, "reason": self.reason,
            "placement": self.placement.to_dict(),
            "strategy": {**self.strategy.to_dict(), "reason": self.strategy_reason},
            "precision": self.precision, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
            "workers": self.workers, "seq_len": self.seq_len,
            "deepspeed": self.deepspeed,
            "step_seconds": self.step_seconds, "tokens_per_s": self.tokens_per_s,
            # the table says it beside the step times; JSON readers get the same warning
            "step_seconds_caveat": None if self.placement.use_gpu else CPU_STEP_CAVEAT,
            "bytes_sent_per_step": max(n.step.bytes_sent for n in self.nodes),
            "model": {"name": m.name, "model_type": m.model_type, "params": m.total_params,
                      "quantized_params": m.quantizable_params if self.workload.bits == 4 else 0,
                      "lora_params": m.lora_params(self.workload.lora_targets, self.workload.lora_r)},
            "nodes": [n.to_dict() for n in self.nodes],
            "candidates": [c.to_dict() for c in self.candidates],
            "notes": list(self.notes),
            "pcs": [{"address": address, "name": pc.nodes[0].name, "workers": pc.workers,
                     "strategy": {**pc.strategy.to_dict(), "reason": pc.strategy_reason},
                     "micro_batch": pc.micro_batch, "grad_accum": pc.grad_accum, "deepspeed": pc.deepspeed}
                    for address, pc in zip(self.addresses, self.pcs)],
            "sync": self.sync.to_dict() if self.sync else None,
        }


def make_plan(job: JobConfig, nodes: list[NodeInventory], *, placement: Placement | None = None,
              workers_per_node: list[int] | None = None, link_gbps: float | None = None,
              overheads: mem.Overheads = mem.OVERHEADS, head: bool = True, data_tokens: int = 0,
              diloco_pc: bool = False) -> Plan:
    """Place the workers, size every allowed strategy on every node, choose the fastest that fits.

    Args:
        job: the validated job.
        nodes: the machines; the first is the head (it runs the Ray head and the driver).
        placement: the workers' placement; by default one worker per GPU on every node
            (one per CPU-only node), or ``train.workers`` on a single machine.
        workers_per_node: how many workers each node hosts; by default the placement's
            workers fill the nodes in order. Nodes given none are left out of the plan.
        link_gbps: network between nodes in Gb/s (default 1).
        overheads: fixed costs (calibration sets these).
        head: the first node runs the Ray head and the driver (False for the other PCs of
            a ``diloco`` run, each planned on its own).
        data_tokens: tokens of the prepared data, which the driver holds while preparing
            them (0: not known, as for ``swarm plan``).
        diloco_pc: the plan of one PC of a ``diloco`` run: a sharded base is loaded whole
            and partitioned over the PC's workers (``swarm.train.worker.device.loading_arguments``).

    Raises:
        UserError: no nodes, a job whose settings exclude every strategy, a placement the
            machines cannot host, or a model whose shape cannot be known (``load_shape``).
    """
    if not nodes:
        raise UserError("no machines to plan for")
    placement = placement or placement_for(job, nodes)
    if workers_per_node is None:
        capacities = [node_capacity(placement, len(n.gpus) or 1, len(n.gpus)) for n in nodes]
        workers_per_node = spread_workers(placement.max_workers, capacities)
    hosting = [(n, k) for n, k in zip(nodes, workers_per_node) if k > 0]
    nodes, per_node = [n for n, _ in hosting], [k for _, k in hosting]
    world = sum(per_node)
    precision = plan_precision(job, nodes, placement.use_gpu)
    shape = load_shape(job.model.path)
    work = replace(workload_from_job(job, 4 if precision == "fp32" else 2, data_tokens), partition_per_pc=diloco_pc)
    shape.lora_groups(work.lora_targets)  # raises a UserError for a target the model lacks
    knobs = mem.choose_knobs(shape, work, world)
    samples = job.train.micro_batch * job.train.grad_accum
    batches = [m for m in range(job.train.micro_batch, 0, -1) if samples % m == 0]
    device = "gpu" if placement.use_gpu else "cpu"

    candidates = []
    for strategy in allowed_strategies(job):
        attempt = None
        for mb in batches:
            w = replace(work, micro_batch=mb)
            figures = tuple(
                node_figures(node, head and i == 0, n, device, shape, w, strategy, world, knobs, overheads,
                              link_gbps, samples // mb, multi_node=len(nodes) > 1)
                for i, (node, n) in enumerate(zip(nodes, per_node))
            )
            attempt = Candidate(strategy, mb, samples // mb, figures)
            if attempt.fits:
                break
        candidates.append(attempt)
    pcs, sync = (), None
    if job.train.strategy == "diloco" or (job.train.strategy == "auto" and len(nodes) > 1):
        pcs = tuple(pc_plans(job, nodes, per_node, placement.use_gpu, precision, overheads, data_tokens))
        sync = diloco.sync_plan(job, shape.lora_params(work.lora_targets, work.lora_r), len(nodes),
                                max(p.step_seconds for p in pcs), link_gbps)
        figures = tuple(replace(p.nodes[0], step=diloco.with_exchange(p.nodes[0].step, sync)) for p in pcs)
        candidates.append(Candidate(Strategy(0, diloco=True), pcs[0].micro_batch, pcs[0].grad_accum, figures))

    fitting = [c for c in candidates if c.fits]
    notes: list[str] = []
    if fitting:
        chosen = min(fitting, key=lambda c: c.step_seconds)
        reason = None
        slowest = max(chosen.nodes, key=lambda n: n.step.seconds)
        if slowest.step.bottleneck == "network":
            notes.append(f"the network sets the pace: {slowest.step.bytes_sent / 1e9:.1f} GB per worker per step "
                         f"over {link_gbps or 1:g} Gb/s; a faster link or fewer machines may train faster")
    else:
        chosen = min(candidates, key=lambda c: c.overflow())
        reason = (f"nothing fits; closest is {chosen.strategy.name} at micro_batch {chosen.micro_batch}: "
                  f"{chosen.problem}")
    if precision == "fp16":
        notes.append("a GPU without bf16 (Turing or older) makes the whole job train in fp16")
    stored = overheads.stored_bytes_per_token * data_tokens
    if placement.mode == "local" and stored > work.object_store_bytes:  # a swarm's store is sized by `swarm up`
        notes.append(f"the prepared data (about {stored / 2**20:,.0f} MiB) is larger than Ray's object store "
                     f"({work.object_store_bytes / 2**20:,.0f} MiB, ray.object_store_mb): Ray spills it to disk and "
                     "the workers read it back from there")
    chose_diloco = chosen.strategy.diloco
    if chose_diloco:
        notes.append(diloco.describe(sync))
    return Plan(
        fits=reason is None, placement=placement, strategy=chosen.strategy,
        strategy_reason=strategy_reason(job, chosen, candidates, world),
        micro_batch=chosen.micro_batch, grad_accum=chosen.grad_accum, precision=precision,
        deepspeed=None if chose_diloco else deepspeed_config(
            job, chosen.strategy, precision, chosen.micro_batch, chosen.grad_accum, knobs,
            pin_memory=placement.use_gpu),
        reason=reason, nodes=chosen.nodes, candidates=tuple(candidates),
        model=shape, workload=replace(work, micro_batch=chosen.micro_batch),
        knobs=pcs[0].knobs if chose_diloco else knobs, workers=world, seq_len=job.data.seq_len,
        notes=tuple(notes), pcs=pcs if chose_diloco else (), sync=sync if chose_diloco else None,
        addresses=tuple(n.address for n in nodes),
    )


def pc_plans(job: JobConfig, nodes: list[NodeInventory], per_node: list[int], use_gpu: bool, precision: str,
             overheads: mem.Overheads, data_tokens: int = 0) -> list[Plan]:
    """Each PC's own plan for a ``diloco`` run (its job: ``diloco.pc_job``), all at one
    micro-batch (the smallest any PC needs), so that the data order gives every worker a
    disjoint share of the same size. The first PC holds the driver and so the prepared data
    (``data_tokens``)."""

    def plan_pc(i: int, micro_batch: int | None) -> Plan:
        n = per_node[i]
        placement = Placement("local", n, n, use_gpu, n)
        return make_plan(diloco.pc_job(job, precision, micro_batch), [nodes[i]], placement=placement,
                         workers_per_node=[n], overheads=overheads, head=i == 0,
                         data_tokens=data_tokens if i == 0 else 0, diloco_pc=True)

    plans = [plan_pc(i, None) for i in range(len(nodes))]
    smallest = min(p.micro_batch for p in plans)
    return [p if p.micro_batch == smallest else plan_pc(i, smallest) for i, p in enumerate(plans)]


def placement_for(job: JobConfig, nodes: list[NodeInventory]) -> Placement:
    """The placement ``swarm train`` would choose on these machines, without asking Ray.

    One machine is a local run (``train.workers`` workers, one per GPU by default); several
    are a swarm whose every node offers one worker slot per GPU, or one without GPUs.
    """
    if len(nodes) == 1:
        return place_workers(job, None, local_gpus=len(nodes[0].gpus))
    slots = [NodeSlots(n.hostname, n.address or n.hostname, len(n.gpus) or 1, len(n.gpus)) for n in nodes]
    return place_workers(job, slots, local_gpus=0)


def plan_precision(job: JobConfig, nodes: list[NodeInventory], on_gpu: bool) -> str:
    """One precision for every worker: see ``swarm.plan.deepspeed.resolve_precision``."""
    capabilities = None
    if on_gpu:
        capabilities = [g.compute_capability or (find_gpu(g.name) or UNKNOWN_GPU).compute_capability
                        for n in nodes for g in n.gpus]
    return resolve_precision(job.train.precision, capabilities, all(n.cpu_bf16 for n in nodes))


def workload_from_job(job: JobConfig, compute_bytes: int = 2, data_tokens: int = 0) -> Workload:
    """The planner's view of a job: shapes of the work, not file names."""
    preference = job.train.method in ("dpo", "orpo")
    targets = job.lora.targets if job.lora.targets == "all-linear" else tuple(job.lora.targets)
    return Workload(
        seq_len=job.data.seq_len, micro_batch=job.train.micro_batch,
        gradient_checkpointing=job.train.gradient_checkpointing, lora_r=job.lora.r, lora_targets=targets,
        bits=job.quantization.bits, double_quant=job.quantization.double_quant, optimizer=job.train.optimizer,
        compute_bytes=compute_bytes, eager_attention=job.model.attention == "eager",
        object_store_bytes=job.ray.object_store_mb * 1024**2,
        sequences=2 if preference else 1, reference_passes=int(job.train.method == "dpo"),
        dora=job.lora.use_dora, data_tokens=data_tokens,
    )
