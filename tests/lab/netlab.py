"""Several "PCs" on one Linux machine: network namespaces joined by a bridge (tests, benchmarks).

Each host is a namespace with one veth interface (``lan0``) holding ``198.18.0.N/24`` (the
benchmarking range, never routed) and its own ``$SWARM_HOME`` (Ray's folders go inside). The bridge
lives in a namespace of its own, so the machine's own network is never touched. Needs root
and ``ip`` (Debian: iproute2).

``destroy()`` kills every process left in the namespaces and deletes them; it is safe to call
twice and after a failed ``create()``. Namespaces of a lab whose process died are swept by the
next lab.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import swarm

SUBNET = "198.18.0"
PREFIX = "swl"  # namespace names: swl<pid>x<n>-h<i>, swl<pid>x<n>-sw
_counter = 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def namespaces() -> list[str]:
    """Names of all network namespaces on this machine."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace_processes(ns: str, grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process inside namespace ``ns``; how many there were."""
    from swarm.cluster.procs import terminate

    procs = []
    for pid in (int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return terminate(procs, grace_s)


def sweep_stale() -> list[str]:
    """Delete namespaces of labs whose creating process is gone (a killed test run)."""
    removed = []
    for ns in namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)x\d+-\w+", ns)
        if m and not psutil.pid_exists(int(m.group(1))):
            kill_namespace_processes(ns, grace_s=1)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


class NetLab:
    """``hosts`` namespace hosts on one bridge; host ``i`` (1-based) has address 198.18.0.i.

    Args:
        hosts: how many hosts.
        root: folder for the hosts' state (a short one under /tmp is made when None: Ray's
            socket paths must stay under 107 bytes).
    """

    def __init__(self, hosts: int, root: Path | None = None):
        global _counter
        _counter += 1
        self.tag = f"{PREFIX}{os.getpid()}x{_counter}"
        self.n = hosts
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="swl", dir="/tmp"))
        self._own_root = root is None
        self.created: list[str] = []

    def __enter__(self) -> "NetLab":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def ns(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i}"

    def home(self, i: int) -> Path:
        return self.root / f"h{i}" / "home"

    def create(self) -> None:
        """Make the bridge namespace and the hosts. On failure, what was made is removed."""
        sweep_stale()
        switch = f"{self.tag}-sw"
        try:
            self._add_ns(switch)
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for i in range(1, self.n + 1):
                host = self.ns(i)
                self._add_ns(host)
                # Both ends are created inside namespaces: the machine's own stack never sees them.
                _ip("-n", switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "lan0", "netns", host)
                _ip("-n", switch, "link", "set", f"p{i}", "master", "br0", "up")
                _ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", "lan0")
                _ip("-n", host, "link", "set", "lan0", "up")
                self.home(i).mkdir(parents=True, exist_ok=True, mode=0o700)
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def env(self, i: int, **extra: str) -> dict[str, str]:
        """Environment for a process of host ``i``: its own state folder, and the swarm package
        this process imported (not whichever one the interpreter would find)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SWARM_"))}
        source = str(Path(swarm.__file__).resolve().parents[1])
        env.update(SWARM_HOME=str(self.home(i)), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])]))
        env.update(extra)
        return env

    def argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def run(self, i: int, argv: list[str], timeout: float = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``i`` and wait; output captured as text."""
        return subprocess.run(self.argv(i, argv), env=env or self.env(i), capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, i: int, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` in its own process group, output to ``log``."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.argv(i, argv), env=env or self.env(i), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def swarm(self, i: int, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """``swarm ARGS`` on host ``i``."""
        return self.run(i, [sys.executable, "-m", "swarm", *args], timeout=timeout, env=env)

    def capture(self, out: Path | str) -> subprocess.Popen:
        """Start recording every frame that crosses the bridge into the pcap file ``out``
        (``tests/lab/wirecap.py``), or with ``out="--count"`` counting its bytes per pair of
        addresses; stop it with ``stop_capture``."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", f"{self.tag}-sw", sys.executable, str(Path(__file__).with_name("wirecap.py")), str(out)],
            env=self.env(0), stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        if proc.stdout.readline().strip() != "capturing":
            proc.kill()
            raise RuntimeError(f"the capture did not start (exit status {proc.wait()})")
        return proc

    @staticmethod
    def stop_capture(proc: subprocess.Popen) -> str:
        """Stop a capture; its last line (how many frames it recorded, or the counts as JSON)."""
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        return out.strip()

    def listening(self, i: int) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket listening inside host ``i``, as the host reports it."""
        out = _ip("netns", "exec", self.ns(i), "ss", "-tlnH").stdout
        found = []
        for line in out.splitlines():
            address, _, port = line.split()[3].rpartition(":")
            found.append((address.strip("[]").removeprefix("::ffff:"), int(port)))
        return sorted(set(found))

    def pids(self, i: int) -> list[int]:
        """Processes running inside host ``i``."""
        return [int(p) for p in _ip("netns", "pids", self.ns(i), check=False).stdout.split()]

    def destroy(self) -> None:
        """Kill what runs in the lab's namespaces, delete them and the state folder."""
        for name in reversed(self.created):
            kill_namespace_processes(name)
            for _ in range(10):  # a namespace busy with a dying process refuses deletion briefly
                if _ip("netns", "del", name, check=False).returncode == 0 or name not in namespaces():
                    break
                time.sleep(0.2)
        self.created = [n for n in self.created if n in namespaces()]
        if self._own_root and not self.created:
            shutil.rmtree(self.root, ignore_errors=True)
