"""Benchmark: a CPU worker's peak RSS and step time with glibc's dynamic mmap threshold and
with swarm's fixed thresholds (``swarm.train.runtime.set_malloc_thresholds``), in one run.

Each case trains the calibration model of tests/integration/test_plan_calibration.py (a
tiny Llama 1536 wide, 6 layers, 129M parameters) with ``swarm train`` under ZeRO-3 with
parameters and optimizer offloaded: once with ``SWARM_MALLOC=glibc`` (glibc's rule) and
once without (swarm's: 1 MiB while loading, 32 MiB while training), alternating,
``--rounds`` times. With ``--avx2``
each case also runs with torch's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``), which is how
a CPU without AVX512 loads and trains. Printed per case: the worker's peak RSS (its
``ru_maxrss``, as every metrics row records it; min-max over rounds), the median step time
after the first step, and the ratios swarm/glibc.

Usage: python tests/bench/bench_malloc.py [--steps 8] [--rounds 2] [--avx2] [--bits 4 none]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MiB = 1024**2


def write_job(folder: Path, model: Path, bits: str, steps: int) -> Path:
    job = {
        "model": {"path": str(model)},
        "quantization": {"bits": None if bits == "none" else int(bits)},
        "lora": {"r": 16, "alpha": 32},
        "data": {"files": [str(REPO / "configs/data/demo.txt")], "format": "text", "seq_len": 64,
                 "eval_fraction": 0},
        "train": {"max_steps": steps, "micro_batch": 1, "grad_accum": 1, "warmup_steps": 0, "log_every": 1,
                  "eval_every": 10_000, "checkpoint_every": 10_000, "strategy": "shard", "precision": "fp32"},
        "offload": {"params": "cpu", "optimizer": "cpu"},
        "output": {"dir": str(folder / "runs")},
        "ray": {"dashboard": False, "object_store_mb": 128},
    }
    path = folder / f"job-{bits}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run(job: Path, env: dict[str, str]) -> tuple[int, float]:
    """Peak RSS of the worker and median step time (first step excluded) of one ``swarm train``."""
    result = subprocess.run([sys.executable, "-m", "swarm", "train", str(job)], cwd=job.parent,
                            env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"swarm train failed:\n{result.stderr[-3000:]}")
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("run: "))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time_s" in r]
    return max(r["peak_rss_bytes"] for r in steps), statistics.median(r["step_time_s"] for r in steps[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--avx2", action="store_true", help="also run every case with torch's AVX2 kernels")
    parser.add_argument("--bits", nargs="+", default=["4", "none"], choices=["4", "none"])
    args = parser.parse_args()

    from swarm.tiny import make_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="bench-malloc-"))
    model = make_tiny_model(folder / "llama-1536x6", [REPO / "configs/data/demo.txt"], arch="llama",
                            hidden=1536, layers=6)
    kernels = [{}, {"ATEN_CPU_CAPABILITY": "avx2"}] if args.avx2 else [{}]
    rules = {"glibc": {"SWARM_MALLOC": "glibc"}, "swarm": {}}
    results: dict[tuple, list[tuple[int, float]]] = {}
    for round_ in range(args.rounds):
        for bits in args.bits:
            job = write_job(folder, model, bits, args.steps)
            for kernel in kernels:
                for rule, env in rules.items():
                    figures = run(job, {**kernel, **env})
                    results.setdefault((bits, kernel.get("ATEN_CPU_CAPABILITY", "default"), rule), []).append(figures)
                    print(f"round {round_ + 1}: base {bits}, kernels {kernel or 'default'}, {rule}: "
                          f"peak {figures[0] / MiB:.0f} MiB, step {figures[1]:.2f} s", flush=True)

    print(f"\n{'base':<5} {'kernels':<8} {'rule':<8} {'peak RSS MiB':>14} {'step s':>7} "
          f"{'peak swarm/glibc':>17} {'step swarm/glibc':>17}")
    for (bits, kernel, rule), figures in results.items():
        peaks = [p for p, _ in figures]
        step = statistics.median(s for _, s in figures)
        ratios = ["", ""]
        if rule == "swarm":
            dynamic = results[(bits, kernel, "glibc")]
            ratios = [f"{statistics.median(peaks) / statistics.median(p for p, _ in dynamic):.2f}",
                      f"{step / statistics.median(s for _, s in dynamic):.2f}"]
        print(f"{bits:<5} {kernel:<8} {rule:<8} {min(peaks) / MiB:>6.0f}-{max(peaks) / MiB:<7.0f} {step:>7.2f} "
              f"{ratios[0]:>17} {ratios[1]:>17}")


if __name__ == "__main__":
    main()
