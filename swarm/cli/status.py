"""``swarm status [--json]``: the swarm's nodes, running jobs and dashboard."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "status",
        help="show nodes (alive or not, GPUs, RAM, offload disk), running jobs and the dashboard URL",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (nodes, jobs, dashboard)")
    p.add_argument("--insecure", action="store_true", help="no secret (the swarm runs --insecure)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.commands import status_command

    return status_command(args.json, args.insecure)
