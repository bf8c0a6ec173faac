"""Trackers (log.to): refusals before a run, a failing tracker, and a resumed run, with the real libraries."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.train.driver.trackers import Trackers, check_trackers


def job(*trackers: str) -> JobConfig:
    return JobConfig.model_validate({"model": {"path": "m"}, "data": {"files": ["d.jsonl"]},
                                     "log": {"to": list(trackers), "project": "tests"}})


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError) as err:
        check_trackers(job("tensorboard", "mlflow"))
    assert str(err.value) == ("log.to: mlflow is not installed; pip install 'swarm-train[trackers]', "
                              "or take mlflow out of log.to")


def test_wandb_offline_needs_no_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.invalid")
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(job("wandb"))
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError, match="log.to: wandb has no API key"):
        check_trackers(job("wandb"))


def test_a_failing_tracker_is_switched_off_with_one_note(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    notes = []
    trackers = Trackers(tmp_path, job("tensorboard"), note=notes.append)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": 1.0})
    trackers.finish({"steps": 3})
    assert notes == ["warning: log.to tensorboard failed and is off for the rest of the run "
                     "(OSError: [Errno 28] No space left on device)"]


def test_a_resumed_run_continues_the_same_runs(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = Trackers(tmp_path, job("tensorboard", "wandb", "mlflow"))
    for step in (1, 2, 3):  # step 3 is lost with the run; the checkpoint was at step 2
        first.log({"kind": "step", "step": step, "loss": 10.0 - step, "tokens": 64})
    first.finish(None)
    ids = json.loads((tmp_path / "trackers.json").read_text())
    second = Trackers(tmp_path, job("tensorboard", "wandb", "mlflow"), resumed_step=2)
    assert second.ids == ids
    for step in (3, 4):
        second.log({"step": step, "loss": 5.0 - step, "eval_loss": 6.0, "stopped": True})
    second.finish({"steps": 4, "train_loss": 1.0, "name": "run", "stopped": False})

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_id == ids["mlflow"]
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert losses[4] == 1.0 and losses[1] == 9.0
    assert run.data.metrics["final.train_loss"] == 1.0 and "stopped" not in run.data.metrics
    assert run.data.params["log.project"] == "tests"

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == {1: 9.0, 2: 8.0, 3: 2.0, 4: 1.0}

    # One folder per session, both of the one run id (W&B adds "-1" when both start in the same second).
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{ids['wandb']}(-\d+)?", r.name)
                                  for r in runs), runs
