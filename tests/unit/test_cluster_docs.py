"""The ports in docs/cluster.md are the ones swarm pins; the service unit runs the agent."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from swarm.cluster import constants as C
from swarm.cluster.builders import HEAD, RayNodeSettings, ray_node_env, ray_start_argv

REPO = Path(__file__).resolve().parents[2]


def documented_ports() -> set[int]:
    ports = set()
    for line in (REPO / "docs" / "cluster.md").read_text().splitlines():
        m = re.match(r"\| (\d+)(?:-(\d+))? \|", line)
        if m:
            ports.add(int(m.group(1)))
            if m.group(2):
                ports.add(int(m.group(2)))
    return ports


def test_docs_list_exactly_the_pinned_ports():
    pinned = set(C.HEAD_PORTS) | set(C.METRICS_PORTS) | {C.RAY_MIN_WORKER_PORT, C.RAY_MAX_WORKER_PORT}
    assert documented_ports() == pinned


def test_every_port_ray_is_given_is_a_pinned_one():
    for metrics in (False, True):
        s = RayNodeSettings(role=HEAD, node_ip="10.0.0.1", head_address="10.0.0.1", temp_dir="/tmp/r",
                            object_store_bytes=C.MIN_OBJECT_STORE_BYTES, metrics=metrics)
        argv = ray_start_argv(s)
        given = {int(argv[i + 1]) for i, a in enumerate(argv) if a.endswith("-port") and int(argv[i + 1]) < 65536}
        given |= {int(v) for k, v in ray_node_env("t", None, None, metrics).items() if k.endswith("METRIC_PORT") and int(v) < 65536}
        expected = set(C.HEAD_PORTS + (C.RAY_MIN_WORKER_PORT, C.RAY_MAX_WORKER_PORT)) - {C.AGENT_PORT}
        # The agent's metrics port is always named (Ray wants one) but stays closed without metrics.
        assert given == expected | ({C.RAY_METRICS_EXPORT_PORT} | (set(C.METRICS_PORTS) if metrics else set()))


def test_service_unit_runs_the_agent_and_stops_its_tree():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "launcher" / "swarm-agent.service")
    service = unit["Service"]
    assert re.search(r"/swarm agent( |$)", service["ExecStart"])
    assert f":{C.AGENT_PORT}" in service["ExecStart"]
    assert service["KillMode"] == "control-group" and service["KillSignal"] == "SIGTERM"
    assert "SWARM_HOME=" in service["Environment"]
    assert unit["Install"]["WantedBy"] == "default.target"  # a user unit
