"""Reading a run folder written by ``swarm train``: config, record, metrics, checkpoints, base.

The folder's layout (the trainer's side of the contract)::

    RUN/config.yaml        resolved JobConfig
    RUN/run.json           what happened: figures, strategy, hardware, data
    RUN/metrics.jsonl      one JSON object per logged step
    RUN/adapter/           final LoRA adapter (peft format)
    RUN/tokenizer/         tokenizer.save_pretrained output
    RUN/checkpoints/step-00000010/   a checkpoint (format: swarm.train.checkpoint)

Only an intact checkpoint is exported: one whose manifest lists files that all match their
SHA-256 (``swarm.train.checkpoint.verify``, the same test a resume makes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from swarm.config.loading import describe_validation_error
from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.metrics_log import FILE as METRICS_FILE
from swarm.metrics_log import read_metrics

from swarm.train.checkpoint import ADAPTER_FILES  # noqa: F401 - the adapter folder's files, for export


@dataclass(frozen=True)
class RunRecord:
    """Everything an export needs to know about a finished (or interrupted) run.

    Attributes:
        dir: the run folder.
        job: the resolved job config from ``config.yaml``.
        config_text: ``config.yaml`` as written, for the model card.
        info: ``run.json`` (empty when the run never wrote it).
        metrics: the lines of ``metrics.jsonl`` in order; a torn last line is left out.
    """

    dir: Path
    job: JobConfig
    config_text: str
    info: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)

    @property
    def precision(self) -> str:
        """The precision the run trained in: ``bf16``, ``fp16`` or ``fp32``.

        Raises:
            UserError: neither run.json nor config.yaml says which.
        """
        value = self.info.get("precision") or self.job.train.precision
        if value not in ("bf16", "fp16", "fp32"):
            raise UserError(
                f"{self.dir}/run.json does not record the precision the run used (bf16, fp16 or fp32), "
                "which the merge needs to reproduce the 4-bit base"
            )
        return value


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a run folder.

    Raises:
        UserError: the folder is missing, has no ``config.yaml``, or a file in it is unreadable.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        what = "does not exist" if not run_dir.exists() else "is not a swarm run folder (no config.yaml)"
        raise UserError(f"{run_dir} {what}")
    config_text = config_file.read_text()
    try:
        job = JobConfig.model_validate(yaml.safe_load(config_text) or {})
    except yaml.YAMLError as exc:
        raise UserError(f"{config_file} is not valid YAML: {' '.join(str(exc).split())}") from None
    except ValidationError as exc:
        raise UserError(f"{config_file}: {describe_validation_error(exc)}") from None
    info = {}
    if (run_dir / "run.json").is_file():
        try:
            info = json.loads((run_dir / "run.json").read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{run_dir}/run.json is not valid JSON ({exc})") from None
    return RunRecord(run_dir, job, config_text, info, read_metrics(run_dir / METRICS_FILE))


def resolve_adapter(run: RunRecord, checkpoint: str | int | Path | None) -> tuple[Path, dict | None]:
    """The adapter folder to export: the run's final one, or a complete checkpoint's.

    Args:
        run: the run.
        checkpoint: None for the final adapter; a step number (``10`` or ``"10"``); or the
            path of a checkpoint folder.

    Returns:
        ``(adapter folder, manifest)``; the manifest is None for the final adapter.

    Raises:
        UserError: no final adapter, or the checkpoint is missing or incomplete.
    """
    from swarm.train import checkpoint as ckpt

    intact = ckpt.intact_checkpoints(run.dir / "checkpoints")
    available = (
        f"intact checkpoints: {', '.join(map(str, intact))}" if intact else "the run has no intact checkpoint"
    )
    if checkpoint is None:
        adapter = run.dir / "adapter"
        if not all((adapter / name).is_file() for name in ADAPTER_FILES):
            raise UserError(
                f"{run.dir} has no final adapter (training did not finish); "
                f"export a checkpoint with --checkpoint STEP ({available})"
            )
        return adapter, None
    text = str(checkpoint)
    if text.isdigit():
        by_step = {ckpt.step_of(p): p for p in ckpt.list_checkpoints(run.dir / "checkpoints")}
        path = by_step.get(int(text))
        if path is None:
            raise UserError(f"run {run.dir} has no checkpoint at step {int(text)} ({available})")
    else:
        path = Path(text)
        if not path.is_dir():
            raise UserError(f"checkpoint {text} does not exist ({available})")
    try:
        manifest = ckpt.verify(path)
    except ValueError as problem:
        raise UserError(f"checkpoint {path} cannot be exported: {problem} ({available})") from None
    return path / ckpt.ADAPTER, manifest


def resolve_base(model_path: str, revision: str | None = None) -> Path:
    """The local folder holding the base model's weights.

    ``model.path`` is used as a folder when it is one; otherwise it is read as a hub id and
    looked up in the local Hugging Face cache, where training downloaded it. Nothing is
    downloaded here.

    Raises:
        UserError: the base is neither a local folder nor in the cache.
    """
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model_path):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model_path, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not cached"; the line below says what to do
            pass
    raise UserError(
        f"base model {model_path} is not a local folder nor in the Hugging Face cache; merging needs "
        "the base weights on this machine: download them or pass --base DIR"
    )
