"""Per-purpose keys from the secret, the swarm's CA, node certificates and their checks.

The certificates are also used for real in a TLS handshake (Python's ssl, the way Ray's gRPC
uses them: each side shows its node certificate, each accepts only the CA's).
"""

from __future__ import annotations

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from swarm.cluster import keys, tls
from swarm.errors import UserError

SECRET = "5e" * 32


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_each_purpose_gets_its_own_key_and_none_reveals_the_secret():
    agent, token = keys.agent_key(SECRET), keys.ray_token(SECRET)
    assert len(agent) == 32 and len(token) == 64 and int(token, 16) >= 0
    assert agent.hex() != token and SECRET not in token and SECRET.encode() not in agent
    assert keys.agent_key(SECRET) == agent and keys.ray_token(SECRET) == token  # the same on every PC
    other = "5f" + SECRET[2:]
    assert keys.agent_key(other) != agent and keys.ray_token(other) != token
    # Ray's token used as if it were a secret yields nothing of this swarm's.
    assert keys.agent_key(token) != agent and keys.ray_token(token) != token


def test_the_ca_stays_private_and_is_made_once(home):
    cert_path = tls.create_ca()
    key_path = home / "ca" / "ca.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600 and stat.S_IMODE((home / "ca").stat().st_mode) == 0o700
    first = cert_path.read_bytes()
    assert tls.create_ca() == cert_path and cert_path.read_bytes() == first
    assert tls.create_ca(overwrite=True) and cert_path.read_bytes() != first
    ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_no_ca_is_one_clear_line():
    with pytest.raises(UserError, match="no swarm CA in .*run `swarm init` on the head"):
        tls.issue_node_certificate(tls.public_key_pem(tls.node_key()), ["198.18.0.2"])


def issued_for_this_pc(address="198.18.0.2") -> tuple[bytes, bytes]:
    tls.create_ca()
    return tls.issue_node_certificate(tls.public_key_pem(tls.node_key()), [address]), tls.ca_certificate_pem()


def test_a_node_installs_a_certificate_for_its_own_key_and_address(home):
    cert, ca = issued_for_this_pc()
    files = tls.install_node_certificate(cert, ca, "198.18.0.2")
    assert files == tls.node_files() == tls.installed_node_files()
    assert files.cert.read_bytes() == cert and files.ca.read_bytes() == ca
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600 and stat.S_IMODE(files.cert.parent.stat().st_mode) == 0o700
    names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"198.18.0.2", "127.0.0.1"}


def test_a_certificate_for_another_key_address_or_ca_is_refused(home, tmp_path):
    cert, ca = issued_for_this_pc()
    with pytest.raises(UserError, match="does not name this node's address 198.18.0.3"):
        tls.install_node_certificate(cert, ca, "198.18.0.3")
    stranger = ec.generate_private_key(ec.SECP256R1())
    foreign = tls.issue_node_certificate(tls.public_key_pem(stranger), ["198.18.0.2"])
    with pytest.raises(UserError, match="certificate for another key"):
        tls.install_node_certificate(foreign, ca, "198.18.0.2")
    tls.create_ca(overwrite=True)  # another swarm's CA
    with pytest.raises(UserError, match="does not check out"):
        tls.install_node_certificate(cert, tls.ca_certificate_pem(), "198.18.0.2")
    with pytest.raises(UserError, match="does not check out"):
        tls.install_node_certificate(b"garbage", ca, "198.18.0.2")
    assert not tls.node_files().cert.exists()  # nothing half-installed


def test_no_node_certificate_is_one_clear_line():
    with pytest.raises(UserError, match="no swarm node certificate"):
        tls.installed_node_files()


def _context(side, files: tls.TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(files.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _handshake(server_files, client_files, server_name="198.18.0.2") -> str:
    """Mutual TLS between the two sets of files over a socket pair; 'ok' or the error."""
    a, b = socket.socketpair()
    result = {}

    def serve():
        try:
            with _context("server", server_files).wrap_socket(a, server_side=True) as s:
                s.sendall(b"x")
                result["server"] = "ok"
        except (ssl.SSLError, OSError) as exc:
            result["server"] = str(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with _context("client", client_files).wrap_socket(b, server_hostname=server_name) as c:
            c.recv(1)
            return "ok"
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    finally:
        b.close()
        thread.join(10)
        a.close()


def test_two_nodes_of_one_ca_shake_hands_and_a_stranger_cannot(home, tmp_path, monkeypatch):
    cert, ca = issued_for_this_pc("198.18.0.2")
    node = tls.install_node_certificate(cert, ca, "198.18.0.2")
    assert _handshake(node, node) == "ok"  # Ray uses one certificate at both ends
    # A second PC of the same swarm: its own key, a certificate from the same CA (the head's).
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "pc2"))
    pc2_key = tls.public_key_pem(tls.node_key())
    monkeypatch.setenv("SWARM_HOME", str(home))
    pc2_cert = tls.issue_node_certificate(pc2_key, ["198.18.0.3"])
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "pc2"))
    pc2 = tls.install_node_certificate(pc2_cert, ca, "198.18.0.3")
    assert _handshake(node, pc2) == "ok"
    # A stranger: a CA and certificate of its own, even for the right address.
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "stranger"))
    tls.create_ca()
    stranger = tls.install_node_certificate(
        tls.issue_node_certificate(tls.public_key_pem(tls.node_key()), ["198.18.0.9"]), tls.ca_certificate_pem(), "198.18.0.9")
    assert "certificate verify failed" in _handshake(node, stranger)  # the node refuses the stranger
    assert "certificate verify failed" in _handshake(stranger, node, server_name="198.18.0.9")
    # A node certificate only vouches for its own address.
    assert "IP address mismatch" in _handshake(node, pc2, server_name="198.18.0.3")


def test_agent_certificate_is_on_the_node_key_and_fingerprints_differ_per_certificate():
    key = tls.node_key()
    first, second = tls.agent_certificate(key), tls.agent_certificate(key)
    cert = x509.load_pem_x509_certificate(first)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert tls.fingerprint(first) != tls.fingerprint(second) and len(tls.fingerprint(first)) == 32


def test_swarm_up_asks_each_node_to_start_with_a_certificate_for_its_key_and_addresses(tmp_path):
    from swarm.cluster.bringup import _start_request
    from swarm.cluster.proto import agent_pb2 as pb
    from swarm.cluster.spec import load_cluster_spec

    path = tmp_path / "cluster.yaml"
    path.write_text("head: {address: 198.18.0.1}\nworkers: [{address: 198.18.0.2}]\nray: {metrics: true}\n")
    spec = load_cluster_spec(path)
    tls.create_ca()
    worker_key = ec.generate_private_key(ec.SECP256R1())
    # The worker reaches the head from another address than the cluster file names (two NICs).
    inventory = pb.InventoryReply(address="10.9.0.2", node_public_key=tls.public_key_pem(worker_key))
    request = _start_request(spec, spec.workers[0], "worker", inventory, SECRET)
    cert = x509.load_pem_x509_certificate(request.node_certificate)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(request.ca_certificate))
    assert cert.public_key().public_numbers() == worker_key.public_key().public_numbers()
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert {str(ip) for ip in ips} == {"10.9.0.2", "198.18.0.2", "127.0.0.1"}
    assert request.metrics
    insecure = _start_request(spec, spec.workers[0], "worker", inventory, None)
    assert not insecure.node_certificate and not insecure.ca_certificate
