"""Calling agents (signed, with the reply's signature checked), and Ray's client environment."""

from __future__ import annotations

import grpc

from swarm.cluster import auth
from swarm.cluster.builders import ray_auth_env
from swarm.cluster.constants import AGENT_PORT
from swarm.cluster.messages import method_path
from swarm.cluster.proto import agent_pb2 as pb
from swarm.errors import UserError


def ray_client_env(secret: str | None) -> dict[str, str]:
    """Variables a Ray client (``ray.init``, ``ray status``, job submission) needs for this swarm.

    Set them before ``import ray`` (Ray reads them when its core starts):
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN=<secret>``, or ``RAY_AUTH_MODE=disabled`` for
    a swarm started with ``--insecure`` (``secret=None``).
    """
    return ray_auth_env(secret)


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
    """A connection to one agent.

    Args:
        address: ``HOST`` or ``HOST:PORT`` of the agent.
        secret: the cluster secret; ``None`` sends unsigned calls (``--insecure``).
        timeout_s: deadline of each call, except ``start_ray`` which waits for Ray.
    """

    def __init__(self, address: str, secret: str | None, timeout_s: float = 20.0):
        self.address = agent_address(address)
        self.timeout_s = timeout_s
        self._key = auth.agent_key(secret) if secret else None
        self._channel = grpc.insecure_channel(self.address)

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

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
        try:
            if self._key is None:
                return reply_cls.FromString(self._channel.unary_unary(method_path(method))(body, timeout=timeout))
            snonce = pb.ChallengeReply.FromString(
                self._channel.unary_unary(method_path("Challenge"))(pb.ChallengeRequest().SerializeToString(), timeout=self.timeout_s)
            ).nonce
            cnonce = auth.new_nonce()
            metadata = (
                (auth.MD_SERVER_NONCE, snonce),
                (auth.MD_CLIENT_NONCE, cnonce),
                (auth.MD_MAC, auth.request_mac(self._key, method, snonce, cnonce, body)),
            )
            out, call = self._channel.unary_unary(method_path(method)).with_call(body, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        mac = dict(call.trailing_metadata() or ()).get(auth.MD_MAC)
        if not auth.verify(auth.reply_mac(self._key, method, snonce, cnonce, out), mac):
            raise AgentCallError(
                f"the agent at {self.address} did not sign its reply with this cluster's secret "
                "(it runs with --insecure or another secret); give every PC the same secret file",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        return reply_cls.FromString(out)

    def _error(self, exc: grpc.RpcError) -> AgentCallError:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            msg = (f"no swarm agent answers at {self.address}; start `swarm agent` on that PC "
                   f"(and let TCP port {self.address.rpartition(':')[2]} through its firewall)")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            msg = f"the agent at {self.address} did not answer in time"
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            msg = f"the agent at {self.address} refused the call: {exc.details()}"
        else:
            msg = f"agent at {self.address}: {exc.details()}"
        return AgentCallError(msg, code)
