"""Run the Ray Train workers of a run: the data into Ray's object store, the mailbox,
the trainer, Ctrl-C and SIGTERM as a stop request, and a failure as one line.
"""

from __future__ import annotations

import gc
import signal
import threading
from typing import Any

from swarm.config.models import JobConfig
from swarm.errors import RunFailure, UserError
from swarm.train.driver.plans import GroupPlanner
from swarm.train.driver.recorder import RunRecorder
from swarm.train.runtime import return_freed_memory

# A hung collective (a PC gone mid-step) fails after this long, not after torch's 30 minutes.
COLLECTIVE_TIMEOUT_S = 300


def fit(job: JobConfig, splits: dict[str, Any], recorder: RunRecorder, fingerprint: dict, resume_state,
        planner: GroupPlanner) -> None:
    """Run the Ray Train workers and feed their messages to ``recorder``.

    ``splits`` (``train`` and ``eval``: ``swarm.data.packing`` Blocks or Pairs) go to Ray's
    object store and the dict is emptied, so that the driver holds no second copy.

    A worker group that fails (a PC dropped out) is restarted by Ray Train from the newest
    checkpoint, with fewer workers when the job allows (``train.min_workers``), and grows
    back when the PC returns; each group asks the driver for its plan first. The first
    Ctrl-C or SIGTERM asks the workers to finish the current step, save a checkpoint and
    stop; a second one aborts at once.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from swarm.train.driver.failures import FailureNotes
    from swarm.train.driver.trainer import ProcessGroupConfig, lean_trainer
    from swarm.train.mailbox import pack, start_mailbox
    from swarm.train.worker.loop import train_loop_per_worker

    placement = planner.placement
    data = ray.put(dict(splits))
    splits.clear()
    gc.collect()
    return_freed_memory()
    mailbox = start_mailbox(resume_state)
    ray.get(mailbox.post_plan.remote(planner.first_key(), pack(planner.current.to_dict())))
    trainer = lean_trainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "data": data,
            "mailbox": mailbox,
            "fingerprint": fingerprint,
            "local": placement.mode == "local",
            # Bytes sent are counted on a swarm's interfaces; a local run sends none.
            "count_sent_bytes": placement.mode != "local",
        },
        scaling_config=ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker=placement.resources_per_worker,
            elastic_resize_monitor_interval_s=job.train.regrow_check_s,
        ),
        # A hung collective should fail in minutes, not after torch's 30-minute default.
        backend_config=ProcessGroupConfig(placement.backend, COLLECTIVE_TIMEOUT_S),
        # Ray Train keeps only bookkeeping here; swarm writes checkpoints itself.
        run_config=RunConfig(
            name=".ray", storage_path=str(recorder.run_dir.resolve()),
            failure_config=FailureConfig(max_failures=job.train.max_restarts),
            callbacks=[FailureNotes(mailbox)],
        ),
        ray_started_here=not job.ray.address,
    )
    stop = threading.Event()
    reader = threading.Thread(target=recorder.consume, args=(mailbox, stop), daemon=True)
    reader.start()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum, frame):
        # Only a flag: the reader thread passes it on to the workers (a handler that calls
        # Ray could run in the middle of a Ray call of this thread).
        if recorder.stop_requested:
            raise KeyboardInterrupt
        recorder.stop_requested = True

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - unwrap user errors raised inside a worker
        raise user_error_from(exc) or RunFailure(f"training failed: {describe_failure(exc)}") from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.set()
        reader.join()
        recorder.close()


def describe_failure(exc: BaseException) -> str:
    """One line for an exception Ray Train raised: its type and the start of its message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def user_error_from(exc: BaseException) -> UserError | None:
    """The ``UserError`` a worker raised, found in the chain Ray wraps around it."""
    seen = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return UserError(str(current))
        pending += [current.__cause__, current.__context__]
        pending += [e for e in getattr(current, "worker_failures", {}).values() if isinstance(e, BaseException)]
        pending += [e for e in getattr(current, "args", ()) if isinstance(e, BaseException)]
    return None
