"""The ``diloco`` strategy's process groups: each PC trains on its own, PCs exchange adapters.

DiLoCo (Douillard et al., arXiv 2311.08105): every PC runs the single-PC path (its
DeepSpeed process groups stay inside the PC: ZeRO never gathers the base over the home
link) on its share of the data, with its own AdamW (the inner optimizer). Every ``H``
steps the PCs exchange only their LoRA weights (``swarm.train.worker.diloco.exchange``), and an outer
optimizer (``swarm.train.worker.diloco.outer``) moves the global adapter every PC continues from.

``PcGroups`` builds the process groups (each PC's, and one of every PC's first worker for the
exchange) and the ``mpu`` that keeps DeepSpeed inside a PC.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PcGroups:
    """The process groups of a run whose PCs train on their own.

    Attributes:
        rank: this worker's global rank.
        addresses: the PCs' addresses, sorted: the PCs' order.
        pc_ranks: the global ranks of each PC, in the PCs' order.
        pc: the index of this worker's PC.
        intra: the group of this PC's workers (DeepSpeed's data-parallel group).
        leaders: the group of every PC's first worker (the exchange).
        alone: a group of this worker only (DeepSpeed's model-parallel group: none).
    """

    rank: int
    addresses: list[str]  # the PCs' addresses, in the PCs' order
    pc_ranks: list[list[int]]
    pc: int
    intra: object
    leaders: object
    alone: object

    @classmethod
    def build(cls, addresses: list[str], rank: int) -> "PcGroups":
        """Create the groups from each rank's node address. Collective: every rank calls it."""
        from swarm.train.worker import collectives

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
        return cls(rank, pcs, pc_ranks, pc, intra[pc], leaders, alone[rank])

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
