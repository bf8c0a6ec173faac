"""Every file shipped in configs/ loads with the schema it belongs to, and opens with a
comment that gives the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def loader(path: Path):
    if path.parent.name == "hardware":
        from swarm.plan import load_hardware

        return load_hardware
    if path.name.startswith("cluster"):
        from swarm.cluster.spec import load_cluster_spec

        return load_cluster_spec
    from swarm.config import load_job

    return load_job


def test_there_are_job_presets():
    names = {p.name for p in ALL}
    assert {"demo.yaml", "llama-8b-16gb.yaml", "llama-70b-nvme.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path):
    assert loader(path)(path) is not None


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_opens_with_its_command(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any("swarm " in line or "python " in line for line in header), f"{path} has no command in its header"
