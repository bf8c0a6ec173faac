"""Challenge-response signing of agent calls: the secret proves itself but never travels.

A call goes like this:

1. the client asks ``Challenge`` for a fresh nonce (the one unauthenticated method);
2. it sends the real call with metadata: that server nonce, a client nonce of its own, and
   ``HMAC(key, method, server nonce, client nonce, request bytes, TLS certificate)``;
3. the agent accepts the server nonce once only, within ``NONCE_TTL_S``, checks the MAC, runs
   the method and signs its reply bytes the same way (with a different label);
4. the client checks the reply MAC, so an impostor agent is caught too.

The calls travel over TLS, and the MACs cover the fingerprint of the TLS certificate: the
client's MAC names the certificate it saw, the agent checks it against its own. A machine in
the middle with a certificate of its own can therefore neither pass calls on nor answer them.

The key is the agent key derived from the cluster secret (``swarm.cluster.keys``), which no
other part of swarm or Ray uses. Replays fail (single-use server nonce), so do tampered
requests or replies (MAC over the exact bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict

NONCE_BYTES = 16
NONCE_TTL_S = 60.0
MAX_OUTSTANDING_NONCES = 4096  # a flood of Challenge calls cannot grow memory past this

MD_SERVER_NONCE = "swarm-nonce-bin"  # "-bin" metadata keys carry raw bytes in gRPC
MD_CLIENT_NONCE = "swarm-cnonce-bin"
MD_MAC = "swarm-mac-bin"



def _mac(key: bytes, label: bytes, method: str, server_nonce: bytes, client_nonce: bytes, body: bytes, channel: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    # Length-prefix every part so that no two different calls hash the same byte string.
    for part in (label, method.encode(), server_nonce, client_nonce, body, channel):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def request_mac(key: bytes, method: str, server_nonce: bytes, client_nonce: bytes, body: bytes, channel: bytes) -> bytes:
    """MAC the client attaches to a call of ``method`` with request bytes ``body``.

    ``channel`` is the fingerprint of the agent's TLS certificate as the client saw it.
    """
    return _mac(key, b"request", method, server_nonce, client_nonce, body, channel)


def reply_mac(key: bytes, method: str, server_nonce: bytes, client_nonce: bytes, body: bytes, channel: bytes) -> bytes:
    """MAC the agent attaches to its reply bytes ``body`` (``channel``: its own certificate's)."""
    return _mac(key, b"reply", method, server_nonce, client_nonce, body, channel)


def new_nonce() -> bytes:
    """A random nonce."""
    return secrets.token_bytes(NONCE_BYTES)


class NonceBook:
    """Server nonces handed out and not yet used; each one is accepted once, while fresh.

    Args:
        ttl_s: how long a nonce stays valid.
        capacity: most nonces outstanding; the oldest are forgotten first.
        clock: time source (tests pass a fake one).
    """

    def __init__(self, ttl_s: float = NONCE_TTL_S, capacity: int = MAX_OUTSTANDING_NONCES, clock=time.monotonic):
        self._ttl_s = ttl_s
        self._capacity = capacity
        self._clock = clock
        self._issued: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        """A fresh nonce, remembered until used or expired."""
        nonce = new_nonce()
        with self._lock:
            self._issued[nonce] = self._clock()
            while len(self._issued) > self._capacity:
                self._issued.popitem(last=False)
        return nonce

    def consume(self, nonce: bytes) -> bool:
        """True once for a nonce this book issued less than ``ttl_s`` ago; False otherwise."""
        with self._lock:
            issued_at = self._issued.pop(nonce, None)
        return issued_at is not None and self._clock() - issued_at <= self._ttl_s


def verify(expected: bytes, given: bytes | None) -> bool:
    """Constant-time comparison of two MACs (``given`` may be missing)."""
    return given is not None and hmac.compare_digest(expected, given)
