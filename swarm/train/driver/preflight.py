"""Checks of ``swarm train`` before anything is loaded: model source, offload folder, run
folder, Ray address, and the job's local paths made absolute.

Everything that can fail because of the user's input fails here or in data preparation,
before a worker starts or a weight is read, with one line (``UserError``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from swarm.config.models import HUB_PREFIX, JobConfig
from swarm.errors import UserError
from swarm.train.driver import resume as resume_rules


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
