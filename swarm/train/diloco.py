"""The ``diloco`` strategy's worker side: each PC trains on its own, PCs exchange adapters.

DiLoCo (Douillard et al., arXiv 2311.08105): every PC runs the single-PC path (its
DeepSpeed process groups stay inside the PC: ZeRO never gathers the base over the home
link) on its share of the data, with its own AdamW (the inner optimizer). Every ``H``
steps the PCs exchange only their LoRA weights: each PC's pseudo-gradient (the global
adapter at the last exchange minus its adapter now) is averaged across the PCs, weighted
by the tokens each trained, and applied to the global adapter by the outer optimizer,
Nesterov SGD (outer lr 0.7, momentum 0.9 by default); every PC continues from the result.
With outer lr 1 and no momentum that is plain averaging of the adapters.

The outer optimizer moves LoRA's B factors (and any other trained weight); the A factors
take the plain mean. A LoRA layer computes with the product B A: extrapolating both factors
by k moves the product by k^2 along their cross term (Nesterov's k reaches
lr / (1 - momentum) = 7), and in tests/bench/bench_diloco.py that ended 5.6% above
replicate's eval loss at H=8 and 63% above at H=1; with A averaged, 0.8% and 1.0%
(docs/benchmarks.md). Extrapolating B alone moves the product linearly, as a dense weight's
outer step would; a larger step for B than for A is also what LoRA+ (Hayou et al., arXiv
2402.12354) finds trains LoRA better.

Only the first worker of each PC (its leader) takes part in the exchange; the
pseudo-gradients cross the link in bf16, over gloo on host memory (the PCs' group is made
``on_host`` beside NCCL inside each PC: the adapter's fp32 copies, the global adapter and
the outer momentum stay in host RAM, off a card that is full of training). ``PcGroups`` builds the process groups and the
``mpu`` that keeps DeepSpeed inside a PC; ``Exchange`` does one exchange.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class PcGroups:
    """The process groups of a run whose PCs train on their own.

    Attributes:
        rank: this worker's global rank.
        pc_ranks: the global ranks of each PC, PCs in a fixed order (by address).
        pc: the index of this worker's PC.
        intra: the group of this PC's workers (DeepSpeed's data-parallel group).
        leaders: the group of every PC's first worker (the exchange).
        alone: a group of this worker only (DeepSpeed's model-parallel group: none).
    """

    rank: int
    pc_ranks: list[list[int]]
    pc: int
    intra: object
    leaders: object
    alone: object

    @classmethod
    def build(cls, addresses: list[str], rank: int) -> "PcGroups":
        """Create the groups from each rank's node address. Collective: every rank calls it."""
        from swarm.train import collectives

        pcs = sorted(set(addresses))
        pc_ranks = [[r for r, a in enumerate(addresses) if a == pc] for pc in pcs]
        # torch wants every rank to create every group, in the same order.
        intra = [collectives.new_group(ranks) for ranks in pc_ranks]
        # The exchange between PCs runs gloo on host memory, beside NCCL inside each PC: its
        # tensors (the flat adapter, the global one, the outer momentum) live in host RAM,
        # where the fp32 masters are with optimizer offload, and a 70B adapter's 1.6 GB of
        # fp32 copies would otherwise pass through a 16 GB card at every exchange.
        leaders = collectives.new_group([ranks[0] for ranks in pc_ranks], on_host=True)
        alone = [collectives.new_group([r]) for r in range(len(addresses))]
        pc = pcs.index(addresses[rank])
        return cls(rank, pc_ranks, pc, intra[pc], leaders, alone[rank])

    @property
    def leader(self) -> int:
        return self.pc_ranks[self.pc][0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def pcs(self) -> int:
        return len(self.pc_ranks)

    def mpu(self) -> "PcMpu":
        return PcMpu(self)


class PcMpu:
    """What DeepSpeed asks a model-parallel unit (``deepspeed.initialize(mpu=...)``):
    data parallelism over this PC's workers only, no model or sequence parallelism."""

    def __init__(self, groups: PcGroups):
        self.groups = groups

    def get_data_parallel_group(self):
        return self.groups.intra

    def get_data_parallel_world_size(self) -> int:
        return len(self.groups.pc_ranks[self.groups.pc])

    def get_data_parallel_rank(self) -> int:
        return self.groups.pc_ranks[self.groups.pc].index(self.groups.rank)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.groups.pc_ranks[self.groups.pc])

    def get_model_parallel_group(self):
        return self.groups.alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.rank

    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_sequence_parallel_group(self):
        return self.groups.alone

    get_sequence_data_parallel_group = get_data_parallel_group
    get_sequence_data_parallel_world_size = get_data_parallel_world_size
    get_sequence_data_parallel_rank = get_data_parallel_rank


def outer_step(global_flat, mean_delta, momentum_buf, lr: float, momentum: float, averaged=()):
    """The outer optimizer: Nesterov SGD on the global adapter, the averaged pseudo-gradient as gradient.

    Args:
        averaged: the slices of the flat adapter that take the plain mean instead (LoRA's A
            factors); their momentum stays zero.

    Returns:
        (new global adapter, new momentum buffer); fp32 tensors.
    """
    momentum_buf = momentum * momentum_buf + mean_delta
    update = lr * (mean_delta + momentum * momentum_buf)
    for part in averaged:
        update[part] = mean_delta[part]
        momentum_buf[part] = 0.0
    return global_flat - update, momentum_buf


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
        groups: the run's PC groups.
        lr / momentum: the outer optimizer's settings.
        momentum_buf: a checkpoint's outer momentum (flat fp32), or None to start at zero.
    """

    def __init__(self, engine, named, groups: PcGroups, lr: float, momentum: float, momentum_buf=None):
        import torch

        self.engine, self.named, self.groups = engine, named, groups
        self.lr, self.momentum = lr, momentum
        self.averaged = lora_a_slices(named)
        self.global_flat = self._local_flat()  # every PC starts from the same adapter
        self.momentum_buf = momentum_buf if momentum_buf is not None else torch.zeros_like(self.global_flat)
        self.waited_s = 0.0  # time this PC's leader spent in cross-PC collectives since the last exchange

    def _local_flat(self):
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        return torch.cat([safe_get_full_fp32_param(p).detach().float().cpu().flatten() for _, p in self.named])

    def blocked(self, seconds: float) -> None:
        """Count time spent waiting for the other PCs (in the per-step all-reduce)."""
        self.waited_s += seconds

    def sync(self, tokens: float) -> SyncFigures:
        """Exchange adapters: every worker calls it at the same step.

        Args:
            tokens: tokens this PC trained since the last exchange (its weight in the mean).
        """
        import torch

        from swarm.train import collectives

        started = time.perf_counter()
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
                                                       self.lr, self.momentum, self.averaged)
        else:
            new_global = torch.empty_like(local)
        new_global = collectives.broadcast(new_global, src=groups.leader, group=groups.intra)
        self._set_adapter(new_global)
        self.global_flat = new_global
        self.waited_s = 0.0
        checksums = []
        if groups.is_leader:  # what each PC now trains from, to show they agree
            mine = self._local_flat().double().sum().reshape(1)
            checksums = [float(x) for x in collectives.all_gather(mine, group=groups.leaders)]
        else:
            self._local_flat()  # the gather above is collective inside the PC
        return SyncFigures(sent, time.perf_counter() - started, wait_s, checksums)

    def _set_adapter(self, flat) -> None:
        """Make ``flat`` this PC's adapter: fp32 masters and the weights the model computes with."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        values, offset = [], 0
        for _, p in self.named:
            numel = full_numel(p)
            shape = getattr(p, "ds_shape", p.shape)
            values.append(flat[offset:offset + numel].view(shape))
            offset += numel
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


def ring_all_reduce_bytes(payload: int, members: int) -> int:
    """Bytes one member sends in a ring all-reduce of ``payload`` bytes: 2 (n-1)/n of it."""
    return int(2 * (members - 1) / members * payload) if members > 1 else 0
