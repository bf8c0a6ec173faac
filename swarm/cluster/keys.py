"""One cluster secret, one key per purpose: what crosses the network can do only its one job.

The secret in ``$SWARM_HOME/secret`` is never used as it is. Each purpose gets its own key,
derived with HKDF-SHA256 (RFC 5869) and a label naming the purpose; knowing one derived key
tells nothing about the secret or about the other keys:

- ``agent_key``: signs and checks agent calls (``swarm.cluster.auth``). It never travels;
  only MACs made with it do.
- ``ray_token``: Ray's ``RAY_AUTH_TOKEN`` on every node and client, which is also the token
  the Ray dashboard asks for. Ray sends it with every call, inside TLS (``swarm.cluster.tls``).

- ``rekey_key``: seals a new secret on its way to the agents (``swarm token --rotate``).

Someone who learns the Ray token (say, from a dashboard exposed in plain HTTP on purpose)
can use Ray, but cannot sign an agent call, and cannot work back to the secret.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
# Fixed, public salt: the secret is already uniformly random, the salt only separates swarm's
# derivations from any other use of the same bytes.
_SALT = b"swarm cluster secret v1"
AGENT_KEY_LABEL = b"swarm agent signing key v1"
RAY_TOKEN_LABEL = b"swarm ray auth token v1"
REKEY_LABEL = b"swarm rekey sealing key v1"
_SEAL_NONCE_BYTES = 12


def derive(secret: str, label: bytes, length: int = KEY_BYTES) -> bytes:
    """``length`` bytes of HKDF-SHA256 of the cluster secret for the purpose ``label``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=label).derive(secret.encode())


def agent_key(secret: str) -> bytes:
    """The 32-byte key that signs agent calls and replies."""
    return derive(secret, AGENT_KEY_LABEL)


def ray_token(secret: str) -> str:
    """Ray's auth token (64 hex characters, the form ``ray get-auth-token --generate`` makes)."""
    return derive(secret, RAY_TOKEN_LABEL).hex()


def seal_secret(current: str, new: str) -> bytes:
    """``new`` encrypted and authenticated (AES-256-GCM) with a key derived from ``current``."""
    nonce = os.urandom(_SEAL_NONCE_BYTES)
    return nonce + AESGCM(derive(current, REKEY_LABEL)).encrypt(nonce, new.encode(), REKEY_LABEL)


def open_sealed_secret(current: str, sealed: bytes) -> str | None:
    """The secret ``seal_secret(current, ...)`` sealed, or None when another key sealed it or
    it was changed on the way."""
    try:
        return AESGCM(derive(current, REKEY_LABEL)).decrypt(
            sealed[:_SEAL_NONCE_BYTES], sealed[_SEAL_NONCE_BYTES:], REKEY_LABEL).decode()
    except (InvalidTag, ValueError, UnicodeDecodeError):
        return None


def valid_secret(text: str) -> bool:
    """Whether ``text`` has the form of a cluster secret ``swarm init`` makes (64 hex digits)."""
    return len(text) == 2 * KEY_BYTES and all(c in "0123456789abcdef" for c in text)
