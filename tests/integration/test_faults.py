"""Faults during a real run, each followed by a resume: a full disk while a checkpoint is
written, a torn last line of metrics.jsonl, a worker process killed, the local Ray's head
killed. After each: the newest intact checkpoint resumes, nothing is reported done that is
not, and the one line printed says what happened.

(A SIGKILL of the driver while a checkpoint is written and a corrupted checkpoint file are
in tests/integration/test_train.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from trainkit import losses, run_dir_of, swarm, write_job

from swarm.metrics_log import read_metrics
from swarm.train.checkpoint import intact_checkpoints

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


@contextmanager
def training(job: Path, cwd: Path, log: Path):
    """``swarm train JOB`` in the background; killed with everything it started if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "train", str(job)], cwd=cwd, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def newest_checkpoint(root: Path) -> int:
    found = [step for run in root.glob("runs/*") for step in intact_checkpoints(run / "checkpoints")]
    return max(found, default=0)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a disk that can really fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_while_a_checkpoint_is_written_stops_the_run_with_its_newest_checkpoint(
        tiny_models, tmp_path, small_disk):
    job = write_job(tmp_path, tiny_models("llama"), train={"max_steps": 100_000, "checkpoint_every": 2},
                    output={"dir": str(small_disk / "runs")})
    log = tmp_path / "train.log"
    with training(job, tmp_path, log) as proc:
        wait_for(lambda: newest_checkpoint(small_disk) >= 2, proc, log, "a first checkpoint")
        # Fill the disk to within 64 kB: the next checkpoint (about 1 MB) cannot be written.
        free = shutil.disk_usage(small_disk).free
        with open(small_disk / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - 64 * 1024))
        code = proc.wait(timeout=600)
    text = log.read_text()
    assert code == 1, text[-3000:]
    [line] = error_lines(text)
    assert "writing to" in line and "No space left on device" in line and "Traceback" not in text
    newest = newest_checkpoint(small_disk)
    assert f"the newest intact checkpoint is {small_disk}" in line and f"step-{newest:08d}" in line
    run_dir = next((small_disk / "runs").iterdir())
    assert not (run_dir / "adapter").exists()  # not reported done
    assert not list((run_dir / "checkpoints").glob(".*"))  # the cut-off checkpoint was cleaned up

    (small_disk / "filler").unlink()
    resumed = swarm("train", str(job), "--resume", "--set", f"train.max_steps={newest + 2}", cwd=tmp_path)
    assert run_dir_of(resumed) == run_dir and f"from step {newest}" in resumed.stderr
    assert sorted(losses(run_dir)) == list(range(1, newest + 3))


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tiny_models, tmp_path):
    job = write_job(tmp_path, tiny_models("llama"), train={"max_steps": 8, "checkpoint_every": 4, "eval_every": 100})
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.1, "to')  # a crash in the middle of a line
    resumed = swarm("train", str(job), "--resume", "--set", "train.max_steps=10", cwd=tmp_path)
    assert run_dir_of(resumed) == run_dir and "from step 8" in resumed.stderr
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert (run_dir / "metrics.jsonl").read_text().endswith("}\n")  # every line whole


def ray_train_workers(driver: psutil.Process) -> list[psutil.Process]:
    return [p for p in driver.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


def test_a_killed_worker_is_restarted_from_the_newest_checkpoint(tiny_models, tmp_path):
    job = write_job(tmp_path, tiny_models("llama"), train={"max_steps": 14, "checkpoint_every": 4})
    log = tmp_path / "train.log"
    with training(job, tmp_path, log) as proc:
        wait_for(lambda: newest_checkpoint(tmp_path) >= 4, proc, log, "a checkpoint")
        [worker] = ray_train_workers(psutil.Process(proc.pid))
        worker.kill()
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "worker 0 failed" in text and "workers restarted" in text, text[-3000:]
    run_dir = Path(text.strip().splitlines()[-1].removeprefix("run: "))
    summary = json.loads((run_dir / "run.json").read_text())
    [restart] = summary["restarts"]
    assert restart["resumed_step"] >= 4 and 0 <= restart["last_step"] - restart["resumed_step"] <= 4
    assert sorted(losses(run_dir)) == list(range(1, 15)) and (run_dir / "adapter").is_dir()


def test_a_local_ray_that_dies_ends_the_run_in_one_line_and_it_resumes(tiny_models, tmp_path):
    job = write_job(tmp_path, tiny_models("llama"), train={"max_steps": 100_000, "checkpoint_every": 4})
    log = tmp_path / "train.log"
    with training(job, tmp_path, log) as proc:
        wait_for(lambda: newest_checkpoint(tmp_path) >= 4, proc, log, "a checkpoint")
        for child in psutil.Process(proc.pid).children(recursive=True):
            if child.name() in ("gcs_server", "raylet"):
                child.kill()
        code = proc.wait(timeout=600)
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert len(error_lines(text)) == 1 and "Traceback" not in text, text[-3000:]
    [line] = error_lines(text)
    assert "training failed" in line and "the newest intact checkpoint is" in line
    newest = newest_checkpoint(tmp_path)
    resumed = swarm("train", str(job), "--resume", "--set", f"train.max_steps={newest + 2}", cwd=tmp_path)
    assert f"from step {newest}" in resumed.stderr
    assert sorted(losses(run_dir_of(resumed))) == list(range(1, newest + 3))
