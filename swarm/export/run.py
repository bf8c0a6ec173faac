"""Reading a run folder written by ``swarm train``: config, record, metrics, checkpoints, base.

The folder's layout (the trainer's side of the contract)::

    RUN/config.yaml        resolved JobConfig
    RUN/run.json           what happened: figures, strategy, hardware, data
    RUN/metrics.jsonl      one JSON object per logged step
    RUN/adapter/           final LoRA adapter (peft format)
    RUN/tokenizer/         tokenizer.save_pretrained output
    RUN/checkpoints/step-00000010/{adapter/, trainer_state.pt, manifest.json}

A checkpoint without ``manifest.json`` (or whose manifest does not say ``complete``) was
cut off while being written and is never exported.
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

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_STEP_DIR = re.compile(r"step-(\d+)")


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
    return RunRecord(run_dir, job, config_text, info, _read_metrics(run_dir / "metrics.jsonl"))


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A crash mid-write leaves half a line at the end; the rest is still good.
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Checkpoint folders of a run by step, complete or not."""
    found = {}
    for path in (run_dir / "checkpoints").glob("step-*"):
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def checkpoint_manifest(path: Path) -> dict | None:
    """The manifest of a complete checkpoint folder, or None when it is incomplete.

    The step comes from the manifest, or from the folder's name when the manifest lacks it.
    """
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return None
    if not isinstance(manifest.get("step"), int):
        match = _STEP_DIR.fullmatch(path.name)
        if not match:
            return None
        manifest = {**manifest, "step": int(match.group(1))}
    if not all((path / "adapter" / name).is_file() for name in ADAPTER_FILES):
        return None
    return manifest


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
    complete = [step for step, path in checkpoints(run.dir).items() if checkpoint_manifest(path)]
    available = (
        f"complete checkpoints: {', '.join(map(str, complete))}" if complete else "the run has no complete checkpoint"
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
        path = checkpoints(run.dir).get(int(text))
        if path is None:
            raise UserError(f"run {run.dir} has no checkpoint at step {int(text)} ({available})")
    else:
        path = Path(text)
        if not path.is_dir():
            raise UserError(f"checkpoint {text} does not exist ({available})")
    manifest = checkpoint_manifest(path)
    if manifest is None:
        raise UserError(
            f"checkpoint {path} is incomplete (no complete manifest.json or adapter); "
            f"it was cut off while being written ({available})"
        )
    return path / "adapter", manifest


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
