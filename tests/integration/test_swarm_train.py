"""`swarm train` on a swarm of namespace hosts: a head that only coordinates and two worker PCs.

One bring-up (module fixture, ``configs/cluster-lab.yaml``: the head has ``train: false``)
serves every test: both strategies train with one worker on each worker host; a job that
asks for more workers than the swarm has is refused before any model is loaded; and a
worker host dropping out mid-run costs at most one checkpoint interval, the run goes on
with the host that is left, grows back when the host returns, and stops cleanly on request.

Run alone with: python -m pytest -m integration tests/integration/test_swarm_train.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from trainkit import adapter_tensors, losses, run_dir_of, write_job

REPO = Path(__file__).resolve().parents[2]
LAB_CONFIG = REPO / "configs" / "cluster-lab.yaml"
HEAD, W1, W2 = 1, 2, 3
ADDR = {i: f"198.18.0.{i}" for i in (1, 2, 3)}
CHECKPOINT_EVERY = 4

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1800),  # the first test also brings the lab up and trains both strategies
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


@pytest.fixture(scope="module")
def lab():
    from lab.netlab import NetLab, namespaces

    lab = NetLab(3)
    lab.create()
    try:
        assert lab.swarm(HEAD, "init").returncode == 0
        for host in (W1, W2):
            copy_secret(lab, host)
        lab.agents = {host: start_agent(lab, host) for host in (HEAD, W1, W2)}
        up = lab.swarm(HEAD, "up", str(LAB_CONFIG), timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        yield lab
    finally:
        lab.destroy()
        assert not [ns for ns in namespaces() if ns.startswith(lab.tag + "-")], "namespaces left behind"


def copy_secret(lab, host: int) -> None:
    (lab.home(host) / "secret").write_bytes((lab.home(HEAD) / "secret").read_bytes())
    os.chmod(lab.home(host) / "secret", 0o600)


def start_agent(lab, host: int):
    proc = lab.popen(host, [sys.executable, "-m", "swarm", "agent", "--listen", f"{ADDR[host]}:7077"],
                     lab.root / f"agent-h{host}.log")
    deadline = time.monotonic() + 90
    while lab.swarm(host, "agent", "--health", "--address", f"{ADDR[host]}:7077", timeout=60).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, (lab.root / f"agent-h{host}.log").read_text()
        time.sleep(0.5)
    return proc


# Replication keeps the base whole on every worker and offloads only the optimizer.
OFFLOAD = {"replicate": {"params": "none", "optimizer": "cpu"}, "shard": {"params": "cpu", "optimizer": "cpu"},
           "diloco": {"params": "cpu", "optimizer": "cpu"}}


def swarm_job(folder: Path, model: Path, **train) -> Path:
    """A tiny QLoRA job (ZeRO offload to CPU as the strategy allows) for the swarm whose head is host 1."""
    return write_job(
        folder, model,
        train={"max_steps": 12, "grad_accum": 1, "eval_every": 100, "checkpoint_every": CHECKPOINT_EVERY, **train},
        offload=OFFLOAD[train.get("strategy", "shard")],
        ray={"address": f"{ADDR[HEAD]}:6379", "object_store_mb": 100},
    )


def train_on_swarm(lab, job: Path, timeout: int = 800):
    result = lab.swarm(HEAD, "train", str(job), timeout=timeout)
    return result


@pytest.fixture(scope="module")
def finished_runs(lab, tiny_models, tmp_path_factory):
    """The same job with each strategy forced, on the two worker hosts."""
    runs = {}
    for strategy in ("replicate", "shard"):
        folder = tmp_path_factory.mktemp(strategy)
        result = train_on_swarm(lab, swarm_job(folder, tiny_models("llama"), strategy=strategy))
        runs[strategy] = (result, run_dir_of(result))
    return runs


@pytest.mark.parametrize("strategy", ["replicate", "shard"])
def test_each_strategy_trains_with_one_worker_on_each_worker_host(finished_runs, strategy):
    result, run_dir = finished_runs[strategy]
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["strategy"]["name"] == strategy
    assert summary["strategy"]["zero_stage"] == {"replicate": 2, "shard": 3}[strategy]
    assert f"strategy: {summary['strategy']['variant']} (train.strategy={strategy} in the job)" in result.stderr
    # One layout from plan to run: both workers initialised DeepSpeed with the plan's config.
    plan = json.loads((run_dir / "plan.json").read_text())
    assert json.loads((run_dir / "deepspeed.json").read_text()) == plan["deepspeed"]
    assert plan["workers"] == 2 and plan["placement"]["mode"] == "per_node"
    assert sorted(n["name"] for n in plan["nodes"]) == sorted(n["hostname"] for n in summary["hardware"]["nodes"])
    assert plan["deepspeed"]["zero_optimization"]["stage"] == summary["strategy"]["zero_stage"]
    # One worker per worker host, each reporting its own address; the head trains nothing.
    nodes = summary["hardware"]["nodes"]
    assert sorted((n["address"], n["workers"]) for n in nodes) == [(ADDR[W1], 1), (ADDR[W2], 1)]
    loss = losses(run_dir)
    assert loss[12] < 0.8 * loss[1], loss
    # The driver on the head wrote the adapter; the workers sent it over Ray.
    assert adapter_tensors(run_dir / "adapter")
    # Bytes each worker's PC sent per step are in the metrics.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sent = [r["sent_bytes_per_worker"] for r in rows if "loss" in r]
    assert all(s > 0 for s in sent), sent


def test_both_strategies_reach_a_similar_loss(finished_runs):
    replicate = losses(finished_runs["replicate"][1])
    shard = losses(finished_runs["shard"][1])
    assert abs(replicate[12] - shard[12]) <= 0.05 * shard[12], (replicate, shard)


def test_sharding_sends_more_per_step_than_replicating(finished_runs):
    def median_sent(run_dir: Path) -> float:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        sent = sorted(r["sent_bytes_per_worker"] for r in rows if "loss" in r)
        return sent[len(sent) // 2]

    # ZeRO-3 also gathers the base's shards in every forward and backward; replication sends
    # the LoRA gradients and weights only (here about 0.4 MB, twice the fp32 LoRA size).
    assert median_sent(finished_runs["shard"][1]) > 1.5 * median_sent(finished_runs["replicate"][1])


def test_more_workers_than_the_swarm_has_is_refused_before_loading(lab, tiny_models, tmp_path):
    job = swarm_job(tmp_path, tiny_models("llama"), workers=3)
    result = train_on_swarm(lab, job, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: train.workers=3 but the swarm offers 2 worker slot(s) on 2 node(s)")
    assert "training " not in result.stderr  # no worker started, no model loaded
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(1800)
def test_a_host_dropping_out_costs_at_most_one_checkpoint_interval_and_it_grows_back(lab, tiny_models, tmp_path):
    from lab.netlab import kill_namespace_processes

    # The run must outlast a restart on one host and the regrowth, however fast this
    # machine steps (a tiny model takes ~0.1 s a step): it has far more steps than it
    # will take, and is stopped (SIGTERM: checkpoint, then exit) once it has grown back.
    job = swarm_job(tmp_path, tiny_models("llama"), strategy="replicate", max_steps=100_000,
                    min_workers=1, regrow_check_s=5)
    log = tmp_path / "train.log"
    driver = lab.popen(HEAD, [sys.executable, "-m", "swarm", "train", str(job)], log)
    try:
        wait_for(lambda: checkpoint_steps(tmp_path) and max(checkpoint_steps(tmp_path)) >= CHECKPOINT_EVERY
                 and max_logged_step(tmp_path) >= CHECKPOINT_EVERY + 2, driver, log, "a checkpoint and two more steps")
        # Worker host 2 drops out: every process on it dies at once, agent and Ray node.
        kill_namespace_processes(lab.ns(W2), grace_s=0)
        wait_for(lambda: "workers restarted: 1 worker(s)" in log.read_text(), driver, log, "a restart on one host")
        # The PC comes back: its agent starts and `swarm up` starts what is missing.
        lab.agents[W2] = start_agent(lab, W2)
        up = lab.swarm(HEAD, "up", str(LAB_CONFIG), timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        wait_for(lambda: "workers restarted: 2 worker(s)" in log.read_text(), driver, log, "growing back to two")
        regrown_at = max_logged_step(tmp_path)
        wait_for(lambda: max_logged_step(tmp_path) >= regrown_at + 3, driver, log, "steps on both hosts again")
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(300) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    assert "stopped at step" in text, text[-4000:]
    # Ray's own report of the lost PC, if it came, is one note line, not coloured lines.
    assert "\x1b[" not in text and not any(line.startswith(("(raylet)", "\t")) for line in text.splitlines()), \
        text[-4000:]
    run_dir = Path(text.strip().splitlines()[-1].removeprefix("run: "))
    summary = json.loads((run_dir / "run.json").read_text())
    shrink, grow = summary["restarts"][:2]
    assert shrink["world_size"] == 1 and shrink["hosts"] == [ADDR[W1]], summary["restarts"]
    assert grow["world_size"] == 2 and grow["hosts"] == [ADDR[W1], ADDR[W2]], summary["restarts"]
    for restart in summary["restarts"]:
        # Training went back to the newest checkpoint: never more than one interval lost.
        assert 0 <= restart["last_step"] - restart["resumed_step"] <= CHECKPOINT_EVERY, restart
    stopped_at = summary["steps"]
    assert summary["stopped"] is True and stopped_at > grow["resumed_step"]
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, stopped_at + 1))  # every step once, after the trimming
    assert loss[stopped_at] < 0.8 * loss[1]
    # The adapter of the checkpoint the stop wrote loads with plain peft onto the base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    model = PeftModel.from_pretrained(base, run_dir / "checkpoints" / f"step-{stopped_at:08d}" / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def checkpoint_steps(folder: Path) -> list[int]:
    found = []
    for manifest in folder.glob("runs/*/checkpoints/step-*/manifest.json"):
        found.append(int(manifest.parent.name.removeprefix("step-")))
    return found


def max_logged_step(folder: Path) -> int:
    steps = [0]
    for metrics in folder.glob("runs/*/metrics.jsonl"):
        steps += [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line]
    return max(steps)


def wait_for(condition, driver, log: Path, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if driver.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: {log.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def diloco_run(lab, tiny_models, tmp_path_factory):
    """diloco with plain per-step averaging (H=1, outer lr 1, no momentum), CPU parameter offload."""
    folder = tmp_path_factory.mktemp("diloco")
    job = swarm_job(folder, tiny_models("llama"), strategy="diloco", max_steps=24, sync_every=1, outer_lr=1.0,
                    outer_momentum=0.0)
    result = train_on_swarm(lab, job)
    return folder, job, result, run_dir_of(result)


def test_diloco_trains_each_host_on_its_own_and_they_agree_after_every_exchange(diloco_run):
    _, _, result, run_dir = diloco_run
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["strategy"]["name"] == "diloco" and summary["world_size"] == 2
    loss = losses(run_dir)
    assert loss[24] < loss[1] * 2 / 3, loss
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["deepspeed"] is None and [pc["workers"] for pc in plan["pcs"]] == [1, 1]
    assert all(pc["deepspeed"]["zero_optimization"]["offload_param"]["device"] == "cpu" for pc in plan["pcs"])
    # The worker on the head's first PC initialised DeepSpeed with its PC's config from the plan.
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds in [pc["deepspeed"] for pc in plan["pcs"]]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    syncs = [r for r in rows if "sync_bytes" in r]
    assert [r["step"] for r in syncs] == list(range(1, 25))
    for row in syncs:  # plain averaging: both hosts hold one adapter after each exchange
        first, second = row["adapter_checksums"]
        assert first == pytest.approx(second, rel=1e-6, abs=1e-6), row
        assert row["sync_bytes"] > 0 and row["sync_wait_s"] >= 0


def test_diloco_sends_only_adapters(diloco_run, finished_runs):
    _, _, _, run_dir = diloco_run

    def median_sent(folder: Path) -> float:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        sent = sorted(r["sent_bytes_per_worker"] for r in rows if "loss" in r)
        return sent[len(sent) // 2]

    # Even exchanging every step it sends less than ZeRO-3, which gathers the base too.
    assert median_sent(run_dir) < median_sent(finished_runs["shard"][1])


def test_a_diloco_run_resumes_on_one_host(lab, diloco_run):
    folder, job, _, run_dir = diloco_run
    result = lab.swarm(HEAD, "train", str(job), "--resume", str(run_dir), "--set", "train.workers=1",
                       "--set", "train.max_steps=28", timeout=800)
    assert run_dir_of(result) == run_dir and "from step 24" in result.stderr, result.stderr[-3000:]
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 28
    assert sorted(losses(run_dir)) == list(range(1, 29))


def test_diloco_makes_one_outer_step_per_h_steps_and_resumes_exactly_between_exchanges(lab, tiny_models, tmp_path):
    """Evals every 3 steps and checkpoints every 5 add no outer step to H=4 (issue 31); the
    checkpoint at step 5, between exchanges, holds each PC's own adapter and inner moments,
    and a run resumed from it on the same PCs ends on the uninterrupted run's adapter."""
    from swarm.train.checkpoint import load_checkpoint

    job = swarm_job(tmp_path, tiny_models("llama"), strategy="diloco", max_steps=12, sync_every=4, eval_every=3,
                    checkpoint_every=5)
    run_dir = run_dir_of(train_on_swarm(lab, job))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sync_bytes" in r] == [4, 8, 12]
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8, 12]  # due at 3, 6, 9 and the end
    mid = load_checkpoint(run_dir / "checkpoints" / "step-00000005")["trainer"]
    assert mid["diloco"]["last_exchange"] == 4 and len(mid["diloco"]["pcs"]) == 2
    for key in ("adapter", "exp_avg", "exp_avg_sq"):  # each PC's own, trained on its own data
        assert not mid["extra"][f"pc0/{key}"].equal(mid["extra"][f"pc1/{key}"]), key
    uninterrupted = adapter_tensors(run_dir / "checkpoints" / "step-00000012" / "adapter")
    for later in ("step-00000010", "step-00000012"):  # the resumed run must write them again
        shutil.rmtree(run_dir / "checkpoints" / later)

    result = lab.swarm(HEAD, "train", str(job), "--resume", str(run_dir / "checkpoints" / "step-00000005"), timeout=800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from step 5" in result.stderr and "approximation" not in result.stderr, result.stderr[-3000:]
    resumed = adapter_tensors(run_dir / "checkpoints" / "step-00000012" / "adapter")
    # Exactly: each PC continues from its own adapter, moments and tokens, with DeepSpeed's CPU
    # Adam at the step it had reached (test_resume_exact.py), and every exchange after it is the
    # uninterrupted run's, bf16 rounding and all.
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), \
        max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)


@pytest.mark.timeout(1800)
def test_when_a_diloco_host_dies_the_other_trains_to_the_end(lab, tiny_models, tmp_path):
    from lab.netlab import kill_namespace_processes

    job = swarm_job(tmp_path, tiny_models("llama"), strategy="diloco", max_steps=40, min_workers=1,
                    sync_every=2, eval_every=5, regrow_check_s=3600)
    log = tmp_path / "train.log"
    driver = lab.popen(HEAD, [sys.executable, "-m", "swarm", "train", str(job)], log)
    try:
        wait_for(lambda: checkpoint_steps(tmp_path) and max(checkpoint_steps(tmp_path)) >= CHECKPOINT_EVERY,
                 driver, log, "a checkpoint")
        kill_namespace_processes(lab.ns(W2), grace_s=0)
        assert driver.wait(900) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        lab.agents[W2] = start_agent(lab, W2)
        lab.swarm(HEAD, "up", str(LAB_CONFIG), timeout=400)
    text = log.read_text()
    assert "workers restarted: 1 worker(s)" in text, text[-4000:]
    run_dir = Path(text.strip().splitlines()[-1].removeprefix("run: "))
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["steps"] == 40 and summary["restarts"][0]["world_size"] == 1
    assert sorted(losses(run_dir)) == list(range(1, 41)) and (run_dir / "adapter").is_dir()
    # An eval that comes due between two exchanges runs at the next exchange (it measures the
    # global adapter and adds no outer step), before and after the restart alike.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"] for r in rows if "eval_loss" in r}
    assert evals == {6, 10, 16, 20, 26, 30, 36, 40}, sorted(evals)
    assert evals <= {r["step"] for r in rows if "sync_bytes" in r}
