"""What `swarm status` prints from a status record."""

from __future__ import annotations

from swarm.cluster.commands import format_status

GIB = 1024**3


def test_status_table_shows_each_node_jobs_and_the_dashboard(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    status = {
        "dashboard": "http://127.0.0.1:8265",
        "error": None,
        "nodes": [
            {"address": "192.168.1.10", "alive": True, "role": "head", "hostname": "tower",
             "gpus": [{"name": "RTX 4090", "vram_bytes": 24 * GIB}], "vram_bytes": 24 * GIB, "ram_bytes": 64 * GIB,
             "offload_free_bytes": 900 * GIB, "offload_write_bytes_per_s": 2 * GIB, "interface": "eth0"},
            {"address": "192.168.1.11", "alive": False, "role": "worker", "hostname": None, "gpus": [],
             "vram_bytes": None, "ram_bytes": None, "offload_free_bytes": None, "offload_write_bytes_per_s": None,
             "interface": None, "error": "no swarm agent answers at 192.168.1.11:7077"},
        ],
        "jobs": [{"job_id": "01000000", "entrypoint": "DRIVER", "step": 120, "loss": 1.23456}],
    }
    lines = format_status(status).splitlines()
    assert lines[0].split() == ["ROLE", "ADDRESS", "HOST", "ALIVE", "GPUS", "VRAM", "RAM", "OFFLOAD", "FREE", "WRITE", "IFACE"]
    assert lines[1].split() == ["head", "192.168.1.10", "tower", "yes", "RTX", "4090", "24.0G", "64.0G", "900.0G", "2.0G/s", "eth0"]
    assert lines[2].split()[:4] == ["worker", "192.168.1.11", "-", "NO"]
    assert "note: 192.168.1.11: no swarm agent answers" in lines[3]
    assert lines[4] == "job 01000000: running, step 120, loss 1.2346 (DRIVER)"
    assert lines[5] == "dashboard: http://127.0.0.1:8265  (sign in with the token `swarm token` prints)"
