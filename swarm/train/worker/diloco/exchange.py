"""The ``diloco`` strategy's exchange between PCs, on every worker (see ``swarm.train.worker.diloco``).

- **Start**: PC 0's adapter is broadcast to every PC before the first step, so the PCs start
  from one adapter whatever random numbers each drew (another peft, torch or CPU kernel).
- **Exchange**, exactly once every ``H`` steps and at the run's last step (so the run's output
  is the global adapter): each PC's pseudo-gradient (the global adapter at the last exchange
  minus its adapter now) is averaged across the PCs, weighted by the tokens each trained, in
  bf16, and the outer optimizer (``swarm.train.worker.diloco.outer``) moves the global adapter; every PC
  continues from it. Nothing else commits an outer step: evals run at exchanges (the global
  adapter exists only there, and an eval between them would cost an exchange's traffic to
  preview it), and a checkpoint between exchanges keeps each PC's own state instead.
- **Checkpoint**: the global adapter (the checkpoint's adapter, what an export of it holds),
  the outer momentum, and each PC's own adapter, inner AdamW moments and tokens since the
  last exchange, gathered on global rank 0, which hands them to the driver. A resume on the
  same PCs restores each PC's own state: the run continues as if never stopped.

Only the first worker of each PC (its leader) takes part in the exchange, over gloo on host
memory (the PCs' group is made ``on_host`` beside NCCL inside each PC: the adapter's fp32
copies, the global adapter and the outer momentum stay in host RAM, off a card that is full
of training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from swarm.train.worker.diloco.outer import outer_step
from swarm.train.worker.diloco.pc_state import restore_pc_state


def exchange_due(done: int, every: int, last: bool) -> bool:
    """Whether the PCs exchange after step ``done``: every ``every`` steps, and at the last step."""
    return last or done % every == 0


def eval_due(done: int, previous_exchange: int, eval_every: int, last: bool) -> bool:
    """Whether to evaluate at the exchange after step ``done``: an eval came due since the
    exchange at ``previous_exchange`` (a multiple of ``eval_every`` passed), or the run ends."""
    return last or done // eval_every > previous_exchange // eval_every


def full_numel(p) -> int:
    """A parameter's whole size, also where ZeRO-3 holds only this rank's partition of it."""
    return int(getattr(p, "ds_numel", p.numel()))


def lora_a_slices(named) -> list[slice]:
    """Where LoRA's A factors (peft's ``lora_A`` / ``lora_embedding_A``) lie in the flat adapter."""
    slices, offset = [], 0
    for name, p in named:
        numel = full_numel(p)
        if ".lora_A." in name or ".lora_embedding_A." in name:
            slices.append(slice(offset, offset + numel))
        offset += numel
    return slices


def ring_all_reduce_bytes(payload: int, members: int) -> int:
    """Bytes one member sends in a ring all-reduce of ``payload`` bytes: 2 (n-1)/n of it."""
    return int(2 * (members - 1) / members * payload) if members > 1 else 0


@dataclass
class SyncFigures:
    """What one exchange cost: bytes this PC sent, seconds in it, seconds the fastest PC waited."""

    bytes_sent: int
    seconds: float
    wait_s: float
    checksums: list[float]  # every PC's adapter after the exchange, summed: all equal


class Exchange:
    """One run's adapter exchanges, on every worker.

    Args:
        engine: this worker's DeepSpeed engine.
        named: the trainable (name, parameter) pairs, in a fixed order.
        groups: the run's PC groups (``swarm.train.worker.diloco.groups.PcGroups``).
        sync: the plan's ``sync`` section (``outer_optimizer``, ``outer_lr``, ``outer_momentum``).
        resume: the checkpoint the run resumes from (its adapter already restored), or None
            to start: then PC 0's adapter is broadcast to every PC. Collective.
    """

    def __init__(self, engine, named, groups, sync: dict, resume: dict | None = None):
        import torch

        self.engine, self.named, self.groups = engine, named, groups
        # Plans written before the rule was a setting used Nesterov on B, the mean on A.
        self.rule = sync.get("outer_optimizer", "nesterov-b")
        self.lr, self.momentum = sync["outer_lr"], sync["outer_momentum"]
        self.a_slices = lora_a_slices(named)
        self.waited_s = 0.0  # time this PC's leader spent in cross-PC collectives since the last exchange
        self.tokens = 0.0  # this worker's tokens since the last exchange
        self.last_exchange = 0  # the step of the last exchange
        self.notes: list[str] = []  # what a resume could not restore exactly
        if resume is None:
            self.global_flat = self._broadcast_start()
            self.momentum_buf = torch.zeros_like(self.global_flat)
        else:
            self.global_flat = self._local_flat()  # the checkpoint's adapter: the global one
            extra = resume["trainer"].get("extra", {})
            self.momentum_buf = extra.get("outer_momentum", torch.zeros_like(self.global_flat)).float()
            self.last_exchange = resume["trainer"]["step"]  # a checkpoint from before the PCs' state: at an exchange
            restore_pc_state(self, resume)

    def _broadcast_start(self):
        """PC 0's adapter, made every PC's (collective)."""
        from swarm.train.worker import collectives

        local = self._local_flat()  # collective inside the PC
        groups = self.groups
        if groups.is_leader:
            local = collectives.broadcast(local, src=groups.pc_ranks[0][0], group=groups.leaders)
        start = collectives.broadcast(local, src=groups.leader, group=groups.intra)
        self.set_adapter(start)
        return start

    def _local_flat(self):
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        return torch.cat([safe_get_full_fp32_param(p).detach().float().cpu().flatten() for _, p in self.named])

    def blocked(self, seconds: float) -> None:
        """Count time spent waiting for the other PCs (in the per-step all-reduce)."""
        self.waited_s += seconds

    def pc_tokens(self) -> float:
        """This PC's tokens since the last exchange. Collective inside the PC."""
        from swarm.train.worker import collectives

        return collectives.reduce_numbers([float(self.tokens)], group=self.groups.intra)[0]

    def sync(self, step: int) -> SyncFigures:
        """Exchange adapters after ``step``: every worker calls it at the same step."""
        import torch

        from swarm.train.worker import collectives

        started = time.perf_counter()
        tokens = self.pc_tokens()
        local = self._local_flat()  # collective inside the PC
        groups = self.groups
        sent = 0
        wait_s = 0.0
        if groups.is_leader:
            # The tokens of all PCs (for the weights), and how long each PC waited for the
            # others since the last exchange: the slowest waits least, the fastest most.
            [total] = collectives.reduce_numbers([tokens], group=groups.leaders)
            [most] = collectives.reduce_numbers([self.waited_s], "max", group=groups.leaders)
            [least] = collectives.reduce_numbers([self.waited_s], "min", group=groups.leaders)
            wait_s = most - least
            weight = tokens / total if total else 1.0 / groups.pcs
            delta = ((self.global_flat - local) * weight).to(torch.bfloat16)
            # the sum of the weighted pseudo-gradients
            delta = collectives.all_reduce(delta, group=groups.leaders)
            sent = ring_all_reduce_bytes(delta.numel() * delta.element_size(), groups.pcs)
            new_global, self.momentum_buf = outer_step(self.global_flat, delta.float(), self.momentum_buf,
                                                       self.rule, self.lr, self.momentum, self.a_slices)
        else:
            new_global = torch.empty_like(local)
        new_global = collectives.broadcast(new_global, src=groups.leader, group=groups.intra)
        self.set_adapter(new_global)
        self.global_flat = new_global
        self.waited_s, self.tokens, self.last_exchange = 0.0, 0.0, step
        checksums = []
        if groups.is_leader:  # what each PC now trains from, to show they agree
            mine = self._local_flat().double().sum().reshape(1)
            checksums = [float(x) for x in collectives.all_gather(mine, group=groups.leaders)]
        else:
            self._local_flat()  # the gather above is collective inside the PC
        return SyncFigures(sent, time.perf_counter() - started, wait_s, checksums)

    def set_adapter(self, flat) -> None:
        """Make ``flat`` this PC's adapter: fp32 masters and the weights the model computes with."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        values = self.unflatten(flat)
        for (_, p), value in zip(self.named, values):
            safe_set_full_fp32_param(p, value.to(p.device))
        params = [p for _, p in self.named]
        if self.engine.zero_optimization_stage() == 3:
            # modifier_rank is a rank within the parameters' group (the PC): its leader is 0.
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if self.groups.is_leader:
                    for p, value in zip(params, values):
                        p.data.copy_(value.to(p.dtype))
        else:
            for p, value in zip(params, values):
                p.data.copy_(value.to(p.dtype))

    def unflatten(self, flat) -> list:
        """``flat`` cut into the trainable parameters' whole shapes, in ``named``'s order."""
        values, offset = [], 0
        for _, p in self.named:
            numel = full_numel(p)
            values.append(flat[offset:offset + numel].view(getattr(p, "ds_shape", p.shape)))
            offset += numel
        return values
