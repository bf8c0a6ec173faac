"""One strategy sized on the machines: each node's figures (memory term by term, whether it
fits, its step time), the :class:`Candidate` they make together, and why one candidate won.

``swarm.plan.decide`` sizes every strategy the job allows (and each PC of a ``diloco`` run)
with :func:`node_figures` and keeps the fastest candidate that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.config.models import JobConfig
from swarm.inventory import NodeInventory
from swarm.plan import memory as mem
from swarm.plan.gpus import CPU_DEVICE, UNKNOWN_GPU, find_gpu
from swarm.plan.shapes import ModelShape
from swarm.plan.speed import StepEstimate, estimate_step, links_for
from swarm.plan.strategy import Strategy
from swarm.plan.workload import Workload

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

    strategy: Strategy
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


def node_figures(node: NodeInventory, is_head: bool, workers: int, device: str, shape: ModelShape,
                  work: Workload, strategy: Strategy, world: int, knobs: mem.ZeroKnobs,
                  overheads: mem.Overheads, link_gbps: float | None, grad_accum: int, multi_node: bool) -> NodeFigures:
    wterms = mem.worker_terms(shape, work, strategy, world, knobs, device, overheads)
    nterms = mem.node_terms(work, is_head, overheads, shape.lora_params(work.lora_targets, work.lora_r))
    gpu = mem.peak(wterms, "gpu")
    unallocated = ("CUDA context", "CUDA allocator slack")
    allocated = mem.peak([t for t in wterms if t.name not in unallocated], "gpu")
    worker_ram = mem.peak(wterms, "ram")
    scaled = [mem.Term(t.name, t.where, t.bytes * workers, t.phase, t.scope) for t in wterms]
    ram = mem.peak(scaled + nterms, "ram")
    nvme = mem.peak(scaled, "nvme")
    ram_limit = int(node.ram_bytes * overheads.ram_limit_fraction)
    capacity = min((g.vram_bytes for g in node.gpus), default=0) if device == "gpu" else 0

    problem = None
    if device == "gpu" and gpu > capacity:
        problem = _overflow("GPU", gpu, capacity, mem.peak_terms(wterms, "gpu")[0])
    elif ram > ram_limit:
        problem = _overflow("RAM", ram, ram_limit, mem.peak_terms(scaled + nterms, "ram")[0], " usable")
    elif nvme and node.offload_free_bytes is None:
        problem = "NVMe offload, but no free NVMe space is known (nvme_gb)"
    elif nvme > (node.offload_free_bytes or 0):
        problem = _overflow("NVMe", nvme, node.offload_free_bytes or 0, mem.peak_terms(wterms, "nvme")[0], " free")

    specs = [find_gpu(g.name) or UNKNOWN_GPU for g in node.gpus] if device == "gpu" else [CPU_DEVICE]
    spec = min(specs, key=lambda s: s.tflops)  # the slowest card sets the pace
    links = links_for(spec.pcie_gbs, node.offload_write_bytes_per_s, link_gbps, multi_node)
    step = estimate_step(shape, work, strategy, world, knobs, grad_accum, spec, links)
    names = (", ".join(f"{node.gpus.count(g)}x {g.name}" for g in dict.fromkeys(node.gpus)) if device == "gpu"
             else "") or "CPU"
    return NodeFigures(
        name=node.hostname, device=names, workers=workers, fits=problem is None, gpu_bytes=gpu,
        gpu_allocated_bytes=allocated, gpu_capacity=capacity, ram_bytes=ram, ram_limit=ram_limit,
        worker_ram_bytes=worker_ram, nvme_bytes=nvme, nvme_capacity=node.offload_free_bytes,
        problem=problem, terms=tuple(wterms), shared_terms=tuple(nterms), step=step,
    )


def _overflow(what: str, need: int, have: int, biggest: mem.Term, qualifier: str = "") -> str:
    return (f"{what} {need / GiB:.1f} of {have / GiB:.1f} GiB{qualifier}; "
            f"largest: {biggest.name} {biggest.bytes / GiB:.1f} GiB")


def strategy_reason(job: JobConfig, chosen: Candidate, candidates: list[Candidate], world: int) -> str:
    """Why ``chosen`` won, in one line."""
    if job.train.strategy != "auto":
        return f"train.strategy={job.train.strategy} in the job"
    others = [c for c in candidates if c.strategy.kind != chosen.strategy.kind]
    prefix = "one worker; " if world == 1 else ""
    if not others:
        return f"{prefix}the job's offload settings need {chosen.strategy.label}"
    best_other = min(others, key=lambda c: (not c.fits, c.step_seconds))
    if not best_other.fits:
        return f"{prefix}{best_other.strategy.kind} does not fit ({best_other.problem})"
    return (f"{prefix}fastest that fits: about {_seconds(chosen.step_seconds)} per step against "
            f"{_seconds(best_other.step_seconds)} for {best_other.strategy.name}")


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
