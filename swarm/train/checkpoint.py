"""Checkpoints of trainable state only, written by the driver, atomically.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding

- ``adapter/``: the LoRA weights in full precision, in peft's format (loadable as is);
- ``trainer_state.pt``: optimizer moments per parameter name, optimizer and scheduler
  state, the step, the number of samples seen (the data position) and RNG states;
- ``manifest.json``: the step, a fingerprint of what the run trains (to refuse an
  incompatible resume) and the SHA-256 of every file. It is written last.

Every tensor is whole (gathered from all ZeRO-3 shards), so a checkpoint does not depend
on how many workers wrote it. The folder is first written under a temporary name, every
file and the folder are fsynced, and only then is it renamed into place: a crash while
writing leaves the previous checkpoints untouched, and a folder whose files do not match
its manifest is reported and skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from swarm.durable import fsync_path, write_bytes
from swarm.errors import UserError

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"
PREFIX = "step-"
# Fault injection for tests: pause this long (seconds) before the manifest of the
# checkpoint at step SWARM_TEST_CHECKPOINT_PAUSE_STEP is written.
PAUSE_STEP_ENV, PAUSE_SECONDS = "SWARM_TEST_CHECKPOINT_PAUSE_STEP", 120


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def write_checkpoint(root: Path, state: dict[str, Any], keep: int) -> Path:
    """Write one checkpoint under ``root`` atomically and keep only the newest ``keep``.

    Args:
        root: The run's ``checkpoints`` folder.
        state: From the workers: ``step``, ``samples_seen``, ``fingerprint``,
            ``peft_config``, ``adapter`` (state dict) and ``trainer`` (the rest).
        keep: How many complete checkpoints to keep.
    """
    import torch
    from safetensors.torch import save

    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state["step"])
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "adapter").mkdir(parents=True)

    state["peft_config"].save_pretrained(tmp / "adapter")
    adapter = {k: v.contiguous() for k, v in state["adapter"].items()}
    write_bytes(tmp / "adapter" / "adapter_model.safetensors", save(adapter, metadata={"format": "pt"}))
    buffer = io.BytesIO()
    torch.save(state["trainer"], buffer)
    write_bytes(tmp / STATE_FILE, buffer.getvalue())

    if os.environ.get(PAUSE_STEP_ENV) == str(state["step"]):
        time.sleep(PAUSE_SECONDS)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "step": state["step"],
        "samples_seen": state["samples_seen"],
        "fingerprint": state["fingerprint"],
        "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
    }
    write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    for folder in (tmp / "adapter", tmp):
        fsync_path(folder)
    if final.exists():  # a checkpoint of this step from an earlier attempt
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and stale temporary folders."""
    complete = list_checkpoints(root)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (by step)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(folder: Path) -> dict:
    """The manifest of a complete, intact checkpoint.

    Raises:
        ValueError: what is wrong with it (missing manifest, missing or altered file).
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError("it has no manifest (it was not finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise ValueError("its manifest is not valid JSON") from None
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if _sha256(path) != digest:
            raise ValueError(f"{name} does not match its checksum")
    return manifest


def newest_valid(root: Path, report) -> Path | None:
    """The newest intact checkpoint under ``root``; each broken one is reported and skipped."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify(folder)
            return folder
        except ValueError as problem:
            report(f"warning: skipping checkpoint {folder}: {problem}")
    return None


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """Read a verified checkpoint: adapter tensors, trainer state and manifest."""
    import torch
    from safetensors.torch import load_file

    try:
        manifest = verify(folder)
    except ValueError as problem:
        raise UserError(f"checkpoint {folder} cannot be used: {problem}") from None
    return {
        "manifest": manifest,
        "adapter": load_file(folder / "adapter" / "adapter_model.safetensors"),
        "trainer": torch.load(folder / STATE_FILE, weights_only=False),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
