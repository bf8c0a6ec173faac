"""The one line between the training workers and the driver: a small Ray actor.

It lives on the driver's node, so that it survives any worker PC dropping out, and it
holds messages as pickled bytes: it never imports torch, and costs one light process.

- Rank 0 sends metrics without waiting (``send``, whose answer is the stop flag) and
  delivers checkpoints and the final adapter with ``deliver``, which returns once the
  mailbox holds them.
- The driver drains the messages (``take``) and may ask the workers to stop.
- The newest delivered checkpoint stays here, so a worker group that Ray Train restarts
  after a failure continues from it (``resume_state``), whether or not the driver has
  finished writing it to disk yet.
- The plan of each worker group the driver has made (``swarm.train.driver.plans``) waits here
  for the group's rank 0 to take it, by the shape of the group (``group_key``).
"""

from __future__ import annotations

import pickle
import threading
from collections import Counter, deque
from typing import Any

# The shape of a worker group: ((node address, workers there), ...), sorted; "local" for a
# run on a Ray started for it, whose single node is the driver's.
GroupKey = tuple


def group_key(addresses: list[str], local: bool) -> GroupKey:
    """The key of a worker group from each rank's node address."""
    if local:
        return (("local", len(addresses)),)
    return tuple(sorted(Counter(addresses).items()))


class Mailbox:
    """Held by a Ray actor; see the module docstring."""

    def __init__(self, resume_state: bytes | None = None):
        self._messages: deque[bytes] = deque()
        self._ready = threading.Condition()
        self._stop = False
        self._resume_state = resume_state
        self._plans: dict[tuple, bytes] = {}

    def send(self, message: bytes) -> bool:
        """Queue ``message`` for the driver; the answer is whether the driver asked to stop."""
        with self._ready:
            self._messages.append(message)
            self._ready.notify_all()
        return self._stop

    def deliver(self, message: bytes, checkpoint: bool = False) -> bool:
        """Like ``send``; a checkpoint also becomes the state a restarted worker group resumes."""
        if checkpoint:
            self._resume_state = message
        return self.send(message)

    def take(self, timeout_s: float) -> list[bytes]:
        """Every waiting message, after waiting up to ``timeout_s`` for the first."""
        with self._ready:
            if not self._messages:
                self._ready.wait(timeout_s)
            taken = list(self._messages)
            self._messages.clear()
            return taken

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def resume_state(self) -> bytes | None:
        return self._resume_state

    def post_plan(self, key: tuple, plan: bytes) -> None:
        self._plans[key] = plan

    def plan(self, key: tuple) -> bytes | None:
        return self._plans.get(key)


def start_mailbox(resume_state: dict[str, Any] | None):
    """Start the mailbox actor on this (the driver's) node and return its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(Mailbox).options(
        num_cpus=0,
        # Workers block in deliver() while the driver takes messages: serve calls in threads.
        max_concurrency=16,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    )
    return actor.remote(pack(resume_state) if resume_state is not None else None)


def pack(message: dict[str, Any]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(message: bytes) -> dict[str, Any]:
    return pickle.loads(message)
