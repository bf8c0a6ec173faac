"""The agent's gRPC server: TLS always; every method but Challenge checks the caller's HMAC
(bound to the server's TLS certificate) and signs its reply.

Handlers receive and return raw bytes (no (de)serializer on the gRPC side) so that the MACs
cover exactly the bytes on the wire; messages are parsed only after the check passes.
"""

from __future__ import annotations

import re
from concurrent import futures

import grpc

from swarm.cluster import auth, keys, tls
from swarm.cluster.messages import SERVICE
from swarm.cluster.proto import agent_pb2 as pb
from swarm.errors import UserError


class AgentError(Exception):
    """A call the agent refuses or cannot do; the client shows ``message`` as one line."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION):
        super().__init__(message)
        self.code = code


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _message_class(descriptor):
    return getattr(pb, descriptor.name)


class _Authenticator:
    """Checks request MACs against single-use nonces and signs replies."""

    def __init__(self, secret: str | None, channel: bytes):
        self.key = keys.agent_key(secret) if secret else None
        self.channel = channel  # fingerprint of the certificate this server shows
        self.nonces = auth.NonceBook()

    def use(self, secret: str) -> None:
        """Check and sign every later call with keys derived from ``secret`` (after a Rekey)."""
        self.key = keys.agent_key(secret)

    def check(self, method: str, body: bytes, context: grpc.ServicerContext) -> tuple[bytes, bytes]:
        if self.key is None:  # agent started with --insecure
            return b"", b""
        md = dict(context.invocation_metadata())
        snonce, cnonce, mac = md.get(auth.MD_SERVER_NONCE), md.get(auth.MD_CLIENT_NONCE), md.get(auth.MD_MAC)
        if not (snonce and cnonce and mac):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the call carries no signature: the caller has no cluster secret (copy the head's "
                "secret file to $SWARM_HOME/secret on that PC)",
            )
        replay = "the call's nonce is unknown, used or expired (a replay?)"
        if not self.nonces.fresh(snonce):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, replay)
        if not auth.verify(auth.request_mac(self.key, method, snonce, cnonce, body, self.channel), mac):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the call is signed with a different cluster secret than this agent's (or for another "
                "TLS certificate: something between you and the agent?); use the same secret file on every PC",
            )
        # Spent only now: a caller without the secret cannot use up memory (nor anyone's nonce).
        if not self.nonces.consume(snonce):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, replay)
        return snonce, cnonce

    def sign(self, method: str, snonce: bytes, cnonce: bytes, body: bytes, context: grpc.ServicerContext) -> None:
        if self.key is not None:
            context.set_trailing_metadata(((auth.MD_MAC, auth.reply_mac(self.key, method, snonce, cnonce, body, self.channel)),))


def _handlers(service, authn: _Authenticator) -> dict[str, grpc.RpcMethodHandler]:
    """One raw-bytes handler per method of the .proto's Agent service."""

    def challenge(body: bytes, context) -> bytes:
        pb.ChallengeRequest.FromString(body)
        nonce = authn.nonces.issue() if authn.key else b""
        return pb.ChallengeReply(nonce=nonce).SerializeToString()

    def authenticated(name: str, request_cls, impl):
        def behavior(body: bytes, context) -> bytes:
            snonce, cnonce = authn.check(name, body, context)
            try:
                reply = impl(request_cls.FromString(body))
            except AgentError as exc:
                context.abort(exc.code, str(exc))
            except UserError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            out = reply.SerializeToString()
            authn.sign(name, snonce, cnonce, out, context)
            if name == "Rekey":  # signed with the old key, which the caller still holds; then the new
                authn.use(service.secret)
            return out

        return behavior

    handlers = {}
    for method in SERVICE.methods:
        if method.name == "Challenge":
            behavior = challenge
        else:
            impl = getattr(service, _snake(method.name))  # StartRay -> service.start_ray
            behavior = authenticated(method.name, _message_class(method.input_type), impl)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(behavior)
    return handlers


def build_server(service, secret: str | None, listen: str, tls_identity: tuple[bytes, bytes],
                 max_workers: int = 4) -> tuple[grpc.Server, int]:
    """A started gRPC server over TLS for ``service`` on ``listen`` (``HOST:PORT``), and its port.

    Args:
        service: object with one snake_case method per Agent RPC (``health``, ``inventory``,
            ``start_ray``, ``stop_ray``, ...), each taking the request message, returning the reply.
        secret: the cluster secret; ``None`` accepts unsigned calls (``--insecure``).
        listen: address to bind (port 0 picks a free one).
        tls_identity: (private key, certificate) in PEM that the server shows; signed calls
            are bound to this certificate.

    Raises:
        UserError: the address cannot be bound.
    """
    key_pem, cert_pem = tls_identity
    authn = _Authenticator(secret, tls.fingerprint(cert_pem))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, _handlers(service, authn)),))
    try:
        port = server.add_secure_port(listen, grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    except RuntimeError:
        port = 0
    if not port:
        raise UserError(f"cannot listen on {listen}: the port is taken or the address is not this PC's; pass --listen HOST:PORT")
    server.start()
    return server, port
