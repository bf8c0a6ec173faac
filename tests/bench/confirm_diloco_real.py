"""The outer-optimizer study's setting, end to end: ``swarm train`` on two namespace PCs.

Run as root on Linux (network namespaces):
    python tests/bench/confirm_diloco_real.py [--steps 64] [--every 8] [--outer average]

tests/bench/study_diloco_outer.py simulates K PCs in one process. This runs one of its settings
through swarm itself: the lab of configs/cluster-lab.yaml (a head that only coordinates, two
worker PCs), SmolLM2-135M-Instruct with a 16-bit base and LoRA r16 on every linear layer, the
study's chat records (its training topics, in chunks of about 200 characters) as a chat file,
2 sequences of 128 tokens per PC per step, the study's learning rate and schedule. It runs
diloco with the given outer optimizer and H, then replicate on the same PCs and tokens, and
scores each output adapter on the study's 48 held-out records, as the study does. It prints
the two held-out losses, their ratio (to set beside the study's), the exchanges the run made
and the bytes its exchanges sent; it passes or fails nothing. swarm packs the chat records
into blocks its own way, so the absolute losses need not equal the study's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "bench"))

from bench_swarm_train import bring_up  # noqa: E402
from study_diloco_outer import LR, MIN_LR_RATIO, WARMUP, Study, records  # noqa: E402

from lab.netlab import NetLab  # noqa: E402


def job_file(folder: Path, data: Path, steps: int, **train) -> Path:
    from lab.realmodel import smollm2

    job = {
        "model": {"path": str(smollm2())},
        "quantization": {"bits": None},
        "lora": {"r": 16, "alpha": 32, "targets": "all-linear"},
        "data": {"files": [str(data)], "format": "chat", "seq_len": 128, "eval_fraction": 0.0},
        "train": {"max_steps": steps, "micro_batch": 2, "grad_accum": 1, "lr": LR, "warmup_steps": WARMUP,
                  "min_lr_ratio": MIN_LR_RATIO, "log_every": 8, "eval_every": 10_000, "checkpoint_every": 10_000,
                  "precision": "bf16", **train},
        "output": {"dir": str(folder / "runs")},
        "ray": {"address": "198.18.0.1:6379", "object_store_mb": 200},
    }
    path = folder / f"job-{train.get('strategy')}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def held_out_loss(study: Study, adapter: Path) -> float:
    from peft import PeftModel

    model = PeftModel.from_pretrained(study.base, adapter)
    loss = study.evaluate(model)
    model.unload()
    return loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--outer", default="average")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the lab makes network namespaces")
    work = Path(tempfile.mkdtemp(prefix="confirm-diloco-"))
    train, _ = records()
    data = work / "reference-chunks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    results = {}
    with NetLab(3) as lab:
        bring_up(lab)
        for strategy, extra in (("diloco", {"sync_every": args.every, "outer_optimizer": args.outer}),
                                ("replicate", {})):
            job = job_file(work, data, args.steps, strategy=strategy, **extra)
            result = lab.swarm(1, "train", str(job), timeout=3600)
            if result.returncode != 0:
                raise SystemExit(f"swarm train failed:\n{result.stderr[-4000:]}")
            run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("run: "))
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            syncs = [r for r in rows if "sync_bytes" in r]
            results[strategy] = {"run": str(run_dir), "exchanges": len(syncs),
                                 "exchange_mb": sum(r["sync_bytes"] for r in syncs) / 1e6}
            print(strategy, json.dumps(results[strategy]), flush=True)
        lab.swarm(1, "down", timeout=300)
    study = Study(threads=2)
    for strategy, figures in results.items():
        figures["held_out_loss"] = held_out_loss(study, Path(figures["run"]) / "adapter")
    ratio = results["diloco"]["held_out_loss"] / results["replicate"]["held_out_loss"] - 1
    print(json.dumps(results, indent=1))
    print(f"diloco {args.outer} H={args.every} against replicate, {args.steps} steps: {100 * ratio:+.2f}% held-out loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
