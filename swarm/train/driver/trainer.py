"""The Ray Train trainer swarm runs: lean, because every process it starts costs RAM.

Each helper actor Ray Train starts is a Python process that imports Ray Train and Ray
Data, about 115 MiB of RAM each (measured with ``tests/bench/bench_train.py``); on a home
PC that memory is better left to CPU offload. So swarm's trainer differs from a plain
``TorchTrainer`` in four ways:

- its backend joins the workers' torch process group (as Ray's ``TorchConfig`` does), but
  lives in this module, which never imports torch: Ray Train's controller process loads
  the backend, and with ``TorchConfig`` it would import torch (about 150 MiB) for nothing;
- no dataset manager (it hands Ray Data shards to workers; swarm passes its packed blocks
  through the object store and gives the trainer no datasets);
- no preemption watcher (it reports cloud nodes drained for spot preemption; a home PC
  that drops out is handled by swarm's restart from the newest checkpoint);
- when Ray was started for this run alone, no placement-group cleaner (that Ray, and every
  reservation in it, ends with the run anyway) and no autoscaling coordinator (it forwards
  resource requests to a cluster autoscaler; a Ray of one PC has nothing to add). On a
  swarm both stay: the cleaner frees the worker slots of a driver killed mid-run, and the
  elastic policy reads the slots it may use from the coordinator.

This module is the one place swarm touches Ray Train's private parts. It relies on, in the
Ray range pyproject.toml allows (checked by tests/unit/test_ray_internals.py, which fails
naming the part a Ray upgrade changed):

- ``ray.train.v2.api.data_parallel_trainer.DataParallelTrainer._create_default_callbacks``
  and ``._initialize_and_run_controller(scaling_policy=...)``;
- ``ray.train.v2._internal.callbacks.datasets.DatasetsCallback`` and
  ``...placement_group_callback.PlacementGroupCleanerCallback``;
- ``ray.train.v2._internal.execution.scaling_policy.FixedScalingPolicy`` with
  ``after_controller_start``, ``_maybe_send_resource_request``, ``_send_resource_request``;
- ``ray.train._internal.utils.get_address_and_port``;
- Ray's system config key ``prestart_worker_first_driver`` (``LOCAL_RAY_SYSTEM_CONFIG``)
  and the ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` variable;
- ``ray._private.worker.print_to_stdstream``, which the driver's error-message thread
  (``listen_error_messages``) calls for every cluster error (``route_ray_errors``).
"""

from __future__ import annotations

import datetime as dt
import os
import re

from ray.train.backend import Backend, BackendConfig

# A Ray started for one run: no idle worker process started in advance for tasks (a
# training run starts only actors, which get processes of their own).
LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy


class ProcessGroupConfig(BackendConfig):
    """Join every worker into one torch process group: gloo on CPUs, NCCL on GPUs."""

    def __init__(self, backend: str, timeout_s: int):
        self.backend = backend
        self.timeout_s = timeout_s

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    def to_dict(self) -> dict:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


class ProcessGroupBackend(Backend):
    # Every worker sees all of its PC's GPUs and takes the one at its local rank.
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(join_process_group, address, port, backend_config.backend, backend_config.timeout_s)


def join_process_group(address: str, port: int, backend: str, timeout_s: int) -> None:
    """Runs on each worker: torch's distributed variables, the worker's device, then the group.

    With NCCL the device is set before the group exists (``swarm.train.worker.collectives.join``):
    NCCL makes each communicator on the current device, which is GPU 0 until it is set.
    """
    import ray.train
    import torch

    from swarm.train.worker import collectives
    from swarm.train.worker.device import worker_device

    context = ray.train.get_context()
    os.environ.update({
        "MASTER_ADDR": address, "MASTER_PORT": str(port),
        "RANK": str(context.get_world_rank()), "WORLD_SIZE": str(context.get_world_size()),
        "LOCAL_RANK": str(context.get_local_rank()), "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "NODE_RANK": str(context.get_node_rank()),
    })
    if backend == "nccl":
        from swarm.hardware import gpus
        from swarm.train.worker.device import collective_env

        for key, value in collective_env(backend, [(g.name, g.compute_capability) for g in gpus()]).items():
            os.environ.setdefault(key, value)
    visible = torch.cuda.device_count() if backend == "nccl" else 0
    timeout = dt.timedelta(seconds=timeout_s)
    rank, world_size = context.get_world_rank(), context.get_world_size()
    collectives.join(
        backend, worker_device(backend == "nccl", context.get_local_rank(), visible),
        store=collectives.rendezvous_store(address, port, rank, world_size, timeout), rank=rank, world_size=world_size,
        timeout=timeout,
    )


class LocalFixedScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy, without resource requests to an autoscaler."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass


def lean_trainer(*args, ray_started_here: bool, **kwargs):
    """A Ray Train ``DataParallelTrainer`` made with these arguments, minus the helpers above."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    unused = (DatasetsCallback, PlacementGroupCleanerCallback) if ray_started_here else (DatasetsCallback,)

    class LeanTrainer(DataParallelTrainer):
        def _create_default_callbacks(self):
            # swarm never gives Ray Train datasets (see the module docstring).
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            policy = controller_init_kwargs["scaling_policy"]
            if ray_started_here and type(policy) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = LocalFixedScalingPolicy(scaling_config=policy.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    # Read by Ray Train's controller, which gets it from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return LeanTrainer(*args, **kwargs)


def route_ray_errors(say) -> None:
    """Give the cluster errors Ray prints in the driver to ``say``, one line each.

    Ray's driver prints every error the cluster publishes (a PC marked dead, a worker
    killed for memory) to stdout in colour, over several lines, whatever ``log_to_driver``
    says; in ``swarm train`` they tore the progress output and its last line, ``run:``.
    swarm reports the consequence itself (``worker 0 failed``, ``workers restarted``), so
    the error keeps only its first sentence, as a note.
    """
    import ray._private.worker as ray_worker

    def print_as_note(data: dict, ignore_prefix: bool = False) -> None:
        for text in data.get("lines", []):
            say(f"note: Ray: {first_sentence(text)}")

    ray_worker.print_to_stdstream = print_as_note


def first_sentence(text: str) -> str:
    """The first sentence of a message, without colour codes or line breaks, at most 300 characters."""
    plain = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    end = plain.find(". ")
    return (plain if end < 0 else plain[:end + 1])[:300]
