"""Ray's own HTTP calls with the token stay off a web proxy once swarm's ``no_proxy`` is set.

Found by test_cluster_attacks.py: a run's driver, behind ``http_proxy``, sent
``authorization: Bearer TOKEN`` to the proxy. Ray's state API (``ray.util.state``) calls the
dashboard on 127.0.0.1 through ``requests``, which honours ``http_proxy`` unless ``no_proxy``
names the host. A real Ray with token auth and its dashboard, a recording "proxy" on loopback,
and a driver that asks the state API: without swarm's ``no_proxy`` the proxy gets the token
(the control), with it the call goes straight to the dashboard and works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ATTACKS = Path(__file__).with_name("test_cluster_attacks.py")
DRIVER = """
import os, sys, time
if sys.argv[1] == "swarm":
    from swarm.cluster.builders import no_proxy_env
    os.environ.update(no_proxy_env(os.environ))
import ray
from ray.util.state import list_nodes
ray.init(include_dashboard=True, num_cpus=1, _temp_dir=sys.argv[2], dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[3]), object_store_memory=100 * 1024**2)
for _ in range(60):  # the dashboard's API answers a few seconds after ray.init
    try:
        print("nodes:", len(list_nodes(address=f"http://127.0.0.1:{sys.argv[3]}")))
        break
    except Exception as exc:
        error = exc
        time.sleep(1)
else:
    print("state api failed:", str(error)[:200])
ray.shutdown()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["plain", "swarm"])
def test_rays_state_api_sends_the_token_to_a_proxy_unless_swarms_no_proxy_is_set(tmp_path, mode):
    token = "ab" * 32
    proxy_port, log = free_port(), tmp_path / "proxy.log"
    proxy = subprocess.Popen([sys.executable, str(ATTACKS), "proxy", "127.0.0.1", str(proxy_port), str(log)])
    ray_dir = tempfile.mkdtemp(prefix="swp", dir="/tmp")  # short: Ray's socket paths stay under 108 bytes
    try:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("RAY_")}
        env.update(http_proxy=f"http://127.0.0.1:{proxy_port}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                   RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        run = subprocess.run([sys.executable, "-c", DRIVER, mode, ray_dir, str(free_port())],
                             env=env, capture_output=True, text=True, timeout=240)
    finally:
        proxy.kill()
        proxy.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
    received = log.read_bytes() if log.exists() else b""
    if mode == "plain":  # the leak, as Ray does it on its own
        assert f"authorization: Bearer {token}".encode() in received, received[-2000:]
    else:
        assert token.encode() not in received
        assert "nodes: 1" in run.stdout, run.stdout + run.stderr[-2000:]
