"""Driver side of ``--resume``: which run and checkpoint, and whether the job still fits it.

A resume continues the same training: the same base model, adapter shape and data.
Settings that only say how long or how loudly to train (``max_steps``, ``log_every``,
``workers``...) may change; anything in the fingerprint may not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.train import checkpoint

# Why each fingerprint entry cannot change, for the refusal line.
REASONS = {
    "model.path": "the adapter was trained on another base model",
    "model.revision": "the adapter was trained on another revision of the base model",
    "quantization": "the adapter was trained against another quantization of the base",
    "lora.r": "the checkpoint's adapter has another shape",
    "lora.targets": "the checkpoint's adapter covers other layers",
    "lora.alpha": "the adapter's scale would change its meaning",
    "lora.use_rslora": "the adapter's scale would change its meaning (alpha / sqrt(r) against alpha / r)",
    # By the checkpoint's value: DoRA on then off drops weights, off then on has none to load.
    "lora.use_dora": {True: "the checkpoint's DoRA magnitude weights would be dropped",
                      False: "the checkpoint has no DoRA magnitude weights to continue from"},
    "data.files": "the data position refers to other data",
    "data.sha256": "the data files' content changed, so the data position is meaningless",
    "data.format": "the data would be tokenized differently",
    "data.columns": "other columns would be read",
    "data.isolate_examples": "the data would be packed differently",
    "data.seq_len": "the data would be packed differently",
    "data.seed": "the data order would differ",
}


# What checkpoints written before a key existed meant by its absence.
BEFORE_THE_KEY = {"data.columns": {}, "data.isolate_examples": False}
# Keys whose absence the checkpoint's adapter config answers (its peft LoraConfig field).
FROM_ADAPTER_CONFIG = {"lora.use_rslora": "use_rslora", "lora.use_dora": "use_dora"}


def fingerprint(job: JobConfig, data_sha256: str) -> dict[str, Any]:
    """What a checkpoint belongs to; any difference makes a resume meaningless."""
    return {
        "model.path": job.model.path,
        "model.revision": job.model.revision,
        "quantization": job.quantization.model_dump(mode="json"),
        "lora.r": job.lora.r,
        "lora.alpha": job.lora.alpha,
        "lora.use_rslora": job.lora.use_rslora,
        "lora.use_dora": job.lora.use_dora,
        "lora.targets": job.lora.targets,
        "data.files": job.data.model_dump(mode="json")["files"],
        "data.format": job.data.format,
        "data.columns": job.data.columns,
        "data.isolate_examples": job.data.isolates,
        "data.seq_len": job.data.seq_len,
        "data.seed": job.data.seed,
        "data.sha256": data_sha256,
    }


def check_compatible(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Refuse, in one line, a job that changed something the checkpoint depends on.

    Args:
        saved: The checkpoint manifest's fingerprint.
        current: ``fingerprint`` of the job resuming it.
        source: The checkpoint folder (its adapter config fills keys older fingerprints lack).
    """
    saved = {**BEFORE_THE_KEY, **adapter_variants(source, saved), **saved}
    for key, reason in REASONS.items():
        if saved.get(key) != current.get(key):
            if isinstance(reason, dict):
                reason = reason[saved.get(key)]
            raise UserError(
                f"cannot resume from {source}: {key} changed from {saved.get(key)!r} to {current.get(key)!r} "
                f"({reason}); change it back or start a new run without --resume"
            )


def adapter_variants(source: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """rsLoRA and DoRA as the checkpoint's adapter config says, for fingerprints without them."""
    if all(key in saved for key in FROM_ADAPTER_CONFIG):
        return {}
    config = json.loads((Path(source) / checkpoint.ADAPTER / "adapter_config.json").read_text())
    return {key: bool(config.get(field, False)) for key, field in FROM_ADAPTER_CONFIG.items()}


def find_run_dir(job: JobConfig, given: str | None) -> Path:
    """The run folder to continue: from a given path, ``output.name``, or the newest match.

    Args:
        job: The job being resumed (paths already absolute).
        given: ``--resume PATH`` (a run or checkpoint folder), or None.
    """
    if given:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"--resume: {given} does not exist; give a run folder or one of its checkpoint folders")
        if (path / checkpoint.MANIFEST).exists() or path.name.startswith(checkpoint.PREFIX):
            return path.parent.parent
        if path.is_dir():
            return path
        raise UserError(f"--resume: {given} is neither a run folder nor a checkpoint folder")
    root = Path(job.output.dir)
    if job.output.name:
        run_dir = root / job.output.name
        if not run_dir.is_dir():
            raise UserError(f"--resume: there is no run folder {run_dir} to resume")
        return run_dir
    candidates = []
    for config_file in root.glob("*/config.yaml"):
        try:
            saved = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            continue
        same_data = saved.get("data", {}).get("files") == job.data.model_dump(mode="json")["files"]
        if saved.get("model", {}).get("path") == job.model.path and same_data:
            candidates.append(config_file.parent)
    if not candidates:
        raise UserError(f"--resume: no earlier run of this job in {root}; run without --resume to start one")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def pick_checkpoint(run_dir: Path, given: str | None, report) -> Path:
    """The checkpoint to resume from: the given one, or the newest intact one."""
    if given and Path(given).name.startswith(checkpoint.PREFIX):
        return Path(given)
    found = checkpoint.newest_valid(run_dir / "checkpoints", report)
    if found is None:
        raise UserError(f"--resume: {run_dir} has no complete checkpoint; start a new run without --resume")
    return found
