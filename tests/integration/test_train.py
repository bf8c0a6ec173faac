"""``swarm train`` end to end on CPU: real bitsandbytes 4-bit, peft LoRA, gradient
checkpointing, DeepSpeed ZeRO-3 with CPU and NVMe offload, Ray Train, checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from trainkit import adapter_tensors, continues_after_evals, falls_by_a_third, losses, run_dir_of, swarm, write_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """One uninterrupted 16-step run of the full path, shared by several tests."""
    folder = tmp_path_factory.mktemp("reference")
    job = write_job(folder, tiny_models("llama"))
    result = swarm("train", str(job), cwd=folder)
    return job, run_dir_of(result), result


def test_full_path_trains_and_records_the_run(reference):
    job, run_dir, result = reference
    assert falls_by_a_third(run_dir), losses(run_dir)
    assert continues_after_evals(run_dir), losses(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert any("eval_loss" in r for r in rows)
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["steps"] == 16 and summary["world_size"] == 1 and summary["precision"] == "fp32"
    # The last status line shows the final eval (step 16's, sent after its step), not step 8's.
    last_lines = [line for line in result.stderr.splitlines() if line.startswith("step 16/16")]
    assert len(last_lines) == 1 and f"eval {summary['eval_loss']:.4f}" in last_lines[0], result.stderr[-2000:]
    strategy = summary["strategy"]
    assert strategy.pop("reason").startswith("one worker; the job's offload settings need sharded base, ZeRO-3")
    assert strategy == {"name": "shard", "variant": "shard-params-cpu-opt-cpu", "zero_stage": 3,
                        "offload_params": "cpu", "offload_optimizer": "cpu",
                        "label": "sharded base, ZeRO-3, parameters in CPU RAM, optimizer in CPU RAM"}
    # One layout from plan to run: the workers initialised DeepSpeed with the plan's config.
    plan = json.loads((run_dir / "plan.json").read_text())
    assert json.loads((run_dir / "deepspeed.json").read_text()) == plan["deepspeed"]
    assert plan["deepspeed"]["zero_optimization"]["stage"] == 3 and plan["precision"] == summary["precision"]
    assert plan["strategy"]["name"] == "shard" and plan["workers"] == 1
    assert summary["tokens"] == sum(r["tokens"] for r in steps)
    # The one worker computes on all of this PC's cores, not on the one thread Ray's
    # token CPU reservation would give it.
    [node] = summary["hardware"]["nodes"]
    assert node["workers"] == 1 and node["cpu_threads_per_worker"] == os.cpu_count()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 16
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    # Checkpoints every 4 steps, the newest 3 kept; the last holds the final adapter.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000008", "step-00000012", "step-00000016"
    ]
    final, ckpt = adapter_tensors(run_dir / "adapter"), adapter_tensors(run_dir / "checkpoints" / "step-00000016" / "adapter")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_saved_adapter_reproduces_the_trained_models_outputs(reference, tiny_models):
    """The adapter, reloaded with plain transformers + peft, gives the eval loss (a function
    of every logit) that the trained model reported at its last step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from swarm.config import load_job
    from swarm.data.prepare import prepare_data
    from swarm.train.worker.model import keep_4bit_layout

    job_path, run_dir, _ = reference
    job = load_job(job_path)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    eval_blocks = prepare_data(job.data, tokenizer).eval
    assert eval_blocks is not None and len(eval_blocks)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), quantization_config=quant, dtype=torch.float32)
    # Compute as training did on every CPU: without this, bitsandbytes' eval path on a CPU
    # with AVX512-BF16 switches to its packed bf16 kernel (about 0.05% off in the loss here).
    keep_4bit_layout(base)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(len(eval_blocks)):
            inputs, _ = eval_blocks.batch([i], "cpu")
            n = int((inputs["labels"][:, 1:] != -100).sum())
            total += model(**inputs).loss.item() * n
            count += n
    reported = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r["eval_loss"] for r in reported if "eval_loss" in r][-1]
    assert total / count == pytest.approx(last_eval, rel=1e-4)


def test_stop_and_resume_gives_the_same_run(reference, tmp_path):
    """SIGTERM mid-run saves a checkpoint and stops; --resume then continues so that every
    step's loss and the final adapter match the uninterrupted run."""
    ref_job, ref_dir, _ = reference
    job = tmp_path / "job.yaml"
    config = yaml.safe_load(ref_job.read_text())
    config["output"]["dir"] = str(tmp_path / "runs")
    job.write_text(yaml.safe_dump(config))

    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm", "train", str(job)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if found and len(losses(found[0].parent)) >= 5:
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, "the run never reached step 5"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    run_dir = Path(out.strip().splitlines()[-1].removeprefix("run: "))
    stopped_at = json.loads((run_dir / "run.json").read_text())["steps"]
    assert 5 <= stopped_at < 16 and "--resume" in err
    assert json.loads((run_dir / "run.json").read_text())["stopped"] is True

    resumed = swarm("train", str(job), "--resume", cwd=tmp_path)
    assert run_dir_of(resumed) == run_dir
    assert f"from step {stopped_at}" in resumed.stderr
    expected, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 17))
    # Bit for bit: the same data, RNG, moments and schedule, and DeepSpeed's CPU Adam brought to
    # the resumed step as the uninterrupted run reached it (test_resume_exact.py).
    assert got == expected
    a, b = adapter_tensors(ref_dir / "adapter"), adapter_tensors(run_dir / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_move_between_worker_counts(reference, tmp_path):
    """A checkpoint written by one worker resumes with two, and one written by two
    workers resumes with one."""
    _, ref_dir, _ = reference
    job_path, _, _ = reference
    copy = tmp_path / "runs" / ref_dir.name
    shutil.copytree(ref_dir, copy)
    two = swarm(
        "train", str(job_path), "--resume", str(copy / "checkpoints" / "step-00000012"),
        "--set", "train.workers=2", "--set", "train.max_steps=14", cwd=tmp_path,
    )
    assert run_dir_of(two) == copy
    assert "from step 12" in two.stderr and "2 worker(s)" in two.stderr
    after_two = losses(copy)
    assert sorted(after_two)[-2:] == [13, 14]
    assert after_two[14] < losses(ref_dir)[1] * 2 / 3  # still the trained adapter, not a fresh one

    one = swarm(
        "train", str(job_path), "--resume", str(copy / "checkpoints" / "step-00000014"),
        "--set", "train.workers=1", "--set", "train.max_steps=16", cwd=tmp_path,
    )
    assert "from step 14" in one.stderr and "1 worker(s)" in one.stderr
    assert sorted(losses(run_dir_of(one)))[-2:] == [15, 16]


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_models, tmp_path):
    job = write_job(tmp_path, tiny_models("llama"), train={"max_steps": 10, "checkpoint_every": 4})
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm", "train", str(job)], cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "SWARM_TEST_CHECKPOINT_PAUSE_STEP": "8"},
    )
    try:
        deadline = time.monotonic() + 400
        partial = None
        while time.monotonic() < deadline and proc.poll() is None:
            partial = next((tmp_path / "runs").glob("*/checkpoints/.step-00000008.partial/trainer_state.json"), None)
            if partial:
                break
            time.sleep(0.2)
        assert partial, "the checkpoint at step 8 was never being written"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_dir = partial.parents[2]
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000004"]

    resumed = swarm("train", str(job), "--resume", cwd=tmp_path)
    assert run_dir_of(resumed) == run_dir
    assert "from step 4" in resumed.stderr
    assert sorted(losses(run_dir)) == list(range(1, 11))
    assert not list((run_dir / "checkpoints").glob(".*.partial"))


def test_corrupt_checkpoint_is_reported_and_skipped(reference, tmp_path):
    job_path, ref_dir, _ = reference
    copy = tmp_path / "runs" / ref_dir.name
    shutil.copytree(ref_dir, copy)
    newest = copy / "checkpoints" / "step-00000016" / "trainer_state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10] + b"0123456789")
    result = swarm("train", str(job_path), "--resume", str(copy), "--set", "train.max_steps=13", cwd=tmp_path)
    assert run_dir_of(result) == copy
    assert "skipping checkpoint" in result.stderr and "does not match its checksum" in result.stderr
    assert "from step 12" in result.stderr


@pytest.mark.parametrize(("changes", "said"), [
    (["lora.r=8"], "lora.r changed from 16 to 8"),
    (["lora.use_rslora=true"], "lora.use_rslora changed from False to True"),
    # DoRA with a 4-bit base trains without ZeRO-3 only: no parameter offload.
    (["lora.use_dora=true", "offload.params=none"], "lora.use_dora changed from False to True"),
], ids=["rank", "rslora", "dora"])
def test_resume_refuses_a_changed_adapter(reference, tmp_path, changes, said):
    job_path, ref_dir, _ = reference
    copy = tmp_path / "runs" / ref_dir.name
    shutil.copytree(ref_dir, copy)
    sets = [arg for change in changes for arg in ("--set", change)]
    result = swarm("train", str(job_path), "--resume", str(copy), *sets, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot resume from")
    assert said in result.stderr and "Traceback" not in result.stderr


# Every architecture swarm names, with every offload mode it offers (the reference run above
# is Llama with CPU offload of both). Half the runs train in bf16, which every CPU can run
# (natively with AVX512-BF16, emulated without), so both precisions are covered on any machine.
OFFLOAD_MODES = {
    "none": {"params": "none", "optimizer": "none"},
    "cpu": {"params": "cpu", "optimizer": "cpu"},
    "nvme": {"params": "nvme", "optimizer": "nvme"},
}
MATRIX = [
    ("llama", "none", "bf16"), ("llama", "nvme", "fp32"),
    ("qwen2", "none", "fp32"), ("qwen2", "cpu", "bf16"), ("qwen2", "nvme", "bf16"),
    ("mistral", "none", "bf16"), ("mistral", "cpu", "fp32"), ("mistral", "nvme", "fp32"),
]


@pytest.mark.parametrize(("arch", "offload", "precision"), MATRIX, ids=["-".join(case) for case in MATRIX])
def test_every_architecture_trains_with_every_offload_mode(tiny_models, tmp_path, arch, offload, precision):
    modes = dict(OFFLOAD_MODES[offload])
    if offload == "nvme":
        modes["nvme_path"] = str(tmp_path / "nvme")
    job = write_job(tmp_path, tiny_models(arch), offload=modes,
                    train={"checkpoint_every": 100, "precision": precision})
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path))
    assert falls_by_a_third(run_dir), losses(run_dir)
    assert continues_after_evals(run_dir), losses(run_dir)
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["precision"] == precision and math.isfinite(summary["train_loss"])
    assert (summary["strategy"]["offload_params"], summary["strategy"]["offload_optimizer"]) == (
        OFFLOAD_MODES[offload]["params"], OFFLOAD_MODES[offload]["optimizer"])
    assert json.loads((run_dir / "deepspeed.json").read_text()) == json.loads(
        (run_dir / "plan.json").read_text())["deepspeed"]
    if offload == "nvme":
        # DeepSpeed swapped real tensors through the folder.
        assert any((tmp_path / "nvme").rglob("*"))


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adafactor"])
def test_device_optimizers_train(tiny_models, tmp_path, optimizer):
    """8-bit AdamW (bitsandbytes) and Adafactor, which run where the weights are."""
    job = write_job(tmp_path, tiny_models("llama"), offload={"params": "none", "optimizer": "none"},
                    train={"optimizer": optimizer, "max_steps": 10, "checkpoint_every": 100, "lr": 1e-2})
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path))
    by_step = losses(run_dir)
    assert by_step[10] < by_step[1] * 0.8, by_step


def test_export_of_a_real_run(reference, tmp_path):
    """The model card of a trained run states that run's figures; the merged model loads."""
    from transformers import AutoModelForCausalLM

    from swarm.export import export_run

    _, run_dir, _ = reference
    merged = export_run(run_dir, out_dir=tmp_path, merge=True, dtype="fp32").merged
    summary = json.loads((run_dir / "run.json").read_text())
    card = (merged.with_name(merged.name.removesuffix("-merged")) / "README.md").read_text()
    assert f"{summary['train_loss']:.4f}" in card
    assert f"{summary['tokens']:,}" in card
    assert summary["data"]["sha256"] in card
    assert f"| Steps | {summary['steps']} |" in card
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_every_checkpoint_training_wrote_exports(reference, tmp_path):
    """`swarm export RUN --checkpoint N` on the checkpoints a real run wrote: each is intact and
    exports its own adapter; one damaged afterwards is refused in one line, naming what is wrong."""
    _, run_dir, _ = reference
    for step in (8, 12, 16):
        result = swarm("export", str(run_dir), "--checkpoint", str(step), "--out", str(tmp_path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        exported = tmp_path / f"{run_dir.name}-step{step}"
        source = run_dir / "checkpoints" / f"step-{step:08d}" / "adapter" / "adapter_model.safetensors"
        assert (exported / "adapter_model.safetensors").read_bytes() == source.read_bytes()
        assert f"checkpoint at step {step} of 16" in (exported / "README.md").read_text()
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    with open(damaged / "checkpoints" / "step-00000012" / "adapter" / "adapter_model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    result = swarm("export", str(damaged), "--checkpoint", "12", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "adapter/adapter_model.safetensors does not match its checksum" in result.stderr
    assert "(intact checkpoints: 8, 16)" in result.stderr and not (tmp_path / "x").exists()
