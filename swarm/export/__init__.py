"""Exports of a finished run: the adapter folder, a merged model, their model cards and names.

``export_run`` writes, from a run folder made by ``swarm train``::

    OUT/NAME/          the LoRA adapter (peft format), tokenizer, README.md model card
    OUT/NAME-merged/   with merge=True: the base with the adapter folded in, as safetensors
                       shards with config, tokenizer and README.md; loads without peft

OUT defaults to ``RUN/export`` and NAME to the run's name (see ``swarm.export.names``), or
``{run name}-step{N}`` for the checkpoint at step N.
Each folder is written under a temporary name next to it and renamed when complete, so a
crash never leaves a half export under the real name.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from swarm.errors import UserError
from swarm.export.card import base_license, front_matter, render_card
from swarm.durable import fsync_path
from swarm.export.merge import DTYPES, merge_adapter, parse_size
from swarm.export.names import checkpoint_name, run_name, validate_name
from swarm.export.run import ADAPTER_FILES, load_run, resolve_adapter, resolve_base

__all__ = ["export_run", "run_name", "validate_name"]


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    checkpoint: str | int | Path | None = None,
    merge: bool = False,
    dtype: str = "bf16",
    name: str | None = None,
    *,
    base: str | Path | None = None,
    max_shard_size: str | int = "2GB",
) -> Path:
    """Export a run's adapter (and, with ``merge``, a merged model), each with a model card.

    Args:
        run_dir: the run folder.
        out_dir: folder to write the exports into; default ``RUN/export``.
        checkpoint: a step number or checkpoint folder to export instead of the final adapter.
        merge: also write the merged model to ``OUT/NAME-merged``.
        dtype: dtype of the merged weights: ``bf16``, ``fp16`` or ``fp32``.
        name: export name; default the run's name (``{name}-step{N}`` for a checkpoint).
            Checked by ``validate_name``.
        base: local folder of the base model; default ``model.path`` of the run (a folder,
            or a hub id found in the local Hugging Face cache).
        max_shard_size: largest shard of merged weights, e.g. ``2GB`` or ``500MB``.

    Returns:
        The merged model's folder when ``merge`` is set (the adapter folder is its sibling
        ``OUT/NAME``), else the adapter folder.

    Raises:
        UserError: not a run folder, a missing or incomplete checkpoint, a bad name, an
            existing folder that is not a swarm export, or (merge) no local base weights.
    """
    run = load_run(run_dir)
    if name is not None:
        validate_name(name)
    else:
        recorded = run.info.get("name") or run.job.output.name or run.dir.name
        try:
            validate_name(recorded)
        except UserError as exc:
            raise UserError(f"{exc}; give the export a valid name with --name") from None
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    adapter_src, manifest = resolve_adapter(run, checkpoint)
    if name is None:
        name = recorded if manifest is None else checkpoint_name(recorded, manifest["step"])
    out = Path(out_dir) if out_dir is not None else run.dir / "export"
    adapter_out, merged_out = out / name, out / f"{name}-merged"
    for target in [adapter_out, *([merged_out] if merge else [])]:
        _check_replaceable(target)

    model = run.job.model
    if base is not None and not Path(base).is_dir():
        raise UserError(f"base model folder {base} does not exist")
    base_dir = Path(base) if base is not None else None
    if merge and base_dir is None:
        base_dir = resolve_base(model.path, model.revision)  # fail here, before writing anything
    load_dtype = run.precision if merge else None
    if base_dir is None:
        try:  # only for the license in the card; an adapter export needs no base weights
            base_dir = resolve_base(model.path, model.revision)
        except UserError:
            pass
    local = Path(model.path).expanduser()
    base_ref = str(local.resolve()) if local.is_dir() else model.path
    tokenizer = run.dir / "tokenizer"
    tokenizer_files = [p for p in tokenizer.iterdir() if p.is_file()] if tokenizer.is_dir() else []
    card = dict(
        name=name, base_ref=base_ref, license_meta=base_license(base_dir), manifest=manifest,
        has_tokenizer=bool(tokenizer_files),
    )

    with _atomic_folder(adapter_out) as tmp:
        for file in [*(adapter_src / f for f in ADAPTER_FILES), *tokenizer_files]:
            shutil.copyfile(file, tmp / file.name)
        text = render_card(run, kind="adapter", folder=adapter_out.resolve(), **card)
        (tmp / "README.md").write_text(text)
    if not merge:
        return adapter_out
    q = run.job.quantization
    with _atomic_folder(merged_out) as tmp:
        merge_adapter(
            base_dir, adapter_src, tmp, bits=q.bits, quant_type=q.quant_type, double_quant=q.double_quant,
            load_dtype=load_dtype, dtype=dtype, max_shard_size=shard_bytes,
            trust_remote_code=model.trust_remote_code,
        )
        for file in tokenizer_files:
            shutil.copyfile(file, tmp / file.name)
        text = render_card(run, kind="merged", folder=merged_out.resolve(), dtype=dtype, **card)
        (tmp / "README.md").write_text(text)
    return merged_out


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier swarm export."""
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; remove it or choose another --out")
    readme = target / "README.md"
    tags = front_matter(readme.read_text(errors="replace")).get("tags") if readme.is_file() else None
    earlier_export = isinstance(tags, list) and "swarm" in tags
    if any(target.iterdir()) and not earlier_export:
        raise UserError(f"{target} exists and is not a swarm export; remove it or choose another --out or --name")


@contextmanager
def _atomic_folder(target: Path):
    """Yield a temporary folder next to ``target`` that becomes ``target`` once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial"
    old = target.parent / f".{target.name}.old"
    for leftover in (tmp, old):  # from an export that crashed
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)

