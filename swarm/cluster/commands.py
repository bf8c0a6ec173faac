"""What ``swarm up``, ``swarm status``, ``swarm down`` and ``swarm token --rotate`` print, around the
library calls."""

from __future__ import annotations

import json
import sys
import threading
import time

from pathlib import Path

from swarm.cluster import bringup, rotate
from swarm.cluster.keys import ray_token
from swarm.cluster.spec import ClusterSpec, NodeSpec, load_cluster_spec
from swarm.cluster.state import cluster_status, load_cluster_state, save_cluster_state
from swarm.errors import UserError
from swarm.home import resolve_secret, secret_path


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f}G"


def format_status(status: dict) -> str:
    """The human table of ``swarm status`` / ``swarm up``."""
    rows = [("ROLE", "ADDRESS", "HOST", "ALIVE", "GPUS", "VRAM", "RAM", "OFFLOAD FREE", "WRITE", "IFACE")]
    for n in status["nodes"]:
        gpus = ", ".join(g["name"] for g in n.get("gpus") or []) or "-"
        rows.append((
            n["role"], n["address"], n.get("hostname") or "-", "yes" if n["alive"] else "NO", gpus,
            _gib(n.get("vram_bytes")), _gib(n.get("ram_bytes")), _gib(n.get("offload_free_bytes")),
            "-" if not n.get("offload_write_bytes_per_s") else _gib(n["offload_write_bytes_per_s"]) + "/s",
            n.get("interface") or "-",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for n in status["nodes"]:
        if n.get("error"):
            lines.append(f"note: {n['address']}: {n['error']}")
    for job in status["jobs"]:
        step = "-" if job.get("step") is None else job["step"]
        loss = "-" if job.get("loss") is None else f"{job['loss']:.4f}"
        lines.append(f"job {job['job_id']}: running, step {step}, loss {loss} ({job['entrypoint']})")
    if status.get("error"):
        lines.append(f"note: {status['error']}")
    if status.get("dashboard"):
        lines.append(f"dashboard: {status['dashboard']}  (sign in with the token `swarm token` prints)")
    return "\n".join(lines)


def _one_pc_spec() -> ClusterSpec:
    from swarm.cluster.agent import local_agent_address

    return ClusterSpec(head=NodeSpec(address="127.0.0.1", agent=local_agent_address()))


def up_command(cluster: str | None, insecure: bool, timeout_s: float) -> int:
    """``swarm up``: bring up, print the nodes; exit 2 when some nodes were refused."""
    secret = resolve_secret(insecure)
    spec = load_cluster_spec(cluster) if cluster else _one_pc_spec()
    start = time.monotonic()
    refusals = bringup.up(spec, secret, timeout_s=timeout_s, say=say_whole_lines)
    elapsed = time.monotonic() - start
    _remember_cluster_file(cluster)
    print(format_status(cluster_status(secret)))
    print(f"up in {elapsed:.1f}s")
    if refusals:
        # One line for all of them: the error, then what to do.
        raise UserError(f"{len(refusals)} node(s) refused: {'; '.join(refusals)}; fix them and run `swarm up` "
                        "again, the others are up")
    return 0


def _remember_cluster_file(cluster: str | None) -> None:
    """Record the cluster file in the state, for `swarm token --rotate` to start the swarm again."""
    state = load_cluster_state()
    if state is not None:
        save_cluster_state({**state, "cluster_file": str(Path(cluster).resolve()) if cluster else None})


def rotate_command(cluster: str | None, timeout_s: float) -> int:
    """``swarm token --rotate``: a new secret on every PC, a new CA, the swarm started again.

    Exits 2 (after doing the rest) when some PC did not take the new secret.
    """
    secret = resolve_secret(False)
    state = load_cluster_state()
    path = cluster or (state or {}).get("cluster_file")
    if path:
        spec = load_cluster_spec(path)
    elif state is not None and [n.get("address") for n in state.get("nodes", [])] == ["127.0.0.1"]:
        spec = _one_pc_spec()
    else:
        raise UserError("which PCs? pass the cluster file: `swarm token --rotate CLUSTER.yaml`")
    new, failures = rotate.rotate(bringup.spec_state(spec)["nodes"], secret, say=say_whole_lines)
    if state is not None:  # the swarm was up: start it again with the new token and certificates
        failures += bringup.up(spec, new, timeout_s=timeout_s, say=say_whole_lines)
        _remember_cluster_file(path)
    print(f"new token (the dashboard asks for it): {ray_token(new)}")
    if failures:
        raise UserError(f"{len(failures)} PC(s) did not take the new secret: {'; '.join(failures)}; copy "
                        f"{secret_path()} to them by hand (as at set-up) and run `swarm up` again")
    return 0


_PRINTING = threading.Lock()


def say_whole_lines(line: str) -> None:
    """Print a progress line from any of bring-up's threads without lines running together."""
    with _PRINTING:
        print(line, flush=True)


def status_command(as_json: bool, insecure: bool) -> int:
    """``swarm status``."""
    status = cluster_status(resolve_secret(insecure))
    print(json.dumps(status, indent=None if as_json else 2) if as_json else format_status(status))
    return 0


def down_command(cluster: str | None, insecure: bool) -> int:
    """``swarm down``: exit 2 when some node could not be stopped."""
    secret = resolve_secret(insecure)
    state = bringup.spec_state(load_cluster_spec(cluster)) if cluster else None
    failures = bringup.down(secret, state)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    if failures:
        raise UserError(f"{len(failures)} node(s) could not be stopped (see above); run `swarm down` again once their agents answer")
    print("swarm is down")
    return 0
