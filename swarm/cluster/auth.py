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

NONCE_BYTES = 16
NONCE_TTL_S = 60.0

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
    """Server nonces: each accepted once, while fresh, with no memory spent on handing them out.

    A nonce carries the time it was issued and a MAC over that time and random bytes, made
    with a key only this process knows; so ``issue`` remembers nothing, and a flood of
    Challenge calls (the one unauthenticated method) can neither grow memory nor push a
    legitimate caller's nonce out. Only nonces spent by calls whose signature checked are
    remembered, until they expire: that memory grows with the secret holders' own calls.

    Args:
        ttl_s: how long a nonce stays valid.
        clock: time source (tests pass a fake one).
    """

    _TAG_BYTES = 16

    def __init__(self, ttl_s: float = NONCE_TTL_S, clock=time.monotonic):
        self._ttl_s = ttl_s
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._spent: dict[bytes, float] = {}  # nonce -> issue time, while fresh
        self._lock = threading.Lock()

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[: self._TAG_BYTES]

    def issue(self) -> bytes:
        """A fresh nonce: issue time (ms), random bytes, and their tag."""
        body = int(self._clock() * 1000).to_bytes(8, "big", signed=True) + secrets.token_bytes(NONCE_BYTES)
        return body + self._tag(body)

    def _issued_at(self, nonce: bytes) -> float | None:
        """When this book issued ``nonce`` (seconds), or None when it did not or it expired."""
        body, tag = nonce[: -self._TAG_BYTES], nonce[-self._TAG_BYTES:]
        if len(body) != 8 + NONCE_BYTES or not hmac.compare_digest(self._tag(body), tag):
            return None
        issued_at = int.from_bytes(body[:8], "big", signed=True) / 1000
        return issued_at if 0 <= self._clock() - issued_at <= self._ttl_s else None

    def fresh(self, nonce: bytes) -> bool:
        """True for a nonce this book issued less than ``ttl_s`` ago and not yet spent."""
        if self._issued_at(nonce) is None:
            return False
        with self._lock:
            return nonce not in self._spent

    def consume(self, nonce: bytes) -> bool:
        """Spend ``nonce``: True once for a fresh nonce this book issued; False otherwise.

        Call it once the call's signature has checked, so that only secret holders' calls
        take memory.
        """
        issued_at = self._issued_at(nonce)
        if issued_at is None:
            return False
        now = self._clock()
        with self._lock:
            for old in [n for n, at in self._spent.items() if now - at > self._ttl_s]:
                del self._spent[old]
            if nonce in self._spent:
                return False
            self._spent[nonce] = issued_at
            return True


def verify(expected: bytes, given: bytes | None) -> bool:
    """Constant-time comparison of two MACs (``given`` may be missing)."""
    return given is not None and hmac.compare_digest(expected, given)
