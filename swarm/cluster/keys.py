"""One cluster secret, one key per purpose: what crosses the network can do only its one job.

The secret in ``$SWARM_HOME/secret`` is never used as it is. Each purpose gets its own key,
derived with HKDF-SHA256 (RFC 5869) and a label naming the purpose; knowing one derived key
tells nothing about the secret or about the other keys:

- ``agent_key``: signs and checks agent calls (``swarm.cluster.auth``). It never travels;
  only MACs made with it do.
- ``ray_token``: Ray's ``RAY_AUTH_TOKEN`` on every node and client, which is also the token
  the Ray dashboard asks for. Ray sends it with every call, inside TLS (``swarm.cluster.tls``).

Someone who learns the Ray token (say, from a dashboard exposed in plain HTTP on purpose)
can use Ray, but cannot sign an agent call, and cannot work back to the secret.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
# Fixed, public salt: the secret is already uniformly random, the salt only separates swarm's
# derivations from any other use of the same bytes.
_SALT = b"swarm cluster secret v1"
AGENT_KEY_LABEL = b"swarm agent signing key v1"
RAY_TOKEN_LABEL = b"swarm ray auth token v1"


def derive(secret: str, label: bytes, length: int = KEY_BYTES) -> bytes:
    """``length`` bytes of HKDF-SHA256 of the cluster secret for the purpose ``label``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=label).derive(secret.encode())


def agent_key(secret: str) -> bytes:
    """The 32-byte key that signs agent calls and replies."""
    return derive(secret, AGENT_KEY_LABEL)


def ray_token(secret: str) -> str:
    """Ray's auth token (64 hex characters, the form ``ray get-auth-token --generate`` makes)."""
    return derive(secret, RAY_TOKEN_LABEL).hex()
