"""Regenerate ``agent_pb2.py`` from ``agent.proto`` (needs grpcio-tools, the ``test`` extra).

Run ``python -m swarm.cluster.proto.regen`` after editing the .proto, or ``--check`` to fail
when the committed module differs from what protoc makes now.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "agent.proto"
GENERATED = "agent_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc on agent.proto into ``out_dir``; returns the generated module's path."""
    from grpc_tools import protoc

    # -I the proto's own folder: the generated file then names it "agent.proto" whatever the
    # current directory is, so the output is the same on every machine.
    status = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out_dir}", str(HERE / PROTO)])
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {HERE / PROTO}")
    return Path(out_dir) / GENERATED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp)).read_text()
    target = HERE / GENERATED
    if args.check:
        if target.read_text() != fresh:
            print(f"{target} is stale; run python -m swarm.cluster.proto.regen", file=sys.stderr)
            return 1
        print(f"{target} matches {PROTO}")
        return 0
    target.write_text(fresh)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
