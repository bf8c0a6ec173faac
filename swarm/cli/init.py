"""``swarm init``: make the cluster secret on the first PC."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "init",
        help="make the cluster secret (Ray's token and the agents' key) in $SWARM_HOME",
        description="Make a random 256-bit cluster secret in $SWARM_HOME/secret (mode 0600) and "
        "say how to copy it to the other PCs. Every other command needs it.",
    )
    p.add_argument("--force", action="store_true", help="replace an existing secret (every PC then needs the new one)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.home import create_secret

    path = create_secret(overwrite=args.force)
    print(f"secret: {path}")
    print("Copy it to every other PC of the swarm over a channel you trust, keeping it private, e.g.:")
    print("  ssh OTHER-PC 'mkdir -p -m 700 ~/.swarm'")
    print(f"  scp -p {path} OTHER-PC:.swarm/secret && ssh OTHER-PC 'chmod 600 ~/.swarm/secret'")
    return 0
