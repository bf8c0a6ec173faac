"""Capture what crosses the test lab's bridge, and look for byte strings in it (tests, benchmarks).

``python tests/lab/wirecap.py OUT.pcap`` runs inside the lab's bridge namespace (as root)
and records every frame that enters the bridge from any host, each once, into a pcap file
(Wireshark and tcpdump read it), until SIGTERM or SIGINT; ``--count`` instead of a file
prints the bytes sent between each pair of addresses, as one JSON line. It needs nothing but Python: a raw
``AF_PACKET`` socket sees the frames on every interface of the namespace.

``tcp_streams`` puts each TCP connection's payload back together, per direction, so that a
string split over two segments is still found.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33  # Linux: a receive buffer above rmem_max (root), so bursts are not dropped
SNAPLEN = 262144  # veth frames reach 64 KiB with segmentation offload
_PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, 1)  # LINKTYPE_ETHERNET


def _frames_until_signal():
    """Yield each frame entering the bridge (bytes) until SIGTERM/SIGINT; prints "capturing"
    once listening, the line the caller waits for."""
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024**2)
    sock.settimeout(0.2)
    print("capturing", flush=True)
    while not stop:
        try:
            data, addr = sock.recvfrom(SNAPLEN)
        except (socket.timeout, InterruptedError):
            continue
        # A frame crossing the bridge is seen entering (from the sender's port) and leaving
        # (to the receiver's port); keep the entering copy only.
        if addr[2] != socket.PACKET_OUTGOING:
            yield data


def capture(out: Path) -> int:
    """Record frames into ``out`` until SIGTERM/SIGINT; returns how many were recorded."""
    frames = 0
    with open(out, "wb") as f:
        f.write(_PCAP_HEADER)
        f.flush()
        for data in _frames_until_signal():
            seconds, fraction = divmod(time.time_ns() // 1000, 1_000_000)
            f.write(struct.pack("<IIII", seconds, fraction, len(data), len(data)) + data)
            frames += 1
    return frames


def count() -> dict[str, int]:
    """Bytes of the IPv4 frames entering the bridge, per ``"src>dst"`` address pair, until
    SIGTERM/SIGINT: what a benchmark needs of a run too large to record."""
    totals: dict[str, int] = defaultdict(int)
    for data in _frames_until_signal():
        if len(data) >= 34 and data[12:14] == b"\x08\x00":
            totals[f"{socket.inet_ntoa(data[26:30])}>{socket.inet_ntoa(data[30:34])}"] += len(data)
    return dict(totals)


def frames(path: Path):
    """The frames of a pcap file this module wrote, in order."""
    data = Path(path).read_bytes()
    pos = len(_PCAP_HEADER)
    while pos + 16 <= len(data):
        _, _, length, _ = struct.unpack_from("<IIII", data, pos)
        yield data[pos + 16:pos + 16 + length]
        pos += 16 + length


def tcp_streams(path: Path) -> dict[tuple[str, int, str, int], bytes]:
    """Each TCP direction's payload, in capture order: ``(src, sport, dst, dport) -> bytes``.

    IPv4 only (the lab has no IPv6 addresses). A retransmitted segment appears twice, which
    can only add matches, never hide one.
    """
    streams: dict[tuple[str, int, str, int], bytearray] = defaultdict(bytearray)
    for frame in frames(path):
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
            continue
        ip_header = (frame[14] & 0x0F) * 4
        total = struct.unpack_from(">H", frame, 16)[0]
        tcp = frame[14 + ip_header:14 + total]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack_from(">HH", tcp)
        key = (socket.inet_ntoa(frame[26:30]), sport, socket.inet_ntoa(frame[30:34]), dport)
        streams[key] += tcp[(tcp[12] >> 4) * 4:]
    return {key: bytes(payload) for key, payload in streams.items()}


def find(path: Path, needles: dict[str, bytes]) -> list[tuple[str, tuple[str, int, str, int]]]:
    """Which needles (by name) occur in which TCP stream of the capture."""
    hits = []
    for key, payload in tcp_streams(path).items():
        hits += [(name, key) for name, needle in needles.items() if needle in payload]
    return hits


if __name__ == "__main__":
    if sys.argv[1] == "--count":
        print(json.dumps(count()), flush=True)
    else:
        print(f"{capture(Path(sys.argv[1]))} frames", flush=True)
