"""Time `swarm up` on three namespace hosts: from the command to every node alive in Ray.

Run as root on Linux (needs `ip`, Debian's iproute2):
    python tests/bench/bench_up.py [--runs N] [--insecure | --compare]

Each run makes a fresh lab (three network namespaces on one bridge, 198.18.0.1-3, see
configs/cluster-lab.yaml), starts an agent per host, times `swarm up` on the head host (which
returns once Ray reports all nodes alive), times a second `swarm up` on the running swarm,
times `swarm down` and deletes the lab. It prints figures; it does not pass or fail on them.
With --insecure, agents and commands run without secret: Ray without token and without TLS,
which shows what TLS and the certificates cost a bring-up; --compare alternates the two modes,
N runs each, so that both see the same load on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cluster-lab.yaml"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # lab: the network-namespace hosts

from lab.netlab import NetLab  # noqa: E402


def wait_healthy(lab: NetLab, host: int, timeout_s: float = 120, insecure: bool = False) -> None:
    deadline = time.monotonic() + timeout_s
    flags = ["--insecure"] if insecure else []
    while lab.swarm(host, "agent", "--health", "--address", f"{lab.address(host)}:7077", *flags).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"agent on host {host} did not become healthy; see {lab.root}/agent-h{host}.log")
        time.sleep(0.5)


def start_agents(lab: NetLab, flags: list[str] | tuple[str, ...] = (), insecure: bool = False) -> None:
    """One secret on the three hosts and a healthy agent on each."""
    lab.swarm(1, "init")
    for host in (2, 3):
        shutil.copy2(lab.home(1) / "secret", lab.home(host) / "secret")
    for host in (1, 2, 3):
        lab.popen(host, [sys.executable, "-m", "swarm", "agent", "--listen", f"{lab.address(host)}:7077", *flags],
                  lab.root / f"agent-h{host}.log")
    for host in (1, 2, 3):
        wait_healthy(lab, host, insecure=insecure)


def one_run(insecure: bool) -> tuple[float, float, float, str]:
    """Seconds to all nodes alive, for a repeated up, for `swarm down`; the up output."""
    flags = ["--insecure"] if insecure else []
    with NetLab(3) as lab:
        start_agents(lab, flags, insecure)
        start = time.monotonic()
        first = lab.swarm(1, "up", str(CONFIG), *flags, timeout=600)
        up_s = time.monotonic() - start
        if first.returncode != 0:
            raise SystemExit(f"swarm up failed:\n{first.stdout}\n{first.stderr}")
        start = time.monotonic()
        again = lab.swarm(1, "up", str(CONFIG), *flags, timeout=600)
        again_s = time.monotonic() - start
        if again.returncode != 0:
            raise SystemExit(f"second swarm up failed:\n{again.stdout}\n{again.stderr}")
        start = time.monotonic()
        down = lab.swarm(1, "down", *flags, timeout=300)
        down_s = time.monotonic() - start
        if down.returncode != 0:
            raise SystemExit(f"swarm down failed:\n{down.stdout}\n{down.stderr}")
    return up_s, again_s, down_s, first.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--insecure", action="store_true", help="no secret: Ray without token and TLS (to see what TLS costs)")
    parser.add_argument("--compare", action="store_true", help="alternate default and --insecure runs, --runs of each")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the lab makes network namespaces")
    modes = [False, True] if args.compare else [args.insecure]
    names = {False: "default (token, TLS)", True: "--insecure (no token, no TLS)"}
    print(f"{time.strftime('%Y-%m-%d %H:%M')}: swarm up on 3 namespace hosts ({CONFIG.relative_to(REPO)}), "
          f"{' against '.join(names[m] for m in modes)}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    ups: dict[bool, list[float]] = {m: [] for m in modes}
    agains: dict[bool, list[float]] = {m: [] for m in modes}
    for i in range(1, args.runs + 1):
        for insecure in modes if i % 2 else modes[::-1]:  # alternate which mode goes first
            up_s, again_s, down_s, out = one_run(insecure)
            ups[insecure].append(up_s)
            agains[insecure].append(again_s)
            phases = "; ".join(re.findall(r"^(?:head|worker) \S+: \w+.*\(([\d.]+s)\)$", out, re.M))
            label = f" {names[insecure]}" if args.compare else ""
            print(f"run {i}{label}: {up_s:.1f} s from `swarm up` to all 3 nodes alive (node starts done at {phases}); "
                  f"again on the running swarm: {again_s:.1f} s; swarm down: {down_s:.1f} s; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for insecure in modes if args.runs > 1 else []:
        runs = ", ".join(f"{u:.1f}" for u in ups[insecure])
        print(f"median, {names[insecure]}: {statistics.median(ups[insecure]):.1f} s to all nodes alive (runs: {runs}), "
              f"{statistics.median(agains[insecure]):.1f} s again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
