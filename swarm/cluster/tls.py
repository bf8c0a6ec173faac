"""The swarm's small certificate authority, node keys and certificates, and Ray's TLS files.

- ``swarm init`` makes the CA on the head: ``$SWARM_HOME/ca/ca.key`` (0600) and ``ca.crt``.
  Its key never leaves the head.
- Every PC (its agent, or ``swarm join``) makes its own node key, ``$SWARM_HOME/tls/node.key``
  (0600), which never leaves the PC either; only its public half travels.
- The head issues each node a certificate for that public key and the node's address, and
  sends it with the CA's certificate over the signed agent channel; the node keeps them as
  ``tls/node.crt`` and ``tls/ca.crt``. Ray then runs with TLS on every gRPC channel
  (``RAY_USE_TLS``): each side shows its node certificate and accepts only peers whose
  certificate this CA signed, so only the swarm's nodes (and clients on those PCs) connect.

ECDSA P-256 throughout: small keys, fast handshakes, understood by Ray's BoringSSL and Python's.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarm.errors import UserError
from swarm.home import home_dir, swarm_home, write_private

AGENT_TLS_NAME = "swarm-agent"  # the DNS name in every agent certificate; clients ask for it
CA_DAYS = 20 * 365
NODE_DAYS = 365  # a node gets a fresh certificate at every start anyway
CLOCK_SKEW = datetime.timedelta(days=1)  # PCs whose clocks differ a little still agree


@dataclass(frozen=True)
class TlsFiles:
    """The three files Ray's TLS reads on a node (``RAY_TLS_SERVER_CERT`` and friends)."""

    cert: Path
    key: Path
    ca: Path


def ca_files() -> tuple[Path, Path]:
    """(key, certificate) of the CA, in ``$SWARM_HOME/ca`` (only the head has them)."""
    folder = swarm_home() / "ca"
    return folder / "ca.key", folder / "ca.crt"


def node_files(home: Path | None = None) -> TlsFiles:
    """This PC's node certificate, key and CA certificate, in ``$SWARM_HOME/tls``.

    Args:
        home: another state folder than ``$SWARM_HOME`` (a test host's).
    """
    folder = (home or swarm_home()) / "tls"
    return TlsFiles(cert=folder / "node.crt", key=folder / "node.key", ca=folder / "ca.crt")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))


def create_ca(overwrite: bool = False) -> Path:
    """Make the swarm's CA in ``$SWARM_HOME/ca``; returns the certificate's path.

    Args:
        overwrite: replace an existing CA (every node then gets a new certificate at its
            next start; nodes running now must be restarted with ``swarm down`` / ``swarm up``).
    """
    key_path, cert_path = ca_files()
    if cert_path.exists() and not overwrite:
        return cert_path
    home_dir("ca")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"swarm CA of {socket.gethostname()}")])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
    )
    cert = _validity(builder, CA_DAYS).sign(key, hashes.SHA256())
    write_private(key_path, _pem_key(key))
    write_private(cert_path, _pem(cert))
    return cert_path


def load_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key and certificate.

    Raises:
        UserError: this PC has no CA (it is not the head, or ``swarm init`` predates TLS).
    """
    key_path, cert_path = ca_files()
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise UserError(
            f"no swarm CA in {key_path.parent}; run `swarm init` on the head PC (it adds the CA "
            "next to an existing secret)"
        ) from None
    return key, cert


def node_key() -> ec.EllipticCurvePrivateKey:
    """This PC's node key, made on first use in ``$SWARM_HOME/tls/node.key`` (mode 0600)."""
    path = node_files().key
    if not path.exists():
        home_dir("tls")
        write_private(path, _pem_key(ec.generate_private_key(ec.SECP256R1())))
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The public half of ``key``, the only part of a node key that travels."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _san(addresses: list[str]) -> x509.SubjectAlternativeName:
    # Loopback too: Ray and clients on the node itself may connect through 127.0.0.1.
    ips = dict.fromkeys([*addresses, "127.0.0.1"])
    return x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName("localhost"), x509.DNSName(AGENT_TLS_NAME)]
    )


def issue_node_certificate(public_key: bytes, addresses: list[str]) -> bytes:
    """A certificate from this PC's CA for a node's public key and IP addresses (PEM).

    It serves both as server and as client certificate: Ray uses one certificate for both
    ends of its mutual TLS.

    Raises:
        UserError: no CA here, or ``public_key`` is not an EC public key in PEM.
    """
    ca_key, ca_cert = load_ca()
    try:
        node_public = serialization.load_pem_public_key(public_key)
        san = _san(addresses)
    except ValueError as exc:
        raise UserError(f"cannot issue a node certificate: {exc}") from None
    if not isinstance(node_public, ec.EllipticCurvePublicKey):
        raise UserError("cannot issue a node certificate: the node's key is not an EC key")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"swarm node {addresses[0]}")]))
        .issuer_name(ca_cert.subject).public_key(node_public).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(san, critical=False)
    )
    return _pem(_validity(builder, NODE_DAYS).sign(ca_key, hashes.SHA256()))


def ca_certificate_pem() -> bytes:
    """The CA's certificate (PEM), sent to nodes along with their own."""
    return _pem(load_ca()[1])


def install_node_certificate(cert_pem: bytes, ca_pem: bytes, node_ip: str) -> TlsFiles:
    """Check a certificate the head sent and keep it, with the CA's, for Ray.

    Raises:
        UserError: the certificate is not for this PC's key, not signed by that CA, or does
            not name ``node_ip``.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
        raise UserError(f"the head sent a node certificate that does not check out: {exc}") from None
    if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != (
        node_key().public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ):
        raise UserError("the head sent a certificate for another key; run `swarm up` again")
    if ipaddress.ip_address(node_ip) not in ips:
        raise UserError(f"the head's certificate does not name this node's address {node_ip}")
    files = node_files()
    home_dir("tls")
    write_private(files.ca, ca_pem)
    write_private(files.cert, cert_pem)
    return files


def installed_node_files() -> TlsFiles:
    """This PC's node files for a Ray client (a driver on a node of the swarm).

    Raises:
        UserError: this PC has no node certificate yet.
    """
    files = node_files()
    if not (files.cert.exists() and files.key.exists() and files.ca.exists()):
        raise UserError(
            f"this PC has no swarm node certificate in {files.cert.parent}; connect from a PC of "
            "the swarm (the head, after `swarm up`)"
        )
    return files


def agent_certificate(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A self-signed certificate for the agent's TLS, on the node key (PEM).

    The agent channel carries the node certificates, so it must work before any is issued:
    it is authenticated by the secret instead (every signed call is bound to this exact
    certificate, see ``swarm.cluster.auth``), and needs no CA.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AGENT_TLS_NAME)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(AGENT_TLS_NAME)]), critical=False)
    )
    return _pem(_validity(builder, CA_DAYS).sign(key, hashes.SHA256()))


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` in PEM, for the gRPC server's credentials (kept in memory)."""
    return _pem_key(key)


def fingerprint(cert_pem: bytes) -> bytes:
    """SHA-256 of a certificate's DER bytes: what a signed agent call is bound to."""
    return hashlib.sha256(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)).digest()
