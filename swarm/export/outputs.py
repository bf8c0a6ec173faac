"""The merged model and the GGUF files of an adapter, shared by run exports and merge exports.

``write_outputs`` folds an adapter into its base (``swarm.export.merge``) into ``OUT/NAME-merged``,
or into a scratch folder when only GGUF files are wanted, and turns that into
``OUT/NAME-gguf`` (``swarm.export.gguf``) with an Ollama Modelfile and a model card.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from swarm.durable import atomic_folder
from swarm.export.folders import scratch_folder
from swarm.export.merge import merge_adapter
from swarm.export.ollama import modelfile
from swarm.home import logs_dir

if TYPE_CHECKING:
    from swarm.export.gguf import GgufFile

# card(kind, folder, **details) -> README.md text; kind is "merged" or "gguf".
CardWriter = Callable[..., str]


def write_outputs(
    adapter_src: Path,
    base_dir: Path,
    training: dict,
    tokenizer: list[Path],
    out: Path,
    name: str,
    card: CardWriter,
    *,
    merge: bool,
    dtype: str,
    max_shard_size: int,
    gguf: list[str] | None,
    gguf_adapter: str | None,
    converter: Path | None,
) -> list["GgufFile"]:
    """Write ``OUT/NAME-merged`` (with ``merge``) and ``OUT/NAME-gguf`` (with ``gguf`` or ``gguf_adapter``).

    Args:
        adapter_src: the peft adapter folder.
        base_dir: local folder of the base weights.
        training: how training loaded the base: ``bits``, ``quant_type``, ``double_quant``,
            ``precision``, ``trust_remote_code``.
        tokenizer: tokenizer files to copy beside the merged weights.
        out: the export folder.
        name: the export's name.
        card: renders each folder's README.md.
        merge: keep the merged model (else it lives in a scratch folder while GGUFs are made).
        dtype: the merged weights' dtype.
        max_shard_size: bytes per safetensors shard.
        gguf: GGUF types to make from the merged model.
        gguf_adapter: type of the GGUF LoRA to make, or None.
        converter: llama.cpp's folder (``llama_cpp.find_converter``) when GGUFs are wanted.

    Returns:
        The GGUF files written, model files first.
    """
    files: list["GgufFile"] = []
    merged_out, gguf_out = out / f"{name}-merged", out / f"{name}-gguf"
    if merge or gguf:
        folder = atomic_folder(merged_out) if merge else scratch_folder(out, f"{name}-merged")
        with folder as tmp:
            merge_adapter(
                base_dir, adapter_src, tmp, bits=training["bits"], quant_type=training["quant_type"],
                double_quant=training["double_quant"], load_dtype=training["precision"], dtype=dtype,
                max_shard_size=max_shard_size, trust_remote_code=training["trust_remote_code"],
            )
            for file in tokenizer:
                shutil.copyfile(file, tmp / file.name)
            # Also read by llama.cpp's converter, which copies its metadata (license, tags) into the GGUF.
            (tmp / "README.md").write_text(card("merged", merged_out.resolve(), dtype=dtype))
            if gguf:
                files = _write_gguf(tmp, adapter_src, base_dir, gguf_out, name, card, gguf, gguf_adapter, dtype, converter)
    elif gguf_adapter is not None:
        files = _write_gguf(None, adapter_src, base_dir, gguf_out, name, card, [], gguf_adapter, dtype, converter)
    return files


def _write_gguf(
    merged_dir, adapter_src, base_dir, gguf_out, name, card, types, adapter_type, dtype, converter
) -> list["GgufFile"]:
    """Write ``OUT/NAME-gguf``: the model GGUFs, the adapter GGUF, a Modelfile, the model card."""
    from swarm.export.gguf import write_adapter_gguf, write_model_ggufs

    log = logs_dir() / f"export-{name}-gguf.log"
    log.unlink(missing_ok=True)
    with atomic_folder(gguf_out) as tmp:
        files = write_model_ggufs(merged_dir, tmp, name, types, dtype, converter, log) if types else []
        if adapter_type is not None:
            files.append(write_adapter_gguf(adapter_src, base_dir, tmp, name, adapter_type, converter, log))
        if types:
            (tmp / "Modelfile").write_text(modelfile(files[0].path.name, *chat_tokenizer(merged_dir)))
        final = [replace(f, path=gguf_out / f.path.name) for f in files]
        text = card("gguf", gguf_out.resolve(), dtype=dtype if types else None, gguf_files=final, has_modelfile=bool(types))
        (tmp / "README.md").write_text(text)
    return final


def chat_tokenizer(folder: Path) -> tuple[str | None, str | None]:
    """The chat template and EOS token of the tokenizer in ``folder``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return template, tokenizer.eos_token


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)


def tokenizer_files(base_dir: Path, fallback: Path | None) -> list[Path]:
    """The base's tokenizer files as they are, for a merged model; ``fallback``'s files if it has none.

    Not the run's re-saved copy: transformers 5 writes a SentencePiece tokenizer as
    ``tokenizer.json`` alone, without the ``tokenizer.model`` and ``added_tokens.json`` that
    llama.cpp's converter reads. Training never changes the vocabulary, so the base's files
    are the run's tokenizer.
    """
    files = [base_dir / n for n in TOKENIZER_FILES if (base_dir / n).is_file()]
    if not files and fallback is not None and fallback.is_dir():
        skip = {"README.md", "adapter_config.json", "adapter_model.safetensors", "swarm-merge.json"}
        files = [p for p in fallback.iterdir() if p.is_file() and p.name not in skip]
    return files
