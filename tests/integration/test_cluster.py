"""A swarm of three namespace hosts: up, status, pinned tasks, refusals, dashboard, join, down.

Every host is a Linux network namespace with its own address (198.18.0.N), ``$SWARM_HOME`` and
Ray temp folder (``swarm.cluster.netlab``). Hosts 1-3 run agents and form the swarm; host 4
plays a PC with other versions, then a PC without agent that joins. The tests run in file order
on one bring-up (module fixture); the last one takes the swarm down and checks that no process
is left. The fixture's finalizer kills whatever is left in the namespaces and deletes them,
whatever happened.

Run alone with: python -m pytest -m integration tests/integration/test_cluster.py
This file is also the browser driver that the dashboard test runs inside the head's namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAB_CONFIG = REPO / "configs" / "cluster-lab.yaml"
ARTIFACTS = REPO / "test-artifacts"
HEAD, W1, W2, OTHER = 1, 2, 3, 4
ADDR = {i: f"198.18.0.{i}" for i in (1, 2, 3, 4)}
FAKE_VERSION = "9.9.9"
# A swarm whose package reports another version: the real CLI, run after patching it.
WITH_FAKE_VERSION = (
    "import sys, swarm; swarm.__version__ = %r\n"
    "from swarm.cli import main\n"
    "sys.exit(main(sys.argv[1:]))" % FAKE_VERSION
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


@dataclass
class Swarm:
    lab: object  # swarm.cluster.netlab.NetLab
    agents: dict[int, subprocess.Popen]
    secret: str
    up: subprocess.CompletedProcess
    up_seconds: float


def wait_healthy(lab, host: int, address: str, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        r = lab.swarm(host, "agent", "--health", "--address", address, timeout=60)
        if r.returncode == 0:
            return r.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"agent {address} not healthy: {r.stderr}")
        time.sleep(0.5)


def start_agent(lab, host: int, python_args: list[str]) -> subprocess.Popen:
    log = lab.root / f"agent-h{host}.log"
    proc = lab.popen(host, [sys.executable, *python_args, "agent", "--listen", f"{ADDR[host]}:7077"], log)
    wait_healthy(lab, host, f"{ADDR[host]}:7077")
    return proc


def status(lab) -> dict:
    r = lab.swarm(HEAD, "status", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.wait(timeout_s)


@pytest.fixture(scope="module")
def swarm():
    from lab.netlab import NetLab

    lab = NetLab(4)
    lab.create()
    try:
        assert lab.swarm(HEAD, "init").returncode == 0
        secret_file = lab.home(HEAD) / "secret"
        for host in (W1, W2, OTHER):  # "copy the secret to the other PCs", mode kept
            (lab.home(host) / "secret").write_bytes(secret_file.read_bytes())
            os.chmod(lab.home(host) / "secret", 0o600)
        agents = {host: start_agent(lab, host, ["-m", "swarm"]) for host in (HEAD, W1, W2)}
        start = time.monotonic()
        up = lab.swarm(HEAD, "up", str(LAB_CONFIG), timeout=400)
        yield Swarm(lab, agents, secret_file.read_text().strip(), up, time.monotonic() - start)
    finally:
        lab.destroy()
        from lab.netlab import namespaces

        assert not [ns for ns in namespaces() if ns.startswith(lab.tag + "-")], "namespaces left behind"


def test_up_brings_the_three_hosts_up(swarm):
    assert swarm.up.returncode == 0, swarm.up.stdout + swarm.up.stderr
    assert "all 3 nodes alive" in swarm.up.stdout
    print(f"\nswarm up: {swarm.up_seconds:.1f}s from the command to all 3 nodes alive")
    st = status(swarm.lab)
    assert {n["address"]: n["alive"] for n in st["nodes"]} == {ADDR[HEAD]: True, ADDR[W1]: True, ADDR[W2]: True}
    assert [n["role"] for n in st["nodes"]] == ["head", "worker", "worker"]
    assert st["dashboard"] == "http://127.0.0.1:8265"
    assert all(n["ram_bytes"] > 0 and n["cpus"] == 1.0 for n in st["nodes"])
    text = swarm.lab.swarm(HEAD, "status").stdout
    assert "dashboard: http://127.0.0.1:8265" in text and text.count(" yes ") == 3


PINNED_TASKS = """
import json, os, sys, ray
from swarm.cluster.state import record_progress
ray.init(address="198.18.0.1:6379", log_to_driver=False)

@ray.remote(num_cpus=0)
def where():
    return {k: os.environ.get(k) for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "RAY_AUTH_MODE", "RAY_USE_TLS")} | {
        "ip": ray.util.get_node_ip_address()}

ips = sys.argv[1:]
refs = [where.options(resources={"node:" + ip: 0.001}).remote() for ip in ips]
print("RESULT " + json.dumps(dict(zip(ips, ray.get(refs, timeout=180)))), flush=True)
job_id = ray.get_runtime_context().get_job_id()
record_progress(job_id, step=3, loss=0.5)  # what a training driver reports
print("JOB " + job_id, flush=True)
sys.stdin.read()  # stay a running job until the test has looked at `swarm status`
"""


def test_a_task_pinned_to_each_node_reports_that_nodes_address(swarm):
    from swarm.cluster.client import ray_client_env
    from swarm.cluster.tls import node_files

    lab = swarm.lab
    env = lab.env(HEAD, **ray_client_env(swarm.secret, node_files(lab.home(HEAD))))
    ips = [ADDR[HEAD], ADDR[W1], ADDR[W2]]
    driver = subprocess.Popen(lab.argv(HEAD, [sys.executable, "-c", PINNED_TASKS, *ips]), env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        lines = [driver.stdout.readline(), driver.stdout.readline()]
        if not (lines[0].startswith("RESULT ") and lines[1].startswith("JOB ")):
            driver.kill()
        else:
            jobs = status(lab)["jobs"]
    finally:
        driver.stdin.close()  # the driver's cue to exit
        driver.wait(120)
        err = driver.stderr.read()
    assert driver.returncode == 0, err[-3000:]
    result = json.loads(lines[0].split(" ", 1)[1])
    job_id = lines[1].split(" ", 1)[1].strip()
    for ip in ips:
        assert result[ip]["ip"] == ip
        # Workers inherit the node's settings: token auth, TLS and the interface that reaches the head.
        assert result[ip]["RAY_AUTH_MODE"] == "token" and result[ip]["RAY_USE_TLS"] == "1"
        assert result[ip]["NCCL_SOCKET_IFNAME"] == result[ip]["GLOO_SOCKET_IFNAME"] == "lan0"
    # While the driver runs, `swarm status` lists it with the progress it recorded.
    assert [(j["job_id"], j["step"], j["loss"]) for j in jobs] == [(job_id, 3, 0.5)]


def test_agent_refuses_calls_without_or_with_a_wrong_secret(swarm):
    lab = swarm.lab
    target = f"{ADDR[W1]}:7077"
    bare = lab.root / "no-secret-home"
    bare.mkdir()
    r = lab.swarm(OTHER, "agent", "--health", "--address", target, env=lab.env(OTHER, SWARM_HOME=str(bare)))
    assert r.returncode == 1 and "no cluster secret" in r.stderr
    r = lab.swarm(OTHER, "agent", "--health", "--insecure", "--address", target, env=lab.env(OTHER, SWARM_HOME=str(bare)))
    assert r.returncode == 1 and "refused the call: the call carries no signature" in r.stderr, r.stderr
    wrong = lab.root / "wrong-secret-home"
    wrong.mkdir()
    (wrong / "secret").write_text("0" * 64 + "\n")
    os.chmod(wrong / "secret", 0o600)
    r = lab.swarm(OTHER, "agent", "--health", "--address", target, env=lab.env(OTHER, SWARM_HOME=str(wrong)))
    assert r.returncode == 1 and "signed with a different cluster secret" in r.stderr, r.stderr
    r = lab.swarm(OTHER, "down", "--insecure", str(LAB_CONFIG), env=lab.env(OTHER, SWARM_HOME=str(bare)))
    assert r.returncode == 2 and r.stderr.count("carries no signature") == 3, r.stderr
    assert "healthy: agent" in wait_healthy(lab, OTHER, target)  # the right secret still works


def test_ray_refuses_a_wrong_token_and_any_client_without_a_certificate_of_the_swarm(swarm):
    from swarm.cluster import keys, tls
    from swarm.cluster.builders import ray_auth_env, ray_tls_env

    code = "import ray; ray.init(address='198.18.0.1:6379'); print('CONNECTED')"
    lab, token = swarm.lab, keys.ray_token(swarm.secret)

    def connect(env_vars: dict) -> subprocess.CompletedProcess:
        # Ray retries the GCS once a second, and a driver's GCS client reconnects for 60 s:
        # 3 tries and 5 s are enough to see the refusal.
        env = lab.env(W1, RAY_gcs_server_port_wait_time_s="3", RAY_gcs_rpc_server_reconnect_timeout_s="5", **env_vars)
        return lab.run(W1, [sys.executable, "-c", code], env=env, timeout=180)

    w1_files = ray_tls_env(tls.node_files(lab.home(W1)))  # a node of the swarm: its certificate
    # The same short retries connect with the swarm's token: the refusals below are refusals.
    r = connect({**ray_auth_env(token), **w1_files})
    assert r.returncode == 0 and "CONNECTED" in r.stdout, r.stderr[-2000:]
    r = connect({**ray_auth_env("f" * 64), **w1_files})
    assert r.returncode != 0 and "CONNECTED" not in r.stdout
    assert "Authentication token is missing or incorrect" in r.stderr
    # The right token without TLS, or with a certificate from another CA, reaches nothing.
    stranger = lab.root / "stranger-home"
    made = lab.run(OTHER, [sys.executable, "-c", STRANGER_CERT], env=lab.env(OTHER, SWARM_HOME=str(stranger)))
    assert made.returncode == 0, made.stderr
    for transport in ({"RAY_USE_TLS": "0"}, ray_tls_env(tls.node_files(stranger))):
        r = connect({**ray_auth_env(token), **transport})
        assert r.returncode != 0 and "CONNECTED" not in r.stdout, r.stdout


# A PC outside the swarm makes its own CA and a certificate for host 4's address with it.
STRANGER_CERT = """
from swarm.cluster import tls
tls.create_ca()
tls.install_node_certificate(tls.issue_node_certificate(tls.public_key_pem(tls.node_key()), ["198.18.0.4"]),
                             tls.ca_certificate_pem(), "198.18.0.4")
"""


DASHBOARD_PROBE = """
import json, sys, urllib.error, urllib.request
def get(token):
    req = urllib.request.Request("http://127.0.0.1:8265/api/v0/nodes")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        return urllib.request.urlopen(req, timeout=20).status
    except urllib.error.HTTPError as exc:
        return exc.code
print(json.dumps([get(None), get("0" * 64), *map(get, sys.argv[1:])]))
"""


def test_dashboard_api_needs_rays_token_and_the_secret_is_not_it(swarm):
    r = swarm.lab.swarm(HEAD, "token")
    token = r.stdout.strip()
    assert r.returncode == 0 and len(token) == 64 and token != swarm.secret
    r = swarm.lab.run(HEAD, [sys.executable, "-c", DASHBOARD_PROBE, swarm.secret, token], timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [401, 403, 403, 200]  # no token, wrong one, the secret itself, Ray's token


def test_browser_signs_in_to_the_dashboard_and_sees_every_node(swarm):
    lab = swarm.lab
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "cluster-dashboard.png"
    shot.unlink(missing_ok=True)
    profile = lab.root / "chromium-profile"
    env = lab.env(HEAD, HOME=str(lab.root), SE_AVOID_STATS="true")
    ips = [ADDR[HEAD], ADDR[W1], ADDR[W2]]
    token = lab.swarm(HEAD, "token").stdout.strip()
    r = lab.run(HEAD, [sys.executable, __file__, "browse", "http://127.0.0.1:8265", str(shot), str(profile), *ips],
                env=env, timeout=300, input=token)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["asked_for_token"] and seen["nodes"] == ips
    assert shot.stat().st_size > 10_000


def test_up_again_starts_only_what_is_missing_and_refuses_other_versions(swarm, tmp_path):
    lab = swarm.lab
    fake = start_agent(lab, OTHER, ["-c", WITH_FAKE_VERSION])
    try:
        config = yaml.safe_load(LAB_CONFIG.read_text())
        config["workers"].append({"address": ADDR[OTHER]})
        path = tmp_path / "cluster-4.yaml"
        path.write_text(yaml.safe_dump(config))
        r = lab.swarm(HEAD, "up", str(path), timeout=400)
        assert r.returncode == 2, r.stdout + r.stderr
        for host in (HEAD, W1, W2):
            assert f"{ADDR[host]}: already running" in r.stdout
        import swarm as package

        # One error line names the refused node and why.
        assert r.stderr.startswith("error: 1 node(s) refused: ") and r.stderr.count("\n") == 1, r.stderr
        assert f"node {ADDR[OTHER]}: swarm {FAKE_VERSION} differs from the head's {package.__version__}; " in r.stderr
        assert lab.pids(OTHER) == [fake.pid]  # nothing was started there
        assert {n["address"] for n in status(lab)["nodes"] if n["alive"]} == {ADDR[HEAD], ADDR[W1], ADDR[W2]}
    finally:
        assert stop(fake) == 0
    assert lab.pids(OTHER) == []


def test_join_without_agent(swarm):
    lab = swarm.lab
    r = lab.run(OTHER, [sys.executable, "-c", WITH_FAKE_VERSION, "join", ADDR[HEAD]], timeout=120)
    assert r.returncode == 2 and f"this PC's swarm {FAKE_VERSION} differs from the head's" in r.stderr, r.stderr
    log = lab.root / "join.log"
    join = lab.popen(OTHER, [sys.executable, "-m", "swarm", "join", ADDR[HEAD], "--num-cpus", "1",
                             "--object-store-memory", str(100 * 1024**2)], log)
    try:
        deadline = time.monotonic() + 240
        while f"joined {ADDR[HEAD]} as {ADDR[OTHER]} (via lan0)" not in log.read_text():
            assert join.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        alive = {n["address"] for n in status(lab)["nodes"] if n["alive"]}
        assert alive == {ADDR[HEAD], ADDR[W1], ADDR[W2], ADDR[OTHER]}
    finally:
        assert stop(join) == 0, log.read_text()
    assert "left the swarm" in log.read_text()
    assert lab.pids(OTHER) == []


def test_a_swarm_of_one_pc_with_every_default_and_insecure(swarm):
    """Host 4 alone: the agent on its default address, `swarm up` without a cluster file, and
    authentication turned off explicitly (--insecure), the only way to turn it off."""
    lab = swarm.lab
    agent = lab.popen(OTHER, [sys.executable, "-m", "swarm", "agent", "--insecure"], lab.root / "agent-h4-default.log")
    try:
        deadline = time.monotonic() + 90
        while (r := lab.swarm(OTHER, "agent", "--health", "--insecure")).returncode != 0:  # found via agent.json
            assert agent.poll() is None and time.monotonic() < deadline, r.stderr
            time.sleep(0.5)
        assert "healthy: agent 127.0.0.1:7077" in r.stdout
        r = lab.swarm(OTHER, "agent", "--health")  # a client with the secret wants a signed reply
        assert r.returncode == 1 and "did not sign its reply" in r.stderr, r.stderr
        r = lab.swarm(OTHER, "up", "--insecure", timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        st = json.loads(lab.swarm(OTHER, "status", "--json", "--insecure").stdout)
        assert [(n["address"], n["alive"], n["interface"]) for n in st["nodes"]] == [("127.0.0.1", True, "lo")]
        assert st["nodes"][0]["offload_write_bytes_per_s"] > 0  # measured by `swarm up`
        r = lab.run(OTHER, [sys.executable, "-c", DASHBOARD_PROBE, "x"], timeout=120)
        assert json.loads(r.stdout)[0] == 200  # Ray without token auth: the dashboard is open
        r = lab.swarm(OTHER, "down", "--insecure", timeout=300)
        assert r.returncode == 0 and "head 127.0.0.1: stopped" in r.stdout, r.stdout + r.stderr
    finally:
        assert stop(agent) == 0
    assert lab.pids(OTHER) == []


def test_down_stops_every_ray_node_and_leaves_no_process(swarm):
    lab = swarm.lab
    r = lab.swarm(HEAD, "down", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2].startswith(f"head {ADDR[HEAD]}: stopped") and "swarm is down" in lines[-1]  # head last
    for host in (HEAD, W1, W2):
        assert lab.pids(host) == [swarm.agents[host].pid], f"Ray processes left on host {host}"
    assert "no Ray node" in wait_healthy(lab, W1, f"{ADDR[W1]}:7077")
    r = lab.swarm(HEAD, "status")
    assert r.returncode == 2 and "no swarm is recorded" in r.stderr
    for host in (HEAD, W1, W2):
        assert stop(swarm.agents[host]) == 0
    assert all(lab.pids(host) == [] for host in (HEAD, W1, W2, OTHER))


# --- the browser driver, run inside the head's namespace by the dashboard test ---------------


def browse(url: str, shot: str, profile: str, ips: list[str]) -> dict:
    """Open the dashboard in headless Chromium, enter the token (stdin), wait for every node."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token = sys.stdin.read().strip()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url + "/#/cluster")
        box = WebDriverWait(driver, 90).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "input[placeholder='Enter your authentication token']")
        )[0]
        box.send_keys(token)
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() == "submit").click()
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, 120).until(lambda d: all(ip in body(d) for ip in ips) and "ALIVE" in body(d))
        driver.save_screenshot(shot)
        return {"asked_for_token": True, "nodes": [ip for ip in ips if ip in body(driver)]}
    finally:
        driver.quit()


if __name__ == "__main__" and sys.argv[1:2] == ["browse"]:
    url, shot, profile, *addresses = sys.argv[2:]
    print(json.dumps(browse(url, shot, profile, addresses)))
