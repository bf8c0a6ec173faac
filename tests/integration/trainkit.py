"""Helpers for tests that run ``swarm train`` for real: tiny models, jobs, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO_TEXT = REPO / "configs" / "data" / "demo.txt"


def write_job(folder: Path, model: Path, **sections) -> Path:
    """A job file like the demo's (QLoRA, ZeRO-3, CPU offload), with section overrides."""
    job = {
        "model": {"path": str(model)},
        "quantization": {"bits": 4},
        "lora": {"r": 16, "alpha": 32},
        "data": {"files": [str(DEMO_TEXT)], "format": "text", "seq_len": 64, "eval_fraction": 0.1},
        "train": {
            "max_steps": 16, "micro_batch": 2, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 2,
            "log_every": 1, "eval_every": 8, "checkpoint_every": 4,
            # Explicit, so a run means the same on every CPU (auto picks bf16 where the CPU
            # has AVX512-BF16); tests that cover bf16 ask for it.
            "precision": "fp32",
        },
        "offload": {"params": "cpu", "optimizer": "cpu"},
        "output": {"dir": str(folder / "runs")},
        "ray": {"dashboard": False, "object_store_mb": 128},
    }
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def swarm(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the ``swarm`` CLI in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "swarm", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    """The run folder from the last line of ``swarm train`` (``run: PATH``)."""
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run: "), result.stdout
    return Path(last.removeprefix("run: "))


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def falls_by_a_third(run_dir: Path) -> bool:
    """The mean loss of the last two steps is below two thirds of the first two's."""
    by_step = losses(run_dir)
    steps = sorted(by_step)
    first = sum(by_step[s] for s in steps[:2]) / 2
    last = sum(by_step[s] for s in steps[-2:]) / 2
    return last < first * 2 / 3


def continues_after_evals(run_dir: Path, slack: float = 1.25) -> bool:
    """After every eval but the last, the next two steps' loss stays near the two before it.

    An eval must not change the model: on CPUs with AVX512-BF16, bitsandbytes once repacked
    4-bit weights in place during eval and the loss jumped back to its untrained level.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = losses(run_dir)
    evals = [r["step"] for r in rows if "eval_loss" in r and r["step"] + 2 in by_step and r["step"] - 1 in by_step]
    assert evals, "the run has no eval followed by two steps"
    for step in evals:
        before = (by_step[step - 1] + by_step[step]) / 2
        after = (by_step[step + 1] + by_step[step + 2]) / 2
        if after > before * slack:
            return False
    return True


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def cache_hub_dataset(cache: Path, repo: str, commit: str, splits: dict[str, list], config: str = "default") -> None:
    """Put a data set into ``cache`` (HF_DATASETS_CACHE) as ``load_dataset(repo)`` leaves it after a download.

    datasets' own JSON builder writes the Arrow files and dataset_info.json; a download
    names the folder ``ORG___NAME/CONFIG/VERSION/COMMIT`` (``DatasetBuilder._relative_data_dir``
    with a repo id), where the builder alone would use NAME: the folder is copied there.
    """
    import shutil

    from datasets.packaged_modules.json.json import Json

    org, name = repo.split("/")
    build = cache.parent / f"build-{commit}-{config}"
    files = {}
    for split, rows in splits.items():
        files[split] = str(build / f"{split}.jsonl")
        Path(files[split]).parent.mkdir(parents=True, exist_ok=True)
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    Json(cache_dir=str(build / "cache"), dataset_name=name, config_name=config, config_id=config, data_files=files,
         hash=commit).download_and_prepare()
    target = cache / f"{org}___{name}" / config
    target.mkdir(parents=True, exist_ok=True)
    for version in (build / "cache" / name / config).iterdir():
        shutil.copytree(version, target / version.name, dirs_exist_ok=True)


def wandb_history(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """The metrics ({key: {step: value}}) and summary an offline W&B run in RUN/wandb holds.

    W&B keeps an offline run as one ``.wandb`` file: its header (``:W&B``, a magic number and a
    version, 7 bytes), then LevelDB log records (32 KiB blocks; 7-byte record headers:
    checksum, length, type) whose payloads are ``wandb_internal_pb2.Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = list((Path(run_dir) / "wandb").glob("*run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, history, summary = 7, b"", {}, {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FULL or LAST completes a record
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.HasField("history"):
            items = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.get("_step", record.history.step.num)
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = value
        if record.HasField("summary"):
            for item in record.summary.update:
                key = item.key or ".".join(item.nested_key)
                if not key.startswith("_"):
                    summary[key] = json.loads(item.value_json)
    return history, summary


def perturb_lora(model, seed: int) -> None:
    """Give every lora_B (zero at creation) random values, so the adapter changes the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def trained_model(base: Path, adapter: Path):
    """The 4-bit base with a run's adapter, computing as training did (fp32, bitsandbytes' plain CPU path)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from swarm.train.worker.model import keep_4bit_layout

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    # Without this, bitsandbytes' eval path on a CPU with AVX512-BF16 switches to its packed bf16 kernel.
    keep_4bit_layout(model)
    return PeftModel.from_pretrained(model, adapter).eval()
