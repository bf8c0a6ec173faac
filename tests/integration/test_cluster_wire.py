"""What someone else on the home network sees and reaches: three namespace PCs and a fourth.

Hosts 1-3 form a swarm as ``configs/cluster-lab.yaml`` describes (the head coordinates, two PCs
train); host 4 is a stranger's PC on the same LAN, without the secret. The bridge is recorded
(``lab.wirecap``) from before ``swarm init`` to after ``swarm down``. The tests run in
file order on that one lab:

- every port each swarm PC reports listening is probed from host 4, without credentials, with
  wrong ones and with a certificate of another CA: none answers with data;
- every folder swarm and Ray made is private;
- a two-PC training run; ``swarm status``; ``swarm down``;
- the recording holds neither the secret nor any key derived from it (nor any private key),
  though it holds every phase's traffic;
- with the dashboard exposed in plain HTTP on purpose, its token is sniffed off the wire and
  shown powerless against the agents and Ray's gRPC.

Run alone with: python -m pytest -m integration tests/integration/test_cluster_wire.py
This file is also the prober that runs inside host 4 (``python THIS probe HOST PORT...``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAB_CONFIG = REPO / "configs" / "cluster-lab.yaml"
HEAD, W1, W2, STRANGER = 1, 2, 3, 4
SWARM = (HEAD, W1, W2)
ADDR = {i: f"198.18.0.{i}" for i in (1, 2, 3, 4)}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and raw sockets need root"),
]


@dataclass
class Wire:
    lab: object  # swarm.cluster.netlab.NetLab
    secret: str
    pcap: Path
    capture: subprocess.Popen | None
    agents: dict[int, subprocess.Popen] = field(default_factory=dict)
    phases: list[str] = field(default_factory=list)  # what ran while the capture recorded


def start_agent(lab, host: int) -> subprocess.Popen:
    proc = lab.popen(host, [sys.executable, "-m", "swarm", "agent", "--listen", f"{ADDR[host]}:7077"], lab.root / f"agent-h{host}.log")
    deadline = time.monotonic() + 120
    while lab.swarm(host, "agent", "--health", "--address", f"{ADDR[host]}:7077", timeout=60).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, (lab.root / f"agent-h{host}.log").read_text()
        time.sleep(0.5)
    return proc


@pytest.fixture(scope="module")
def wire():
    from lab.netlab import NetLab, namespaces

    lab = NetLab(4)
    lab.create()
    w = Wire(lab, "", lab.root / "bridge.pcap", None)
    try:
        w.capture = lab.capture(w.pcap)
        assert lab.swarm(HEAD, "init").returncode == 0
        w.secret = (lab.home(HEAD) / "secret").read_text().strip()
        for host in (W1, W2):  # the user copies the secret by hand (scp), not through the swarm
            (lab.home(host) / "secret").write_bytes((lab.home(HEAD) / "secret").read_bytes())
            os.chmod(lab.home(host) / "secret", 0o600)
        w.agents = {host: start_agent(lab, host) for host in SWARM}
        up = lab.swarm(HEAD, "up", str(LAB_CONFIG), timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        w.phases.append("up")
        yield w
    finally:
        if w.capture and w.capture.poll() is None:
            lab.stop_capture(w.capture)
        lab.destroy()
        assert not [ns for ns in namespaces() if ns.startswith(lab.tag + "-")], "namespaces left behind"


# --- ports ------------------------------------------------------------------------------------

def test_every_port_of_every_pc_refuses_a_stranger(wire):
    from swarm.cluster import constants as C

    lab = wire.lab
    made = lab.run(STRANGER, [sys.executable, "-c", STRANGER_CERT], env=lab.env(STRANGER))
    assert made.returncode == 0, made.stderr
    pinned = set(C.HEAD_PORTS) | set(range(C.RAY_MIN_WORKER_PORT, C.RAY_MAX_WORKER_PORT + 1))
    for host in SWARM:
        sockets = lab.listening(host)
        reachable = sorted({port for address, port in sockets if address not in ("127.0.0.1", "::1")})
        # Every port open to the LAN is one swarm pinned; what else Ray opens listens on loopback only.
        assert set(reachable) <= pinned, (host, sockets)
        assert {7077, 6380, 6381, 6383} <= set(reachable) and not set(reachable) & set(C.METRICS_PORTS), (host, sockets)
        if host == HEAD:
            assert {6379, 10001} <= set(reachable) and 8265 not in reachable
        r = lab.run(STRANGER, [sys.executable, __file__, "probe", ADDR[host], *map(str, reachable)],
                    env=lab.env(STRANGER), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        answers = json.loads(r.stdout)
        assert sorted(map(int, answers)) == reachable
        leaks = {port: [a for a in outcomes if not a.startswith(REFUSED)] for port, outcomes in answers.items()}
        assert not any(leaks.values()), (host, leaks)


# A PC outside the swarm: a CA of its own and a certificate for its own address.
STRANGER_CERT = """
from swarm.cluster import tls
tls.create_ca()
tls.install_node_certificate(tls.issue_node_certificate(tls.public_key_pem(tls.node_key()), ["198.18.0.4"]),
                             tls.ca_certificate_pem(), "198.18.0.4")
"""

# What counts as no answer: nothing, a closed or reset connection, a refused TLS handshake, an
# HTTP 401/403, or Ray's two public health checks on the dashboard agent's HTTP port, which by
# Ray's design answer "success" to anyone (docs/cluster.md lists them).
REFUSED = ("closed", "reset", "timeout", "tls refused", "http 401", "http 403", "health check")
HTTP_PATHS = ("/", "/metrics", "/api/version", "/api/v0/nodes", "/api/jobs/", "/api/cluster_status",
              "/api/healthz", "/api/local_raylet_healthz", "/api/gcs_healthz")
HEALTH = re.compile(r"(raylet: )?success(\ngcs: success( \(no local gcs\))?)?")


def _exchange(host: str, port: int, payload: bytes, context: ssl.SSLContext | None) -> str:
    """Send ``payload`` (over TLS with ``context`` if given) and classify what comes back."""
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        return f"closed (connect: {exc.strerror})"
    try:
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as exc:
                return f"tls refused ({exc})"
        sock.sendall(payload)
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ssl.SSLError as exc:
        return "tls refused (after the handshake)" if not data else f"ANSWERED over TLS before {exc}: {data[:200]!r}"
    except socket.timeout:
        if not data:
            return "timeout"
    except ConnectionResetError:
        if not data:
            return "reset"
    finally:
        sock.close()
    if not data:
        return "closed"
    head, _, body = data.partition(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if status and status.group(1) in (b"401", b"403"):
        return f"http {status.group(1).decode()}"
    if status and status.group(1) == b"200" and HEALTH.fullmatch(body.decode(errors="replace").strip()):
        return "health check"
    return f"ANSWERED {data[:300]!r}"


def probe(host: str, ports: list[int]) -> dict[int, list[str]]:
    """Every port: plain HTTP with no token and a wrong one on many paths; TLS without a
    client certificate and with the stranger's own (another CA's), then the same requests."""
    from swarm.cluster import tls

    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.check_hostname, foreign.verify_mode = False, ssl.CERT_NONE
    files = tls.node_files()
    foreign.load_cert_chain(files.cert, files.key)
    out = {}
    for port in ports:
        answers = []
        for path in HTTP_PATHS:
            for token in (None, "0" * 64):
                auth = f"Authorization: Bearer {token}\r\n" if token else ""
                request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode()
                answers += [_exchange(host, port, request, ctx) for ctx in (None, anonymous, foreign)]
        out[port] = answers
    return out


# --- folders ----------------------------------------------------------------------------------

def test_every_folder_swarm_and_ray_made_is_out_of_other_users_reach(wire):
    for host in SWARM:
        home = wire.lab.home(host)
        assert stat.S_IMODE(home.stat().st_mode) == 0o700 and home.stat().st_uid == os.getuid()
        ray_dir = home / "ray"
        assert (ray_dir / "session_latest" / "sockets").is_dir(), f"Ray's folders are not in {home}"
        for path in [p for p in home.rglob("*") if p.is_dir() and not p.is_symlink()]:
            mode = stat.S_IMODE(path.stat().st_mode)
            if ray_dir in path.parents or path == ray_dir:
                continue  # Ray's own (0777 by Ray's choice), reachable only through the 0700 home
            assert mode == 0o700, f"{path} is {oct(mode)}"
        for name in ("secret", "tls/node.key") + (("ca/ca.key",) if host == HEAD else ()):
            assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name


# --- training, status, down, the recording ----------------------------------------------------

def test_a_two_pc_training_run(wire, tiny_models, tmp_path):
    from trainkit import losses, run_dir_of, write_job

    job = write_job(tmp_path, tiny_models("llama"), train={"max_steps": 6, "grad_accum": 1, "eval_every": 100,
                    "checkpoint_every": 3}, ray={"address": f"{ADDR[HEAD]}:6379", "object_store_mb": 100})
    result = wire.lab.swarm(HEAD, "train", str(job), timeout=800)
    run_dir = run_dir_of(result)
    nodes = json.loads((run_dir / "run.json").read_text())["hardware"]["nodes"]
    assert sorted(n["address"] for n in nodes) == [ADDR[W1], ADDR[W2]]
    assert len(losses(run_dir)) == 6
    wire.phases.append("train")


def test_status_then_down(wire):
    lab = wire.lab
    r = lab.swarm(HEAD, "status", "--json", timeout=120)
    assert r.returncode == 0 and all(n["alive"] for n in json.loads(r.stdout)["nodes"]), r.stdout + r.stderr
    wire.phases.append("status")
    r = lab.swarm(HEAD, "down", timeout=300)
    assert r.returncode == 0 and "swarm is down" in r.stdout, r.stdout + r.stderr
    wire.phases.append("down")
    time.sleep(1)  # the last segments of the teardown reach the bridge
    assert "frames" in lab.stop_capture(wire.capture)


def test_the_recording_holds_no_secret_and_no_key_though_it_holds_every_phase(wire):
    from cryptography.hazmat.primitives import serialization

    from lab import wirecap
    from swarm.cluster import keys

    assert wire.phases == ["up", "train", "status", "down"], "an earlier test failed: the recording misses a phase"
    needles = {}
    for name, key in (("secret", wire.secret), ("ray token", keys.ray_token(wire.secret)), ("agent key", keys.agent_key(wire.secret).hex())):
        needles[f"{name} (hex)"] = key.encode()
        needles[f"{name} (bytes)"] = bytes.fromhex(key)
    for host in SWARM:  # the private keys of the CA and of every node: none may travel either
        for pem in [wire.lab.home(host) / "tls" / "node.key"] + ([wire.lab.home(HEAD) / "ca" / "ca.key"] if host == HEAD else []):
            key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
            scalar = key.private_numbers().private_value.to_bytes(32, "big")
            needles[f"{pem.parent.name}/{pem.name} of host {host}"] = scalar
            needles[f"{pem.parent.name}/{pem.name} of host {host} (PEM)"] = pem.read_bytes().splitlines()[1]
    streams = wirecap.tcp_streams(wire.pcap)
    hits = [(name, flow) for flow, payload in streams.items() for name, needle in needles.items() if needle in payload]
    assert hits == []
    # The recording is no empty one: the agents, Ray's GCS and the training's traffic are in it.
    sent = {}
    for (src, sport, dst, dport), payload in streams.items():
        sent[dport] = sent.get(dport, 0) + len(payload)
    assert sent.get(7077, 0) > 10_000 and sent.get(6379, 0) > 10_000, sorted(sent.items())[:20]
    between_workers = sum(len(p) for (src, _, dst, _), p in streams.items() if {src, dst} == {ADDR[W1], ADDR[W2]})
    assert between_workers > 100_000  # the training's gradient exchange


# --- a dashboard in plain HTTP, on purpose ------------------------------------------------------

def test_a_token_sniffed_off_a_plain_http_dashboard_cannot_sign_an_agent_call(wire, tmp_path):
    """The one way left to put a token on the wire in clear is to expose the dashboard in plain
    HTTP (``dashboard.insecure_plain_http``). The token a stranger sniffs there opens the
    dashboard, as the option's name warns, but it is not the secret: no agent takes a call
    signed with it, and Ray's gRPC does not even shake hands without a certificate."""
    from lab import wirecap
    from swarm.cluster import keys

    lab = wire.lab
    config = yaml.safe_load(LAB_CONFIG.read_text())
    config["dashboard"] = {"host": ADDR[HEAD], "insecure_plain_http": True}
    path = tmp_path / "cluster-open-dashboard.yaml"
    path.write_text(yaml.safe_dump(config))
    pcap = tmp_path / "open-dashboard.pcap"
    capture = lab.capture(pcap)
    try:
        up = lab.swarm(HEAD, "up", str(path), timeout=400)
        assert up.returncode == 0 and "warning: the dashboard listens on 198.18.0.1 in plain HTTP" in up.stdout, up.stdout + up.stderr
        # The user opens the dashboard's API from their laptop (host 2) with the token.
        r = lab.run(W1, [sys.executable, "-c", DASHBOARD_GET, f"http://{ADDR[HEAD]}:8265", keys.ray_token(wire.secret)])
        assert r.returncode == 0 and r.stdout.strip() == "200", r.stdout + r.stderr
    finally:
        lab.stop_capture(capture)
    sniffed = {m.group(1).decode() for payload in wirecap.tcp_streams(pcap).values()
               for m in re.finditer(rb"[Aa]uthorization: Bearer ([0-9a-f]{64})", payload)}
    assert sniffed == {keys.ray_token(wire.secret)}  # the stranger has it now
    token = sniffed.pop()
    stolen = lab.root / "stolen-home"
    stolen.mkdir(mode=0o700)
    (stolen / "secret").write_text(token + "\n")  # the token, used as if it were the secret
    os.chmod(stolen / "secret", 0o600)
    as_stranger = lab.env(STRANGER, SWARM_HOME=str(stolen))
    for host in SWARM:
        r = lab.swarm(STRANGER, "agent", "--health", "--address", f"{ADDR[host]}:7077", env=as_stranger)
        assert r.returncode == 1 and "signed with a different cluster secret" in r.stderr, r.stderr
    r = lab.swarm(STRANGER, "down", str(path), env=as_stranger, timeout=300)
    assert r.returncode == 2 and r.stderr.count("signed with a different cluster secret") == 3, r.stderr
    # Ray's GCS with the token but without a certificate of the swarm: no handshake, no call.
    code = f"import ray; ray.init(address='{ADDR[HEAD]}:6379'); print('CONNECTED')"
    env = lab.env(STRANGER, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USE_TLS="0", RAY_gcs_server_port_wait_time_s="3",
                  RAY_gcs_rpc_server_reconnect_timeout_s="5")  # a refused driver gives up in 5 s, not 60
    r = lab.run(STRANGER, [sys.executable, "-c", code], env=env, timeout=180)
    assert r.returncode != 0 and "CONNECTED" not in r.stdout
    r = lab.swarm(HEAD, "down", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for host in SWARM:
        wire.agents[host].send_signal(signal.SIGTERM)
        assert wire.agents[host].wait(60) == 0
        assert lab.pids(host) == []


DASHBOARD_GET = """
import sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/api/v0/nodes", headers={"Authorization": "Bearer " + sys.argv[2]})
print(urllib.request.urlopen(request, timeout=30).status)
"""


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    print(json.dumps(probe(sys.argv[2], [int(p) for p in sys.argv[3:]])))
