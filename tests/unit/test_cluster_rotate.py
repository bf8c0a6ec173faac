"""`swarm token --rotate`'s part with the agents, over real gRPC and TLS on loopback (no Ray node):
each agent takes the new secret sealed with the old one, and from then on only the new one."""

from __future__ import annotations

import grpc
import pytest

from swarm.cluster import keys, rotate, tls
from swarm.cluster.agent import AgentService
from swarm.cluster.client import AgentCallError, AgentClient
from swarm.cluster.proto import agent_pb2 as pb
from swarm.cluster.server import build_server

OLD = "a" * 64
NEW = "c" * 64


@pytest.fixture
def agents(tmp_path, monkeypatch):
    """Start agents with a given secret, each with its own $SWARM_HOME; yields a starter."""
    servers = []

    def start(secret: str, name: str) -> tuple[str, AgentService]:
        monkeypatch.setenv("SWARM_HOME", str(tmp_path / name))
        service = AgentService(secret, tmp_path / "offload")
        identity = (tls.private_key_pem(service.key), tls.agent_certificate(service.key))
        server, port = build_server(service, secret, "127.0.0.1:0", identity)
        servers.append(server)
        return f"127.0.0.1:{port}", service

    yield start
    for server in servers:
        server.stop(grace=None)


def test_sealed_secret_opens_only_with_the_current_secret():
    sealed = keys.seal_secret(OLD, NEW)
    assert NEW.encode() not in sealed
    assert keys.open_sealed_secret(OLD, sealed) == NEW
    assert keys.open_sealed_secret("b" * 64, sealed) is None
    assert keys.open_sealed_secret(OLD, sealed[:-1] + bytes([sealed[-1] ^ 1])) is None


def test_every_agent_takes_the_new_secret_and_refuses_the_old(agents, tmp_path, monkeypatch):
    (a, sa), (b, sb) = agents(OLD, "h1"), agents(OLD, "h2")
    (c, _) = agents("b" * 64, "h3")  # a PC of another swarm: it cannot be re-keyed with this one
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "pc"))  # where the agents (one process here) save it
    nodes = [{"address": "10.0.0.2", "agent": a, "role": "worker"}, {"address": "10.0.0.3", "agent": c, "role": "worker"},
             {"address": "10.0.0.1", "agent": b, "role": "head"}]
    said = []
    failures = rotate.rekey_nodes(nodes, OLD, NEW, say=said.append)
    assert len(failures) == 1 and failures[0].startswith("node 10.0.0.3:") and "different cluster secret" in failures[0]
    assert said == ["worker 10.0.0.2: new secret", "head 10.0.0.1: new secret"]
    assert sa.secret == NEW and sb.secret == NEW
    assert (tmp_path / "pc" / "secret").read_text().strip() == NEW  # saved, mode 0600
    assert (tmp_path / "pc" / "secret").stat().st_mode & 0o777 == 0o600
    for address in (a, b):
        with AgentClient(address, NEW) as client:
            assert client.health().healthy
        with AgentClient(address, OLD) as client, pytest.raises(AgentCallError, match="different cluster secret"):
            client.health()


def test_a_rekey_sealed_with_another_secret_changes_nothing(agents):
    address, service = agents(OLD, "h1")
    with AgentClient(address, OLD) as client, pytest.raises(AgentCallError) as refused:
        client.call("Rekey", pb.RekeyRequest(sealed_secret=keys.seal_secret("b" * 64, NEW)), pb.RekeyReply)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "did not open" in str(refused.value)
    assert service.secret == OLD
    with AgentClient(address, OLD) as client:
        assert client.health().healthy
