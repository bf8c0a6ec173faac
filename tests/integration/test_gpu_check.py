"""The GPU check script is ready for a GPU machine: on this one it says there is no GPU, and
its training code runs on the CPU path with a shrunk model (the same calls it makes on a GPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check")
def test_without_a_gpu_the_check_says_so_in_one_line():
    result = subprocess.run(["bash", str(REPO / "tests/gpu/run.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout == "gpu check: no NVIDIA GPU on this machine; nothing to check\n" and not result.stderr


def test_the_checks_training_path_runs_and_learns(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tests/gpu/check.py"), "--out", str(tmp_path / "out"), "--work", str(tmp_path),
         "--case", "cpu-offload", "--layers", "2", "--steps", "8", "--seq-len", "128", "--precision", "fp32"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [summary] = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert summary["strategy"] == "shard-params-cpu-opt-cpu" and summary["loss_fell_by_a_third"], summary
    assert summary["tokens_per_s"] > 0 and summary["planned_tokens_per_s"] > 0
