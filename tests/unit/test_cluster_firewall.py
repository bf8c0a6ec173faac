"""The nftables rule set `swarm firewall` prints: which ports, whom it lets in, and that nft takes it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from swarm.cluster import constants as C
from swarm.cluster.firewall import guarded_ports, nft_ruleset

PEERS = ["198.18.0.2", "198.18.0.1", "198.18.0.3"]


def covered(port: int, ranges) -> bool:
    return any(low <= port <= high for low, high in ranges)


def test_every_pinned_port_and_the_ephemeral_range_are_guarded():
    ranges = guarded_ports((32768, 60999))
    for port in set(C.HEAD_PORTS) | set(C.METRICS_PORTS) | {C.RAY_MIN_WORKER_PORT, C.RAY_MAX_WORKER_PORT, 32768, 45000, 60999}:
        assert covered(port, ranges), port
    assert not covered(22, ranges) and not covered(443, ranges) and not covered(61000, ranges)
    assert all(a[1] < b[0] - 1 for a, b in zip(ranges, ranges[1:]))  # merged, in order


def test_the_rule_set_lets_in_the_swarms_pcs_and_replies_only():
    rules = nft_ruleset(PEERS, (32768, 60999))
    assert "elements = { 198.18.0.1, 198.18.0.2, 198.18.0.3 }" in rules
    lines = [line.strip() for line in rules.splitlines()]
    drop = lines.index(next(line for line in lines if line.endswith(" drop")))
    # Accepts come first: replies to this PC's own connections, loopback, the swarm's PCs.
    assert lines.index("ct state established,related accept") < drop
    assert lines.index("ip saddr @peers accept") < drop
    assert "policy accept;" in rules  # every other port of the PC stays as it was
    assert rules.startswith("add table inet swarm\ndelete table inet swarm\n")  # replaces its own table only
    with pytest.raises(ValueError):
        nft_ruleset([])


@pytest.mark.skipif(shutil.which("nft") is None or os.geteuid() != 0, reason="needs nft and root")
def test_nft_accepts_the_rule_set():
    result = subprocess.run(["nft", "-c", "-f", "-"], input=nft_ruleset(PEERS), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
