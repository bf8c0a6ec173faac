"""Driver side: the workers' messages turned into the run folder's files and the display.

Rank 0 sends plain dicts through the run's mailbox (see ``swarm.train.mailbox``); the
recorder is their only reader and the driver's only writer of the run's files while the
workers run (metrics.jsonl, checkpoints, the adapter, plan.json, deepspeed.json, the
trackers). It runs in a thread of the driver while ``TorchTrainer.fit`` blocks; what it
shows goes through ``swarm.train.driver.progress``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from swarm.config.models import JobConfig
from swarm.durable import atomic_folder, write_json
from swarm.metrics_log import FILE as METRICS_FILE
from swarm.metrics_log import MetricsLog, read_metrics
from swarm.train.driver.progress import ProgressDisplay, status_text
from swarm.train.driver.trackers import Trackers


class RunRecorder:
    """Consumes worker messages: writes the run's files, keeps the figures, shows progress."""

    def __init__(self, run_dir: Path, job: JobConfig, dashboard_url: str | None, status_job_id: str | None = None,
                 planner=None):
        self.run_dir = run_dir
        self.planner = planner  # a swarm.train.driver.plans.GroupPlanner: answers the worker groups' plan requests
        self.refusal: str | None = None  # why a worker group could not train (the job no longer fits it)
        self.failure: str | None = None  # what the driver failed to do with a worker's message (a write)
        self.status_job_id = status_job_id
        self.job = job
        self.display = ProgressDisplay(job.train.max_steps)
        # A resumed run continues the file (trimmed to its checkpoint) and its token count.
        earlier = read_metrics(run_dir / METRICS_FILE)
        self.metrics = MetricsLog(run_dir / METRICS_FILE)
        resumed_step = max((m.get("step", 0) for m in earlier), default=0)
        self.start: dict = {}
        self.last_step: dict = {}
        self.last_eval: float | None = None
        self.total_tokens = sum(m.get("tokens", 0) for m in earlier)
        self.adapter_written = False
        self.stop_requested = False
        self.stopped_at: int | None = None
        self.checkpoints: list[Path] = []
        self.restarts: list[dict] = []
        self._lock = threading.Lock()
        if dashboard_url:
            self.display.line(f"dashboard: {dashboard_url}")
        # TensorBoard, W&B, MLflow as log.to says (swarm.train.driver.trackers); finished by the driver.
        self.trackers = Trackers(run_dir, job, resumed_step, note=self.note, dashboard_url=dashboard_url)

    # -- messages ---------------------------------------------------------------------

    def consume(self, mailbox, stop: threading.Event) -> None:
        """Read the mailbox's messages until ``stop`` is set and it is drained.

        Also passes a stop the user asked for (``stop_requested``, set by the signal
        handler) on to the workers. A message this thread cannot handle (a full disk while
        writing a checkpoint, say) must not end the run silently: it is kept in ``failure``,
        the workers are asked to stop, and the driver reports it when they have.
        """
        import ray

        from swarm.train.mailbox import unpack

        self._mailbox = mailbox
        asked = False
        while True:
            if self.stop_requested and not asked:
                asked = True
                self.note("stopping after this step and saving a checkpoint (press Ctrl-C again to abort)")
                mailbox.request_stop.remote()
            taken = ray.get(mailbox.take.remote(0.5))
            for message in taken:
                if self.failure is not None:
                    continue  # nothing more is written once a write failed
                try:
                    self.handle(unpack(message))
                except Exception as exc:  # noqa: BLE001 - any failure here must stop the run, loudly
                    self.failure = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                    mailbox.request_stop.remote()
            if not taken and stop.is_set():
                return

    def handle(self, message: dict) -> None:
        kind = message.pop("kind")
        with self._lock:
            getattr(self, f"_on_{kind}")(message)

    def _on_plan_request(self, message: dict) -> None:
        from swarm.train.mailbox import pack

        key = message["key"]
        answer = self.planner.answer(key)
        if "refused" not in answer:
            write_json(self.run_dir / "plan.json", answer)
        self._mailbox.post_plan.remote(key, pack(answer))

    def _on_refused(self, message: dict) -> None:
        self.refusal = message["reason"]

    def _on_start(self, message: dict) -> None:
        # What the workers passed to deepspeed.initialize, kept beside the plan it came from.
        write_json(self.run_dir / "deepspeed.json", message.pop("deepspeed"))
        restarted = bool(self.start)
        self.start = message
        hosts = ", ".join(sorted({h.get("address") or h["hostname"] for h in message["hosts"]}))
        if restarted:
            # Ray Train started a new worker group (a PC dropped out or came back); it
            # continues from the newest checkpoint, so later steps are logged again.
            self.restarts.append({
                "last_step": self.last_step.get("step", 0), "resumed_step": message["start_step"],
                "world_size": message["world_size"], "hosts": sorted({h.get("address") or h["hostname"] for h in message["hosts"]}),
            })
            self._trim_metrics(message["start_step"])
            self.note(f"workers restarted: {message['world_size']} worker(s) on {hosts}, "
                      f"continuing from step {message['start_step']}")
            self.display.rewind(message["start_step"])
            return
        self.display.line(
            f"training {self.job.model.path}: {message['world_size']} worker(s) on {hosts}, "
            f"{message['precision']}, {message['trainable_params']:,} trainable parameters"
        )
        self.display.start(message["start_step"])

    def _on_step(self, message: dict) -> None:
        self.last_step = message
        self.total_tokens += message["tokens"]
        self._write_metrics(message)
        self.display.show(message["step"], status_text(message, self.last_eval))
        if self.status_job_id:
            from swarm.cluster.state import record_progress

            record_progress(self.status_job_id, message["step"], message["loss"])

    def _on_sync(self, message: dict) -> None:
        self._write_metrics(message)

    def _on_eval(self, message: dict) -> None:
        self.last_eval = message["eval_loss"]
        self._write_metrics(message)
        if self.last_step.get("step") == message["step"]:
            # A worker sends a step's eval after the step: its line is drawn again with it
            # (the last step's line once showed the eval before the final one).
            self.display.show(message["step"], status_text(self.last_step, self.last_eval))

    def _on_checkpoint(self, message: dict) -> None:
        from swarm.train.checkpoint import write_checkpoint

        folder = write_checkpoint(self.run_dir / "checkpoints", message, self.job.train.keep_checkpoints)
        self.checkpoints.append(folder)
        self.note(f"checkpoint: {folder}")

    def _on_note(self, message: dict) -> None:
        self.note(message["text"])

    def _on_stopped(self, message: dict) -> None:
        self.stopped_at = message["step"]

    def _on_adapter(self, message: dict) -> None:
        write_adapter(self.run_dir / "adapter", message["peft_config"], message["state_dict"])
        self.adapter_written = True

    # -- output -----------------------------------------------------------------------

    def note(self, line: str) -> None:
        """A line above the progress bar (or on stderr without a terminal)."""
        self.display.note(line)

    def _trim_metrics(self, step: int) -> None:
        """Forget what was logged after ``step``: those steps are trained again."""
        kept = self.metrics.trim(step)
        self.total_tokens = sum(r.get("tokens", 0) for r in kept)

    def _write_metrics(self, record: dict) -> None:
        self.metrics.append(record)
        self.trackers.log(record)

    def close(self) -> None:
        self.display.close()
        self.metrics.close()

    def summary(self) -> dict:
        """Figures for run.json."""
        return {
            "steps": self.last_step.get("step", 0),
            "tokens": self.total_tokens,
            "train_loss": self.last_step.get("loss"),
            "eval_loss": self.last_eval,
            "world_size": self.start.get("world_size"),
            "restarts": self.restarts,
            "precision": self.start.get("precision"),
            "trainable_params": self.start.get("trainable_params"),
            "hardware": {"nodes": _nodes(self.start.get("hosts", []))},
        }


def _nodes(hosts: list[dict]) -> list[dict]:
    """One entry per machine (by its address), with the GPUs of all its workers."""
    nodes: dict[str, dict] = {}
    for host in hosts:
        key = host.get("address") or host["hostname"]
        node = nodes.setdefault(key, {"hostname": host["hostname"], "address": host.get("address"), "gpus": [],
                                      "ram_bytes": host["ram_bytes"], "workers": 0,
                                      "cpu_threads_per_worker": host["cpu_threads"]})
        node["gpus"] += host["gpus"]
        node["workers"] += 1
    return list(nodes.values())


def write_adapter(folder: Path, peft_config, state_dict: dict) -> None:
    """Write a peft adapter folder atomically (``swarm.durable.atomic_folder``)."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        peft_config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
