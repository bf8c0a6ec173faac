"""Packing with and without keeping examples apart: the eval loss each gives.

Run from the repository root:
    python tests/bench/bench_packing.py [--steps 80] [--examples 400] [--seeds 2]

Makes the demo's tiny Llama and an instruction data set of a copy task ("Repeat: six random
words" -> the same words), where the words of one example say nothing about the next one.
Trains it with `swarm train` twice per seed, with ``data.isolate_examples`` true (positions
restart and attention stays within each example) and false (examples run together in each
block), then scores both adapters on held-out examples, each alone, as a model meets them
after training: mean loss per answer token. It prints figures; it does not pass or fail on them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))  # trainkit: the adapter on the 4-bit base
DEMO = REPO / "configs" / "data" / "demo.txt"


def copy_task(count: int, seed: int) -> list[dict]:
    words = sorted(set(DEMO.read_text().lower().split()))
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        picked = " ".join(rng.choice(words) for _ in range(6))
        rows.append({"instruction": f"Repeat: {picked}", "output": picked})
    return rows


def train(work: Path, model: Path, data: Path, isolate: bool, steps: int, seed: int) -> Path:
    overrides = {
        "model.path": str(model), "data.files": f"[{data}]", "data.format": "instruction", "data.seq_len": 128,
        "data.eval_fraction": 0.1, "data.isolate_examples": str(isolate).lower(), "train.max_steps": steps,
        "train.micro_batch": 4, "train.grad_accum": 1, "train.lr": 5e-3, "train.warmup_steps": 5,
        "train.eval_every": steps, "train.checkpoint_every": steps, "train.precision": "fp32",
        "train.seed": seed, "output.dir": str(work / "runs"), "output.name": f"copy-{isolate}-{seed}".lower(),
        "ray.dashboard": "false", "ray.object_store_mb": 128,
    }
    done = subprocess.run([sys.executable, "-m", "swarm", "train", str(REPO / "configs/demo.yaml"),
                           *(x for k, v in overrides.items() for x in ("--set", f"{k}={v}"))],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return Path(done.stdout.strip().splitlines()[-1].removeprefix("run: "))


def alone_loss(run: Path, base: Path, rows: list[dict]) -> float:
    """Mean loss per answer token over ``rows``, each example fed to the model alone."""
    import torch
    from trainkit import trained_model
    from transformers import AutoTokenizer

    from swarm.data.tokenize import bos_of, tokenize

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = trained_model(base, run / "adapter")
    bos, eos = bos_of(tokenizer), tokenizer.eos_token_id
    total = count = 0.0
    with torch.no_grad():
        for ids, mask in tokenize(rows, "instruction", tokenizer):
            ids, mask = bos + ids + [eos], [False] * len(bos) + mask + [True]
            labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
            n = sum(mask[1:])
            total += model(input_ids=torch.tensor([ids]), labels=labels).loss.item() * n
            count += n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    from swarm.tiny import make_tiny_model
    from swarm.train.runtime import prepare_process_env

    prepare_process_env()  # quiet transformers and bitsandbytes as `swarm train` has them

    with tempfile.TemporaryDirectory(prefix="swarm-bench-packing-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "tiny-llama", [DEMO])
        held_out = copy_task(100, seed=999)
        results: dict[bool, list[float]] = {True: [], False: []}
        print("| seed | isolate_examples | eval loss of the run (its own blocks) | held-out loss, each example alone |")
        print("| --- | --- | --- | --- |")
        for seed in range(args.seeds):
            data = work / f"copy-{seed}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in copy_task(args.examples, seed)))
            for isolate in (True, False):
                run = train(work, model, data, isolate, args.steps, seed)
                own = json.loads((run / "run.json").read_text())["eval_loss"]
                alone = alone_loss(run, model, held_out)
                results[isolate].append(alone)
                print(f"| {seed} | {str(isolate).lower()} | {own:.3f} | {alone:.3f} |", flush=True)
        isolated, joined = statistics.mean(results[True]), statistics.mean(results[False])
        print(f"\nmean held-out loss: isolated {isolated:.3f}, run together {joined:.3f} "
              f"(isolation: {(joined - isolated) / joined:.1%} lower)")


if __name__ == "__main__":
    main()
