"""The run's torch store listens on the swarm's address only, where torch's own listens on all."""

from __future__ import annotations

import datetime as dt
import socket

import psutil
import torch.distributed as dist

from swarm.train.worker.collectives import rendezvous_store

TIMEOUT = dt.timedelta(seconds=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_torchs_own_store_listens_on_every_address():
    """What swarm works around (so the next test can tell the two apart)."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, TIMEOUT, wait_for_workers=False)
    try:
        assert listening_addresses(port) & {"0.0.0.0", "::"}
    finally:
        del store


def test_rank_0_serves_the_store_on_the_given_address_only_and_the_others_join_it():
    port = free_port()
    server = rendezvous_store("127.0.0.1", port, 0, 2, TIMEOUT)
    client = rendezvous_store("127.0.0.1", port, 1, 2, TIMEOUT)
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
        client.set("from rank 1", b"hello")
        assert server.get("from rank 1") == b"hello"
    finally:
        del client, server
