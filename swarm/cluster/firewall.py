"""An nftables rule set that lets only the swarm's PCs reach a PC's swarm, Ray and training ports.

PyTorch's rendezvous store and its Gloo / NCCL connections authenticate nobody and listen on
ports of the system's choosing (the kernel's ephemeral range) while a run trains. swarm binds
them to the swarm's interface, but anyone on that LAN can still reach them. The agent runs as
the user and cannot install a firewall; a user who runs the bootstrap as root (or
``sudo swarm firewall CLUSTER --apply``) gets this rule set: new TCP connections to those
ports are dropped unless they come from a PC of the cluster file. Everything else on the PC
(its other services, its own outgoing connections) is left as it is.

``nft_ruleset`` is pure (tested as text); ``apply`` hands it to ``nft``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from swarm.cluster import constants as C
from swarm.errors import UserError

TABLE = "swarm"
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range


def guarded_ports(ephemeral: tuple[int, int] = DEFAULT_EPHEMERAL) -> list[tuple[int, int]]:
    """Port ranges only the swarm's PCs may open connections to: every port swarm pins
    (agent, Ray) and the ephemeral range, where torch's store and Gloo / NCCL listen."""
    pinned = sorted(set(C.HEAD_PORTS) | set(C.METRICS_PORTS))
    ranges = [(p, p) for p in pinned] + [(C.RAY_MIN_WORKER_PORT, C.RAY_MAX_WORKER_PORT), ephemeral]
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def nft_ruleset(peers: list[str], ephemeral: tuple[int, int] = DEFAULT_EPHEMERAL) -> str:
    """The rule set for ``nft -f -``: replaces swarm's own table, touches no other.

    Args:
        peers: IPv4 addresses of every PC of the swarm (this one included).
        ephemeral: the kernel's ephemeral port range (``ip_local_port_range``).
    """
    if not peers:
        raise ValueError("a swarm has at least one PC")
    ports = ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in guarded_ports(ephemeral))
    return "\n".join([
        # "add" then "delete": removes an older swarm table, and works when there is none.
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  set peers {",
        "    type ipv4_addr",
        f"    elements = {{ {', '.join(sorted(set(peers)))} }}",
        "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        "    ct state established,related accept",
        "    iif lo accept",
        "    ip saddr @peers accept",
        f"    tcp dport {{ {ports} }} drop",
        "  }",
        "}",
        "",
    ])


def ephemeral_range() -> tuple[int, int]:
    """This PC's ephemeral port range (Linux's default when it cannot be read)."""
    try:
        low, high = PORT_RANGE_FILE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def apply(ruleset: str) -> None:
    """Install ``ruleset`` with ``nft``.

    Raises:
        UserError: no ``nft`` here, or it refused (not root, say).
    """
    nft = shutil.which("nft")
    if nft is None:
        raise UserError("`nft` is not installed (Debian/Ubuntu: apt install nftables); or apply the printed rules another way")
    result = subprocess.run([nft, "-f", "-"], input=ruleset, capture_output=True, text=True)
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise UserError(f"nft refused the rules ({why}); run as root: `sudo swarm firewall CLUSTER --apply`")
