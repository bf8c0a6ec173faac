"""``swarm token``: print the token the Ray dashboard asks for (derived from the secret)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "token",
        help="print Ray's token, which the dashboard asks for (derived from the cluster secret, not the secret)",
        description="Print the token Ray's dashboard and its HTTP API ask for. It is derived from the "
        "cluster secret (HKDF) and is not the secret: it cannot sign agent calls, nor lead back to "
        "the secret. It does let its holder use Ray, so keep it as private as the secret.",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.keys import ray_token
    from swarm.home import read_secret

    print(ray_token(read_secret()))
    return 0
