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
from swarm.cluster import builders
from swarm.cluster.client import AgentCallError, AgentClient
from swarm.cluster.constants import RAY_GCS_PORT
from swarm.cluster.proto import agent_pb2 as pb
from swarm.cluster.spec import ClusterSpec, NodeSpec
from swarm.cluster.state import alive_addresses, clear_cluster_state, load_cluster_state, save_cluster_state
from swarm.errors import UserError


@dataclass
class _Worker:
    spec: NodeSpec
    client: AgentClient
    health: pb.HealthReply | None = None
    refusal: str | None = None


def auth_mode(secret: str | None) -> str:
    return "token" if secret else "disabled"


def _check_worker(w: _Worker, head_address: str, head_versions: dict, secret: str | None) -> None:
    """Fill ``w.health`` or ``w.refusal`` (one phrase, without the node's address)."""
    try:
        w.health = w.client.health()
        # Measuring the offload drive here (once; the agent caches it) puts its speed in
        # `swarm status` and in the inventory the planner reads.
        versions = dict(w.client.inventory(peer=head_address, measure_disk=True).versions)
    except AgentCallError as exc:
        w.refusal = str(exc)
        return
    if w.health.auth_mode != auth_mode(secret):
        w.refusal = f"its agent runs with auth {w.health.auth_mode}, the head with {auth_mode(secret)}; start every agent the same way"
        return
    mismatches = builders.version_mismatches(head_versions, versions)
    if mismatches:
        w.refusal = "; ".join(mismatches) + "; install the same versions on every PC"


def _start_request(spec: ClusterSpec, node: NodeSpec, role: str) -> pb.StartRayRequest:
    merged = spec.merged(node)
    request = pb.StartRayRequest(
        role=role, head_address=spec.head.address, object_store_bytes=merged["object_store_bytes"],
        resources=merged["resources"], dashboard_host=spec.dashboard.host if role == builders.HEAD else "",
    )
    if merged["num_cpus"] is not None:
        request.num_cpus = merged["num_cpus"]
    if merged["num_gpus"] is not None:
        request.num_gpus = merged["num_gpus"]
    return request


def up(spec: ClusterSpec, secret: str | None, timeout_s: float = 180.0, say=print) -> list[str]:
    """Start the head, check and start every worker, and wait until all are alive in Ray.

    Args:
        spec: the cluster file.
        secret: the cluster secret, or ``None`` for ``--insecure``.
        timeout_s: how long to wait for the nodes to be alive.
        say: where progress lines go.

    Returns:
        One line per refused node (``node ADDRESS: why``); empty when all came up.

    Raises:
        UserError: the head cannot be reached or started, or a node never became alive.
    """
    local = {a for addrs in hardware.interfaces().values() for a, _ in addrs}
    if spec.dashboard.host in ("127.0.0.1", "localhost") and spec.head.address not in local:
        raise UserError(f"run `swarm up` on the head PC ({spec.head.address} is not an address of this one), or set dashboard.host to the head's address")
    head = AgentClient(spec.head.agent_address, secret)
    workers = [_Worker(w, AgentClient(w.agent_address, secret)) for w in spec.workers]
    try:
        head_health = head.health()
        if head_health.auth_mode != auth_mode(secret):
            raise UserError(f"the head's agent runs with auth {head_health.auth_mode} but this command with {auth_mode(secret)}; use --insecure on both or neither")
        head_versions = dict(head.inventory(peer=spec.head.address, measure_disk=True).versions)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda w: _check_worker(w, spec.head.address, head_versions, secret), workers))

        t0 = time.monotonic()
        dashboard = builders.dashboard_url(spec.dashboard.host, spec.head.address)
        accepted = [w for w in workers if w.refusal is None]
        save_cluster_state({  # first, so that `swarm down` works even if this is interrupted
            "head_address": spec.head.address,
            "gcs_address": builders.gcs_address(spec.head.address),
            "dashboard": dashboard,
            "auth": auth_mode(secret),
            "nodes": [{"address": spec.head.address, "agent": spec.head.agent_address, "role": builders.HEAD}]
            + [{"address": w.spec.address, "agent": w.spec.agent_address, "role": builders.WORKER} for w in accepted],
        })
        fresh_head = not (head_health.ray.running and head_health.ray.role == builders.HEAD)
        # Workers of a head that is started now are all stale; otherwise ask Ray which live.
        alive = set() if fresh_head else _wait_alive(dashboard, secret, {spec.head.address}, timeout_s)

        def start_worker(w: _Worker) -> None:
            try:
                # A node still attached to a head that restarted is stale: start it afresh.
                if w.health.ray.running and (fresh_head or w.spec.address not in alive):
                    w.client.stop_ray()
                reply = w.client.start_ray(_start_request(spec, w.spec, builders.WORKER))
                what = "already running" if reply.already_running else "started"
                say(f"worker {w.spec.address}: {what} via {reply.interface or '?'} ({time.monotonic() - t0:.1f}s)")
            except AgentCallError as exc:
                w.refusal = str(exc)

        with ThreadPoolExecutor(max_workers=8) as pool:
            head_start = pool.submit(head.start_ray, _start_request(spec, spec.head, builders.HEAD))
            # The GCS accepts workers long before the head's dashboard and raylet are ready:
            # starting them then overlaps the slowest parts of every PC's start.
            _wait_port(spec.head.address, RAY_GCS_PORT, head_start, timeout_s)
            if head_start.done() and head_start.exception():
                head_start.result()  # the head failed: raise before any worker is started
            workers_started = [pool.submit(start_worker, w) for w in accepted]
            started = head_start.result()
            say(f"head {spec.head.address}: {'already running' if started.already_running else 'started'} ({time.monotonic() - t0:.1f}s)")
            for future in workers_started:
                future.result()
        expected = {spec.head.address} | {w.spec.address for w in workers if w.refusal is None}
        _wait_alive(dashboard, secret, expected, timeout_s)
        say(f"all {len(expected)} nodes alive ({time.monotonic() - t0:.1f}s)")
    finally:
        head.close()
        for w in workers:
            w.client.close()
    return [f"node {w.spec.address}: {w.refusal}" for w in workers if w.refusal]


def _wait_port(host: str, port: int, give_up: Future, timeout_s: float) -> None:
    """Return once ``host:port`` accepts TCP connections, ``give_up`` is done, or time is out."""
    deadline = time.monotonic() + timeout_s
    while not give_up.done() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)


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
