"""Checkpoints of trainable state only: the one format, its one writer and its one reader.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding

- ``adapter/``: the LoRA weights in full precision, in peft's format (loadable as is);
- ``trainer_state.safetensors``: tensors of the trainer's state, by name: Adam's moments
  (``exp_avg/NAME``, ``exp_avg_sq/NAME``), the RNG states (``rng/torch``, ``rng/cuda/I``,
  ``rng/numpy``) and a strategy's own state (``extra/NAME``: diloco's outer momentum and
  each PC's own adapter and moments, see ``swarm.train.worker.diloco.pc_state``);
- ``trainer_state.json``: the rest: the step, the number of samples seen (the data
  position), the optimizer's step count, the LR schedule and the other RNG fields;
- ``manifest.json``: the step, a fingerprint of what the run trains (to refuse an
  incompatible resume) and the SHA-256 of every file. It is written last.

A checkpoint is intact when its manifest exists and every file it lists has that SHA-256
(``verify``); resume and export both read checkpoints through this module, so they agree on
which are usable. Nothing in a checkpoint is executable: tensors are safetensors and the
rest JSON, so a checkpoint copied from elsewhere cannot run code when it is read.

Every tensor is whole (gathered from all ZeRO shards), so a checkpoint does not depend on
how many workers wrote it. The folder is first written under a temporary name, every file
and folder in it is fsynced, and only then is it renamed into place (``swarm.durable``): a crash while writing
leaves the previous checkpoints untouched, and a folder whose files do not match its
manifest is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from swarm.durable import atomic_folder
from swarm.errors import UserError

MANIFEST = "manifest.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
ADAPTER = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PREFIX = "step-"
# Fault injection for tests: pause this long (seconds) before the manifest of the
# checkpoint at step SWARM_TEST_CHECKPOINT_PAUSE_STEP is written.
PAUSE_STEP_ENV, PAUSE_SECONDS = "SWARM_TEST_CHECKPOINT_PAUSE_STEP", 120


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(folder: Path) -> int | None:
    """The step in a checkpoint folder's name, or None when the name is not one."""
    digits = folder.name.removeprefix(PREFIX)
    return int(digits) if folder.name.startswith(PREFIX) and digits.isdigit() else None


def write_checkpoint(root: Path, state: dict[str, Any], keep: int) -> Path:
    """Write one checkpoint under ``root`` atomically and keep only the newest ``keep``.

    Args:
        root: The run's ``checkpoints`` folder.
        state: From the workers: ``step``, ``samples_seen``, ``fingerprint``,
            ``peft_config``, ``adapter`` (state dict) and ``trainer`` (see ``split_state``).
        keep: How many complete checkpoints to keep.
    """
    from safetensors.torch import save

    final = root / checkpoint_name(state["step"])
    with atomic_folder(final) as tmp:
        (tmp / ADAPTER).mkdir()
        state["peft_config"].save_pretrained(tmp / ADAPTER)
        adapter = {k: v.contiguous() for k, v in state["adapter"].items()}
        (tmp / ADAPTER / "adapter_model.safetensors").write_bytes(save(adapter, metadata={"format": "pt"}))
        tensors, plain = split_state(state["trainer"])
        (tmp / STATE_TENSORS).write_bytes(save(tensors))
        (tmp / STATE_JSON).write_text(json.dumps(plain, indent=1) + "\n")

        if os.environ.get(PAUSE_STEP_ENV) == str(state["step"]):
            time.sleep(PAUSE_SECONDS)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "step": state["step"],
            "samples_seen": state["samples_seen"],
            "fingerprint": state["fingerprint"],
            "files": {str(p.relative_to(tmp)): sha256(p) for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    prune(root, keep)
    return final


def split_state(trainer: dict[str, Any]) -> tuple[dict, dict]:
    """The trainer state as (named tensors, JSON data); ``join_state`` is the inverse.

    ``trainer`` holds ``step``, ``samples_seen``, ``optimizer_step``, ``scheduler`` (a
    state dict of numbers), ``moments`` ({"exp_avg": {name: tensor}, ...}) and ``rng``
    (torch, cuda, numpy and python states).
    """
    import numpy as np
    import torch

    tensors = {f"{key}/{name}": t.contiguous() for key, by_name in trainer["moments"].items()
               for name, t in by_name.items()}
    rng = trainer["rng"]
    tensors["rng/torch"] = rng["torch"]
    for i, state in enumerate(rng["cuda"] or []):
        tensors[f"rng/cuda/{i}"] = state
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    for name, t in trainer.get("extra", {}).items():  # e.g. diloco's outer momentum
        tensors[f"extra/{name}"] = t.contiguous()
    version, python_state, gauss_next = rng["python"]
    plain = {
        "step": trainer["step"], "samples_seen": trainer["samples_seen"],
        "optimizer_step": trainer["optimizer_step"], "scheduler": trainer["scheduler"],
        "moment_keys": sorted(trainer["moments"]),
        "extra_keys": sorted(trainer.get("extra", {})),
        "diloco": trainer.get("diloco"),  # the PCs and the last exchange (swarm.train.worker.diloco.pc_state)
        "cuda_rng_states": len(rng["cuda"] or []),
        "numpy_rng": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python_rng": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    return tensors, plain


def join_state(tensors: dict, plain: dict) -> dict[str, Any]:
    """The trainer state ``split_state`` split."""
    import numpy as np

    moments = {key: {} for key in plain["moment_keys"]}
    for name, tensor in tensors.items():
        key, _, rest = name.partition("/")
        if key in moments:
            moments[key][rest] = tensor
    np_rng = plain["numpy_rng"]
    py_rng = plain["python_rng"]
    cuda = [tensors[f"rng/cuda/{i}"] for i in range(plain["cuda_rng_states"])] or None
    return {
        "step": plain["step"], "samples_seen": plain["samples_seen"], "optimizer_step": plain["optimizer_step"],
        "scheduler": plain["scheduler"], "moments": moments,
        "extra": {name: tensors[f"extra/{name}"] for name in plain.get("extra_keys", [])},
        "diloco": plain.get("diloco"),
        "rng": {
            "torch": tensors["rng/torch"], "cuda": cuda,
            "numpy": (np_rng["kind"], tensors["rng/numpy"].numpy().astype(np.uint32), np_rng["pos"],
                      np_rng["has_gauss"], np_rng["cached_gaussian"]),
            "python": (py_rng["version"], tuple(py_rng["state"]), py_rng["gauss_next"]),
        },
    }


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and stale temporary folders."""
    complete = list_checkpoints(root)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".{PREFIX}*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, intact or not, oldest first (by step)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def verify(folder: Path) -> dict:
    """The manifest of an intact checkpoint: the one definition, for resume and export alike.

    Raises:
        ValueError: what is wrong with it (missing manifest, missing or altered file).
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError("it has no manifest (it was not finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("its manifest is not valid JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        raise ValueError("its manifest lacks the step or the file list")
    for name in (*(f"{ADAPTER}/{f}" for f in ADAPTER_FILES), STATE_TENSORS, STATE_JSON):
        if name not in files:
            raise ValueError(f"its manifest does not list {name}")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if sha256(path) != digest:
            raise ValueError(f"{name} does not match its checksum")
    return manifest


def intact_checkpoints(root: Path) -> dict[int, Path]:
    """The intact checkpoints under ``root`` by step, oldest first."""
    found = {}
    for folder in list_checkpoints(root):
        try:
            found[verify(folder)["step"]] = folder
        except ValueError:
            continue
    return found


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
    """Read an intact checkpoint: adapter tensors, trainer state and manifest.

    Raises:
        UserError: the checkpoint is not intact (see ``verify``).
    """
    from safetensors.torch import load_file

    try:
        manifest = verify(folder)
    except ValueError as problem:
        raise UserError(f"checkpoint {folder} cannot be used: {problem}") from None
    state = join_state(load_file(folder / STATE_TENSORS), json.loads((folder / STATE_JSON).read_text()))
    return {
        "manifest": manifest,
        "adapter": load_file(folder / ADAPTER / "adapter_model.safetensors"),
        "trainer": state,
    }


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
