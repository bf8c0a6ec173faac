"""Planning: where the workers run, with which strategy and precision, whether the job fits,
how fast it will run, and the exact DeepSpeed config: one frozen :class:`Plan`.

Pure arithmetic over the model's shape (counted on the meta device, no weights) and the
machines' inventories. The entry point is :func:`make_plan`.
"""

from swarm.plan.candidates import Candidate, NodeFigures
from swarm.plan.decide import Plan, make_plan, workload_from_job
from swarm.plan.inventories import Hardware, inventory_from_cluster, load_hardware
from swarm.plan.memory import Overheads
from swarm.plan.shapes import ModelShape, bundled_names, load_shape
from swarm.plan.strategy import STRATEGIES, Strategy
from swarm.plan.workload import Workload

__all__ = [
    "STRATEGIES", "Candidate", "Hardware", "ModelShape", "NodeFigures", "Overheads", "Plan", "Strategy",
    "Workload", "bundled_names", "inventory_from_cluster", "load_hardware", "load_shape", "make_plan",
    "workload_from_job",
]
