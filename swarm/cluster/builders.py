"""Pure builders: ``ray start`` argv and environment, interface choice, version checks.

Nothing here starts a process or opens a socket; ``swarm.cluster.raynode`` launches what these
functions describe, and the unit tests check them as data.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from swarm.cluster import constants as C

HEAD = "head"
WORKER = "worker"

# Versions that must match the head's exactly: Ray refuses mismatched Python and Ray anyway
# (with a less clear message), and torch / deepspeed / swarm must agree for one training step
# to mean the same thing on every node.
CHECKED_VERSIONS = ("python", "ray", "torch", "deepspeed", "swarm")

# Variables a child Ray process must not inherit from whoever started the agent: a stale
# token, a token file, TLS files or a cluster address would override what swarm sets.
_SCRUBBED_ENV = (
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
    "RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT",
    "RAY_enable_metrics_collection", "AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT",
    "RAY_event_log_reporter_enabled",
)
# Ray binds its autoscaler's and its dashboard's Prometheus servers to every address, without
# authentication, and offers no switch to turn them off. A port number outside 0-65535 makes
# their start fail (Ray logs the exception once and carries on without them): that is the
# switch. 65536 says so plainly in Ray's logs ("port must be 0-65535").
_NO_PORT = "65536"


@dataclass(frozen=True)
class RayNodeSettings:
    """Everything that decides how one PC's Ray node is started."""

    role: str  # HEAD or WORKER
    node_ip: str  # the address this node is reached at
    head_address: str  # the head's address (equal to node_ip on the head)
    temp_dir: str  # Ray's --temp-dir; one per host, short (Unix socket paths)
    object_store_bytes: int
    num_cpus: int | None = None  # None: Ray counts them
    num_gpus: int | None = None  # None: Ray counts them
    resources: Mapping[str, float] = field(default_factory=dict)
    dashboard_host: str = "127.0.0.1"  # head only
    interface: str | None = None  # NCCL / Gloo socket interface (reaches the head)
    worker_slots: int = 1  # training workers it may host (see worker_slots())
    metrics: bool = False  # open Ray's unauthenticated Prometheus endpoints (cluster file: ray.metrics)

    def __post_init__(self):
        if self.role not in (HEAD, WORKER):
            raise ValueError(f"role must be {HEAD!r} or {WORKER!r}, not {self.role!r}")
        if self.role == HEAD and self.node_ip != self.head_address:
            raise ValueError("a head node's node_ip is the head address")
        if self.object_store_bytes < C.MIN_OBJECT_STORE_BYTES:
            raise ValueError(f"object store of {self.object_store_bytes} bytes is below {C.MIN_OBJECT_STORE_BYTES}")


def gcs_address(head_address: str) -> str:
    """``HOST:PORT`` of the head's GCS, what ``ray.init(address=...)`` takes."""
    return f"{head_address}:{C.RAY_GCS_PORT}"


def dashboard_url(dashboard_host: str, head_address: str) -> str:
    """URL of the dashboard: on the head itself when bound to loopback, else on its address."""
    host = {"0.0.0.0": head_address, "localhost": "127.0.0.1"}.get(dashboard_host, dashboard_host)
    return f"http://{host}:{C.RAY_DASHBOARD_PORT}"


def default_object_store_bytes(ram_bytes: int) -> int:
    """Object store size when the cluster file gives none: 10% of RAM, between 100 MiB and 4 GiB.

    Ray's own default (30% of RAM) competes with DeepSpeed's CPU offload for host memory, and
    Ray's memory monitor kills workers near 95% use; swarm moves tensors through DeepSpeed,
    not the object store, so a small store is enough.
    """
    return max(C.MIN_OBJECT_STORE_BYTES, min(4 * 1024**3, ram_bytes // 10))


def ray_start_argv(s: RayNodeSettings, python: str = sys.executable) -> list[str]:
    """The ``ray start`` command line for ``s``, blocking in the foreground.

    ``--block`` keeps one parent process per node, so the caller can stop exactly this node
    (its process group) instead of ``ray stop``, which kills every Ray process on the machine.
    """
    argv = [
        python, "-m", "ray.scripts.scripts", "start", "--block",
        "--node-ip-address", s.node_ip,
        "--temp-dir", s.temp_dir,
        "--object-store-memory", str(s.object_store_bytes),
        "--node-manager-port", str(C.RAY_NODE_MANAGER_PORT),
        "--object-manager-port", str(C.RAY_OBJECT_MANAGER_PORT),
        "--runtime-env-agent-port", str(C.RAY_RUNTIME_ENV_AGENT_PORT),
        "--dashboard-agent-grpc-port", str(C.RAY_DASHBOARD_AGENT_GRPC_PORT),
        # The dashboard agent's HTTP server (Ray's per-node job agent, and Serve's API) runs
        # any command for whoever holds Ray's token, on the node's LAN address, with no
        # certificate asked: a leaked token would be a shell on every PC. swarm runs no Ray
        # job through it, so it stays closed (a port Ray cannot bind; the agent logs it once
        # and runs without HTTP). Jobs reach the swarm as drivers, over mutual TLS.
        "--dashboard-agent-listen-port", _NO_PORT,
        "--metrics-export-port", str(C.RAY_METRICS_EXPORT_PORT),
        "--min-worker-port", str(C.RAY_MIN_WORKER_PORT),
        "--max-worker-port", str(C.RAY_MAX_WORKER_PORT),
        "--disable-usage-stats",
        # The log monitor streams workers' output to drivers; swarm's drivers do not print it
        # (log_to_driver=False) and every log stays in the node's session folder, so one Python
        # process fewer per node starts (a shorter `swarm up`).
        "--include-log-monitor", "false",
    ]
    if s.role == HEAD:
        argv += [
            "--head",
            "--port", str(C.RAY_GCS_PORT),
            "--ray-client-server-port", str(C.RAY_CLIENT_PORT),
            "--include-dashboard", "true",
            "--dashboard-host", s.dashboard_host,
            "--dashboard-port", str(C.RAY_DASHBOARD_PORT),
        ]
    else:
        argv += ["--address", gcs_address(s.head_address)]
    if s.num_cpus is not None:
        argv += ["--num-cpus", str(s.num_cpus)]
    if s.num_gpus is not None:
        argv += ["--num-gpus", str(s.num_gpus)]
    # The cluster file's resources win, so `train: false` can set the slots to 0.
    resources = {C.WORKER_SLOT_RESOURCE: s.worker_slots, **s.resources}
    resources = {name: amount for name, amount in resources.items() if amount}
    if resources:
        argv += ["--resources", json.dumps(dict(sorted(resources.items())))]
    return argv


def worker_slots(num_gpus: int | None, detected_gpus: int) -> int:
    """Training workers a node may host: one per GPU it gives Ray, or one without GPUs.

    Args:
        num_gpus: the GPUs the cluster file gives Ray (None: what the node has).
        detected_gpus: the GPUs the node has.
    """
    gpus = detected_gpus if num_gpus is None else num_gpus
    return max(1, gpus)


def ray_node_env(token: str | None, interface: str | None, tls_files=None, metrics: bool = False,
                 events: bool = True) -> dict[str, str]:
    """Variables to set for a Ray node (and so for every worker process it spawns).

    Args:
        token: Ray's auth token (derived from the cluster secret); ``None`` runs Ray without
            authentication (``--insecure``), said explicitly so that a token file in ``~/.ray``
            cannot turn authentication on for one node only.
        interface: the interface that reaches the head; NCCL and Gloo use it instead of
            guessing (NCCL's default filter skips Wi-Fi ``wl*`` and picks docker bridges).
        tls_files: the node's ``swarm.cluster.tls.TlsFiles``: Ray's gRPC then runs over mutual
            TLS; ``None`` (only with ``--insecure``) leaves it in plain text.
        metrics: open Ray's Prometheus endpoints (unauthenticated, on every address) on the
            pinned metrics ports; off, they stay closed.
        events: let the node's processes write Ray's event files, which its dashboard agent
            posts to the dashboard with Ray's token (see ``ray_events_env``): the head only.
    """
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    env.update(ray_auth_env(token))
    env.update(ray_tls_env(tls_files))
    env.update(ray_metrics_env(metrics))
    env.update(ray_events_env(events))
    if interface:
        env["NCCL_SOCKET_IFNAME"] = interface
        env["GLOO_SOCKET_IFNAME"] = interface
    return env


def ray_auth_env(token: str | None) -> dict[str, str]:
    """Ray's token-authentication variables for a node or a client."""
    if token is None:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def ray_tls_env(files) -> dict[str, str]:
    """Ray's TLS variables for a node or a client (``files``: a ``TlsFiles``, or ``None``).

    Every Ray gRPC server and channel of the process then uses TLS with this certificate on
    both ends and accepts only peers whose certificate the same CA signed.
    """
    if files is None:
        return {"RAY_USE_TLS": "0"}
    return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(files.cert), "RAY_TLS_SERVER_KEY": str(files.key),
            "RAY_TLS_CA_CERT": str(files.ca)}


def ray_metrics_env(metrics: bool) -> dict[str, str]:
    """Ray's metrics variables: its Prometheus endpoints on the pinned ports, or closed."""
    if metrics:
        return {"RAY_enable_metrics_collection": "1", "AUTOSCALER_METRIC_PORT": str(C.RAY_AUTOSCALER_METRICS_PORT),
                "DASHBOARD_METRIC_PORT": str(C.RAY_DASHBOARD_METRICS_PORT)}
    # Off, the dashboard agent (6384) does not start its exporter at all.
    return {"RAY_enable_metrics_collection": "0", "AUTOSCALER_METRIC_PORT": _NO_PORT, "DASHBOARD_METRIC_PORT": _NO_PORT}


def ray_events_env(events: bool) -> dict[str, str]:
    """Ray's event files on (the head) or off (a worker).

    A node's dashboard agent posts every event its processes write to the dashboard address
    that Ray keeps in its GCS, with Ray's token in plain HTTP. That address is the head's
    loopback (127.0.0.1:8265): on a worker PC nothing listens there, and any local user who
    binds the port would collect the token (with the dashboard on the LAN, the token would
    cross it in clear). On the head the dashboard itself holds that port.
    """
    return {} if events else {"RAY_event_log_reporter_enabled": "0"}


def no_proxy_env(environ: Mapping[str, str], hosts: Sequence[str] = ()) -> dict[str, str]:
    """``no_proxy`` / ``NO_PROXY``: what ``environ`` had, plus loopback and the swarm's ``hosts``.

    Ray's Python parts call its dashboard over HTTP with the token in a header (the state API
    of a driver, the dashboard's own checks) through ``requests``, which sends everything to
    ``http_proxy`` unless ``no_proxy`` names the host; a proxy that the PC's user set for the
    web would then receive the token in clear. Other destinations keep the user's proxy.
    """
    have = [h.strip() for h in (environ.get("no_proxy") or environ.get("NO_PROXY") or "").split(",") if h.strip()]
    merged = ",".join(dict.fromkeys([*have, "127.0.0.1", "localhost", "::1", *hosts]))
    return {"no_proxy": merged, "NO_PROXY": merged}


def child_env(base: Mapping[str, str], overlay: Mapping[str, str]) -> dict[str, str]:
    """``base`` without inherited Ray auth/address variables, then ``overlay`` on top."""
    env = {k: v for k, v in base.items() if k not in _SCRUBBED_ENV}
    env.update(overlay)
    return env


def choose_interface(
    peer: str,
    interfaces: Mapping[str, Sequence[tuple[str, str]]],
    routed_source: str | None = None,
) -> tuple[str, str] | None:
    """The (interface, local address) this PC uses to reach ``peer``.

    Args:
        peer: IPv4 address of the other PC (usually the head).
        interfaces: interface name -> [(IPv4 address, netmask)], as the OS lists them.
        routed_source: the source address the kernel picks for ``peer`` (from a route lookup);
            used when no interface is on the peer's subnet (a routed or VPN path).

    Returns:
        The interface and address, or ``None`` if no interface reaches ``peer``.
    """
    target = ipaddress.ip_address(peer)
    # 1. The peer is this PC (the head asking about itself).
    for name, addrs in interfaces.items():
        for addr, _ in addrs:
            if ipaddress.ip_address(addr) == target:
                return name, addr
    # 2. Directly connected: the most specific subnet that contains the peer.
    best: tuple[int, str, str] | None = None
    for name, addrs in interfaces.items():
        for addr, netmask in addrs:
            net = ipaddress.ip_network(f"{addr}/{netmask}", strict=False)
            if net.prefixlen == net.max_prefixlen or target not in net:
                continue
            if best is None or net.prefixlen > best[0]:
                best = (net.prefixlen, name, addr)
    if best:
        return best[1], best[2]
    # 3. Routed: whichever interface holds the kernel's chosen source address.
    if routed_source:
        for name, addrs in interfaces.items():
            if any(addr == routed_source for addr, _ in addrs):
                return name, routed_source
    return None


def version_mismatches(head: Mapping[str, str], node: Mapping[str, str], keys: Sequence[str] = CHECKED_VERSIONS) -> list[str]:
    """One phrase per version that differs, e.g. ``"swarm 9.9 differs from the head's 0.1.0"``."""
    out = []
    for key in keys:
        want, have = head.get(key, "not installed"), node.get(key, "not installed")
        if want != have:
            out.append(f"{key} {have} differs from the head's {want}")
    return out
