"""Calling agents (over TLS, signed, with the reply's signature checked), and Ray's client
environment."""

from __future__ import annotations

import os
import socket
import ssl
import threading

import grpc

from swarm.cluster import auth, keys, tls
from swarm.cluster.builders import no_proxy_env, ray_auth_env, ray_tls_env
from swarm.cluster.constants import AGENT_PORT
from swarm.cluster.messages import method_path
from swarm.cluster.proto import agent_pb2 as pb
from swarm.errors import UserError


def ray_client_env(secret: str | None, files: tls.TlsFiles | None = None) -> dict[str, str]:
    """Variables a Ray client (``ray.init``, ``ray status``, job submission) needs for this swarm.

    Set them before ``import ray`` (Ray reads them when its core starts): Ray's token
    (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``, derived from the secret) and its TLS files
    (``RAY_USE_TLS=1`` and this PC's node certificate, key and CA certificate), or
    ``RAY_AUTH_MODE=disabled`` alone for a swarm started with ``--insecure`` (``secret=None``);
    and ``no_proxy`` with loopback added, so that Ray's HTTP calls to the dashboard (its state
    API sends the token) never go to a web proxy.

    Args:
        secret: the cluster secret, or ``None``.
        files: the node files to use (default: this PC's, ``$SWARM_HOME/tls``).

    Raises:
        UserError: this PC has no node certificate (it is not a node of the swarm).
    """
    if secret is None:
        return {**ray_auth_env(None), **no_proxy_env(os.environ)}
    return {**ray_auth_env(keys.ray_token(secret)), **ray_tls_env(files or tls.installed_node_files()),
            **no_proxy_env(os.environ)}


def agent_address(text: str) -> str:
    """``HOST:PORT`` from ``HOST`` or ``HOST:PORT`` (the agent's default port filled in)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return f"{text}:{AGENT_PORT}"
    if not host or not port.isdigit():
        raise UserError(f"agent address {text!r} is not HOST or HOST:PORT")
    return text


class AgentCallError(UserError):
    """An agent could not be reached, refused the call, or could not do it."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class AgentClient:
    """A TLS connection to one agent, opened on the first call.

    The agent shows a certificate of its own making; the client takes whichever it is shown
    and binds every signed call to it (``swarm.cluster.auth``), so the secret, not a CA,
    decides whom the client talks to.

    Args:
        address: ``HOST`` or ``HOST:PORT`` of the agent.
        secret: the cluster secret; ``None`` sends unsigned calls (``--insecure``).
        timeout_s: deadline of each call, except ``start_ray`` which waits for Ray.
    """

    def __init__(self, address: str, secret: str | None, timeout_s: float = 20.0):
        self.address = agent_address(address)
        self.timeout_s = timeout_s
        self._key = keys.agent_key(secret) if secret else None
        self._channel: grpc.Channel | None = None
        self._fingerprint = b""
        self._lock = threading.Lock()  # calls may come from several threads

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _connect(self) -> grpc.Channel:
        with self._lock:
            return self._channel or self._open()

    def _open(self) -> grpc.Channel:
        """Fetch the agent's certificate, then open a channel that trusts exactly that one."""
        host, _, port = self.address.rpartition(":")
        try:
            pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=self.timeout_s).encode()
        except ssl.SSLError as exc:
            raise AgentCallError(f"{self.address} does not speak TLS as a swarm agent does ({exc.reason}); "
                                 "is it an agent of an older swarm?", grpc.StatusCode.UNAVAILABLE) from None
        except (socket.timeout, TimeoutError):
            raise AgentCallError(f"the agent at {self.address} did not answer in time", grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except OSError:
            raise self._unavailable() from None
        self._fingerprint = tls.fingerprint(pem)
        self._channel = grpc.secure_channel(
            self.address, grpc.ssl_channel_credentials(root_certificates=pem),
            # Agents are the swarm's own PCs: a web proxy from the environment (gRPC honours
            # http_proxy / https_proxy) would only learn who talks to whom, or break the call.
            options=[("grpc.ssl_target_name_override", tls.AGENT_TLS_NAME), ("grpc.enable_http_proxy", 0)],
        )
        return self._channel

    def issue_certificate(self, public_key: bytes, address: str) -> pb.IssueCertificateReply:
        return self.call("IssueCertificate", pb.IssueCertificateRequest(public_key=public_key, address=address),
                         pb.IssueCertificateReply)

    def health(self) -> pb.HealthReply:
        return self.call("Health", pb.HealthRequest(), pb.HealthReply)

    def inventory(self, peer: str = "", measure_disk: bool = False) -> pb.InventoryReply:
        return self.call("Inventory", pb.InventoryRequest(peer=peer, measure_disk=measure_disk), pb.InventoryReply, timeout_s=60)

    def start_ray(self, request: pb.StartRayRequest) -> pb.StartRayReply:
        return self.call("StartRay", request, pb.StartRayReply, timeout_s=180)

    def stop_ray(self) -> pb.StopRayReply:
        return self.call("StopRay", pb.StopRayRequest(), pb.StopRayReply, timeout_s=60)

    def call(self, method: str, request, reply_cls, timeout_s: float | None = None):
        """Call ``method`` with ``request``, signed, and return the checked, parsed reply.

        Raises:
            AgentCallError: the agent is unreachable, refused the call, failed, or could not
                prove that it holds the same secret.
        """
        timeout = timeout_s or self.timeout_s
        body = request.SerializeToString()
        channel = self._connect()
        try:
            if self._key is None:
                return reply_cls.FromString(channel.unary_unary(method_path(method))(body, timeout=timeout))
            snonce = pb.ChallengeReply.FromString(
                channel.unary_unary(method_path("Challenge"))(pb.ChallengeRequest().SerializeToString(), timeout=self.timeout_s)
            ).nonce
            cnonce = auth.new_nonce()
            metadata = (
                (auth.MD_SERVER_NONCE, snonce),
                (auth.MD_CLIENT_NONCE, cnonce),
                (auth.MD_MAC, auth.request_mac(self._key, method, snonce, cnonce, body, self._fingerprint)),
            )
            out, call = channel.unary_unary(method_path(method)).with_call(body, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        mac = dict(call.trailing_metadata() or ()).get(auth.MD_MAC)
        if not auth.verify(auth.reply_mac(self._key, method, snonce, cnonce, out, self._fingerprint), mac):
            raise AgentCallError(
                f"the agent at {self.address} did not sign its reply with this cluster's secret "
                "(it runs with --insecure or another secret); give every PC the same secret file",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        return reply_cls.FromString(out)

    def _unavailable(self) -> AgentCallError:
        return AgentCallError(
            f"no swarm agent answers at {self.address}; start `swarm agent` on that PC "
            f"(and let TCP port {self.address.rpartition(':')[2]} through its firewall)", grpc.StatusCode.UNAVAILABLE)

    def _error(self, exc: grpc.RpcError) -> AgentCallError:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return self._unavailable()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            msg = f"the agent at {self.address} did not answer in time"
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            msg = f"the agent at {self.address} refused the call: {exc.details()}"
        else:
            msg = f"agent at {self.address}: {exc.details()}"
        return AgentCallError(msg, code)
