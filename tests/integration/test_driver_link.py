"""Rank 0's line to the driver: a real Ray and the real mailbox actor."""

import time

import pytest

ray = pytest.importorskip("ray")

from swarm.train.mailbox import start_mailbox, unpack
from swarm.train.worker.driver_link import DriverLink


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024**2, logging_level="ERROR",
             log_to_driver=False)
    yield
    ray.shutdown()


def steps_until_stop(link: DriverLink, mailbox, steps: int, log_every: int) -> tuple[int | None, list[dict]]:
    """Run a worker's step loop (probe, then log) against the mailbox; the driver asks to stop
    after step 5. Returns the step at which the worker saw the stop, and what the driver took."""
    taken, stopped_at = [], None
    for step in range(1, steps + 1):
        if link.stop_requested():
            stopped_at = step
            break
        if step % log_every == 0:
            link.send({"kind": "step", "step": step})
        if step == 5:
            ray.get(mailbox.request_stop.remote())
        time.sleep(0.05)  # a step's work: the mailbox answers meanwhile
        taken += [unpack(m) for m in ray.get(mailbox.take.remote(0))]
    return stopped_at, taken


def test_a_run_that_logs_every_step_calls_the_driver_once_per_step_and_still_stops(local_ray):
    mailbox = start_mailbox(None)
    link = DriverLink(mailbox)
    stopped_at, taken = steps_until_stop(link, mailbox, steps=40, log_every=1)
    assert stopped_at is not None and 6 <= stopped_at <= 10, stopped_at
    assert [m["step"] for m in taken] == list(range(1, stopped_at))
    # One message per step carried the stop flag back; the first step had none to ride on.
    assert link.calls <= stopped_at, (link.calls, stopped_at)


def test_a_run_that_logs_rarely_probes_on_its_own(local_ray):
    mailbox = start_mailbox(None)
    link = DriverLink(mailbox)
    stopped_at, taken = steps_until_stop(link, mailbox, steps=40, log_every=10)
    assert stopped_at is not None and 6 <= stopped_at <= 10, stopped_at
    assert taken == []
