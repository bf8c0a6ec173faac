"""``swarm down [CLUSTER.yaml]``: stop every Ray node of the swarm, head last."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "down",
        help="stop every Ray node through the agents, workers first, head last",
        description="Stop the swarm recorded by `swarm up` on this PC, or the one CLUSTER describes.",
    )
    p.add_argument("cluster", nargs="?", help="cluster file (default: the swarm this PC started)")
    p.add_argument("--insecure", action="store_true", help="no secret (the swarm runs --insecure)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.commands import down_command

    return down_command(args.cluster, args.insecure)
