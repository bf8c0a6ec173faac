"""``swarm join HEAD``: join this PC (no agent needed) to a running swarm, in the foreground."""

from __future__ import annotations

from swarm.cli.args import integer


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "join",
        help="run a Ray worker here that joins the swarm of HEAD (foreground; Ctrl-C leaves)",
        description="Check HEAD's agent (a head is running there, same versions), get this PC's "
        "node certificate from it (for a key made here), then run a Ray worker on this PC with "
        "Ray's token, TLS and the interface that reaches HEAD, until Ctrl-C.",
    )
    p.add_argument("head", help="the head PC's address (HOST, or HOST:PORT of its agent)")
    p.add_argument("--num-cpus", type=integer(minimum=1), default=None)
    p.add_argument("--num-gpus", type=integer(minimum=0), default=None)
    p.add_argument("--object-store-memory", type=integer(minimum=0), default=0, metavar="BYTES",
                   help="default 10%% of RAM, at most 4 GiB")
    p.add_argument("--insecure", action="store_true", help="no secret (the swarm must run --insecure)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.join import join
    from swarm.home import resolve_secret

    return join(args.head, resolve_secret(args.insecure), args.num_cpus, args.num_gpus, args.object_store_memory)
