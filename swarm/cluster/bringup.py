"""Bringing a swarm up and down through the agents: every PC checked first, the head and the
workers started together, the head stopped last.

``up`` is safe to repeat: agents report nodes already running, and only what is missing (or
attached to an old head) is started. Refused nodes are reported one line each; the others
still come up.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from swarm import hardware
from swarm.cluster import builders, tls
from swarm.cluster.client import AgentCallError, AgentClient
from swarm.cluster.constants import RAY_DASHBOARD_AGENT_GRPC_PORT, RAY_NODE_MANAGER_PORT, RAY_RUNTIME_ENV_AGENT_PORT
from swarm.cluster.proto import agent_pb2 as pb
from swarm.cluster.spec import LOOPBACK, ClusterSpec, NodeSpec
from swarm.cluster.state import alive_addresses, clear_cluster_state, load_cluster_state, save_cluster_state
from swarm.errors import UserError


# A worker's `ray start` asks the GCS for the head node before anything else and, while the
# head has not registered, asks again only every 2 seconds. The head's raylet registers as
# soon as its two agents listen: once these ports answer, a worker started now finds the head
# on its first question instead of losing up to 2 s.
HEAD_READY_PORTS = (RAY_NODE_MANAGER_PORT, RAY_RUNTIME_ENV_AGENT_PORT, RAY_DASHBOARD_AGENT_GRPC_PORT)


@dataclass
class _Node:
    spec: NodeSpec
    client: AgentClient
    health: pb.HealthReply | None = None
    inventory: pb.InventoryReply | None = None
    refusal: str | None = None


def auth_mode(secret: str | None) -> str:
    return "token" if secret else "disabled"


def _check(node: _Node, head_address: str, head_versions: dict, secret: str | None) -> None:
    """Fill ``node.health`` and ``node.inventory``, or ``node.refusal`` (one phrase)."""
    try:
        node.health = node.client.health()
        # The offload drive's speed (the agent measures it when it starts and caches it) goes
        # into `swarm status` and into the inventory the planner reads.
        node.inventory = node.client.inventory(peer=head_address, measure_disk=True)
    except AgentCallError as exc:
        node.refusal = str(exc)
        return
    if node.health.auth_mode != auth_mode(secret):
        node.refusal = f"its agent runs with auth {node.health.auth_mode}, the head with {auth_mode(secret)}; start every agent the same way"
        return
    mismatches = builders.version_mismatches(head_versions, dict(node.inventory.versions))
    if mismatches:
        node.refusal = "; ".join(mismatches) + "; install the same versions on every PC"


def _start_request(spec: ClusterSpec, node: NodeSpec, role: str, inventory: pb.InventoryReply,
                   secret: str | None) -> pb.StartRayRequest:
    merged = spec.merged(node)
    request = pb.StartRayRequest(
        role=role, head_address=spec.head.address, object_store_bytes=merged["object_store_bytes"],
        resources=merged["resources"], dashboard_host=spec.dashboard.host if role == builders.HEAD else "",
        metrics=spec.ray.metrics,
    )
    if merged["num_cpus"] is not None:
        request.num_cpus = merged["num_cpus"]
    if merged["num_gpus"] is not None:
        request.num_gpus = merged["num_gpus"]
    if secret is not None:
        # The node's certificate names the address it reaches the head from (its Ray address)
        # and the one in the cluster file; the key it certifies never left that PC.
        addresses = list(dict.fromkeys([inventory.address or node.address, node.address]))
        request.node_certificate = tls.issue_node_certificate(inventory.node_public_key, addresses)
        request.ca_certificate = tls.ca_certificate_pem()
    return request


def up(spec: ClusterSpec, secret: str | None, timeout_s: float = 180.0, say=print) -> list[str]:
    """Start the head, check and start every worker, and wait until all are alive in Ray.

    The head starts as soon as its agent answers; the workers are checked meanwhile and
    started once the head's node is about to register (see ``HEAD_READY_PORTS``).

    Args:
        spec: the cluster file.
        secret: the cluster secret, or ``None`` for ``--insecure``.
        timeout_s: how long to wait for the nodes to be alive.
        say: where progress lines go.

    Returns:
        One line per refused node (``node ADDRESS: why``); empty when all came up.

    Raises:
        UserError: the head cannot be reached or started, no CA is here, or a node never
            became alive.
    """
    local = {a for addrs in hardware.interfaces().values() for a, _ in addrs}
    if spec.head.address not in local and spec.dashboard.host in LOOPBACK:
        raise UserError(f"run `swarm up` on the head PC ({spec.head.address} is not an address of this one)")
    if secret is not None:
        tls.load_ca()  # fail before any node starts
    if spec.dashboard.host not in LOOPBACK:
        say(f"warning: the dashboard listens on {spec.dashboard.host} in plain HTTP (dashboard.insecure_plain_http): "
            "Ray's token crosses the LAN in clear text whenever someone signs in")
    head = _Node(spec.head, AgentClient(spec.head.agent_address, secret))
    workers = [_Node(w, AgentClient(w.agent_address, secret)) for w in spec.workers]
    try:
        head.health = head.client.health()
        if head.health.auth_mode != auth_mode(secret):
            raise UserError(f"the head's agent runs with auth {head.health.auth_mode} but this command with {auth_mode(secret)}; use --insecure on both or neither")
        head.inventory = head.client.inventory(peer=spec.head.address)
        head_versions = dict(head.inventory.versions)
        dashboard = builders.dashboard_url(spec.dashboard.host, spec.head.address)
        fresh_head = not (head.health.ray.running and head.health.ray.role == builders.HEAD)
        t0 = time.monotonic()
        _save_state(spec, dashboard, secret, [])  # first, so that `swarm down` works even if this is interrupted
        with ThreadPoolExecutor(max_workers=8) as pool:
            head_start = pool.submit(head.client.start_ray, _start_request(spec, spec.head, builders.HEAD, head.inventory, secret))
            checks = [pool.submit(_check, w, spec.head.address, head_versions, secret) for w in workers]
            disk = pool.submit(head.client.inventory, peer=spec.head.address, measure_disk=True)
            for future in checks:
                future.result()
            accepted = [w for w in workers if w.refusal is None]
            _save_state(spec, dashboard, secret, accepted)
            # Workers of a head that is started now are all stale; otherwise ask Ray which live.
            alive = set() if fresh_head else _wait_alive(dashboard, secret, {spec.head.address}, timeout_s)
            _wait_ports(spec.head.address, HEAD_READY_PORTS, head_start, timeout_s)
            if head_start.done() and head_start.exception():
                head_start.result()  # the head failed: raise before any worker is started
            started = [pool.submit(_start_worker, spec, w, secret, fresh_head or w.spec.address not in alive, t0, say)
                       for w in accepted]
            reply = head_start.result()
            say(f"head {spec.head.address}: {'already running' if reply.already_running else 'started'} ({time.monotonic() - t0:.1f}s)")
            for future in started + [disk]:
                future.result()
        expected = {spec.head.address} | {w.spec.address for w in workers if w.refusal is None}
        _wait_alive(dashboard, secret, expected, timeout_s)
        say(f"all {len(expected)} nodes alive ({time.monotonic() - t0:.1f}s)")
    finally:
        for node in [head, *workers]:
            node.client.close()
    return [f"node {w.spec.address}: {w.refusal}" for w in workers if w.refusal]


def _start_worker(spec: ClusterSpec, w: _Node, secret: str | None, stale: bool, t0: float, say) -> None:
    """Start one checked worker; a node still attached to a head that restarted is restarted."""
    try:
        if w.health.ray.running and stale:
            w.client.stop_ray()
        reply = w.client.start_ray(_start_request(spec, w.spec, builders.WORKER, w.inventory, secret))
        what = "already running" if reply.already_running else "started"
        say(f"worker {w.spec.address}: {what} via {reply.interface or '?'} ({time.monotonic() - t0:.1f}s)")
    except (AgentCallError, UserError) as exc:
        w.refusal = str(exc)


def _save_state(spec: ClusterSpec, dashboard: str, secret: str | None, accepted: list[_Node]) -> None:
    """Record the swarm (the head and the ``accepted`` workers) before they start."""
    save_cluster_state({
        "head_address": spec.head.address,
        "gcs_address": builders.gcs_address(spec.head.address),
        "dashboard": dashboard,
        "auth": auth_mode(secret),
        "nodes": [{"address": spec.head.address, "agent": spec.head.agent_address, "role": builders.HEAD}]
        + [{"address": w.spec.address, "agent": w.spec.agent_address, "role": builders.WORKER} for w in accepted],
    })


def _wait_ports(host: str, ports: tuple[int, ...], give_up: Future, timeout_s: float) -> None:
    """Return once every one of ``ports`` on ``host`` accepts TCP, ``give_up`` is done, or time is out."""
    deadline = time.monotonic() + timeout_s
    waiting = list(ports)
    while waiting and not give_up.done() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, waiting[0]), timeout=1):
                waiting.pop(0)
        except OSError:
            time.sleep(0.1)


def _wait_alive(dashboard: str, secret: str | None, expected: set[str], timeout_s: float) -> set[str]:
    """Poll Ray until every address in ``expected`` is alive; the alive set."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while True:
        try:
            alive = alive_addresses(dashboard, secret)
            if expected <= alive:
                return alive
            last_error = f"not alive yet: {', '.join(sorted(expected - alive))}"
        except UserError as exc:  # the dashboard takes a moment after the head starts
            last_error = str(exc)
        if time.monotonic() > deadline:
            raise UserError(f"nodes did not come up within {timeout_s:.0f}s ({last_error}); see the agents' $SWARM_HOME/logs/ray-node.log")
        time.sleep(0.5)


def down(secret: str | None, state: dict | None = None, say=print) -> list[str]:
    """Stop every Ray node through its agent, workers first and the head last.

    Returns:
        One line per node that could not be stopped; empty when all were.
    """
    state = state or load_cluster_state()
    if state is None:
        raise UserError("no swarm is recorded on this PC; pass the cluster file: `swarm down CLUSTER.yaml`")
    nodes = [n for n in state.get("nodes", []) if n.get("agent")]
    workers = [n for n in nodes if n.get("role") != builders.HEAD]
    heads = [n for n in nodes if n.get("role") == builders.HEAD]
    failures: list[str] = []

    def stop(node: dict) -> None:
        start = time.monotonic()
        try:
            with AgentClient(node["agent"], secret) as client:
                reply = client.stop_ray()
            what = f"stopped ({reply.processes_stopped} processes)" if reply.was_running else "was not running"
            say(f"{node.get('role', 'node')} {node['address']}: {what} ({time.monotonic() - start:.1f}s)")
        except AgentCallError as exc:
            failures.append(f"node {node['address']}: {exc}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(stop, workers))
    for node in heads:  # last: workers that lose their head early only log errors
        stop(node)
    if not failures:
        clear_cluster_state()
    return failures


def spec_state(spec: ClusterSpec) -> dict:
    """A state record for ``spec`` (``swarm down CLUSTER.yaml`` when no state file exists)."""
    return {
        "head_address": spec.head.address,
        "nodes": [{"address": spec.head.address, "agent": spec.head.agent_address, "role": builders.HEAD}]
        + [{"address": w.address, "agent": w.agent_address, "role": builders.WORKER} for w in spec.workers],
    }
