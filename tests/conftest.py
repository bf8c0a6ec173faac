"""Shared fixtures: tiny models of real architectures, made once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "integration"))
sys.path.insert(0, str(Path(__file__).parent))  # tests/lab: the network-namespace hosts

DEMO_TEXT = Path(__file__).resolve().parents[1] / "configs" / "data" / "demo.txt"

# Every process a test starts finds the ninja DeepSpeed's ops were built with, also when pytest
# runs as .venv/bin/python without the venv activated: another ninja rebuilds an op (minutes).
from swarm.train.ops import pin_ninja  # noqa: E402

pin_ninja()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A function arch -> folder of a tiny local model (llama, qwen2, mistral)."""
    from swarm.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(root / f"tiny-{arch}", [DEMO_TEXT], arch=arch)
        return made[arch]

    return get
