"""Exports of a finished run: the adapter folder, a merged model, GGUF files, model cards, names.

``export_run`` writes, from a run folder made by ``swarm train``::

    OUT/NAME/          the LoRA adapter (peft format), tokenizer, README.md model card
    OUT/NAME-merged/   with merge=True: the base with the adapter folded in, as safetensors
                       shards with config, tokenizer and README.md; loads without peft
    OUT/NAME-gguf/     with gguf / gguf_adapter: NAME-TYPE.gguf per type (llama.cpp's own
                       converter and quantizer), NAME-lora-TYPE.gguf, an Ollama Modelfile
                       and README.md listing the files

OUT defaults to ``RUN/export`` and NAME to the run's name (see ``swarm.export.names``), or
``{run name}-step{N}`` for the checkpoint at step N.
Each folder is written under a temporary name next to it and renamed when complete, so a
crash never leaves a half export under the real name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.errors import UserError
from swarm.export.adapters_merge import RECORD
from swarm.export.card import base_license, render_card
from swarm.durable import atomic_folder
from swarm.export.folders import check_replaceable
from swarm.export.merge import DTYPES, parse_size
from swarm.export.names import checkpoint_name, validate_name
from swarm.export.outputs import tokenizer_files, write_outputs
from swarm.export.run import ADAPTER_FILES, load_run, resolve_adapter, resolve_base

if TYPE_CHECKING:
    from swarm.export.gguf import GgufFile



@dataclass(frozen=True)
class Exported:
    """The folders an export wrote.

    Attributes:
        adapter: ``OUT/NAME``, the adapter (peft format) with its model card.
        merged: ``OUT/NAME-merged`` when a merged model was asked for, else None.
        gguf: ``OUT/NAME-gguf`` when GGUF files were asked for, else None.
        gguf_files: the GGUF files in ``gguf``, model files first, then the adapter.
    """

    adapter: Path
    merged: Path | None = None
    gguf: Path | None = None
    gguf_files: list["GgufFile"] = field(default_factory=list)


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
    gguf: list[str] | None = None,
    gguf_adapter: str | None = None,
    llama_cpp_dir: str | Path | None = None,
) -> Exported:
    """Export a run's adapter (and a merged model, GGUF files), each folder with a model card.

    Args:
        run_dir: the run folder, or a ``swarm merge`` folder (an adapter already: only its
            merged model and GGUF files are written, to its parent folder by default).
        out_dir: folder to write the exports into; default ``RUN/export``.
        checkpoint: a step number or checkpoint folder to export instead of the final adapter.
        merge: also write the merged model to ``OUT/NAME-merged``.
        dtype: dtype of the merged weights: ``bf16``, ``fp16`` or ``fp32``.
        name: export name; default the run's name (``{name}-step{N}`` for a checkpoint).
            Checked by ``validate_name``.
        base: local folder of the base model; default ``model.path`` of the run (a folder,
            or a hub id found in the local Hugging Face cache).
        max_shard_size: largest shard of merged weights, e.g. ``2GB`` or ``500MB``.
        gguf: GGUF types (``f16``, ``q8_0``, ``q4_k_m``, ...) to write to ``OUT/NAME-gguf``
            from the merged model, with an Ollama Modelfile; the merge happens in a temporary
            folder unless ``merge`` keeps it.
        gguf_adapter: also write the adapter as a GGUF LoRA of this type (``f16``, ...).
        llama_cpp_dir: a llama.cpp checkout whose converters to use (see ``swarm.export.llama_cpp``).

    Raises:
        UserError: not a run folder, a missing or incomplete checkpoint, a bad name, an
            existing folder that is not a swarm export, no local base weights (merge, GGUF),
            llama.cpp's tools missing or refusing the model, a merge folder with nothing asked.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    wants_gguf = bool(gguf) or gguf_adapter is not None
    if (Path(run_dir) / RECORD).is_file():
        if checkpoint is not None:
            raise UserError(f"{run_dir} is a `swarm merge` folder; it has no checkpoints")
        if not (merge or wants_gguf):
            raise UserError(f"{run_dir} is an adapter already; ask for --merge, --gguf or --gguf-adapter")
        options = dict(merge=merge, dtype=dtype, max_shard_size=shard_bytes, gguf=gguf, gguf_adapter=gguf_adapter)
        return _export_merge(Path(run_dir), out_dir, name, base, llama_cpp_dir, options)
    run = load_run(run_dir)
    if name is not None:
        validate_name(name)
    else:
        recorded = run.info.get("name") or run.job.output.name or run.dir.name
        try:
            validate_name(recorded)
        except UserError as exc:
            raise UserError(f"{exc}; give the export a valid name with --name") from None
    adapter_src, manifest = resolve_adapter(run, checkpoint)
    if name is None:
        name = recorded if manifest is None else checkpoint_name(recorded, manifest["step"])
    out = Path(out_dir) if out_dir is not None else run.dir / "export"
    adapter_out, merged_out, gguf_out = out / name, out / f"{name}-merged", out / f"{name}-gguf"
    for target in [adapter_out, *([merged_out] if merge else []), *([gguf_out] if wants_gguf else [])]:
        check_replaceable(target)
    # Everything that can refuse comes before the first folder is written.
    if gguf_adapter is not None:
        from swarm.export.gguf import check_adapter_convertible

        check_adapter_convertible(adapter_src)
    converter = _converter(llama_cpp_dir, gguf) if wants_gguf else None
    model = run.job.model
    if merge or wants_gguf:
        base_dir = _base_folder(base, model.path, model.revision)
    else:
        try:  # only for the license in the card; an adapter export needs no base weights
            base_dir = _base_folder(base, model.path, model.revision)
        except UserError:
            if base is not None:
                raise
            base_dir = None
    local = Path(model.path).expanduser()
    base_ref = str(local.resolve()) if local.is_dir() else model.path
    run_tokenizer = run.dir / "tokenizer"
    tokenizer = [p for p in run_tokenizer.iterdir() if p.is_file()] if run_tokenizer.is_dir() else []
    card = dict(
        name=name, base_ref=base_ref, license_meta=base_license(base_dir), manifest=manifest,
        has_tokenizer=bool(tokenizer),
    )

    q = run.job.quantization
    training = dict(bits=q.bits, quant_type=q.quant_type, double_quant=q.double_quant, precision=run.precision,
                    trust_remote_code=model.trust_remote_code) if (merge or wants_gguf) else {}

    with atomic_folder(adapter_out) as tmp:
        for file in [*(adapter_src / f for f in ADAPTER_FILES), *tokenizer]:
            shutil.copyfile(file, tmp / file.name)
        text = render_card(run, kind="adapter", folder=adapter_out.resolve(), **card)
        (tmp / "README.md").write_text(text)
    files = write_outputs(
        adapter_src, base_dir, training, tokenizer_files(base_dir, run_tokenizer) if training else [], out, name,
        lambda kind, folder, **extra: render_card(run, kind=kind, folder=folder, **card, **extra),
        merge=merge, dtype=dtype, max_shard_size=shard_bytes, gguf=gguf, gguf_adapter=gguf_adapter, converter=converter,
    )
    return Exported(adapter_out, merged_out if merge else None, gguf_out if wants_gguf else None, files)


def _export_merge(merge_dir: Path, out_dir, name, base, llama_cpp_dir, options: dict) -> Exported:
    """Export a ``swarm merge`` folder: its merged model and GGUF files (it is an adapter already).

    Writes ``OUT/NAME-merged`` and ``OUT/NAME-gguf``, OUT defaulting to the merge folder's
    parent and NAME to its name; ``options`` are ``write_outputs``' keyword arguments.
    """
    from swarm.export.adapters_merge import record_of
    from swarm.export.merge_card import render_merge_card

    record = record_of(merge_dir)
    name = validate_name(name) if name is not None else merge_dir.name
    out = Path(out_dir) if out_dir is not None else merge_dir.parent
    merged_out, gguf_out = out / f"{name}-merged", out / f"{name}-gguf"
    wants_gguf = bool(options["gguf"]) or options["gguf_adapter"] is not None
    for target in [*([merged_out] if options["merge"] else []), *([gguf_out] if wants_gguf else [])]:
        check_replaceable(target)
    converter = _converter(llama_cpp_dir, options["gguf"]) if wants_gguf else None
    base_dir = _base_folder(base, record["base"]["path"], record["base"].get("revision"))
    training = {**record["training"], "trust_remote_code": record["base"].get("trust_remote_code", False)}
    files = write_outputs(
        merge_dir, base_dir, training, tokenizer_files(base_dir, merge_dir), out, name,
        lambda kind, folder, **extra: render_merge_card(record, kind, folder, **extra), converter=converter, **options,
    )
    return Exported(merge_dir, merged_out if options["merge"] else None, gguf_out if wants_gguf else None, files)


def _converter(llama_cpp_dir: str | Path | None, gguf: list[str] | None) -> Path:
    """llama.cpp's converters, and its quantizer when a type needs it: checked before any work."""
    # Imported here, not at the top: `python -m swarm.export.llama_cpp` runs that module as a script.
    from swarm.export.llama_cpp import CONVERTER_TYPES, INSTALL_HINT, bindings_version, find_converter

    quantized = [t for t in gguf or [] if t not in CONVERTER_TYPES]
    if quantized and bindings_version() is None:
        raise UserError(f"making {', '.join(quantized)} needs llama.cpp's quantizer; {INSTALL_HINT}")
    return find_converter(llama_cpp_dir)


def _base_folder(base: str | Path | None, model_path: str, revision: str | None) -> Path:
    """``--base`` when given (it must exist), else the base the run names (local or cached)."""
    if base is not None:
        if not Path(base).is_dir():
            raise UserError(f"base model folder {base} does not exist")
        return Path(base)
    return resolve_base(model_path, revision)
