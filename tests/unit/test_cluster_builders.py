"""Pure builders: ray start argv and env, interface choice, version checks, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm.cluster import constants as C
from swarm.cluster.builders import (
    HEAD, WORKER, RayNodeSettings, child_env, choose_interface, dashboard_url, default_object_store_bytes,
    gcs_address, no_proxy_env, ray_node_env, ray_start_argv, version_mismatches, worker_slots,
)
from swarm.cluster.tls import TlsFiles

MIB = 1024**2


def settings(**kw) -> RayNodeSettings:
    base = dict(role=WORKER, node_ip="198.18.0.2", head_address="198.18.0.1", temp_dir="/tmp/r", object_store_bytes=100 * MIB)
    base.update(kw)
    return RayNodeSettings(**base)


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def test_worker_argv_joins_the_head_with_pinned_ports_and_no_dashboard():
    argv = ray_start_argv(settings(num_cpus=1), python="/py")
    assert argv[:5] == ["/py", "-m", "ray.scripts.scripts", "start", "--block"]
    assert flag(argv, "--address") == "198.18.0.1:6379"
    assert flag(argv, "--node-ip-address") == "198.18.0.2"
    assert flag(argv, "--temp-dir") == "/tmp/r"
    assert flag(argv, "--object-store-memory") == str(100 * MIB)
    assert flag(argv, "--num-cpus") == "1"
    assert flag(argv, "--node-manager-port") == str(C.RAY_NODE_MANAGER_PORT)
    assert flag(argv, "--object-manager-port") == str(C.RAY_OBJECT_MANAGER_PORT)
    assert flag(argv, "--min-worker-port") == str(C.RAY_MIN_WORKER_PORT)
    assert flag(argv, "--max-worker-port") == str(C.RAY_MAX_WORKER_PORT)
    # Head-only flags make `ray start` abort on a worker.
    for head_only in ("--head", "--port", "--include-dashboard", "--dashboard-host", "--dashboard-port"):
        assert head_only not in argv
    assert "--num-gpus" not in argv
    # One training worker slot by default (a CPU-only PC hosts one worker).
    assert json.loads(flag(argv, "--resources")) == {C.WORKER_SLOT_RESOURCE: 1}


def test_head_argv_pins_gcs_dashboard_and_client_ports():
    s = settings(role=HEAD, node_ip="198.18.0.1", dashboard_host="198.18.0.1", num_gpus=2, resources={"b": 1.0, "a": 2.0})
    argv = ray_start_argv(s, python="/py")
    assert "--head" in argv and "--address" not in argv
    assert flag(argv, "--port") == "6379"
    assert flag(argv, "--dashboard-port") == "8265"
    assert flag(argv, "--dashboard-host") == "198.18.0.1"
    assert flag(argv, "--include-dashboard") == "true"
    assert flag(argv, "--ray-client-server-port") == "10001"
    assert flag(argv, "--num-gpus") == "2"
    assert json.loads(flag(argv, "--resources")) == {"a": 2.0, "b": 1.0, C.WORKER_SLOT_RESOURCE: 1}
    assert flag(argv, "--resources") == '{"a": 2.0, "b": 1.0, "swarm_worker": 1}'  # sorted: same settings, same argv


def test_worker_slots_one_per_gpu_or_one_without_and_none_when_the_node_does_not_train():
    assert worker_slots(None, detected_gpus=2) == 2
    assert worker_slots(1, detected_gpus=2) == 1  # the cluster file gives Ray one GPU
    assert worker_slots(None, detected_gpus=0) == 1
    s = settings(role=HEAD, node_ip="198.18.0.1", worker_slots=1, resources={C.WORKER_SLOT_RESOURCE: 0.0})
    assert "--resources" not in ray_start_argv(s, python="/py")  # `train: false` in the cluster file


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="role"):
        settings(role="boss")
    with pytest.raises(ValueError, match="head address"):
        settings(role=HEAD, node_ip="198.18.0.9")
    with pytest.raises(ValueError, match="object store"):
        settings(object_store_bytes=10 * MIB)


FILES = TlsFiles(cert=Path("/h/tls/node.crt"), key=Path("/h/tls/node.key"), ca=Path("/h/tls/ca.crt"))


def test_node_env_sets_token_auth_tls_and_socket_interfaces():
    env = ray_node_env("t0ken", "wlan0", FILES)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"] == "t0ken"
    assert env["RAY_USE_TLS"] == "1"
    assert (env["RAY_TLS_SERVER_CERT"], env["RAY_TLS_SERVER_KEY"], env["RAY_TLS_CA_CERT"]) == (
        "/h/tls/node.crt", "/h/tls/node.key", "/h/tls/ca.crt")
    assert env["NCCL_SOCKET_IFNAME"] == "wlan0"
    assert env["GLOO_SOCKET_IFNAME"] == "wlan0"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_metrics_endpoints_are_closed_unless_asked():
    closed = ray_node_env("t", None, FILES)
    assert closed["RAY_enable_metrics_collection"] == "0"
    # Ray offers no switch for these two servers: a port outside 0-65535 keeps them from starting.
    assert int(closed["AUTOSCALER_METRIC_PORT"]) > 65535 and int(closed["DASHBOARD_METRIC_PORT"]) > 65535
    asked = ray_node_env("t", None, FILES, metrics=True)
    assert asked["RAY_enable_metrics_collection"] == "1"
    assert {int(asked["AUTOSCALER_METRIC_PORT"]), int(asked["DASHBOARD_METRIC_PORT"])} == {
        C.RAY_AUTOSCALER_METRICS_PORT, C.RAY_DASHBOARD_METRICS_PORT}


def test_no_node_serves_rays_http_job_agent():
    """Ray's per-node job agent (HTTP, node address) runs any command for the token alone."""
    for role, ip in ((WORKER, "198.18.0.2"), (HEAD, "198.18.0.1")):
        s = RayNodeSettings(role=role, node_ip=ip, head_address="198.18.0.1", temp_dir="/tmp/r",
                            object_store_bytes=C.MIN_OBJECT_STORE_BYTES)
        argv = ray_start_argv(s)
        assert int(argv[argv.index("--dashboard-agent-listen-port") + 1]) > 65535


def test_only_the_head_writes_ray_events():
    """A worker's dashboard agent would post them with the token to 127.0.0.1:8265, where
    nothing of the swarm listens on a worker."""
    assert ray_node_env("t", None, FILES, events=False)["RAY_event_log_reporter_enabled"] == "0"
    assert "RAY_event_log_reporter_enabled" not in ray_node_env("t", None, FILES, events=True)
    base = {"RAY_event_log_reporter_enabled": "1"}
    assert "RAY_event_log_reporter_enabled" not in child_env(base, ray_node_env("t", None, FILES, events=True))


def test_insecure_env_disables_auth_and_tls_explicitly_and_carries_no_token():
    env = ray_node_env(None, None)
    assert env["RAY_AUTH_MODE"] == "disabled" and env["RAY_USE_TLS"] == "0"
    assert "RAY_AUTH_TOKEN" not in env and "RAY_TLS_CA_CERT" not in env and "NCCL_SOCKET_IFNAME" not in env


def test_child_env_drops_inherited_ray_auth_tls_and_address():
    base = {"PATH": "/bin", "RAY_AUTH_TOKEN_PATH": "/root/.ray/auth_token", "RAY_AUTH_TOKEN": "old", "RAY_ADDRESS": "x:1",
            "RAY_TLS_CA_CERT": "/elsewhere/ca.crt", "DASHBOARD_METRIC_PORT": "8080"}
    env = child_env(base, ray_node_env("new", None))
    assert env["PATH"] == "/bin"
    assert env["RAY_AUTH_TOKEN"] == "new"
    assert "RAY_AUTH_TOKEN_PATH" not in env and "RAY_ADDRESS" not in env and "RAY_TLS_CA_CERT" not in env
    assert env["DASHBOARD_METRIC_PORT"] != "8080"


def test_no_log_monitor_on_any_node():
    for role, ip in ((WORKER, "198.18.0.2"), (HEAD, "198.18.0.1")):
        assert flag(ray_start_argv(settings(role=role, node_ip=ip), python="/py"), "--include-log-monitor") == "false"


IFACES = {
    "lo": [("127.0.0.1", "255.0.0.0")],
    "eth0": [("192.168.1.20", "255.255.255.0")],
    "wlan0": [("192.168.1.21", "255.255.255.0")],
    "wg0": [("10.8.0.5", "255.255.255.255")],  # point-to-point VPN: a /32 contains no peer
    "docker0": [("172.17.0.1", "255.255.0.0")],
    "lab": [("198.18.0.2", "255.255.255.0"), ("198.18.0.130", "255.255.255.128")],
}


def test_interface_for_the_peer_itself_is_the_one_holding_its_address():
    assert choose_interface("192.168.1.21", IFACES) == ("wlan0", "192.168.1.21")


def test_directly_connected_peer_uses_the_most_specific_subnet():
    assert choose_interface("198.18.0.200", IFACES) == ("lab", "198.18.0.130")
    assert choose_interface("198.18.0.7", IFACES) == ("lab", "198.18.0.2")
    # Two interfaces on one subnet: the first listed wins, deterministically.
    assert choose_interface("192.168.1.1", IFACES) == ("eth0", "192.168.1.20")


def test_wifi_only_pc_gets_its_wifi_interface():
    only_wifi = {"lo": IFACES["lo"], "wlp3s0": [("192.168.1.33", "255.255.255.0")], "docker0": IFACES["docker0"]}
    assert choose_interface("192.168.1.10", only_wifi) == ("wlp3s0", "192.168.1.33")


def test_routed_peer_uses_the_kernels_source_address():
    assert choose_interface("10.8.0.1", IFACES, routed_source="10.8.0.5") == ("wg0", "10.8.0.5")
    assert choose_interface("203.0.113.9", IFACES, routed_source=None) is None
    assert choose_interface("203.0.113.9", IFACES, routed_source="10.99.0.1") is None


def test_version_mismatches_name_each_difference():
    head = {"python": "3.11.7", "ray": "2.60.0", "torch": "2.13.0", "deepspeed": "0.19.8", "swarm": "0.1.0", "peft": "1"}
    assert version_mismatches(head, dict(head, peft="2")) == []  # peft is reported, not checked
    lines = version_mismatches(head, dict(head, swarm="9.9.9", torch="2.12.0"))
    assert lines == ["torch 2.12.0 differs from the head's 2.13.0", "swarm 9.9.9 differs from the head's 0.1.0"]
    missing = dict(head)
    del missing["deepspeed"]
    assert version_mismatches(head, missing) == ["deepspeed not installed differs from the head's 0.19.8"]


def test_default_object_store_is_bounded():
    assert default_object_store_bytes(512 * MIB) == C.MIN_OBJECT_STORE_BYTES
    assert default_object_store_bytes(32 * 1024 * MIB) == 32 * 1024 * MIB // 10
    assert default_object_store_bytes(512 * 1024 * MIB) == 4 * 1024 * MIB


def test_addresses():
    assert gcs_address("198.18.0.1") == "198.18.0.1:6379"
    assert dashboard_url("127.0.0.1", "198.18.0.1") == "http://127.0.0.1:8265"
    assert dashboard_url("0.0.0.0", "198.18.0.1") == "http://198.18.0.1:8265"
    assert dashboard_url("198.18.0.1", "198.18.0.1") == "http://198.18.0.1:8265"


def test_no_proxy_keeps_the_users_entries_and_adds_loopback_and_the_swarm():
    """Ray's state API sends the token to the dashboard through `requests`, which honours
    http_proxy unless no_proxy names the host (issue 32)."""
    env = no_proxy_env({"NO_PROXY": "intranet.example, 10.0.0.0/8"}, ["198.18.0.1", "198.18.0.2"])
    assert env["no_proxy"] == env["NO_PROXY"] == "intranet.example,10.0.0.0/8,127.0.0.1,localhost,::1,198.18.0.1,198.18.0.2"
    assert no_proxy_env({}, ["198.18.0.1", "127.0.0.1"])["no_proxy"] == "127.0.0.1,localhost,::1,198.18.0.1"


def test_a_client_behind_a_proxy_calls_loopback_directly(monkeypatch):
    import urllib.request

    from swarm.cluster.client import ray_client_env

    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    env = ray_client_env(None)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert urllib.request.proxy_bypass("127.0.0.1")  # what requests and urllib ask before using a proxy
