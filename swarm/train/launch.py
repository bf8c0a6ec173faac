"""Driver side of ``swarm train``: check, prepare data, start Ray, run the workers, record.

Everything that can fail because of the user's input fails here, before a worker starts
or a weight is read: the model folder, the tokenizer, every data record, the offload
folder. The data is tokenized once on the driver and handed to the workers through Ray's
object store, so workers on other PCs need neither the data files nor a shared drive.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil
import yaml

from swarm import __version__, metrics_log
from swarm.config.models import HUB_PREFIX, JobConfig
from swarm.errors import RunFailure, UserError
from swarm.train import checkpoint
from swarm.train import resume as resume_rules
from swarm.train.plans import GroupPlanner
from swarm.durable import replace_text, write_json
from swarm.train.progress import ProgressRecorder
from swarm.train.trackers import check_trackers
from swarm.train.runtime import prepare_process_env, return_freed_memory

# A hung collective (a PC gone mid-step) fails after this long, not after torch's 30 minutes.
COLLECTIVE_TIMEOUT_S = 300


def train(job: JobConfig, resume: str | bool | None = None) -> Path:
    """Run the job to the end (or to a requested stop) and return its run folder.

    Args:
        job: The validated job.
        resume: None or False for a new run; True to continue this job's newest run from
            its newest intact checkpoint; a path to a run or checkpoint folder.
    """
    prepare_process_env()
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
    from swarm.train.data import prepare_data

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
            from swarm.train.survey import survey_cluster

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
        recorder = ProgressRecorder(run_dir, job, dashboard_url, status_job_id=session.job_id, planner=planner)
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


def finish_run(run_dir: Path, job: JobConfig, recorder: ProgressRecorder, stats, started, planner) -> dict:
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


def kept_checkpoint(run_dir: Path) -> str:
    """"; the newest intact checkpoint is ..." for a failure line."""
    newest = checkpoint.newest_valid(run_dir / "checkpoints", report=lambda line: None)
    return f"; the newest intact checkpoint is {newest}" if newest else "; no checkpoint was written"


def plan_run(job: JobConfig, nodes, data_tokens: int = 0) -> GroupPlanner:
    """The run's planner, holding the plan of its first worker group, or a one-line refusal.

    Args:
        nodes: the swarm's live nodes (``survey_cluster``), or None for a Ray started for
            this run.
        data_tokens: tokens of the prepared data (the driver's share of the head's RAM).
    """
    from swarm.hardware import inventory
    from swarm.train.plans import run_planner
    from swarm.train.survey import node_inventories

    if nodes is None:
        return run_planner(job, None, [inventory(offload=job.offload.nvme_path)], data_tokens)
    return run_planner(job, nodes, node_inventories(nodes, job.offload.nvme_path), data_tokens)


def open_run_dir(job: JobConfig, resume: str | bool | None, fingerprint: dict) -> tuple[Path, dict | None]:
    """A new run folder, or the run and checkpoint to resume (checked against ``fingerprint``)."""
    if not resume:
        return create_run_dir(job), None
    given = resume if isinstance(resume, str) else None
    run_dir = resume_rules.find_run_dir(job, given)
    source = resume_rules.pick_checkpoint(run_dir, given, report=lambda line: print(line, file=sys.stderr))
    resume_state = checkpoint.load_checkpoint(source)
    resume_rules.check_compatible(resume_state["manifest"]["fingerprint"], fingerprint, source)
    metrics_log.trim(run_dir / metrics_log.FILE, resume_state["manifest"]["step"])
    print(f"resuming {run_dir} from step {resume_state['manifest']['step']}", file=sys.stderr)
    return run_dir, resume_state


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


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """The job with local paths made absolute: Ray workers do not run in this folder."""
    files = [_absolute_source(entry) for entry in job.data.files]
    update: dict[str, Any] = {"data": job.data.model_copy(update={"files": files})}
    if is_local_model(job.model.path):
        update["model"] = job.model.model_copy(update={"path": str(Path(job.model.path).expanduser().resolve())})
    if job.offload.nvme_path:
        update["offload"] = job.offload.model_copy(
            update={"nvme_path": str(Path(job.offload.nvme_path).expanduser().resolve())}
        )
    return job.model_copy(update=update)


def _absolute_source(entry):
    """A ``data.files`` entry with its local path made absolute; Hub data sets stay as they are."""
    if isinstance(entry, str):
        return entry if entry.startswith(HUB_PREFIX) else str(Path(entry).expanduser().resolve())
    if entry.path is None:
        return entry
    return entry.model_copy(update={"path": str(Path(entry.path).expanduser().resolve())})


def is_local_model(path: str) -> bool:
    """A folder path, as opposed to a hub id of the form ``org/name``."""
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1


def check_model_source(job: JobConfig) -> None:
    """Refuse a model path that is neither an existing folder nor a plausible hub id."""
    path = job.model.path
    if is_local_model(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"model.path: folder {path} does not exist")
        if not (folder / "config.json").is_file():
            raise UserError(f"model.path: {path} has no config.json; point it at a transformers model folder")


def check_offload_folder(job: JobConfig) -> None:
    """The NVMe offload folder, when the job names one, must exist (or be creatable) and be writable."""
    if not job.offload.nvme_path:
        return
    folder = Path(job.offload.nvme_path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"offload.nvme_path: cannot write to {folder} ({exc.strerror})") from None


def load_tokenizer(job: JobConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            job.model.path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code
        )
    except OSError as exc:
        raise UserError(f"model.path: cannot load a tokenizer from {job.model.path} ({' '.join(str(exc).split())[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_run_folder(job: JobConfig, resume: str | bool | None) -> None:
    """Refuse, before anything is loaded, a run folder the run could not write or find."""
    from swarm.export.names import validate_name

    if resume:
        resume_rules.find_run_dir(job, resume if isinstance(resume, str) else None)
        return
    if job.output.name:
        validate_name(job.output.name)
        run_dir = Path(job.output.dir) / job.output.name
        if run_dir.exists():
            raise UserError(f"output.name: run folder {run_dir} exists; choose another output.name, "
                            "or continue it with --resume")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``ray.address`` where nothing answers (Ray itself would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"ray.address {address!r} is not HOST:PORT (the head's GCS, e.g. 192.168.1.10:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"ray.address {address}: nothing answers there ({exc.strerror or exc}); start the swarm "
                        "with `swarm up` on the head, or check the address (`swarm status`)") from None


def create_run_dir(job: JobConfig) -> Path:
    """``output.dir/NAME``; a generated name gets ``-2``, ``-3``... when taken."""
    from swarm.export.names import run_name, validate_name

    root = Path(job.output.dir)
    if job.output.name:
        validate_name(job.output.name)
        run_dir = root / job.output.name
        if run_dir.exists():
            raise UserError(f"output.name: run folder {run_dir} exists; choose another output.name")
    else:
        base = run_name(job, dt.date.today())
        run_dir, n = root / base, 1
        while run_dir.exists():
            n += 1
            run_dir = root / f"{base}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


class ray_session:
    """Connect to the configured Ray, or start a local one with a capped object store.

    A Ray started here is stopped on exit; one that was already running is left alone.
    """

    def __init__(self, job: JobConfig):
        self.job = job

    def __enter__(self) -> str | None:
        import ray

        from swarm.train.trainer import LOCAL_RAY_SYSTEM_CONFIG

        settings = self.job.ray
        self.job_id = None
        if settings.address:
            context = ray.init(address=settings.address, log_to_driver=False, logging_level="ERROR")
            # `swarm status` shows this job's step and loss under its Ray job id.
            self.job_id = ray.get_runtime_context().get_job_id() if "RAY_AUTH_MODE" in os.environ else None
        else:
            # Ray's log monitor forwards worker output to drivers; with log_to_driver off
            # nobody reads it, yet it globs Ray's log folder ten times a second (about 1%
            # of a core). Let it look for new files every 5 s instead.
            os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
            os.environ.setdefault("LOG_NAME_UPDATE_INTERVAL_S", "5")
            context = ray.init(
                address="local",
                object_store_memory=settings.object_store_mb * 1024**2,
                include_dashboard=settings.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=free_dashboard_port(settings.dashboard_port) if settings.dashboard else None,
                # Worker output goes to Ray's log files; the terminal shows swarm's progress.
                log_to_driver=False,
                logging_level="ERROR",
                _system_config=LOCAL_RAY_SYSTEM_CONFIG,
            )
        url = context.dashboard_url
        # The processes of a Ray started here: if one dies the run cannot go on, and Ray's
        # own core would end this process a minute later with a C++ log line.
        self.head_processes = [] if settings.address else [
            p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
        return f"http://{url}" if url and not url.startswith("http") else url

    def lost(self) -> list[str]:
        """Names of this run's own Ray processes that are no longer running."""
        return [p.name() for p in self.head_processes if not _running(p)]

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_local_ray(session: ray_session, run_dir: Path, done: threading.Event) -> threading.Thread:
    """End the run with one line when the Ray started for it dies (nothing could go on)."""

    def watch() -> None:
        while not done.wait(2.0):
            lost = session.lost()
            if lost:
                print(f"error: training failed: the Ray this run started stopped ({', '.join(lost)} exited)"
                      f"{kept_checkpoint(run_dir)}; continue with `swarm train JOB --resume {run_dir}`",
                      file=sys.stderr, flush=True)
                os._exit(RunFailure.exit_status)

    thread = threading.Thread(target=watch, daemon=True, name="swarm-ray-watch")
    thread.start()
    return thread


def free_dashboard_port(wanted: int) -> int:
    """``wanted`` if nothing listens there, else a free port (another run's dashboard has it)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    print(f"note: port {wanted} is taken (another run's dashboard?); this run's dashboard uses {port}", file=sys.stderr)
    return port


def swarm_client_env() -> dict[str, str]:
    """Ray's token and TLS variables from this PC's swarm secret and node certificate.

    A swarm this PC brought up with ``--insecure`` gets ``RAY_AUTH_MODE=disabled`` and no TLS;
    a PC without secret, nothing (a Ray cluster that is not a swarm). Ray reads them when its
    core starts, so they must be set before ``ray.init``.

    Raises:
        UserError: the secret is unusable, or this PC has no node certificate of the swarm.
    """
    from swarm.cluster.client import ray_client_env
    from swarm.cluster.state import load_cluster_state
    from swarm.home import read_secret, secret_path

    state = load_cluster_state()
    if state is not None and state.get("auth") == "disabled":
        return ray_client_env(None)
    if not secret_path().exists():
        return {}
    return ray_client_env(read_secret())


def fit(job: JobConfig, splits: dict[str, Any], recorder: ProgressRecorder, fingerprint: dict, resume_state,
        planner: GroupPlanner) -> None:
    """Run the Ray Train workers and feed their messages to ``recorder``.

    ``splits`` (``train`` and ``eval``: ``swarm.train.packing`` Blocks or Pairs) go to Ray's
    object store and the dict is emptied, so that the driver holds no second copy.

    A worker group that fails (a PC dropped out) is restarted by Ray Train from the newest
    checkpoint, with fewer workers when the job allows (``train.min_workers``), and grows
    back when the PC returns; each group asks the driver for its plan first. The first
    Ctrl-C or SIGTERM asks the workers to finish the current step, save a checkpoint and
    stop; a second one aborts at once.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from swarm.train.failures import FailureNotes
    from swarm.train.loop import train_loop_per_worker
    from swarm.train.mailbox import pack, start_mailbox
    from swarm.train.trainer import ProcessGroupConfig, lean_trainer

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


def write_run_summary(run_dir: Path, job: JobConfig, recorder: ProgressRecorder, stats, started, finished,
                      plan) -> dict:
    """run.json: what the model card and later tools need to know about this run.

    A resumed run keeps its first start and adds this session's wall time to the earlier ones.
    """
    earlier_s, first_started = 0.0, started
    previous = run_dir / "run.json"
    if previous.is_file():
        earlier = json.loads(previous.read_text())
        first_started = dt.datetime.fromisoformat(earlier["started"])
        earlier_s = earlier.get("wall_time_s", 0.0)
    summary = {
        "name": run_dir.name,
        "swarm_version": __version__,
        "base_model": job.model.path,
        "started": first_started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "wall_time_s": round(earlier_s + (finished - started).total_seconds(), 1),
        **recorder.summary(),
        "strategy": {**plan.strategy.to_dict(), "reason": plan.strategy_reason},
        "data": {"format": job.data.format, **vars(stats)},
        "stopped": recorder.stopped_at is not None,
    }
    write_json(run_dir / "run.json", summary)
    return summary
