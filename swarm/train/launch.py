"""Driver side of ``swarm train``: check, prepare data, start Ray, run the workers, record.

Everything that can fail because of the user's input fails here, before a worker starts
or a weight is read: the model folder, the tokenizer, every data record, the offload
folder. The data is tokenized once on the driver and handed to the workers through Ray's
object store, so workers on other PCs need neither the data files nor a shared drive.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from swarm import __version__
from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.train import checkpoint
from swarm.train import resume as resume_rules
from swarm.train.progress import ProgressRecorder
from swarm.train.runtime import prepare_process_env

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
    if not job.ray.address:
        # A local run is placed and planned before Ray starts: a refusal costs nothing.
        placement, choice, plan = decide_layout(job, None)
        job = with_planned_batch(job, plan)
    tokenizer = load_tokenizer(job)
    from swarm.train.data import prepare_data

    prepared = prepare_data(job.data, tokenizer)
    if not prepared.train:
        raise UserError(f"data.files: no training blocks were made from {', '.join(job.data.files)}")
    fingerprint = resume_rules.fingerprint(job, prepared.stats.sha256)

    with (session := ray_session(job)) as dashboard_url:
        if job.ray.address:
            # A swarm is asked what it offers; refusals still come before any weight is read.
            placement, choice, plan = decide_layout(job, survey_cluster_nodes())
            job = with_planned_batch(job, plan)
        print(f"workers: {placement.describe()}", file=sys.stderr)
        print(f"strategy: {choice.name} ({choice.reason})", file=sys.stderr)
        run_dir, resume_state = open_run_dir(job, resume, fingerprint)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
        if plan is not None:
            (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        tokenizer.save_pretrained(run_dir / "tokenizer")
        started = dt.datetime.now(dt.timezone.utc)
        recorder = ProgressRecorder(run_dir, job, dashboard_url, status_job_id=session.job_id)
        fit(job, pack_arrays(prepared), recorder, fingerprint, resume_state, placement, choice)
    finished = dt.datetime.now(dt.timezone.utc)
    write_run_summary(run_dir, job, recorder, prepared.stats, started, finished, choice)
    if recorder.stopped_at is not None:
        print(
            f"stopped at step {recorder.stopped_at}; continue with: swarm train JOB --resume {run_dir}",
            file=sys.stderr,
        )
    return run_dir


def open_run_dir(job: JobConfig, resume: str | bool | None, fingerprint: dict) -> tuple[Path, dict | None]:
    """A new run folder, or the run and checkpoint to resume (checked against ``fingerprint``)."""
    if not resume:
        return create_run_dir(job), None
    given = resume if isinstance(resume, str) else None
    run_dir = resume_rules.find_run_dir(job, given)
    source = resume_rules.pick_checkpoint(run_dir, given, report=lambda line: print(line, file=sys.stderr))
    resume_state = checkpoint.load_checkpoint(source)
    resume_rules.check_compatible(resume_state["manifest"]["fingerprint"], fingerprint, source)
    trim_metrics(run_dir / "metrics.jsonl", resume_state["manifest"]["step"])
    print(f"resuming {run_dir} from step {resume_state['manifest']['step']}", file=sys.stderr)
    return run_dir, resume_state


def survey_cluster_nodes():
    from swarm.train.placement import survey_cluster

    return survey_cluster()


def decide_layout(job: JobConfig, nodes):
    """Placement, strategy and memory plan, or a one-line refusal.

    Args:
        nodes: the swarm's live nodes, or None for a Ray started for this run.

    Returns:
        ``(placement, strategy choice, plan)``; the plan is None when the model's shape
        cannot be known without a download.
    """
    from swarm.plan import local_inventory
    from swarm.train.placement import choose_strategy, node_inventories, place_workers, zero_strategy

    placement = place_workers(job, nodes, local_gpus=local_gpu_count())
    if nodes is None:
        inventories = [local_inventory(job.offload.nvme_path)]
    else:
        inventories = node_inventories(nodes, job.offload.nvme_path)
    plans: dict[str, Any] = {}

    def plan_for(name: str):
        if name not in plans:
            plans[name] = plan_or_none(job, inventories, zero_strategy(job, name))
        return plans[name]

    def fits_replicated() -> tuple[bool, str]:
        plan = plan_for("replicate")
        if plan is None:
            return False, "its size is unknown"
        if not plan.fits:
            return False, plan.reason
        tightest = max(plan.nodes, key=_fullness)
        used, limit = ((tightest.gpu_bytes, tightest.gpu_capacity) if tightest.gpu_capacity
                       else (tightest.ram_bytes, tightest.ram_limit))
        return True, f"tightest: {tightest.name} at {used / 1024**3:.1f} of {limit / 1024**3:.1f} GiB"

    choice = choose_strategy(job, placement.max_workers, fits_replicated)
    plan = plan_for(choice.name)
    if plan is not None and not plan.fits:
        raise UserError(f"this job does not fit: {plan.reason}; `swarm plan JOB` shows the figures")
    return placement, choice, plan


def _fullness(node) -> float:
    return node.gpu_bytes / node.gpu_capacity if node.gpu_capacity else node.ram_bytes / node.ram_limit


def plan_or_none(job: JobConfig, inventories: list, strategy):
    """The planner's figures for ``strategy`` on these machines; None when the shape is unknown."""
    from swarm.plan import make_plan

    try:
        return make_plan(job, inventories, strategies=[strategy])
    except UserError as exc:
        print(f"warning: no memory plan for this job ({exc})", file=sys.stderr)
        return None


def with_planned_batch(job: JobConfig, plan) -> JobConfig:
    """The job with the plan's micro-batch when the job's does not fit (same samples per step)."""
    if plan is None or plan.micro_batch == job.train.micro_batch:
        return job
    print(
        f"plan: micro_batch {job.train.micro_batch} does not fit; training with micro_batch "
        f"{plan.micro_batch} x grad_accum {plan.grad_accum} (the same samples per step)",
        file=sys.stderr,
    )
    return job.model_copy(update={"train": job.train.model_copy(
        update={"micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum})})


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step``: a resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """The job with local paths made absolute: Ray workers do not run in this folder."""
    update: dict[str, Any] = {
        "data": job.data.model_copy(update={"files": [str(Path(f).expanduser().resolve()) for f in job.data.files]})
    }
    if is_local_model(job.model.path):
        update["model"] = job.model.model_copy(update={"path": str(Path(job.model.path).expanduser().resolve())})
    if job.offload.nvme_path:
        update["offload"] = job.offload.model_copy(
            update={"nvme_path": str(Path(job.offload.nvme_path).expanduser().resolve())}
        )
    return job.model_copy(update=update)


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
    """The NVMe offload folder must exist (or be creatable) and be writable."""
    if not job.offload.nvme_path or "nvme" not in (job.offload.params, job.offload.optimizer):
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


def pack_arrays(prepared) -> dict[str, Any]:
    """Packed blocks as int32 arrays: compact in Ray's object store, sliced by index."""
    arrays: dict[str, Any] = {}
    for split in ("train", "eval"):
        blocks = getattr(prepared, split)
        for key in ("input_ids", "labels", "attention_mask"):
            arrays[f"{split}_{key}"] = np.array([b[key] for b in blocks], dtype=np.int32) if blocks else None
    return arrays


class ray_session:
    """Connect to the configured Ray, or start a local one with a capped object store.

    A Ray started here is stopped on exit; one that was already running is left alone.
    """

    def __init__(self, job: JobConfig):
        self.job = job

    def __enter__(self) -> str | None:
        import ray

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
                # Ray would start an idle worker process in advance for tasks; a training
                # run starts only actors, which get processes of their own.
                _system_config={"prestart_worker_first_driver": False},
            )
        url = context.dashboard_url
        return f"http://{url}" if url and not url.startswith("http") else url

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()


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


def fit(job: JobConfig, arrays: dict[str, Any], recorder: ProgressRecorder, fingerprint: dict, resume_state,
        placement, choice) -> None:
    """Run the Ray Train workers and feed their messages to ``recorder``.

    A worker group that fails (a PC dropped out) is restarted by Ray Train from the newest
    checkpoint, with fewer workers when the job allows (``train.min_workers``), and grows
    back when the PC returns. The first Ctrl-C or SIGTERM asks the workers to finish the
    current step, save a checkpoint and stop; a second one aborts at once.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from swarm.train.failures import FailureNotes
    from swarm.train.loop import train_loop_per_worker
    from swarm.train.mailbox import start_mailbox
    from swarm.train.trainer import ProcessGroupConfig, lean_trainer

    mailbox = start_mailbox(resume_state)
    trainer = lean_trainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "data": ray.put(arrays),
            "mailbox": mailbox,
            "fingerprint": fingerprint,
            "strategy": choice.name,
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
        backend_config=ProcessGroupConfig("nccl" if placement.use_gpu else "gloo", COLLECTIVE_TIMEOUT_S),
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
        if recorder.stop_requested:
            raise KeyboardInterrupt
        recorder.stop_requested = True
        recorder.note("stopping after this step and saving a checkpoint (press Ctrl-C again to abort)")
        mailbox.request_stop.remote()

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - unwrap user errors raised inside a worker
        raise user_error_from(exc) or exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.set()
        reader.join()
        recorder.close()


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
                      choice) -> None:
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
        "strategy": choice.to_dict(),
        "data": {"format": job.data.format, **vars(stats)},
        "stopped": recorder.stopped_at is not None,
    }
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "run.json")
