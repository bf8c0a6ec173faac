"""The running swarm as this PC knows it (``$SWARM_HOME/cluster.json``) and as Ray reports it.

``swarm up`` / ``swarm join`` write the state file; ``swarm status``, ``swarm down`` and
``swarm train`` read it. Live facts (which nodes are alive, running jobs) come from the Ray
dashboard's HTTP API with the token, and per-PC hardware from each agent.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from swarm.cluster import keys
from swarm.cluster.client import AgentCallError, AgentClient
from swarm.errors import UserError
from swarm.home import home_dir, swarm_home


def state_path() -> Path:
    return swarm_home() / "cluster.json"


def save_cluster_state(state: dict) -> None:
    """Write the state file atomically (a reader never sees half of it)."""
    path = state_path()
    home_dir()
    tmp = path.with_name(f".cluster.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    os.replace(tmp, path)


def clear_cluster_state() -> None:
    state_path().unlink(missing_ok=True)


def load_cluster_state() -> dict | None:
    """The swarm this PC started or joined, or None.

    Keys: ``head_address``; ``gcs_address`` (what ``ray.init(address=...)`` takes);
    ``dashboard`` (URL or None); ``auth`` ("token" or "disabled"); ``nodes``: a list of
    ``{"address", "agent", "role"}``; ``updated``.
    """
    try:
        return json.loads(state_path().read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise UserError(f"{state_path()} is damaged; run `swarm up` again to rewrite it") from None


def progress_dir() -> Path:
    return swarm_home() / "progress"


def record_progress(job_id: str, step: int, loss: float | None) -> None:
    """Let ``swarm status`` show a training job's step and loss (the driver calls this)."""
    folder = home_dir("progress")
    tmp = folder / f".{job_id}.tmp"
    tmp.write_text(json.dumps({"step": step, "loss": loss, "time": time.time()}))
    os.replace(tmp, folder / f"{job_id}.json")


# The dashboard is on the swarm's own head (its loopback, as a rule): a proxy that the user set
# for the web (http_proxy, https_proxy; urllib honours them and bypasses 127.0.0.1 only when
# no_proxy says so) must never see these calls, which carry Ray's token in a header.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def dashboard_get(dashboard: str, path: str, secret: str | None, timeout_s: float = 10.0):
    """GET a dashboard API path with Ray's token (derived from ``secret``); the parsed JSON.

    The call goes straight to the dashboard, whatever proxy the environment names.

    Raises:
        UserError: the dashboard is unreachable or refuses the token.
    """
    request = urllib.request.Request(dashboard.rstrip("/") + path)
    if secret:
        request.add_header("Authorization", f"Bearer {keys.ray_token(secret)}")
    try:
        with _DIRECT.open(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise UserError(f"the Ray dashboard at {dashboard} refused this PC's token ({exc.code}); use the head's secret file") from None
        raise UserError(f"the Ray dashboard at {dashboard} answered {exc.code} to {path}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"the Ray dashboard at {dashboard} does not answer ({getattr(exc, 'reason', exc)}); is the swarm up?") from None


def ray_nodes(dashboard: str, secret: str | None) -> dict[str, dict]:
    """Ray's nodes by address; a live node wins over dead ones that had the same address."""
    data = dashboard_get(dashboard, "/api/v0/nodes?limit=10000&detail=true", secret)
    nodes: dict[str, dict] = {}
    for node in data["data"]["result"]["result"]:
        ip = node["node_ip"]
        if ip not in nodes or node["state"] == "ALIVE":
            nodes[ip] = node
    return nodes


def alive_addresses(dashboard: str, secret: str | None) -> set[str]:
    """Addresses of the nodes Ray reports alive."""
    return {ip for ip, node in ray_nodes(dashboard, secret).items() if node["state"] == "ALIVE"}


def running_jobs(dashboard: str, secret: str | None) -> list[dict]:
    """Running Ray jobs, with step and loss when their driver recorded them."""
    jobs = []
    for job in dashboard_get(dashboard, "/api/jobs/", secret):
        if job.get("status") != "RUNNING":
            continue
        entry = {"job_id": job.get("job_id"), "entrypoint": job.get("entrypoint") or job.get("type"), "step": None, "loss": None}
        progress = progress_dir() / f"{job.get('job_id')}.json"
        if job.get("job_id") and progress.is_file():
            entry.update({k: v for k, v in json.loads(progress.read_text()).items() if k in ("step", "loss")})
        jobs.append(entry)
    return jobs


def _agent_facts(agent: str | None, secret: str | None, head_address: str) -> dict:
    if not agent:
        return {}
    try:
        with AgentClient(agent, secret, timeout_s=5) as client:
            inv = client.inventory(peer=head_address)
    except AgentCallError as exc:
        return {"error": str(exc)}
    return {
        "hostname": inv.hostname,
        "gpus": [{"name": g.name, "vram_bytes": g.vram_bytes} for g in inv.gpus],
        "vram_bytes": sum(g.vram_bytes for g in inv.gpus) if inv.gpus else None,
        "ram_bytes": inv.ram_bytes,
        "offload_free_bytes": inv.offload_free_bytes if inv.offload_free_bytes >= 0 else None,
        "offload_write_bytes_per_s": inv.offload_write_bytes_per_s or None,  # measured by `swarm up`
        "interface": inv.interface or None,
    }


def cluster_status(secret: str | None, state: dict | None = None) -> dict:
    """Everything ``swarm status`` shows, as one JSON-ready dict.

    Keys: ``dashboard``, ``head_address``, ``gcs_address``, ``error`` (why live facts are
    missing, or None), ``jobs`` and ``nodes`` (each with ``address``, ``alive``, ``role``,
    ``hostname``, ``gpus``, ``vram_bytes``, ``ram_bytes``, ``offload_free_bytes``,
    ``offload_write_bytes_per_s``, ``interface``, ``cpus``).
    """
    state = state if state is not None else load_cluster_state()
    if state is None:
        raise UserError("no swarm is recorded on this PC; start one with `swarm up CLUSTER.yaml` (or `swarm join HEAD`)")
    dashboard = state.get("dashboard")
    error, live, jobs = None, {}, []
    try:
        if not dashboard:
            raise UserError("this PC does not know the dashboard's address; run `swarm status` on the head")
        live = ray_nodes(dashboard, secret)
        jobs = running_jobs(dashboard, secret)
    except UserError as exc:
        error = str(exc)
    known = {n["address"]: n for n in state.get("nodes", [])}
    addresses = list(known) + sorted(set(live) - set(known))  # nodes that joined without agent
    with ThreadPoolExecutor(max_workers=8) as pool:
        facts = dict(zip(addresses, pool.map(lambda a: _agent_facts(known.get(a, {}).get("agent"), secret, state.get("head_address", "")), addresses)))
    nodes = []
    for address in addresses:
        ray_node = live.get(address, {})
        resources = ray_node.get("resources_total") or {}
        nodes.append({
            "address": address,
            "alive": ray_node.get("state") == "ALIVE",
            "role": known.get(address, {}).get("role") or ("head" if ray_node.get("is_head_node") else "worker"),
            "hostname": ray_node.get("node_name"),
            "cpus": resources.get("CPU"),
            "gpus": [],
            "vram_bytes": None,
            "ram_bytes": None,
            "offload_free_bytes": None,
            "offload_write_bytes_per_s": None,
            "interface": None,
            **facts[address],
        })
    return {
        "dashboard": dashboard,
        "head_address": state.get("head_address"),
        "gcs_address": state.get("gcs_address"),
        "error": error,
        "nodes": nodes,
        "jobs": jobs,
    }
