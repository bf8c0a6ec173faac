"""``swarm firewall CLUSTER [--apply]``: the nftables rules that keep the swarm's ports to its PCs."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "firewall",
        help="print (or, as root, apply) nftables rules: only the swarm's PCs reach its agent, Ray and training ports",
        description="Print an nftables rule set for this PC: new TCP connections to swarm's agent, Ray's "
        "pinned ports and the ephemeral range (where PyTorch's rendezvous store and Gloo / NCCL "
        "listen while a run trains; they authenticate nobody) are dropped unless they come from a "
        "PC of CLUSTER. It lives in its own table (inet swarm) and leaves every other rule and "
        "port alone. --apply installs it with nft (root only); run it on every PC.",
    )
    p.add_argument("cluster", help="cluster file, e.g. configs/cluster.yaml (its PCs are the ones let in)")
    p.add_argument("--apply", action="store_true", help="install the rules with `nft -f -` (needs root)")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.cluster import firewall
    from swarm.cluster.spec import load_cluster_spec

    spec = load_cluster_spec(args.cluster)
    peers = [spec.head.address] + [w.address for w in spec.workers]
    rules = firewall.nft_ruleset(peers, firewall.ephemeral_range())
    if not args.apply:
        print(rules, end="")
        return 0
    firewall.apply(rules)
    print(f"nftables table inet {firewall.TABLE}: only {', '.join(peers)} reach the swarm's ports here")
    return 0
