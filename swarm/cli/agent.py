"""``swarm agent``: the per-PC service that ``swarm up`` talks to (or ``--health`` to probe it)."""

from __future__ import annotations

import sys

from swarm.cli.args import host_port
from swarm.cluster.constants import AGENT_PORT


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run this PC's node agent (gRPC), or check it with --health",
        description="Serve this PC's inventory and start/stop its Ray node for `swarm up` and "
        f"`swarm down`. Listens on 0.0.0.0:{AGENT_PORT} by default, over TLS; every call must be "
        "signed with a key derived from the cluster secret. Ray nodes it starts use Ray's token "
        "and TLS with the certificate the head issues. With --health, ask the running agent "
        "instead and exit 0 when it is healthy, 1 otherwise.",
    )
    p.add_argument("--listen", default=f"0.0.0.0:{AGENT_PORT}", type=host_port, metavar="HOST:PORT",
                   help="address to serve on")
    p.add_argument("--offload-dir", default=None, help="offload folder to report on (default $SWARM_HOME/offload)")
    p.add_argument("--insecure", action="store_true", help="accept unsigned calls and run Ray without token and without TLS (trusted networks only)")
    p.add_argument("--health", action="store_true", help="check the local agent and exit 0 (healthy) or 1")
    p.add_argument("--address", default=None, type=host_port, metavar="HOST:PORT",
                   help="with --health: the agent to check (default: the local one)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.agent import check_health, serve

    if args.health:
        healthy, line = check_health(args.address, args.insecure)
        print(line, file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else 1
    return serve(args.listen, args.offload_dir, args.insecure)
