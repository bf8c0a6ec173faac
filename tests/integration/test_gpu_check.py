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


NCCL_STAND_IN = r'''
import json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path[:0] = [sys.argv[1] + "/tests", sys.argv[1] + "/tests/gpu", sys.argv[1]]
import pytest
from lab.nccl_rules import NcclStandIn, local_rendezvous
import nccl_case

stand_in = NcclStandIn(pytest.MonkeyPatch())
local_rendezvous()
result = nccl_case.run("cuda:0", model_device="cpu")
print(json.dumps({"result": result, "violations": stand_in.violations, "events": stand_in.events}))
'''


def test_the_checks_nccl_case_keeps_nccls_device_rules_with_gloo_standing_in():
    """The NCCL case on this CPU: gloo carries the data, the stand-in plays a card and refuses any
    tensor of swarm's that reaches an NCCL group off the card, or a collective before set_device."""
    result = subprocess.run([sys.executable, "-c", NCCL_STAND_IN, str(REPO)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["violations"] == []
    assert report["events"][0] == ["set_device", "cuda:0"]
    checked = [e for e in report["events"] if e[0] not in ("set_device", "init_process_group", "new_group")]
    assert {backend for _, backend, _ in checked} == {"nccl", "gloo"}
    assert any(set(devices) == {"cuda:0"} for _, backend, devices in checked if backend == "nccl")
    case = report["result"]
    assert case["exchange_ok"] and case["plan_round_trip"], case
    assert case["step_sums"] == [2.5, 128.0, 0.0] and case["pc_tokens"] == 128.0
