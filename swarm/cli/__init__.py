"""The ``swarm`` command: one module per verb, each parsing its flags and making one call.

User errors (``UserError``) print one line ``error: ...`` and exit with status 2; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys

from swarm import __version__
from swarm.cli.args import OneLineParser
from swarm.errors import UserError

# Verb modules, each with ``add_parser(subparsers)`` and ``run(args) -> int``.
VERBS = ("init", "agent", "up", "join", "status", "down", "token", "firewall", "plan", "train", "export", "merge",
         "tiny_model", "from_gguf")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="swarm",
        description="Fine-tune large language models with QLoRA and DeepSpeed ZeRO-3 on the GPUs you own.",
    )
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    subparsers = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=OneLineParser)
    subparsers.required = True
    for name in VERBS:
        module = __import__(f"swarm.cli.{name}", fromlist=["add_parser"])
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from swarm.train.runtime import quiet_bitsandbytes_kernel_fetch

    quiet_bitsandbytes_kernel_fetch()
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
