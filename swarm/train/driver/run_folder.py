"""The run folder's bookkeeping: a new folder or the one ``--resume`` continues, the
newest intact checkpoint a failure line names, and ``run.json`` at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

from swarm import __version__, metrics_log
from swarm.config.models import JobConfig
from swarm.durable import write_json
from swarm.errors import UserError
from swarm.train import checkpoint
from swarm.train.driver import resume as resume_rules
from swarm.train.driver.recorder import RunRecorder


def kept_checkpoint(run_dir: Path) -> str:
    """"; the newest intact checkpoint is ..." for a failure line."""
    newest = checkpoint.newest_valid(run_dir / "checkpoints", report=lambda line: None)
    return f"; the newest intact checkpoint is {newest}" if newest else "; no checkpoint was written"


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


def write_run_summary(run_dir: Path, job: JobConfig, recorder: RunRecorder, stats, started, finished,
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
