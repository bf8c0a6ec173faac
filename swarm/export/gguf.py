"""GGUF files of an export, for llama.cpp, Ollama and LM Studio, made with llama.cpp's own tools.

From a merged model folder, ``write_model_ggufs`` writes ``NAME-TYPE.gguf`` for each asked
type: f16, bf16 and q8_0 straight from llama.cpp's converter; the k-quants (and q4_0, q5_0)
from llama.cpp's quantizer, fed by a lossless GGUF of the merged weights' own dtype (bf16,
f16 or f32), which is one of the asked files when it can be, else a temporary one.
``write_adapter_gguf`` writes the LoRA adapter as a GGUF LoRA (``NAME-lora-TYPE.gguf``) for
users who keep the base GGUF they already have (``llama-cli -m BASE.gguf --lora FILE``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import UserError
from swarm.export import llama_cpp
from swarm.export.llama_cpp import CONVERTER_TYPES, GGUF_TYPES

ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TYPE = "q4_k_m"
_LOSSLESS = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}  # merged dtype -> GGUF type that keeps it


@dataclass(frozen=True)
class GgufFile:
    """One GGUF file written by an export.

    Attributes:
        path: the file.
        gguf_type: ``f16``, ``q4_k_m``, ... (lower case, as given on the command line).
        size_bytes: its size on disk.
        seconds: wall time spent making it (for a k-quant: the quantizer's run only).
        adapter: whether it is a GGUF LoRA rather than a whole model.
    """

    path: Path
    gguf_type: str
    size_bytes: int
    seconds: float
    adapter: bool = False


def parse_types(text: str | None) -> list[str]:
    """The GGUF types in ``q4_k_m,q8_0`` (case-insensitive, in order, each once).

    Raises:
        UserError: an unknown type.
    """
    types = []
    for item in (text or DEFAULT_TYPE).split(","):
        gguf_type = item.strip().lower()
        if gguf_type not in GGUF_TYPES:
            raise UserError(f"--gguf: unknown type {item.strip()!r}; choose from {', '.join(GGUF_TYPES)}")
        if gguf_type not in types:
            types.append(gguf_type)
    return types


def parse_adapter_type(text: str | None) -> str:
    """The GGUF LoRA's type (default f16).

    Raises:
        UserError: a type the LoRA converter does not write.
    """
    gguf_type = (text or "f16").strip().lower()
    if gguf_type not in ADAPTER_TYPES:
        raise UserError(f"--gguf-adapter: type {text!r} is not one of {', '.join(ADAPTER_TYPES)}")
    return gguf_type


def file_name(name: str, gguf_type: str, adapter: bool = False) -> str:
    """``NAME-Q4_K_M.gguf``, or ``NAME-lora-F16.gguf`` for an adapter (llama.cpp's casing of types)."""
    return f"{name}-{'lora-' if adapter else ''}{gguf_type.upper()}.gguf"


def write_model_ggufs(
    merged_dir: Path, dest: Path, name: str, types: list[str], merged_dtype: str, converter: Path, log: Path
) -> list[GgufFile]:
    """Convert the merged model in ``merged_dir`` to one GGUF per type in ``dest``.

    Args:
        merged_dir: a merged export (config, safetensors, tokenizer files with ``tokenizer.model``
            for a SentencePiece tokenizer).
        dest: folder to write to.
        name: the export's name, the stem of each file.
        types: GGUF types, from ``parse_types``.
        merged_dtype: the merged weights' dtype (bf16, fp16, fp32), for the quantizer's input.
        converter: llama.cpp folder from ``llama_cpp.find_converter``.
        log: file that collects the tools' output.

    Raises:
        UserError: a tool refused the model (its reason in one line).
    """
    written: dict[str, GgufFile] = {}
    for gguf_type in [t for t in types if t in CONVERTER_TYPES]:
        written[gguf_type] = _timed(
            gguf_type, dest / file_name(name, gguf_type),
            lambda out, t=gguf_type: llama_cpp.convert_model(converter, merged_dir, out, t, log),
        )
    quantized = [t for t in types if t not in CONVERTER_TYPES]
    if quantized:
        lossless = _LOSSLESS[merged_dtype]
        source = written[lossless].path if lossless in written else dest / f".{name}-{lossless}.gguf.tmp"
        if lossless not in written:
            llama_cpp.convert_model(converter, merged_dir, source, lossless, log)
        try:
            for gguf_type in quantized:
                written[gguf_type] = _timed(
                    gguf_type, dest / file_name(name, gguf_type),
                    lambda out, t=gguf_type: llama_cpp.quantize(source, out, t, log),
                )
        finally:
            if lossless not in written:
                source.unlink(missing_ok=True)
    return [written[t] for t in types]


def check_adapter_convertible(adapter_dir: Path) -> None:
    """Refuse, before anything is written, an adapter a GGUF LoRA cannot hold (DoRA's magnitudes)."""
    if json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("use_dora"):
        raise UserError("--gguf-adapter: a DoRA adapter has no GGUF LoRA form (llama.cpp adds only B @ A to "
                        "the base); export the merged model instead: --merge --gguf")


def write_adapter_gguf(
    adapter_dir: Path, base_dir: Path, dest: Path, name: str, gguf_type: str, converter: Path, log: Path
) -> GgufFile:
    """Convert a peft LoRA adapter to a GGUF LoRA that llama.cpp applies to a GGUF of its base.

    Raises:
        UserError: the converter refused the adapter.
    """
    return _timed(
        gguf_type, dest / file_name(name, gguf_type, adapter=True),
        lambda out: llama_cpp.convert_adapter(converter, adapter_dir, base_dir, out, gguf_type, log),
        adapter=True,
    )


def _timed(gguf_type: str, path: Path, make, adapter: bool = False) -> GgufFile:
    start = time.perf_counter()
    make(path)
    if not path.is_file():
        raise UserError(f"llama.cpp's tools reported success but wrote no {path.name}")
    return GgufFile(path, gguf_type, path.stat().st_size, time.perf_counter() - start, adapter)
