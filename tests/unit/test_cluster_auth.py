"""Signed agent calls over real gRPC on loopback: right secret, none, wrong, replay, impostor."""

from __future__ import annotations

import grpc
import pytest

from swarm.cluster import auth
from swarm.cluster.agent import AgentService
from swarm.cluster.client import AgentCallError, AgentClient
from swarm.cluster.messages import method_path
from swarm.cluster.proto import agent_pb2 as pb
from swarm.cluster.server import build_server

SECRET = "a" * 64
OTHER = "b" * 64


@pytest.fixture
def agent(tmp_path):
    """A real agent service (no Ray node) on a free loopback port; yields its address."""
    servers = []

    def start(secret):
        server, port = build_server(AgentService(secret, tmp_path / "offload"), secret, "127.0.0.1:0")
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


def test_signed_calls_with_the_right_secret_work(agent):
    with AgentClient(agent(SECRET), SECRET) as client:
        health = client.health()
        inv = client.inventory(peer="127.0.0.1")
    assert health.healthy and health.auth_mode == "token" and not health.ray.running
    assert inv.interface == "lo" and inv.address == "127.0.0.1"
    assert inv.versions["swarm"] and inv.ram_bytes > 0


def test_call_without_secret_is_refused(agent):
    with AgentClient(agent(SECRET), None) as client, pytest.raises(AgentCallError, match="carries no signature") as err:
        client.health()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_call_with_a_wrong_secret_is_refused(agent):
    with AgentClient(agent(SECRET), OTHER) as client, pytest.raises(AgentCallError, match="different cluster secret"):
        client.inventory()


def test_agent_that_does_not_know_the_secret_is_caught_by_the_client(agent):
    # An impostor (or an agent run with --insecure) answers anything but cannot sign its reply.
    with AgentClient(agent(None), SECRET) as client, pytest.raises(AgentCallError, match="did not sign its reply"):
        client.health()


def test_insecure_agent_and_client_talk_unsigned(agent):
    with AgentClient(agent(None), None) as client:
        assert client.health().auth_mode == "disabled"


def _signed(channel, method: str, body: bytes, key: bytes):
    snonce = pb.ChallengeReply.FromString(channel.unary_unary(method_path("Challenge"))(b"")).nonce
    cnonce = auth.new_nonce()
    md = ((auth.MD_SERVER_NONCE, snonce), (auth.MD_CLIENT_NONCE, cnonce), (auth.MD_MAC, auth.request_mac(key, method, snonce, cnonce, body)))
    return md


def test_replayed_and_tampered_calls_are_refused(agent):
    address = agent(SECRET)
    key = auth.agent_key(SECRET)
    body = pb.InventoryRequest(peer="127.0.0.1").SerializeToString()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method_path("Inventory"))
        md = _signed(channel, "Inventory", body, key)
        call(body, metadata=md)  # the genuine call
        with pytest.raises(grpc.RpcError) as replay:
            call(body, metadata=md)
        assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "used or expired" in replay.value.details()

        md = _signed(channel, "Inventory", body, key)
        tampered = pb.InventoryRequest(peer="127.0.0.2").SerializeToString()
        with pytest.raises(grpc.RpcError) as changed:
            call(tampered, metadata=md)
        assert changed.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A MAC for one method does not authorise another.
        md = _signed(channel, "Health", b"", key)
        with pytest.raises(grpc.RpcError) as other_method:
            channel.unary_unary(method_path("StopRay"))(b"", metadata=md)
        assert other_method.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_macs_bind_every_part():
    key = auth.agent_key(SECRET)
    base = auth.request_mac(key, "Health", b"s" * 16, b"c" * 16, b"body")
    assert base != auth.request_mac(key, "Healt", b"s" * 16, b"c" * 16, b"hbody")  # no ambiguity at part borders
    assert base != auth.request_mac(key, "Health", b"s" * 16, b"d" * 16, b"body")
    assert base != auth.reply_mac(key, "Health", b"s" * 16, b"c" * 16, b"body")  # a request MAC is no reply MAC
    assert base != auth.request_mac(auth.agent_key(OTHER), "Health", b"s" * 16, b"c" * 16, b"body")
    assert SECRET.encode() not in key and len(key) == 32


def test_nonce_book_accepts_each_nonce_once_while_fresh():
    now = [0.0]
    book = auth.NonceBook(ttl_s=10, capacity=3, clock=lambda: now[0])
    a = book.issue()
    assert book.consume(a) and not book.consume(a)
    b = book.issue()
    now[0] = 11.0
    assert not book.consume(b)  # expired
    assert not book.consume(auth.new_nonce())  # never issued
    first = book.issue()
    for _ in range(3):
        book.issue()
    assert not book.consume(first)  # evicted: a Challenge flood cannot grow memory
