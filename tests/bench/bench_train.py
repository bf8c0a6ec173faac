"""Benchmark: ``swarm train`` against a minimal hand-written DeepSpeed loop, in one run.

Both train the same tiny Llama (QLoRA, gradient checkpointing, ZeRO-3 with CPU offload of
parameters and optimizer) for the same steps on this machine. Printed figures:

- steady-state step time (median, first steps excluded) and its ratio swarm/baseline, also
  per round (each pair runs back to back) with a bootstrap interval for their median;
- CPU seconds per step of the training process (all threads), on both sides;
- CPU cores used by swarm's other processes (driver, Ray's daemons and dashboard, Ray
  Train's controller, the mailbox) while the worker trains: what its compute threads lose;
- start-up time: launch to the first training step;
- peak RSS of each whole process tree (swarm: CLI driver + Ray + worker), and the
  difference, which is swarm's orchestration overhead.

Timed runs and memory runs are separate. Reading PSS walks every mapping of every
process (about 0.13 s of CPU per sweep over swarm's ~20 processes, against one process for
the baseline): sampled during a timed run, it would slow the side with more processes and
skew the step-time ratio. Timed runs alternate between the sides (``--rounds``), so that a
slow spell of a shared machine hits both.

Usage: python tests/bench/bench_train.py [--steps 30] [--rounds 3] [--hidden 256] [--layers 4] [--set KEY=VALUE]
Targets (issue 2): step-time ratio <= 1.05; orchestration overhead <= 1.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and all its descendants (swarm's: the driver, Ray's daemons, their workers)."""
    return [root, *root.children(recursive=True)]


def train_worker(tree: list[psutil.Process]) -> psutil.Process:
    """The Ray Train worker among ``tree`` (StopIteration before Ray has started it)."""
    return next(p for p in tree if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"))


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants; keeps the peaks.

    Summed RSS counts a shared page (torch's libraries, mapped by every Ray process) once
    per process; PSS splits it among them, so summed PSS is the memory the tree really uses.
    """

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = total_pss = 0
            try:
                for proc in process_tree(self.root):
                    try:
                        info = proc.memory_full_info()
                        total += info.rss
                        total_pss += info.pss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, total_pss)
            time.sleep(0.1)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.peak_pss


class ProcessCpu:
    """CPU seconds of the Ray Train worker per logged step, and of every other process of
    the run (driver, Ray's daemons and dashboard, Ray Train's controller, the mailbox) per
    second of wall time.

    Sampled once a second from /proc, from the third logged step on (like the median step
    time); the process list is read once, at the first sample. Against the baseline's CPU
    per step, the first tells extra work inside the worker apart from cores lost to the
    second, which competes with the worker's compute threads.
    """

    def __init__(self, root_pid: int):
        self.root = psutil.Process(root_pid)
        self.worker: psutil.Process | None = None
        self.others: list[psutil.Process] = []
        # (steps, worker CPU s, others' CPU s, wall s) at the first and the latest sample
        self.first: tuple[int, float, float, float] | None = None
        self.last: tuple[int, float, float, float] | None = None
        self._next = 0.0

    def sample(self, metrics: Path) -> None:
        if time.perf_counter() < self._next:
            return
        self._next = time.perf_counter() + 1.0
        try:
            steps = len(metrics.read_text().splitlines())
            if steps < 3:
                return
            if self.worker is None:
                tree = process_tree(self.root)
                self.worker = train_worker(tree)
                self.others = [p for p in tree if p.pid != self.worker.pid]
            others = 0.0
            for proc in self.others:
                try:
                    others += sum(proc.cpu_times()[:2])
                except psutil.Error:
                    pass
            self.last = (steps, sum(self.worker.cpu_times()[:2]), others, time.perf_counter())
            self.first = self.first or self.last
        except (psutil.Error, StopIteration):
            pass

    def per_step(self) -> float | None:
        if self.first is None or self.last[0] == self.first[0]:
            return None
        (s0, c0, _, _), (s1, c1, _, _) = self.first, self.last
        return (c1 - c0) / (s1 - s0)

    def others_cores(self) -> float | None:
        if self.first is None or self.last is self.first:
            return None
        (_, _, o0, t0), (_, _, o1, t1) = self.first, self.last
        return (o1 - o0) / (t1 - t0)


def bootstrap_interval(ratios: list[float], resamples: int = 10_000) -> tuple[float, float]:
    """A 95% interval for the median of ``ratios``, by resampling the rounds.

    It says how far the machine's noise alone could move the median: a target inside the
    interval is neither shown met nor shown missed by this run. Seeded, so a printed
    figure can be recomputed from the printed ratios.
    """
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def write_job(folder: Path, model: Path, steps: int) -> Path:
    job = {
        "model": {"path": str(model)},
        "data": {"files": [str(REPO / "configs/data/demo.txt")], "seq_len": 128, "eval_fraction": 0},
        "train": {"max_steps": steps, "micro_batch": 4, "grad_accum": 2, "lr": 2e-3,
                  "log_every": 1, "checkpoint_every": 10_000, "precision": "fp32"},
        "offload": {"params": "cpu", "optimizer": "cpu"},
        "output": {"dir": str(folder / "runs")},
        "ray": {"dashboard": True},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_baseline(job: Path, memory: bool) -> dict:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/bench/baseline_loop.py"), str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = TreeMemory(proc.pid) if memory else None
    out, _ = proc.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    if sampler is not None:
        result["tree_peak_rss_bytes"], result["tree_peak_pss_bytes"] = sampler.stop()
    return result


def run_swarm(job: Path, memory: bool, overrides: list[str]) -> dict:
    runs = job.parent / "runs"
    before = set(runs.glob("*/metrics.jsonl"))
    launched = time.perf_counter()
    log = job.parent / "swarm-stderr.log"
    sets = [arg for override in overrides for arg in ("--set", override)]
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "train", str(job), *sets],
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    sampler = TreeMemory(proc.pid) if memory else None
    first_step_at = None
    metrics = None
    cpu = ProcessCpu(proc.pid)
    while proc.poll() is None:
        if metrics is None:
            found = [m for m in runs.glob("*/metrics.jsonl") if m not in before]
            metrics = found[0] if found else None
        if metrics is not None and first_step_at is None and metrics.stat().st_size:
            row = json.loads(metrics.read_text().splitlines()[0])
            first_step_at = time.perf_counter() - row["step_time_s"]
        if first_step_at is not None:
            cpu.sample(metrics)
        # Polled gently: this loop competes with the run it watches.
        time.sleep(0.25)
    proc.communicate()
    peaks = sampler.stop() if sampler is not None else (None, None)
    if proc.returncode != 0:
        sys.exit("swarm train failed:\n" + "\n".join(log.read_text().splitlines()[-15:]))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    return {
        "startup_s": first_step_at - launched,
        "step_times": step_times,
        "median_step_s": statistics.median(step_times[2:]),
        "cpu_per_step_s": cpu.per_step(),
        "others_cores": cpu.others_cores(),
        "tree_peak_rss_bytes": peaks[0],
        "tree_peak_pss_bytes": peaks[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each side, alternated")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to swarm train only, e.g. ray.dashboard=false to measure the dashboard's share")
    args = parser.parse_args()

    from swarm.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_tiny_model(folder / "model", [REPO / "configs/data/demo.txt"],
                                hidden=args.hidden, layers=args.layers)
        job = write_job(folder, model, args.steps)
        # Timed runs alternate, so that a slow spell of this shared machine hits both
        # sides; then one memory run of each (see the module docstring).
        timed = []
        # Each round's pair runs back to back, so its ratio cancels the slow drifts of a shared machine.
        paired = []
        for round_ in range(args.rounds):
            baseline, swarm = run_baseline(job, memory=False), run_swarm(job, memory=False, overrides=args.set)
            timed.append((baseline, swarm))
            paired.append(swarm["median_step_s"] / baseline["median_step_s"])
            print(f"round {round_ + 1}: median step {baseline['median_step_s']:.3f} s baseline, "
                  f"{swarm['median_step_s']:.3f} s swarm (ratio {paired[-1]:.3f})", flush=True)
        baseline_mem, swarm_mem = run_baseline(job, memory=True), run_swarm(job, memory=True, overrides=args.set)

    def median_of(side: int, key: str) -> float:
        values = [pair[side][key] for pair in timed if pair[side][key] is not None]
        return statistics.median(values) if values else float("nan")

    step = (median_of(0, "median_step_s"), median_of(1, "median_step_s"))
    cpu = (median_of(0, "cpu_per_step_s"), median_of(1, "cpu_per_step_s"))
    startup = (median_of(0, "startup_s"), median_of(1, "startup_s"))
    rss = (baseline_mem["tree_peak_rss_bytes"], swarm_mem["tree_peak_rss_bytes"])
    pss = (baseline_mem["tree_peak_pss_bytes"], swarm_mem["tree_peak_pss_bytes"])
    print(f"tiny llama hidden={args.hidden} layers={args.layers}, {args.steps} steps x {args.rounds} rounds, "
          "QLoRA + ZeRO-3 + CPU offload (params, optimizer), fp32 on CPU"
          + (f"; swarm with --set {' --set '.join(args.set)}" if args.set else ""))
    print(f"{'':28}{'baseline':>12}{'swarm':>12}")
    print(f"{'median step time (s)':28}{step[0]:12.3f}{step[1]:12.3f}")
    print(f"{'worker CPU per step (s)':28}{cpu[0]:12.3f}{cpu[1]:12.3f}")
    print(f"{'start-up to first step (s)':28}{startup[0]:12.1f}{startup[1]:12.1f}")
    print(f"{'peak RSS, process tree (GiB)':28}{rss[0] / GIB:12.2f}{rss[1] / GIB:12.2f}")
    print(f"{'peak PSS, process tree (GiB)':28}{pss[0] / GIB:12.2f}{pss[1] / GIB:12.2f}")
    others = median_of(1, "others_cores")
    print(f"swarm's other processes (driver, Ray daemons, dashboard, controller, mailbox) used {others:.3f} cores "
          f"beside the worker, of this machine's {psutil.cpu_count()}")
    print(f"step time ratio swarm/baseline: {step[1] / step[0]:.3f} (target <= 1.05; median over rounds); "
          f"worker CPU per step ratio: {cpu[1] / cpu[0]:.3f}")
    low, high = bootstrap_interval(paired)
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in paired)}; their median {statistics.median(paired):.3f} "
          f"(95% bootstrap interval {low:.3f} to {high:.3f})")
    print(f"orchestration RAM overhead: {(pss[1] - pss[0]) / GIB:.2f} GiB by PSS, "
          f"{(rss[1] - rss[0]) / GIB:.2f} GiB by summed RSS (target <= 1.5 GiB)")


if __name__ == "__main__":
    main()
