"""``swarm token``: print the token the Ray dashboard asks for; ``--rotate``: a new secret everywhere."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "token",
        help="print Ray's token, which the dashboard asks for (derived from the cluster secret, not the secret); "
        "--rotate replaces the secret on every PC",
        description="Print the token Ray's dashboard and its HTTP API ask for. It is derived from the "
        "cluster secret (HKDF) and is not the secret: it cannot sign agent calls, nor lead back to "
        "the secret. It does let its holder use Ray, so keep it as private as the secret. "
        "With --rotate (on the head, after a leak): make a new secret, give it to every PC of the "
        "swarm through its agent, make a new CA, and start the swarm again with the new token and "
        "new certificates; the old token, secret and certificates then open nothing.",
    )
    p.add_argument("--rotate", action="store_true",
                   help="replace the cluster secret (and every key, token and certificate) on every PC, then print the new token")
    p.add_argument("cluster", nargs="?",
                   help="with --rotate: the cluster file (default: the one the running swarm was started with)")
    p.add_argument("--timeout", type=float, default=180.0, help="with --rotate: seconds to wait for every node to be alive")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.keys import ray_token
    from swarm.errors import UserError
    from swarm.home import read_secret

    if args.cluster and not args.rotate:
        raise UserError("a cluster file goes with --rotate only; `swarm token` alone prints this PC's token")
    if args.rotate:
        from swarm.cluster.commands import rotate_command

        return rotate_command(args.cluster, args.timeout)
    print(ray_token(read_secret()))
    return 0
