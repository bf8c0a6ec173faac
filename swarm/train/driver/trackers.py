"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow (``log.to``).

Each is an optional package (``pip install 'swarm-train[trackers]'``); a job that names one
that is missing is refused before anything loads. The driver writes to them from the same
messages as metrics.jsonl (``swarm.train.driver.progress``): the run's config at the start, every
step and eval record, and the run's final figures at the end.

- ``tensorboard``: event files in RUN/tensorboard (``tensorboard --logdir RUN``).
- ``wandb``: a W&B run in RUN/wandb; with ``WANDB_MODE=offline`` nothing leaves the PC
  (``wandb sync`` uploads it later).
- ``mlflow``: an MLflow run, by default in a local store RUN/mlruns (``mlflow ui
  --backend-store-uri RUN/mlruns``), or at ``log.mlflow_uri`` / ``MLFLOW_TRACKING_URI``.

A resumed run continues the same W&B and MLflow runs (their ids are kept in
RUN/trackers.json). A tracker that fails during the run is switched off with one note;
training goes on.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from swarm.config.models import JobConfig
from swarm.durable import write_json
from swarm.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"


def check_trackers(job: JobConfig) -> None:
    """Refuse, in one line, a tracker that is not installed or cannot log in."""
    for name in job.log.to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"log.to: {name} is not installed; pip install 'swarm-train[trackers]', "
                            f"or take {name} out of log.to")
    if "wandb" in job.log.to and not _wandb_offline() and not _wandb_key():
        raise UserError("log.to: wandb has no API key (WANDB_API_KEY or `wandb login`); log in, or set "
                        "WANDB_MODE=offline to keep the run in RUN/wandb and `wandb sync` it later")


def _wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Trackers:
    """The run's trackers; every method is a no-op for a job without ``log.to``.

    Args:
        run_dir: the run folder.
        job: the job (its config is logged).
        resumed_step: the step a resumed run continues from (0 for a new run).
        note: prints a line for the user (a tracker that failed).
        dashboard_url: the Ray dashboard, kept with the run's config.
    """

    def __init__(self, run_dir: Path, job: JobConfig, resumed_step: int = 0, note=print,
                 dashboard_url: str | None = None):
        self.run_dir, self.job, self.note = Path(run_dir), job, note
        ids_path = self.run_dir / IDS_FILE
        self.ids = json.loads(ids_path.read_text()) if resumed_step and ids_path.is_file() else {}
        config = {**job.model_dump(mode="json"), "ray_dashboard": dashboard_url}
        self.open: dict[str, object] = {}
        for name in job.log.to:
            self._guard(name, lambda name=name: self.open.__setitem__(name, _START[name](self, config, resumed_step)))
        if self.ids:
            write_json(ids_path, self.ids)

    def log(self, record: dict) -> None:
        """A metrics record (a step's or an eval's): its numbers, at its step."""
        step = record.get("step", 0)
        figures = {k: float(v) for k, v in record.items()
                   if k not in ("step", "kind") and isinstance(v, int | float) and not isinstance(v, bool)}
        for name in list(self.open):
            self._guard(name, lambda name=name: _LOG[name](self.open[name], figures, step))

    def finish(self, summary: dict | None) -> None:
        """The run's final figures (run.json's numbers), then close every tracker."""
        figures = {k: float(v) for k, v in (summary or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and v is not None}
        for name in list(self.open):
            self._guard(name, lambda name=name: _FINISH[name](self.open[name], figures))
        self.open.clear()

    def _guard(self, name: str, work) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a tracker must not end the training run
            self.open.pop(name, None)
            self.note(f"warning: log.to {name} failed and is off for the rest of the run "
                      f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")


def _start_tensorboard(trackers: Trackers, config: dict, resumed_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # On a resume, events after the checkpoint's step (trained again now) are dropped.
    writer = SummaryWriter(str(trackers.run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)
    writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=resumed_step)
    return writer


def _log_tensorboard(writer, figures: dict, step: int) -> None:
    for key, value in figures.items():
        writer.add_scalar(key, value, global_step=step)
    writer.flush()


def _finish_tensorboard(writer, figures: dict) -> None:
    writer.add_text("summary", "```\n" + json.dumps(figures, indent=2) + "\n```")
    writer.close()


def _start_wandb(trackers: Trackers, config: dict, resumed_step: int):
    import wandb

    run_id = trackers.ids.get("wandb") or uuid.uuid4().hex[:12]
    trackers.ids["wandb"] = run_id
    return wandb.init(project=trackers.job.log.project, name=trackers.run_dir.name, id=run_id, resume="allow",
                      dir=str(trackers.run_dir), config=config, settings=wandb.Settings(console="off", silent=True))


def _log_wandb(run, figures: dict, step: int) -> None:
    run.log(figures, step=step)


def _finish_wandb(run, figures: dict) -> None:
    run.summary.update(figures)
    run.finish()


def _start_mlflow(trackers: Trackers, config: dict, resumed_step: int):
    from mlflow import MlflowClient

    uri = trackers.job.log.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        # MLflow 3 keeps its file store for existing users only; a run folder is where
        # swarm keeps everything, and `mlflow ui --backend-store-uri RUN/mlruns` reads it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (trackers.run_dir / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=uri)
    run_id = trackers.ids.get("mlflow")
    if run_id is None:
        experiment = client.get_experiment_by_name(trackers.job.log.project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(trackers.job.log.project)
        run_id = client.create_run(experiment_id, run_name=trackers.run_dir.name).info.run_id
        for key, value in _flat(config).items():
            client.log_param(run_id, key, str(value)[:6000])
    trackers.ids["mlflow"] = run_id
    return client, run_id


def _log_mlflow(opened, figures: dict, step: int) -> None:
    from mlflow.entities import Metric

    client, run_id = opened
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()])


def _finish_mlflow(opened, figures: dict) -> None:
    _log_mlflow(opened, {f"final.{k}": v for k, v in figures.items()}, 0)
    client, run_id = opened
    client.set_terminated(run_id)


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_START = {"tensorboard": _start_tensorboard, "wandb": _start_wandb, "mlflow": _start_mlflow}
_LOG = {"tensorboard": _log_tensorboard, "wandb": _log_wandb, "mlflow": _log_mlflow}
_FINISH = {"tensorboard": _finish_tensorboard, "wandb": _finish_wandb, "mlflow": _finish_mlflow}
