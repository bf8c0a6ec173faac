"""Driver side of ``swarm train``: the order of a run, from checks to ``run.json``.

Checks (``preflight``) and data preparation come first, so that anything the user can fix
fails before a worker starts or a weight is read; then the plan, the Ray session
(``ray_session``), the run folder (``run_folder``), the workers (``fit``) and the summary.
The data is tokenized once on the driver and handed to the workers through Ray's object
store, so workers on other PCs need neither the data files nor a shared drive.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
from pathlib import Path

import yaml

from swarm.config.models import JobConfig
from swarm.durable import replace_text, write_json
from swarm.errors import RunFailure, UserError
from swarm.train.driver import resume as resume_rules
from swarm.train.driver.fit import fit
from swarm.train.driver.plans import GroupPlanner
from swarm.train.driver.preflight import (
    check_model_source,
    check_offload_folder,
    check_reachable,
    check_run_folder,
    load_tokenizer,
    with_absolute_paths,
)
from swarm.train.driver.ray_session import ray_session, swarm_client_env, watch_local_ray
from swarm.train.driver.recorder import RunRecorder
from swarm.train.driver.run_folder import kept_checkpoint, open_run_dir, write_run_summary
from swarm.train.driver.trackers import check_trackers
from swarm.train.runtime import prepare_process_env, swarm_sets_malloc


def train(job: JobConfig, resume: str | bool | None = None) -> Path:
    """Run the job to the end (or to a requested stop) and return its run folder.

    Args:
        job: The validated job.
        resume: None or False for a new run; True to continue this job's newest run from
            its newest intact checkpoint; a path to a run or checkpoint folder.
    """
    prepare_process_env()
    swarm_sets_malloc(os.environ)  # what the local workers will read: a bad value is refused now
    if job.ray.address:
        # Ray reads its token variables once, when it is first imported (the tokenizer and
        # data libraries may import it): set them first.
        os.environ.update(swarm_client_env())
    job = with_absolute_paths(job)
    check_model_source(job)
    check_offload_folder(job)
    check_run_folder(job, resume)
    check_trackers(job)
    if job.ray.address:
        check_reachable(job.ray.address)
    else:
        # A local run is planned before anything is read: a refusal costs nothing. It is
        # planned again below, once the prepared data (which the driver holds) is known.
        plan_run(job, None)
    tokenizer = load_tokenizer(job)
    from swarm.data.prepare import prepare_data

    prepared = prepare_data(job.data, tokenizer)
    if prepared.train is None:
        raise UserError(f"data.files: no training examples were made from {', '.join(job.data.labels)}")
    stats, splits = prepared.stats, {"train": prepared.train, "eval": prepared.eval}
    del prepared  # the splits go to Ray's object store; the driver keeps no copy (see fit)
    fingerprint = resume_rules.fingerprint(job, stats.sha256)
    data_tokens = stats.train_tokens + stats.eval_tokens
    planner = None
    if not job.ray.address:
        planner = plan_run(job, None, data_tokens)
        # The workers of a local run run here: DeepSpeed's ops are built here, once, after
        # every input is checked and before any worker needs them.
        from swarm.train.ops import ensure_ops, ops_for

        ensure_ops(ops_for(planner.current.to_dict()), note=lambda line: print(line, file=sys.stderr, flush=True))

    with (session := ray_session(job)) as dashboard_url:
        if job.ray.address:
            # A swarm is asked what it offers; refusals still come before any weight is read.
            from swarm.train.driver.survey import survey_cluster

            planner = plan_run(job, survey_cluster(), data_tokens)
        plan = planner.current
        job = with_planned_batch(job, plan)
        print(f"workers: {plan.placement.describe()}", file=sys.stderr)
        print(f"strategy: {plan.strategy.name} ({plan.strategy_reason})", file=sys.stderr)
        run_dir, resume_state = open_run_dir(job, resume, fingerprint)
        replace_text(run_dir / "config.yaml", yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
        write_json(run_dir / "plan.json", plan.to_dict())
        tokenizer.save_pretrained(run_dir / "tokenizer")
        started = dt.datetime.now(dt.timezone.utc)
        recorder = RunRecorder(run_dir, job, dashboard_url, status_job_id=session.job_id, planner=planner)
        fitted = threading.Event()
        watch_local_ray(session, run_dir, fitted)
        try:
            fit(job, splits, recorder, fingerprint, resume_state, planner)
        except RunFailure as exc:
            recorder.trackers.finish(None)
            raise RunFailure(f"{exc}{kept_checkpoint(run_dir)}; continue with `swarm train JOB --resume {run_dir}`") \
                from exc
        finally:
            fitted.set()  # before Ray stops with the session
    summary = None
    try:
        summary = finish_run(run_dir, job, recorder, stats, started, planner)
    finally:
        recorder.trackers.finish(summary)
    return run_dir


def finish_run(run_dir: Path, job: JobConfig, recorder: RunRecorder, stats, started, planner) -> dict:
    """After the workers: refuse a run that did not end well, else write run.json and return it."""
    if recorder.failure:
        raise RunFailure(f"the run stopped: writing to {run_dir} failed ({recorder.failure}){kept_checkpoint(run_dir)}; "
                         f"fix that (free disk space?) and continue with `swarm train JOB --resume {run_dir}`")
    if recorder.refusal:
        raise RunFailure(f"{recorder.refusal}{kept_checkpoint(run_dir)}; continue with `swarm train JOB --resume "
                         f"{run_dir}` when the machines are back")
    if recorder.stopped_at is None and not recorder.adapter_written:
        raise RunFailure(f"the workers ended without delivering the trained adapter{kept_checkpoint(run_dir)}; "
                         f"continue with `swarm train JOB --resume {run_dir}`")
    finished = dt.datetime.now(dt.timezone.utc)
    summary = write_run_summary(run_dir, job, recorder, stats, started, finished, planner.current)
    if recorder.stopped_at is not None:
        print(
            f"stopped at step {recorder.stopped_at}; continue with: swarm train JOB --resume {run_dir}",
            file=sys.stderr,
        )
    return summary


def plan_run(job: JobConfig, nodes, data_tokens: int = 0) -> GroupPlanner:
    """The run's planner, holding the plan of its first worker group, or a one-line refusal.

    Args:
        nodes: the swarm's live nodes (``survey_cluster``), or None for a Ray started for
            this run.
        data_tokens: tokens of the prepared data (the driver's share of the head's RAM).
    """
    from swarm.hardware import inventory
    from swarm.train.driver.plans import run_planner
    from swarm.train.driver.survey import node_inventories

    if nodes is None:
        return run_planner(job, None, [inventory(offload=job.offload.nvme_path)], data_tokens)
    return run_planner(job, nodes, node_inventories(nodes, job.offload.nvme_path), data_tokens)


def with_planned_batch(job: JobConfig, plan) -> JobConfig:
    """The job with the plan's micro-batch when the job's does not fit (same samples per step)."""
    if plan.micro_batch == job.train.micro_batch:
        return job
    print(
        f"plan: micro_batch {job.train.micro_batch} does not fit; training with micro_batch "
        f"{plan.micro_batch} x grad_accum {plan.grad_accum} (the same samples per step)",
        file=sys.stderr,
    )
    return job.model_copy(update={"train": job.train.model_copy(
        update={"micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum})})


