"""A base to fine-tune from a GGUF file a user already has (llama.cpp, Ollama, LM Studio).

transformers reads GGUF files (``from_pretrained(folder, gguf_file=NAME)``, with the ``gguf``
package): it dequantizes every tensor and rebuilds the tokenizer, chat template included,
from the file's metadata. A model loaded that way refuses ``save_pretrained`` (it carries
a GGUF ``quantization_config``), so its weights are copied into a model made from the same
config without it, which saves as an ordinary Hugging Face folder that ``swarm train``,
peft and llama.cpp's converter read.

Limits, said in the folder's README.md too: a quantized GGUF's weights are not the original
ones (a Q4 file keeps about 4.5 bits per weight; the fine-tune starts from the dequantized
values, and a merged export of it carries them); only the architectures transformers' GGUF
loader knows convert (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3, ...).
"""

from __future__ import annotations

from pathlib import Path

from swarm.errors import UserError

DTYPES = ("bfloat16", "float16", "float32")

NOTE = """# {name}

Converted by `swarm from-gguf` from `{source}` ({file_type}).

The weights are the GGUF's, dequantized to {dtype}: where the file was quantized they are not
the original model's weights, and neither is a fine-tune or merged export made from them.
Fetch the original Hugging Face folder when you can.
"""


def read_gguf_header(path: Path) -> tuple[str, str]:
    """The architecture and file type a GGUF's metadata names.

    Raises:
        UserError: the file is missing or not a GGUF.
    """
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    from gguf import GGUFReader
    from gguf.constants import LlamaFileType

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.parts[field.data[0]]

    arch = value("general.architecture")
    kind = value("general.file_type")
    arch_name = bytes(arch).decode() if arch is not None else "unknown"
    try:
        kind_name = LlamaFileType(int(kind[0])).name.removeprefix("MOSTLY_") if kind is not None else "unknown"
    except ValueError:
        kind_name = f"file type {int(kind[0])}"
    return arch_name, kind_name


def hf_folder_from_gguf(gguf_path: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Write ``gguf_path``'s model and tokenizer to ``out`` as a Hugging Face folder.

    Args:
        gguf_path: the GGUF file.
        out: the folder to write (must not exist; written whole or not at all).
        dtype: the saved weights' dtype.

    Returns:
        ``out``.

    Raises:
        UserError: a missing or foreign file, an architecture transformers cannot read from
            GGUF, or an existing ``out``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.durable import atomic_folder

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if out.exists():
        raise UserError(f"{out} exists; name a new folder")
    arch, file_type = read_gguf_header(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UserError(f"{gguf_path}: transformers cannot read a '{arch}' model from GGUF "
                        f"({' '.join(str(exc).split())[:200]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(getattr(torch, dtype))
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(NOTE.format(name=out.name, source=gguf_path.name, file_type=file_type,
                                                   dtype=dtype))
    return out
