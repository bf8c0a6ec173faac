"""The worker loop's pure helpers: learning-rate schedule and CPU threads per worker."""

import math
from itertools import pairwise

import pytest

from swarm.config.models import JobConfig
from swarm.train.worker.loop import cpu_threads_per_worker, lr_lambda


def job_with(**train) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"path": "unused"}, "data": {"files": ["unused.txt"]}, "train": train,
    })


def test_schedule_warms_up_then_decays_to_the_floor():
    factor = lr_lambda(job_with(max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    warmup = [factor(s) for s in range(10)]
    assert warmup == sorted(warmup) and warmup[0] > 0 and warmup[-1] < 1
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert factor(100) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    decay = [factor(s) for s in range(10, 101)]
    assert all(a >= b for a, b in pairwise(decay)) and all(math.isfinite(f) for f in decay)


@pytest.mark.parametrize(("cores", "workers", "threads"), [(16, 1, 16), (16, 2, 8), (12, 5, 2), (2, 4, 1), (None, 1, 1)])
def test_cores_are_shared_among_a_pcs_workers(cores, workers, threads):
    assert cpu_threads_per_worker(cores, workers) == threads


@pytest.mark.parametrize(("cores", "ray_cpus", "workers", "threads"),
                         [(16, 4.0, 1, 4), (16, 4.0, 2, 2), (2, 1.0, 1, 1), (8, 32.0, 2, 4), (None, 6.0, 2, 3)])
def test_a_pc_lending_ray_fewer_cores_trains_on_those(cores, ray_cpus, workers, threads):
    assert cpu_threads_per_worker(cores, workers, ray_cpus) == threads
