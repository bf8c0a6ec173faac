"""Planning the ``diloco`` strategy: each PC its own single-PC plan, plus the adapter exchange.

Memory: each PC is planned as if it trained alone with its own workers (replicated on its
GPUs, or ZeRO-3 with CPU or NVMe offload inside it, whichever is fastest there), so a PC
with a small card offloads while one with a large card does not. Traffic: every ``H``
steps the PCs all-reduce their LoRA pseudo-gradients in bf16, nothing else. Time: the
slowest PC's step, plus the exchange spread over the ``H`` steps between exchanges.

``H`` (``train.sync_every``) is proposed so that the exchange costs at most
``EXCHANGE_SHARE`` of the training time, and at least a few exchanges happen in a run. With
the default outer optimizer (``average``: the mean of the PCs' adapters) it is the smallest
such H: the exchange's cost is the only reason to wait longer. With a Nesterov rule it is never
proposed below ``MIN_PROPOSED_EVERY``: momentum multiplies each exchange's change by up to
lr / (1 - momentum) = 7, and exchanging after every step carried B's norm to 5 times
replicate's in tests/bench/bench_diloco.py. Eight steps keep a margin there; the floor is a
margin, not a measured limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.config.models import JobConfig
from swarm.plan.speed import DEFAULT_LINK_GBPS, LINK_EFFICIENCY, StepEstimate

EXCHANGE_SHARE = 0.05  # proposed H keeps the exchange within 5% of the step time
EXCHANGE_BYTES_PER_PARAM = 2  # pseudo-gradients travel in bf16
LINK_LATENCY_S = 0.01  # a few round trips on a home network, per exchange
MIN_EXCHANGES = 4  # a proposed H leaves at least this many exchanges in a run
MIN_PROPOSED_EVERY = 8  # with outer momentum: a margin (see the module's note)


@dataclass(frozen=True)
class SyncPlan:
    """The exchange between PCs: how often, how big, how long, the outer optimizer."""

    every: int
    bytes_per_worker: int  # sent by each PC's leader per exchange
    seconds: float  # one exchange on the link
    outer_optimizer: str
    outer_lr: float
    outer_momentum: float
    proposed: bool  # H came from the planner (train.sync_every: auto)

    def to_dict(self) -> dict:
        return {"every": self.every, "bytes_per_worker": self.bytes_per_worker, "seconds": self.seconds,
                "outer_optimizer": self.outer_optimizer, "outer_lr": self.outer_lr,
                "outer_momentum": self.outer_momentum, "proposed": self.proposed}


def exchange_cost(lora_params: int, pcs: int, link_gbps: float | None) -> tuple[int, float]:
    """(bytes each PC sends, seconds) of one exchange: a ring all-reduce of bf16 pseudo-gradients."""
    payload = lora_params * EXCHANGE_BYTES_PER_PARAM
    sent = int(2 * (pcs - 1) / pcs * payload) if pcs > 1 else 0
    rate = (link_gbps or DEFAULT_LINK_GBPS) * 1e9 / 8 * LINK_EFFICIENCY
    return sent, (sent / rate + LINK_LATENCY_S if sent else 0.0)


def propose_every(exchange_s: float, step_s: float, max_steps: int, outer_momentum: float = 0.0) -> int:
    """The smallest H whose exchange costs at most EXCHANGE_SHARE of training, within a run's steps.

    With outer momentum, not below MIN_PROPOSED_EVERY (see the module's note).
    """
    floor = MIN_PROPOSED_EVERY if outer_momentum > 0 else 1
    wanted = math.ceil(exchange_s / (EXCHANGE_SHARE * step_s)) if exchange_s > 0 and step_s > 0 else 1
    return max(1, min(max(wanted, floor), max(1, max_steps // MIN_EXCHANGES)))


def with_exchange(step: StepEstimate, sync: SyncPlan) -> StepEstimate:
    """A PC's step with its share of the exchange: the exchange's time and bytes over H steps."""
    share = sync.seconds / sync.every
    parts = {**step.parts, "adapter exchange": round(share, 6)}
    return StepEstimate(seconds=step.seconds + share, parts=parts,
                        bottleneck=step.bottleneck if share < step.seconds else "network",
                        bytes_sent=int(sync.bytes_per_worker / sync.every))


def pc_job(job: JobConfig, precision: str, micro_batch: int | None = None) -> JobConfig:
    """The job as one PC trains it alone: its own strategy (auto inside it), the run's precision."""
    samples = job.train.micro_batch * job.train.grad_accum
    update = {"strategy": "auto", "precision": precision, "workers": "auto", "min_workers": None}
    if micro_batch is not None:
        update.update(micro_batch=micro_batch, grad_accum=samples // micro_batch)
    return job.model_copy(update={"train": job.train.model_copy(update=update)})


def sync_plan(job: JobConfig, lora_params: int, pcs: int, slowest_step_s: float, link_gbps: float | None) -> SyncPlan:
    sent, seconds = exchange_cost(lora_params, pcs, link_gbps)
    proposed = job.train.sync_every == "auto"
    momentum = job.train.outer_momentum if job.train.outer_optimizer != "average" else 0.0
    every = (propose_every(seconds, slowest_step_s, job.train.max_steps, momentum) if proposed
             else job.train.sync_every)
    return SyncPlan(every, sent, seconds, job.train.outer_optimizer, job.train.outer_lr, job.train.outer_momentum,
                    proposed)


def describe(sync: SyncPlan) -> str:
    how = "proposed from the link and the step time" if sync.proposed else "train.sync_every"
    text = (f"adapters exchanged every {sync.every} step(s) ({how}): {sync.bytes_per_worker / 1e6:.1f} MB per PC, "
            f"about {sync.seconds:.1f} s each, and evals at exchanges; outer optimizer {outer_text(sync)}")
    return text


def outer_text(sync: SyncPlan) -> str:
    if sync.outer_optimizer == "average":
        return "average (the mean of the PCs' adapters)"
    where = "the whole adapter" if sync.outer_optimizer == "nesterov" else "LoRA's B factors, the mean on A"
    return f"{sync.outer_optimizer}: Nesterov SGD lr {sync.outer_lr:g}, momentum {sync.outer_momentum:g} on {where}"
