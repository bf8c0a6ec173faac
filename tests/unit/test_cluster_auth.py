"""Signed agent calls over real gRPC and TLS on loopback: right secret, none, wrong, replay,
impostor, a machine in the middle, and Ray's token used as if it were the secret."""

from __future__ import annotations

import socket
import ssl
import threading

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from swarm.cluster import auth, keys, tls
from swarm.cluster.agent import AgentService
from swarm.cluster.client import AgentCallError, AgentClient
from swarm.cluster.messages import method_path
from swarm.cluster.proto import agent_pb2 as pb
from swarm.cluster.server import build_server

SECRET = "a" * 64
OTHER = "b" * 64


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """A real agent service (no Ray node) over TLS on a free loopback port; yields its address."""
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "home"))
    servers = []

    def start(secret):
        service = AgentService(secret, tmp_path / "offload")
        identity = (tls.private_key_pem(service.key), tls.agent_certificate(service.key))
        server, port = build_server(service, secret, "127.0.0.1:0", identity)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


def open_channel(address: str) -> tuple[grpc.Channel, bytes]:
    """A TLS channel to ``address`` trusting the certificate it shows, and that certificate's fingerprint."""
    host, port = address.rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port))).encode()
    creds = grpc.ssl_channel_credentials(root_certificates=pem)
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", tls.AGENT_TLS_NAME)]), tls.fingerprint(pem)


def test_signed_calls_with_the_right_secret_work(agent):
    with AgentClient(agent(SECRET), SECRET) as client:
        health = client.health()
        inv = client.inventory(peer="127.0.0.1")
    assert health.healthy and health.auth_mode == "token" and not health.ray.running
    assert inv.interface == "lo" and inv.address == "127.0.0.1"
    assert inv.versions["swarm"] and inv.ram_bytes > 0
    assert inv.node_public_key.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_the_agent_speaks_only_tls(agent):
    address = agent(SECRET)
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(method_path("Challenge"))(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_call_without_secret_is_refused(agent):
    with AgentClient(agent(SECRET), None) as client, pytest.raises(AgentCallError, match="carries no signature") as err:
        client.health()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_call_with_a_wrong_secret_is_refused(agent):
    with AgentClient(agent(SECRET), OTHER) as client, pytest.raises(AgentCallError, match="different cluster secret"):
        client.inventory()


def test_rays_token_cannot_sign_agent_calls(agent):
    """What Ray carries (its token, derived from the secret) is no key to the agents: neither
    as a secret file nor as the signing key itself."""
    address = agent(SECRET)
    token = keys.ray_token(SECRET)
    with AgentClient(address, token) as client, pytest.raises(AgentCallError, match="different cluster secret"):
        client.health()
    channel, channel_id = open_channel(address)
    with channel:
        for key in (token.encode(), bytes.fromhex(token)):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(method_path("StopRay"))(b"", metadata=_signed(channel, "StopRay", b"", key, channel_id))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_agent_that_does_not_know_the_secret_is_caught_by_the_client(agent):
    # An impostor (or an agent run with --insecure) answers anything but cannot sign its reply.
    with AgentClient(agent(None), SECRET) as client, pytest.raises(AgentCallError, match="did not sign its reply"):
        client.health()


def test_insecure_agent_and_client_talk_unsigned(agent):
    with AgentClient(agent(None), None) as client:
        assert client.health().auth_mode == "disabled"


def _signed(channel, method: str, body: bytes, key: bytes, channel_id: bytes):
    snonce = pb.ChallengeReply.FromString(channel.unary_unary(method_path("Challenge"))(b"")).nonce
    cnonce = auth.new_nonce()
    mac = auth.request_mac(key, method, snonce, cnonce, body, channel_id)
    return (auth.MD_SERVER_NONCE, snonce), (auth.MD_CLIENT_NONCE, cnonce), (auth.MD_MAC, mac)


def test_replayed_and_tampered_calls_are_refused(agent):
    address = agent(SECRET)
    key = keys.agent_key(SECRET)
    body = pb.InventoryRequest(peer="127.0.0.1").SerializeToString()
    channel, channel_id = open_channel(address)
    with channel:
        call = channel.unary_unary(method_path("Inventory"))
        md = _signed(channel, "Inventory", body, key, channel_id)
        call(body, metadata=md)  # the genuine call
        with pytest.raises(grpc.RpcError) as replay:
            call(body, metadata=md)
        assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "used or expired" in replay.value.details()

        md = _signed(channel, "Inventory", body, key, channel_id)
        tampered = pb.InventoryRequest(peer="127.0.0.2").SerializeToString()
        with pytest.raises(grpc.RpcError) as changed:
            call(tampered, metadata=md)
        assert changed.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A MAC for one method does not authorise another.
        md = _signed(channel, "Health", b"", key, channel_id)
        with pytest.raises(grpc.RpcError) as other_method:
            channel.unary_unary(method_path("StopRay"))(b"", metadata=md)
        assert other_method.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A MAC made for another TLS certificate (what a client behind a relay would make).
        md = _signed(channel, "Health", b"", key, b"\0" * 32)
        with pytest.raises(grpc.RpcError) as other_cert:
            channel.unary_unary(method_path("Health"))(b"", metadata=md)
        assert "another TLS certificate" in other_cert.value.details()


class TlsRelay:
    """A machine in the middle: it ends the client's TLS with a certificate of its own and
    passes every byte on to the real agent over a second TLS connection."""

    def __init__(self, target: str, tmp_path):
        key = ec.generate_private_key(ec.SECP256R1())  # its own key: it has no other
        (tmp_path / "relay.key").write_bytes(tls.private_key_pem(key))
        (tmp_path / "relay.crt").write_bytes(tls.agent_certificate(key))
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(tmp_path / "relay.crt", tmp_path / "relay.key")
        self.server_ctx.set_alpn_protocols(["h2"])  # gRPC insists on HTTP/2 by ALPN
        self.client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_ctx.check_hostname, self.client_ctx.verify_mode = False, ssl.CERT_NONE
        self.client_ctx.set_alpn_protocols(["h2"])
        self.target = target.rsplit(":", 1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            inner = self.server_ctx.wrap_socket(conn, server_side=True)
            outer = self.client_ctx.wrap_socket(socket.create_connection((self.target[0], int(self.target[1]))))
        except (OSError, ssl.SSLError):
            return
        # One thread per connection: an SSL socket must not be read and written from two.
        for sock in (inner, outer):
            sock.settimeout(0.05)
        try:
            while True:
                for src, dst in ((inner, outer), (outer, inner)):
                    try:
                        data = src.recv(65536)
                    except (socket.timeout, ssl.SSLWantReadError):
                        continue
                    if not data:
                        return
                    dst.sendall(data)
        except OSError:
            return
        finally:
            inner.close()
            outer.close()

    def close(self):
        self.listener.close()


def test_a_relay_in_the_middle_can_neither_pass_calls_on_nor_answer_them(agent, tmp_path):
    relay = TlsRelay(agent(SECRET), tmp_path)
    try:
        with AgentClient(relay.address, SECRET) as client, pytest.raises(AgentCallError, match="another TLS certificate"):
            client.health()
        with AgentClient(relay.address, None) as client:  # the channel itself works: it is the MAC that says no
            with pytest.raises(AgentCallError, match="carries no signature"):
                client.health()
    finally:
        relay.close()


def test_macs_bind_every_part():
    key = keys.agent_key(SECRET)
    fp = b"f" * 32
    base = auth.request_mac(key, "Health", b"s" * 16, b"c" * 16, b"body", fp)
    assert base != auth.request_mac(key, "Healt", b"s" * 16, b"c" * 16, b"hbody", fp)  # no ambiguity at part borders
    assert base != auth.request_mac(key, "Health", b"s" * 16, b"d" * 16, b"body", fp)
    assert base != auth.request_mac(key, "Health", b"s" * 16, b"c" * 16, b"body", b"g" * 32)  # another certificate
    assert base != auth.reply_mac(key, "Health", b"s" * 16, b"c" * 16, b"body", fp)  # a request MAC is no reply MAC
    assert base != auth.request_mac(keys.agent_key(OTHER), "Health", b"s" * 16, b"c" * 16, b"body", fp)


def test_nonce_book_accepts_each_nonce_once_while_fresh():
    now = [0.0]
    book = auth.NonceBook(ttl_s=10, clock=lambda: now[0])
    a = book.issue()
    assert book.fresh(a) and book.consume(a) and not book.consume(a) and not book.fresh(a)
    b = book.issue()
    now[0] = 11.0
    assert not book.consume(b)  # expired
    assert not book.consume(auth.new_nonce())  # never issued
    assert not book.consume(auth.NonceBook(ttl_s=10, clock=lambda: now[0]).issue())  # another agent's
    forged = bytearray(book.issue())
    forged[3] ^= 1  # an issue time moved by hand
    assert not book.consume(bytes(forged))


def test_a_challenge_flood_neither_evicts_a_callers_nonce_nor_takes_memory():
    """Issue 32: 4,096 Challenge calls used to push out every nonce handed out before them."""
    book = auth.NonceBook()
    mine = book.issue()
    for _ in range(100_000):  # the flood: nonces the attacker never spends
        book.issue()
    assert book._spent == {}  # handing out nonces remembers nothing
    assert book.consume(mine)
    assert len(book._spent) == 1  # only the spent one, until it expires

def test_a_caller_signs_with_its_nonce_after_a_challenge_flood_over_grpc(agent):
    """Someone without the secret asks for 5,000 nonces between a caller's Challenge and its
    call (the old agent kept 4,096 and forgot the oldest): the call still goes through."""
    address = agent(SECRET)
    key = keys.agent_key(SECRET)
    body = pb.HealthRequest().SerializeToString()
    channel, channel_id = open_channel(address)
    with channel:
        md = _signed(channel, "Health", body, key, channel_id)
        challenge = channel.unary_unary(method_path("Challenge"))
        empty = pb.ChallengeRequest().SerializeToString()
        for _ in range(5000):
            challenge(empty)
        reply = pb.HealthReply.FromString(channel.unary_unary(method_path("Health"))(body, metadata=md))
    assert reply.healthy
