"""``swarm tiny-model``: make a tiny model of a real architecture for demos and tests."""

from __future__ import annotations

from pathlib import Path

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
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer", default="bpe", choices=["bpe", "sentencepiece"],
        help="byte-level BPE (default), or SentencePiece BPE with byte fallback, which llama.cpp's GGUF "
        "converter accepts (it refuses BPE tokenizers it does not know)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    for path in args.text:
        if not Path(path).is_file():
            raise UserError(f"text file {path} does not exist")
    if args.hidden % 4:
        raise UserError(f"--hidden {args.hidden} must be a multiple of 4 (the tiny models have 4 heads)")
    from swarm.tiny import make_tiny_model

    out = make_tiny_model(
        args.out, args.text, arch=args.arch, vocab_size=args.vocab_size,
        hidden=args.hidden, layers=args.layers, seed=args.seed, tokenizer=args.tokenizer,
    )
    print(f"model: {out}")
    return 0
