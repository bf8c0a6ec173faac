"""``swarm from-gguf``: a Hugging Face folder to fine-tune from a GGUF file a user already has."""

from __future__ import annotations

from pathlib import Path

from swarm.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "from-gguf",
        help="turn a GGUF file (llama.cpp, Ollama) into a model folder swarm can fine-tune",
        description="Dequantize a GGUF file's weights and write them, with its tokenizer and chat template, "
        "to OUT as a Hugging Face folder. A quantized file's weights are not the original model's: "
        "prefer the original folder when you can get it.",
    )
    p.add_argument("gguf", help="the .gguf file (Ollama keeps them under ~/.ollama/models/blobs)")
    p.add_argument("out", help="the folder to write (must not exist)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the saved weights (default bfloat16)")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files through it
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install 'swarm-train[gguf]'") from None
    from swarm.from_gguf import hf_folder_from_gguf
    from swarm.train.runtime import prepare_process_env

    prepare_process_env()
    out = hf_folder_from_gguf(Path(args.gguf), Path(args.out), args.dtype)
    print(f"model: {out}")
    return 0
