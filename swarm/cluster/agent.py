"""The node agent: this PC's inventory, and its one Ray node started and stopped on request.

``swarm agent`` serves this over gRPC and TLS (``swarm.cluster.server``); ``swarm up`` and
``swarm down`` on the head call it. The agent holds the cluster secret and derives Ray's token
from it itself, so no call ever carries a token. Its node key never leaves the PC: the head
issues a certificate for its public half, which the agent checks and gives to Ray.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import grpc

import swarm
from swarm import hardware
from swarm.cluster import builders, keys, tls
from swarm.cluster.builders import RayNodeSettings
from swarm.cluster.client import AgentClient
from swarm.cluster.constants import AGENT_PORT
from swarm.cluster.messages import inventory_to_proto
from swarm.cluster.proto import agent_pb2 as pb
from swarm.cluster.raynode import RayNode, RayStartError
from swarm.cluster.server import AgentError, build_server
from swarm.errors import UserError
from swarm.home import (home_dir, logs_dir, offload_dir, ray_temp_dir, resolve_secret, secret_path, swarm_home,
                        write_private)

WRITE_SPEED_MAX_AGE_S = 600.0  # a drive's speed does not change; re-measure rarely


class AgentService:
    """What the agent does; each method takes a request message and returns the reply.

    Args:
        secret: the cluster secret (Ray's token); ``None`` runs Ray without authentication.
        offload: the offload folder whose free space and write speed are reported.
    """

    def __init__(self, secret: str | None, offload: Path):
        self.secret = secret
        self.offload = offload
        self.key = tls.node_key()  # made on first start; only its public half is ever sent
        self.node: RayNode | None = None
        self._stopped_on_purpose = False
        self._lock = threading.Lock()  # one start/stop at a time
        self._speed: tuple[float, float] | None = None  # (measured at, bytes/s)
        self._speed_lock = threading.Lock()  # one measurement at a time

    def write_speed(self, measure: bool) -> float | None:
        """The offload folder's write speed: measured now if ``measure`` and none is fresh."""
        with self._speed_lock:
            if measure and (self._speed is None or time.monotonic() - self._speed[0] > WRITE_SPEED_MAX_AGE_S):
                self._speed = (time.monotonic(), hardware.measure_write_speed(self.offload))
            return self._speed[1] if self._speed else None

    def health(self, request: pb.HealthRequest) -> pb.HealthReply:
        status = self._node_status()
        healthy = not status.failure
        return pb.HealthReply(
            healthy=healthy,
            swarm_version=swarm.__version__,
            auth_mode="token" if self.secret else "disabled",
            ray=status,
            message="ok" if healthy else status.failure,
        )

    def inventory(self, request: pb.InventoryRequest) -> pb.InventoryReply:
        speed = self.write_speed(request.measure_disk)
        inv = hardware.inventory(peer=request.peer or None, offload=self.offload, write_speed=speed)
        reply = inventory_to_proto(inv, offload_dir=str(self.offload))
        reply.node_public_key = tls.public_key_pem(self.key)
        return reply

    def start_ray(self, request: pb.StartRayRequest) -> pb.StartRayReply:
        if request.role not in (builders.HEAD, builders.WORKER):
            raise AgentError(f"role must be head or worker, not {request.role!r}", grpc.StatusCode.INVALID_ARGUMENT)
        with self._lock:
            if self.node is not None and self.node.running():
                s = self.node.settings
                if s.role == request.role and s.head_address == request.head_address:
                    return pb.StartRayReply(
                        already_running=True, node_ip=s.node_ip, interface=s.interface or "", log_path=str(self.node.log_path)
                    )
                raise AgentError(
                    f"{socket.gethostname()} already runs a Ray {s.role} of head {s.head_address}; "
                    "run `swarm down` on that head first"
                )
            settings = self._settings(request)
            node = RayNode(settings, self._ray_env(request, settings), logs_dir() / "ray-node.log")
            self._stopped_on_purpose = False
            self.node = node
            try:
                node.start()
            except RayStartError as exc:
                self.node = None  # the caller hears why; the agent itself stays healthy
                raise AgentError(f"Ray {request.role} failed to start on {socket.gethostname()}: {exc}") from None
            return pb.StartRayReply(node_ip=settings.node_ip, interface=settings.interface or "", log_path=str(node.log_path))

    def _ray_env(self, request: pb.StartRayRequest, settings: RayNodeSettings) -> dict[str, str]:
        """The node's variables: the derived token and the certificate the head sent."""
        events = settings.role == builders.HEAD  # see builders.ray_events_env
        # Ray's processes inherit the agent's proxy settings, but never for the swarm's hosts.
        no_proxy = builders.no_proxy_env(os.environ, [settings.head_address, settings.node_ip])
        if self.secret is None:
            return {**builders.ray_node_env(None, settings.interface, None, settings.metrics, events), **no_proxy}
        if not request.node_certificate:
            raise AgentError("the head sent no node certificate (it runs an older swarm); install the same swarm on every PC")
        try:
            files = tls.install_node_certificate(request.node_certificate, request.ca_certificate, settings.node_ip)
        except UserError as exc:
            raise AgentError(f"{socket.gethostname()}: {exc}", grpc.StatusCode.PERMISSION_DENIED) from None
        return {**builders.ray_node_env(keys.ray_token(self.secret), settings.interface, files, settings.metrics, events),
                **no_proxy}

    def issue_certificate(self, request: pb.IssueCertificateRequest) -> pb.IssueCertificateReply:
        """A node certificate from this PC's CA (the head's) for a PC that joins without agent."""
        if self.secret is None:
            raise AgentError("this agent runs with --insecure: its swarm has no TLS to join")
        try:
            ipaddress.IPv4Address(request.address)
        except ValueError:
            raise AgentError(f"{request.address!r} is not an IPv4 address", grpc.StatusCode.INVALID_ARGUMENT) from None
        cert = tls.issue_node_certificate(request.public_key, [request.address])
        return pb.IssueCertificateReply(certificate=cert, ca_certificate=tls.ca_certificate_pem())

    def rekey(self, request: pb.RekeyRequest) -> pb.RekeyReply:
        """Take the new cluster secret: stop the Ray node (it runs with the old token), save it.

        The server checks later calls with the new secret once this reply is signed.
        """
        if self.secret is None:
            raise AgentError("this agent runs with --insecure: it has no secret to replace")
        new = keys.open_sealed_secret(self.secret, request.sealed_secret)
        if new is None or not keys.valid_secret(new):
            raise AgentError("the new secret did not open with this PC's current one", grpc.StatusCode.INVALID_ARGUMENT)
        stopped = self.stop_ray()
        home_dir()
        write_private(secret_path(), (new + "\n").encode())
        self.secret = new
        return pb.RekeyReply(was_running=stopped.was_running)

    def stop_ray(self, request: pb.StopRayRequest | None = None) -> pb.StopRayReply:
        with self._lock:
            if self.node is None:
                return pb.StopRayReply(was_running=False)
            was_running = self.node.running()
            self._stopped_on_purpose = True
            stopped = self.node.stop()
            return pb.StopRayReply(was_running=was_running, processes_stopped=stopped)

    def _settings(self, request: pb.StartRayRequest) -> RayNodeSettings:
        head = request.head_address
        reach = hardware.interface_to(head)
        if request.role == builders.HEAD:
            local = {addr for addrs in hardware.interfaces().values() for addr, _ in addrs}
            if head not in local:
                raise AgentError(f"{head} is not an address of {socket.gethostname()} (it has {', '.join(sorted(local))}); fix head.address in the cluster file")
        elif reach is None:
            raise AgentError(f"no network interface of {socket.gethostname()} reaches the head at {head}")
        return RayNodeSettings(
            role=request.role,
            node_ip=head if request.role == builders.HEAD else reach[1],
            head_address=head,
            temp_dir=str(ray_temp_dir()),
            object_store_bytes=request.object_store_bytes or builders.default_object_store_bytes(hardware.ram_bytes()),
            num_cpus=request.num_cpus if request.HasField("num_cpus") else None,
            num_gpus=request.num_gpus if request.HasField("num_gpus") else None,
            resources=dict(request.resources),
            dashboard_host=request.dashboard_host or "127.0.0.1",
            interface=reach[0] if reach else None,
            worker_slots=builders.worker_slots(
                request.num_gpus if request.HasField("num_gpus") else None, len(hardware.gpus())),
            metrics=request.metrics,
        )

    def _node_status(self) -> pb.RayNodeStatus:
        node = self.node
        if node is None:
            return pb.RayNodeStatus()
        s = node.settings
        status = pb.RayNodeStatus(
            running=node.running(), role=s.role, node_ip=s.node_ip, head_address=s.head_address,
            pid=node.pid, log_path=str(node.log_path),
            dashboard_url=builders.dashboard_url(s.dashboard_host, s.head_address) if s.role == builders.HEAD else "",
        )
        if not status.running and not self._stopped_on_purpose:
            status.failure = f"the Ray {s.role} exited with status {node.proc.returncode}: {node.log_tail()}"
        return status


def agent_file() -> Path:
    """``$SWARM_HOME/agent.json``: where the running agent listens (read by ``--health``)."""
    return swarm_home() / "agent.json"


def run_agent(listen: str, secret: str | None, offload: Path, ready=None) -> None:
    """Serve the agent on ``listen`` until SIGTERM or SIGINT, then stop the Ray node it started.

    Args:
        listen: ``HOST:PORT`` to bind.
        secret: the cluster secret, or ``None`` for ``--insecure``.
        offload: the offload folder to report on.
        ready: optional callable run once the server listens (prints the banner).
    """
    service = AgentService(secret, offload)
    # Measured now, while nothing waits for it: `swarm up` then finds the figure ready instead
    # of writing to every PC's drive while Ray starts.
    threading.Thread(target=service.write_speed, args=(True,), daemon=True).start()
    identity = (tls.private_key_pem(service.key), tls.agent_certificate(service.key))
    server, _ = build_server(service, secret, listen, identity)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    path = agent_file()
    home_dir()
    path.write_text(json.dumps({"listen": listen, "pid": os.getpid(), "auth": "token" if secret else "disabled"}))
    try:
        if ready:
            ready()
        while not done.wait(1.0):
            pass
    finally:
        # Stop Ray first: its processes must not outlive the agent that owns them.
        service.stop_ray()
        server.stop(grace=2).wait()
        path.unlink(missing_ok=True)


def serve(listen: str, offload: str | None, insecure: bool) -> int:
    """``swarm agent``: read the secret, serve until stopped; the exit status."""
    secret = resolve_secret(insecure)
    folder = Path(offload).expanduser() if offload else offload_dir()
    mode = ("WITHOUT authentication, Ray WITHOUT TLS (--insecure)" if secret is None
            else "TLS, calls signed with a key derived from the cluster secret")
    missing_tools = hardware.build_tools_warning()
    if missing_tools:
        print(missing_tools, file=sys.stderr, flush=True)  # in the agent's journal, before swarm up joins it
    run_agent(listen, secret, folder, ready=lambda: print(f"swarm agent on {listen}, {mode}; offload folder {folder}", flush=True))
    return 0


def local_agent_address() -> str:
    """Where this PC's agent listens, from ``agent.json`` (loopback when it binds all addresses)."""
    try:
        listen = json.loads(agent_file().read_text())["listen"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return f"127.0.0.1:{AGENT_PORT}"
    host, _, port = listen.rpartition(":")
    return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"


def check_health(address: str | None, insecure: bool) -> tuple[bool, str]:
    """``swarm agent --health``: (healthy, one line saying why)."""
    address = address or local_agent_address()
    try:
        with AgentClient(address, resolve_secret(insecure), timeout_s=5) as client:
            reply = client.health()
    except UserError as exc:
        return False, f"unhealthy: {exc}"
    ray = f"Ray {reply.ray.role} running" if reply.ray.running else "no Ray node"
    if not reply.healthy:
        return False, f"unhealthy: {reply.message}"
    return True, f"healthy: agent {address}, swarm {reply.swarm_version}, {ray}"
