"""``swarm init``: make the cluster secret and the swarm's certificate authority on the head PC."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "init",
        help="make the cluster secret (every key of the swarm derives from it) and the CA in $SWARM_HOME",
        description="Make a random 256-bit cluster secret in $SWARM_HOME/secret (mode 0600) and the "
        "swarm's certificate authority in $SWARM_HOME/ca (the head issues each PC's Ray certificate "
        "with it), and say how to copy the secret to the other PCs. Every other command needs the "
        "secret. With a secret already there, only a missing CA is made.",
    )
    p.add_argument("--force", action="store_true",
                   help="replace the secret and the CA (every PC then needs the new secret, every node a restart)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster.tls import ca_files, create_ca
    from swarm.home import create_secret, secret_path

    if secret_path().exists() and not args.force and not ca_files()[1].exists():
        print(f"ca: {create_ca()} (the secret at {secret_path()} stays as it is)")
        return 0
    path = create_secret(overwrite=args.force)
    print(f"secret: {path}")
    print(f"ca: {create_ca(overwrite=True)} (stays on this PC, the head)")
    print("Copy the secret to every other PC of the swarm over a channel you trust, keeping it private, e.g.:")
    print("  ssh OTHER-PC 'mkdir -p -m 700 ~/.swarm'")
    print(f"  scp -p {path} OTHER-PC:.swarm/secret && ssh OTHER-PC 'chmod 600 ~/.swarm/secret'")
    return 0
