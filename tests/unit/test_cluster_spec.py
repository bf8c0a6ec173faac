"""Cluster files: every shipped one loads and says how to run it; errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.cluster.spec import load_cluster_spec
from swarm.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("cluster*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_cluster_files_load_and_open_with_their_command(path):
    spec = load_cluster_spec(path)
    assert spec.head.address and spec.head.agent_address.endswith(":7077")
    first = path.read_text().splitlines()[:4]
    assert first[0].startswith("#") and any("swarm up" in line or "bench_up.py" in line for line in first)


def test_there_are_shipped_cluster_files():
    assert {p.name for p in CONFIGS} >= {"cluster.yaml", "cluster-lab.yaml"}


def test_node_settings_override_cluster_defaults():
    spec = load_cluster_spec(next(p for p in CONFIGS if p.name == "cluster.yaml"))
    by_address = {w.address: w for w in spec.workers}
    assert spec.merged(by_address["192.168.1.12"])["object_store_bytes"] == 1024**3
    assert spec.merged(by_address["192.168.1.11"])["object_store_bytes"] == 2 * 1024**3
    assert by_address["192.168.1.11"].agent_address == "192.168.1.11:7077"


def test_a_node_with_train_false_offers_no_worker_slot():
    lab = load_cluster_spec(next(p for p in CONFIGS if p.name == "cluster-lab.yaml"))
    assert lab.merged(lab.head)["resources"] == {"swarm_worker": 0.0}
    assert lab.merged(lab.workers[0])["resources"] == {}  # the agent offers one per GPU, or one


@pytest.mark.parametrize("text, message", [
    ("head: {address: pc1}", "head.address: must be an IPv4 address"),
    ("head: {address: 10.0.0.1}\nworkers: [{address: 10.0.0.1}]", "listed twice"),
    ("head: {address: 10.0.0.1, colour: red}", "unknown key 'head.colour'"),
    ("workers: []", "missing required key 'head'"),
    ("head: {address: 10.0.0.1}\nray: {object_store_memory: 1MiB}", "below"),
    ("head: {address: 10.0.0.1, agent: 'x:y'}", "head.agent: agent address 'x:y' is not HOST or HOST:PORT"),
    ("head: [", "not valid YAML"),
    ("head: {address: 10.0.0.1}\ndashboard: {host: 10.0.0.1}", "would send Ray's token over the LAN in plain HTTP.*insecure_plain_http"),
])
def test_bad_cluster_files_fail_with_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_cluster_spec(path)
    assert "\n" not in str(err.value)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_cluster_spec(tmp_path / "nope.yaml")


def test_a_dashboard_on_the_lan_and_metrics_must_be_asked_for_by_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("head: {address: 10.0.0.1}\n")
    spec = load_cluster_spec(path)
    assert spec.dashboard.host == "127.0.0.1" and not spec.dashboard.insecure_plain_http and not spec.ray.metrics
    path.write_text("head: {address: 10.0.0.1}\nray: {metrics: true}\ndashboard: {host: 10.0.0.1, insecure_plain_http: true}\n")
    spec = load_cluster_spec(path)
    assert spec.ray.metrics and spec.dashboard.host == "10.0.0.1"
