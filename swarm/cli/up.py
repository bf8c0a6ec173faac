"""``swarm up [CLUSTER.yaml]``: bring the swarm up from the head PC."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "up",
        help="start the Ray head here and every worker PC listed in the cluster file",
        description="On the head PC: start the Ray head (token auth, TLS, dashboard on loopback, "
        "pinned ports) through the local agent, check every agent in CLUSTER (same Python, ray, "
        "torch, deepspeed, swarm), issue each node its certificate from the swarm's CA, start "
        "their Ray workers, wait until all are alive and print them. "
        "Safe to run again: only what is missing is started. Without CLUSTER, a swarm of "
        "this PC alone (its agent on 127.0.0.1).",
    )
    p.add_argument("cluster", nargs="?", help="cluster file, e.g. configs/cluster.yaml")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every node to be alive")
    p.add_argument("--insecure", action="store_true", help="no secret: Ray without token and TLS, agents unsigned (they must run --insecure too)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.commands import up_command

    return up_command(args.cluster, args.insecure, args.timeout)
