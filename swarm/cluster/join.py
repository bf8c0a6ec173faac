"""``swarm join``: a PC without agent runs a Ray worker in the foreground, joined to a swarm.

The head's agent is asked first (is a head running, with which versions?) and issues this
PC's node certificate (for a key made here, which stays here); the node then runs as a child
process tree of this command and stops with it.
"""

from __future__ import annotations

import signal
import sys
import threading

from swarm import hardware
from swarm.cluster import builders, keys, tls
from swarm.cluster.bringup import auth_mode
from swarm.cluster.builders import RayNodeSettings
from swarm.cluster.client import AgentClient, agent_address
from swarm.cluster.raynode import RayNode, RayStartError
from swarm.cluster.state import clear_cluster_state, save_cluster_state
from swarm.errors import UserError
from swarm.home import logs_dir, ray_temp_dir


def join(head: str, secret: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
         object_store_bytes: int = 0, say=print) -> int:
    """Run a Ray worker on this PC in the foreground, joined to the swarm whose head is ``head``.

    Checks the head's agent first (a head is running, same versions), then blocks until the
    node stops or this process gets SIGINT/SIGTERM, which stops the node.

    Returns:
        0, once the node was stopped on request.

    Raises:
        UserError: no head runs there, versions or auth differ, Ray could not start, or the
            node stopped by itself (its log says why).
    """
    missing_tools = hardware.build_tools_warning()
    if missing_tools:
        say(missing_tools)  # the runs the driver would refuse here, said now rather than at the first one
    head_agent = agent_address(head)
    head_ip = head_agent.rpartition(":")[0]
    reach = hardware.interface_to(head_ip)
    if reach is None:
        raise UserError(f"no network interface of this PC reaches the head at {head_ip}")
    with AgentClient(head_agent, secret) as client:
        health = client.health()
        if not (health.ray.running and health.ray.role == builders.HEAD):
            raise UserError(f"no Ray head runs at {head_ip}; run `swarm up` on the head PC first")
        if health.auth_mode != auth_mode(secret):
            raise UserError(f"the head runs with auth {health.auth_mode}, this command with {auth_mode(secret)}; use --insecure on both or neither")
        head_versions = dict(client.inventory().versions)
        mismatches = builders.version_mismatches(head_versions, hardware.versions())
        if mismatches:
            raise UserError("this PC's " + "; ".join(mismatches) + "; install the same versions as the head")
        files = None
        if secret is not None:
            issued = client.issue_certificate(tls.public_key_pem(tls.node_key()), reach[1])
            files = tls.install_node_certificate(issued.certificate, issued.ca_certificate, reach[1])
    settings = RayNodeSettings(
        role=builders.WORKER, node_ip=reach[1], head_address=head_ip, temp_dir=str(ray_temp_dir()),
        object_store_bytes=object_store_bytes or builders.default_object_store_bytes(hardware.ram_bytes()),
        num_cpus=num_cpus, num_gpus=num_gpus, interface=reach[0],
        worker_slots=builders.worker_slots(num_gpus, len(hardware.gpus())),
    )
    token = keys.ray_token(secret) if secret is not None else None
    node = RayNode(settings, builders.ray_node_env(token, reach[0], files), logs_dir() / "ray-join.log")
    stopping = threading.Event()

    def on_signal(*_):
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        node.start()
    except RayStartError as exc:
        raise UserError(f"could not join {head_ip}: {exc}") from None
    save_cluster_state({
        "head_address": head_ip, "gcs_address": builders.gcs_address(head_ip),
        # A dashboard on the head's loopback is not reachable from here.
        "dashboard": None if "//127.0.0.1:" in health.ray.dashboard_url else health.ray.dashboard_url or None,
        "auth": auth_mode(secret),
        "nodes": [{"address": head_ip, "agent": head_agent, "role": builders.HEAD},
                  {"address": reach[1], "agent": None, "role": builders.WORKER}],
    })
    say(f"joined {head_ip} as {reach[1]} (via {reach[0]}); Ctrl-C leaves the swarm")
    sys.stdout.flush()
    try:
        while node.running() and not stopping.wait(0.5):
            pass
    finally:
        node.stop()
        clear_cluster_state()
    if stopping.is_set():
        say("left the swarm")
        return 0
    raise UserError(f"the Ray node stopped: {node.log_tail()} (see {node.log_path})")
