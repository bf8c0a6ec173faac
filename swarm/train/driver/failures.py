"""Telling the user why Ray Train restarts the workers (a PC dropped out, a worker crashed)."""

from __future__ import annotations

from ray.train import UserCallback

from swarm.train.mailbox import pack


class FailureNotes(UserCallback):
    """Sends one line per failed worker to the run's mailbox, shown above the progress bar.

    Runs inside Ray Train's controller; without it a restart would show only as the
    workers' next start.
    """

    def __init__(self, mailbox):
        self.mailbox = mailbox

    def after_exception(self, run_context, worker_exceptions) -> None:
        for rank, exc in sorted(worker_exceptions.items()):
            first = " ".join(str(exc).split())[:300]
            text = f"worker {rank} failed ({type(exc).__name__}: {first})"
            self.mailbox.send.remote(pack({"kind": "note", "text": text}))
