"""``swarm tiny-model``: make a tiny model of a real architecture for demos and tests."""

from __future__ import annotations

from pathlib import Path

from swarm.cli.args import integer
from swarm.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tiny-model",
        help="make a tiny local model (real architecture, random weights) for the demo and tests",
        description="Train a small tokenizer on TEXT files and write a randomly initialised "
        "model of a real transformers architecture to OUT. Nothing is downloaded.",
    )
    p.add_argument("out", help="folder to write the model and tokenizer to")
    p.add_argument("--text", nargs="+", required=True, help="text files to train the tokenizer on")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral"])
    p.add_argument("--vocab-size", type=integer(minimum=2, maximum=1_000_000), default=512)
    p.add_argument("--hidden", type=integer(minimum=4, maximum=65_536), default=128,
                   help="width, a multiple of 4 (the tiny models have 4 heads)")
    p.add_argument("--layers", type=integer(minimum=1, maximum=1024), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer", default="bpe", choices=["bpe", "sentencepiece"],
        help="byte-level BPE (default), or SentencePiece BPE with byte fallback, which llama.cpp's GGUF "
        "converter accepts (it refuses BPE tokenizers it does not know)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    for path in args.text:
        check_text_file(Path(path))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(f"{out} is a folder with other files in it; choose an empty or new folder for OUT")
    from swarm.train.runtime import prepare_process_env

    prepare_process_env()  # quiet libraries: their progress bars would run into the output line
    if args.tokenizer == "bpe" and args.vocab_size < 300:
        # Byte-level BPE starts from its 256 byte tokens and the special tokens.
        raise UserError(f"--vocab-size {args.vocab_size} is too small for a byte-level BPE tokenizer; give 300 or more")
    if args.hidden % 4:
        raise UserError(f"--hidden {args.hidden} must be a multiple of 4 (the tiny models have 4 heads)")
    from swarm.tiny import make_tiny_model

    out = make_tiny_model(
        args.out, args.text, arch=args.arch, vocab_size=args.vocab_size,
        hidden=args.hidden, layers=args.layers, seed=args.seed, tokenizer=args.tokenizer,
    )
    print(f"model: {out}")
    return 0


def check_text_file(path: Path) -> None:
    """A tokenizer's training text: an existing, non-empty file of UTF-8 text."""
    if not path.exists():
        raise UserError(f"text file {path} does not exist")
    if not path.is_file():
        raise UserError(f"text file {path} is a folder; give text files")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"text file {path} is not UTF-8 text (byte {exc.start}); give plain text files") from None
    if "\x00" in text:
        raise UserError(f"text file {path} holds NUL bytes, as binary files do; give plain text files")
    if not text.strip():
        raise UserError(f"text file {path} is empty; give files with some text to train the tokenizer on")
