"""Choosing a strategy: every candidate is sized on every node, the fastest that fits wins.

``make_plan(job, nodes)`` is the public entry point. It builds the model's shape from its
config (no weights), tries each strategy of ``swarm.plan.memory.STRATEGIES`` with the job's
micro-batch and, when that does not fit, smaller ones that keep the samples per step (the
accumulation grows to match), and picks the fitting candidate with the shortest estimated
step. The resulting :class:`Plan` carries the per-node figures and the DeepSpeed ZeRO
section that the training run must use for the figures to hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import GpuInfo, NodeInventory
from swarm.plan import memory as mem
from swarm.plan.gpus import CPU_DEVICE, UNKNOWN_GPU, find_gpu
from swarm.plan.shapes import ModelShape, load_shape
from swarm.plan.speed import StepEstimate, estimate_step, links_for

GiB = 1024**3


@dataclass(frozen=True)
class NodeFigures:
    """One node under one candidate.

    Attributes:
        gpu_bytes: peak of one worker's GPU (0 on a CPU node).
        gpu_allocated_bytes: the part torch's allocator hands out (compare with
            ``torch.cuda.max_memory_allocated``): GPU peak less context and slack.
        gpu_capacity: VRAM of the node's smallest card.
        ram_bytes: peak host RAM of the node, all workers and shared processes together.
        ram_limit: the RAM it may use (Ray's memory monitor kills workers above 95%).
        worker_ram_bytes: peak RSS of one worker process (compare with a measured RSS).
        nvme_bytes / nvme_capacity: offload space needed and free (None: not known).
        problem: why it does not fit, one line, naming the largest term; None when it fits.
        terms: one worker's terms (a node with several GPUs runs that many such workers).
        shared_terms: the node's shared terms (Ray, object store, operating system).
    """

    name: str
    device: str
    workers: int
    fits: bool
    gpu_bytes: int
    gpu_allocated_bytes: int
    gpu_capacity: int
    ram_bytes: int
    ram_limit: int
    worker_ram_bytes: int
    nvme_bytes: int
    nvme_capacity: int | None
    problem: str | None
    terms: tuple[mem.Term, ...]
    shared_terms: tuple[mem.Term, ...]
    step: StepEstimate

    def node_terms(self) -> list[mem.Term]:
        """Every term of the node: worker terms times the worker count, then the shared ones."""
        scaled = [mem.Term(t.name, t.where, t.bytes * self.workers, t.phase, t.scope) for t in self.terms]
        return scaled + list(self.shared_terms)

    def biggest(self, where: str, n: int = 6) -> list[mem.Term]:
        """The ``n`` largest terms of the peak phase of ``gpu`` (per card), ``ram`` or ``nvme`` (per node)."""
        terms = list(self.terms) if where == "gpu" else self.node_terms()
        return mem.peak_terms(terms, where)[:n]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "device": self.device, "workers": self.workers, "fits": self.fits,
            "gpu_bytes": self.gpu_bytes, "gpu_allocated_bytes": self.gpu_allocated_bytes,
            "gpu_capacity": self.gpu_capacity, "ram_bytes": self.ram_bytes, "ram_limit": self.ram_limit,
            "worker_ram_bytes": self.worker_ram_bytes, "nvme_bytes": self.nvme_bytes,
            "nvme_capacity": self.nvme_capacity, "problem": self.problem,
            "worker_terms": [t.to_dict() for t in self.terms],
            "shared_terms": [t.to_dict() for t in self.shared_terms], "step": self.step.to_dict(),
        }


@dataclass(frozen=True)
class Candidate:
    """One strategy at the largest micro-batch that fits (or at micro-batch 1 if none does)."""

    strategy: mem.Strategy
    micro_batch: int
    grad_accum: int
    nodes: tuple[NodeFigures, ...]

    @property
    def fits(self) -> bool:
        return all(n.fits for n in self.nodes)

    @property
    def step_seconds(self) -> float:
        return max(n.step.seconds for n in self.nodes)

    @property
    def problem(self) -> str | None:
        return next((f"{n.name}: {n.problem}" for n in self.nodes if n.problem), None)

    def overflow(self) -> float:
        """How far the worst node is over its worst limit (1.0 = exactly full)."""
        ratios = []
        for n in self.nodes:
            if n.gpu_capacity:
                ratios.append(n.gpu_bytes / n.gpu_capacity)
            ratios.append(n.ram_bytes / n.ram_limit)
            if n.nvme_bytes:
                ratios.append(n.nvme_bytes / n.nvme_capacity if n.nvme_capacity else float("inf"))
        return max(ratios)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy.to_dict(), "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "fits": self.fits, "step_seconds": self.step_seconds, "problem": self.problem}


@dataclass(frozen=True)
class Plan:
    """What ``swarm plan`` decided; ``swarm train`` refuses to start when ``fits`` is false.

    Attributes:
        fits: the chosen candidate fits on every node.
        strategy: the chosen strategy (the closest candidate when nothing fits).
        micro_batch / grad_accum: per worker; their product is the job's samples per step.
        reason: one line saying why nothing fits; None when it fits.
        nodes: per-node figures of the chosen candidate.
        candidates: every strategy tried.
        workers: training workers (one per GPU, one per CPU node).
        precision: bf16, fp16 (a card without bf16) or fp32.
        notes: things the user must do for the plan to hold (e.g. set offload.nvme_path).
    """

    fits: bool
    strategy: mem.Strategy
    micro_batch: int
    grad_accum: int
    reason: str | None
    nodes: tuple[NodeFigures, ...]
    candidates: tuple[Candidate, ...]
    model: ModelShape
    workload: mem.Workload
    knobs: mem.ZeroKnobs
    workers: int
    precision: str
    seq_len: int
    nvme_path: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def step_seconds(self) -> float:
        return max(n.step.seconds for n in self.nodes)

    @property
    def tokens_per_s(self) -> float:
        return self.workers * self.micro_batch * self.grad_accum * self.seq_len / self.step_seconds

    def zero_config(self) -> dict:
        """The ``zero_optimization`` section of the DeepSpeed config these figures assume."""
        s, k = self.strategy, self.knobs
        cfg: dict = {"stage": s.zero_stage}
        if s.zero_stage == 0:
            return cfg
        cfg.update(reduce_bucket_size=k.reduce_bucket_size, contiguous_gradients=True, overlap_comm=True)
        if s.zero_stage == 3:
            cfg.update(stage3_prefetch_bucket_size=k.prefetch_bucket_size,
                       stage3_max_live_parameters=k.max_live_parameters,
                       stage3_max_reuse_distance=k.max_reuse_distance,
                       stage3_param_persistence_threshold=k.param_persistence_threshold,
                       sub_group_size=k.sub_group_size)
        pin = any(n.gpu_capacity for n in self.nodes)  # pinned host memory speeds PCIe copies only
        if s.offload_params != "none":
            cfg["offload_param"] = {"device": s.offload_params, "pin_memory": pin}
            if s.offload_params == "nvme":
                cfg["offload_param"].update(nvme_path=self.nvme_path, buffer_count=k.param_buffer_count,
                                            buffer_size=k.param_buffer_size)
        if s.offload_optimizer != "none":
            cfg["offload_optimizer"] = {"device": s.offload_optimizer, "pin_memory": pin}
            if s.offload_optimizer == "nvme":
                cfg["offload_optimizer"].update(nvme_path=self.nvme_path, buffer_count=k.optimizer_buffer_count)
        return cfg

    def to_dict(self) -> dict:
        m = self.model
        return {
            "fits": self.fits, "reason": self.reason, "strategy": self.strategy.to_dict(),
            "micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "workers": self.workers,
            "precision": self.precision, "seq_len": self.seq_len,
            "step_seconds": self.step_seconds, "tokens_per_s": self.tokens_per_s,
            "bytes_sent_per_step": max(n.step.bytes_sent for n in self.nodes),
            "model": {"name": m.name, "model_type": m.model_type, "params": m.total_params,
                      "quantized_params": m.quantizable_params if self.workload.bits == 4 else 0,
                      "lora_params": m.lora_params(self.workload.lora_targets, self.workload.lora_r)},
            "nodes": [n.to_dict() for n in self.nodes],
            "candidates": [c.to_dict() for c in self.candidates],
            "zero_optimization": self.zero_config(), "notes": list(self.notes),
        }


def make_plan(job: JobConfig, nodes: list[NodeInventory], *, link_gbps: float | None = None,
              strategies: list[mem.Strategy] | None = None,
              overheads: mem.Overheads = mem.OVERHEADS) -> Plan:
    """Size every strategy on every node and choose the fastest that fits everywhere.

    Args:
        job: the validated job.
        nodes: the machines; the first is the head (it runs the Ray head and the driver).
            Each GPU gets a worker; a node without GPUs gets one CPU worker, or
            ``train.workers`` of them when it is the only node.
        link_gbps: network between nodes in Gb/s (default 1).
        strategies: the strategies to try; default all of ``STRATEGIES``, or only the one the
            job's ``offload`` section names when it asks for an offload.
        overheads: fixed costs (calibration sets these).

    Raises:
        UserError: no nodes, or a model whose shape cannot be known (see ``load_shape``).
    """
    if not nodes:
        raise UserError("no machines to plan for")
    shape = load_shape(job.model.path)
    per_node = _workers_per_node(job, nodes)
    world = sum(per_node)
    precision = _precision(job, nodes)
    work = workload_from_job(job, 4 if precision == "fp32" else 2)
    shape.lora_groups(work.lora_targets)  # raises a UserError for a target the model lacks
    knobs = mem.choose_knobs(shape, work, world)
    samples = job.train.micro_batch * job.train.grad_accum
    batches = [m for m in range(job.train.micro_batch, 0, -1) if samples % m == 0]

    candidates = []
    for strategy in _strategies(job, strategies):
        attempt = None
        for mb in batches:
            w = replace(work, micro_batch=mb)
            figures = tuple(
                _node_figures(node, i == 0, n, shape, w, strategy, world, knobs, overheads,
                              link_gbps, samples // mb, multi_node=len(nodes) > 1)
                for i, (node, n) in enumerate(zip(nodes, per_node))
            )
            attempt = Candidate(strategy, mb, samples // mb, figures)
            if attempt.fits:
                break
        candidates.append(attempt)

    fitting = [c for c in candidates if c.fits]
    notes: list[str] = []
    if fitting:
        chosen = min(fitting, key=lambda c: c.step_seconds)
        reason = None
        if chosen.strategy.uses_nvme and not job.offload.nvme_path:
            notes.append("set offload.nvme_path to a folder on the NVMe drive")
        slowest = max(chosen.nodes, key=lambda n: n.step.seconds)
        if slowest.step.bottleneck == "network":
            notes.append(f"the network sets the pace: {slowest.step.bytes_sent / 1e9:.1f} GB per worker per step "
                         f"over {link_gbps or 1:g} Gb/s; a faster link or fewer machines may train faster")
    else:
        chosen = min(candidates, key=lambda c: c.overflow())
        reason = (f"nothing fits; closest is {chosen.strategy.label} at micro_batch {chosen.micro_batch}: "
                  f"{chosen.problem}")
    if isinstance(job.train.workers, int) and job.train.workers > world:
        reason = f"train.workers={job.train.workers} but the machines offer {world} workers (one per GPU)"
    if precision == "fp16":
        notes.append("a GPU without bf16 (Turing or older) makes the whole job train in fp16")
    return Plan(
        fits=reason is None, strategy=chosen.strategy, micro_batch=chosen.micro_batch,
        grad_accum=chosen.grad_accum, reason=reason, nodes=chosen.nodes, candidates=tuple(candidates),
        model=shape, workload=replace(work, micro_batch=chosen.micro_batch),
        knobs=knobs, workers=world, precision=precision, seq_len=job.data.seq_len,
        nvme_path=job.offload.nvme_path, notes=tuple(notes),
    )


def workload_from_job(job: JobConfig, compute_bytes: int = 2) -> mem.Workload:
    """The planner's view of a job: shapes of the work, not file names."""
    targets = job.lora.targets if job.lora.targets == "all-linear" else tuple(job.lora.targets)
    return mem.Workload(
        seq_len=job.data.seq_len, micro_batch=job.train.micro_batch,
        gradient_checkpointing=job.train.gradient_checkpointing, lora_r=job.lora.r, lora_targets=targets,
        bits=job.quantization.bits, double_quant=job.quantization.double_quant, optimizer=job.train.optimizer,
        compute_bytes=compute_bytes, eager_attention=job.model.attention == "eager",
        object_store_bytes=job.ray.object_store_mb * 1024**2,
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


def _workers_per_node(job: JobConfig, nodes: list[NodeInventory]) -> list[int]:
    if len(nodes) == 1 and not nodes[0].gpus:
        # Several CPU workers on one machine: what the tests run.
        return [job.train.workers if isinstance(job.train.workers, int) else 1]
    return [len(n.gpus) or 1 for n in nodes]


def _precision(job: JobConfig, nodes: list[NodeInventory]) -> str:
    # The rule of swarm.train.ds_config.resolve_precision: bf16 where the device computes it
    # natively, fp16 on GPUs before Ampere, fp32 on CPUs without AMX or AVX512-BF16. A
    # CPU-only inventory is planned with this machine's CPU flags (it is where such jobs run).
    if job.train.precision != "auto":
        return job.train.precision
    gpus = [g for n in nodes for g in n.gpus]
    if not gpus:
        return "bf16" if _cpu_flags() & {"amx_bf16", "avx512_bf16"} else "fp32"
    for gpu in gpus:
        cc = gpu.compute_capability or (find_gpu(gpu.name) or UNKNOWN_GPU).compute_capability
        if tuple(cc) < (8, 0):
            return "fp16"
    return "bf16"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _strategies(job: JobConfig, given: list[mem.Strategy] | None) -> list[mem.Strategy]:
    if given:
        return list(given)
    if job.offload.params != "none" or job.offload.optimizer != "none":
        return [mem.Strategy(3, job.offload.params, job.offload.optimizer)]
    if job.train.optimizer != "adamw":  # only DeepSpeed's CPU Adam runs off the device
        return [s for s in mem.STRATEGIES if s.offload_optimizer == "none"]
    return list(mem.STRATEGIES)


def _node_figures(node: NodeInventory, is_head: bool, workers: int, shape: ModelShape, work: mem.Workload,
                  strategy: mem.Strategy, world: int, knobs: mem.ZeroKnobs, overheads: mem.Overheads,
                  link_gbps: float | None, grad_accum: int, multi_node: bool) -> NodeFigures:
    device = "gpu" if node.gpus else "cpu"
    wterms = mem.worker_terms(shape, work, strategy, world, knobs, device, overheads)
    nterms = mem.node_terms(work, is_head, overheads)
    gpu = mem.peak(wterms, "gpu")
    unallocated = ("CUDA context", "CUDA allocator slack")
    allocated = mem.peak([t for t in wterms if t.name not in unallocated], "gpu")
    worker_ram = mem.peak(wterms, "ram")
    scaled = [mem.Term(t.name, t.where, t.bytes * workers, t.phase, t.scope) for t in wterms]
    ram = mem.peak(scaled + nterms, "ram")
    nvme = mem.peak(scaled, "nvme")
    ram_limit = int(node.ram_bytes * overheads.ram_limit_fraction)
    capacity = min((g.vram_bytes for g in node.gpus), default=0)

    problem = None
    if device == "gpu" and gpu > capacity:
        problem = _overflow("GPU", gpu, capacity, mem.peak_terms(wterms, "gpu")[0])
    elif ram > ram_limit:
        problem = _overflow("RAM", ram, ram_limit, mem.peak_terms(scaled + nterms, "ram")[0], " usable")
    elif nvme and node.offload_free_bytes is None:
        problem = "NVMe offload, but no free NVMe space is known (nvme_gb)"
    elif nvme > (node.offload_free_bytes or 0):
        problem = _overflow("NVMe", nvme, node.offload_free_bytes or 0, mem.peak_terms(wterms, "nvme")[0], " free")

    specs = [find_gpu(g.name) or UNKNOWN_GPU for g in node.gpus] or [CPU_DEVICE]
    spec = min(specs, key=lambda s: s.tflops)  # the slowest card sets the pace
    links = links_for(spec.pcie_gbs, node.offload_write_bytes_per_s, link_gbps, multi_node)
    step = estimate_step(shape, work, strategy, world, knobs, grad_accum, spec, links)
    names = ", ".join(f"{node.gpus.count(g)}x {g.name}" for g in dict.fromkeys(node.gpus)) or "CPU"
    return NodeFigures(
        name=node.hostname, device=names, workers=workers, fits=problem is None, gpu_bytes=gpu,
        gpu_allocated_bytes=allocated, gpu_capacity=capacity, ram_bytes=ram, ram_limit=ram_limit,
        worker_ram_bytes=worker_ram, nvme_bytes=nvme, nvme_capacity=node.offload_free_bytes,
        problem=problem, terms=tuple(wterms), shared_terms=tuple(nterms), step=step,
    )


def _overflow(what: str, need: int, have: int, biggest: mem.Term, qualifier: str = "") -> str:
    return (f"{what} {need / GiB:.1f} of {have / GiB:.1f} GiB{qualifier}; "
            f"largest: {biggest.name} {biggest.bytes / GiB:.1f} GiB")
