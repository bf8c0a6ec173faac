"""The parts of a model card that describe GGUF files: what each file is, and how to run it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarm.export.llama_build import install_command

if TYPE_CHECKING:
    from swarm.export.gguf import GgufFile

# What each type is, in the words llama.cpp's quantize tool uses for them.
TYPE_NOTES = {
    "f32": "32-bit floats, lossless", "f16": "16-bit floats", "bf16": "bfloat16, the merged weights as they are",
    "q8_0": "8-bit, nearly lossless", "q6_k": "6-bit k-quant", "q5_k_m": "5-bit k-quant, medium",
    "q5_k_s": "5-bit k-quant, small", "q4_k_m": "4-bit k-quant, medium: the usual choice",
    "q4_k_s": "4-bit k-quant, small", "q3_k_l": "3-bit k-quant, large", "q3_k_m": "3-bit k-quant, medium",
    "q3_k_s": "3-bit k-quant, small", "q2_k": "2-bit k-quant", "q4_0": "4-bit, legacy", "q5_0": "5-bit, legacy",
}


def files_section(files: list["GgufFile"]) -> str:
    """A table of the GGUF files: name, type, size."""
    rows = ["| File | Type | Size |", "| --- | --- | --- |"]
    for f in files:
        kind = "LoRA adapter, " if f.adapter else ""
        rows.append(f"| `{f.path.name}` | {f.gguf_type.upper()} ({kind}{TYPE_NOTES.get(f.gguf_type, '')}) "
                    f"| {human_size(f.size_bytes)} ({f.size_bytes:,} bytes) |")
    return "## GGUF files\n\n" + "\n".join(rows)


def running_section(files: list["GgufFile"], base_ref: str, has_modelfile: bool) -> str:
    """How to run the files with llama.cpp, Ollama and LM Studio."""
    models = [f for f in files if not f.adapter]
    adapters = [f for f in files if f.adapter]
    parts = ["## How to run it"]
    if models:
        first = models[0].path.name
        parts.append(f"With llama.cpp: `llama-cli -m {first} -cnv`; with llama-cpp-python: "
                     f"`Llama(model_path=\"{first}\")`, installed built for every CPU with "
                     f"`{install_command('llama-cpp-python')}` (pip's own build targets the CPU that builds it, and one "
                     "made on an Intel Xeon with AMX crashed on quantized GGUFs there).")
        if has_modelfile:
            parts.append(f"With Ollama, from this folder (the Modelfile uses `{first}`; change its FROM line "
                         "for another file): `ollama create my-model -f Modelfile && ollama run my-model`.")
        parts.append("LM Studio and other llama.cpp-based apps open the `.gguf` files directly.")
    if adapters:
        parts.append(
            f"The LoRA adapter `{adapters[0].path.name}` applies to a GGUF of the base model (`{base_ref}`), "
            f"which you may already have: `llama-cli -m BASE.gguf --lora {adapters[0].path.name}`; in Ollama, "
            f"`FROM BASE.gguf` and `ADAPTER ./{adapters[0].path.name}` in a Modelfile."
        )
    return "\n\n".join(parts)


def human_size(size: int) -> str:
    """``4.1 GB``, ``812 MB``, ``95 kB``: decimal units, as file managers and the Hub show them."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 100 * scale else f"{size / scale:.0f} {unit}"
    return f"{size} B"
