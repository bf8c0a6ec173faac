"""Diagnostic: where the machine's CPU goes while the bench's job trains, from a scheduler trace.

Runs the job of ``bench_train.py`` once with the baseline loop and once with ``swarm train``.
Over ``--steps`` steady steps (from step 8) it records the kernel's ``sched_switch`` events
and prints, for each side:

- each process's CPU in ms per second of wall time, and how often its threads were put on
  a CPU (an idle Ray actor still runs about 100 times a second: Ray's core worker checks
  for signals every 10 ms);
- for the training process's compute threads, read from ``/proc/<pid>/task/*/schedstat``:
  the time each spent waiting in the run queue per step, and its time slices per step
  (a slice ends when the thread sleeps or another process preempts it).

On a machine whose cores the compute threads fill, every ms another process runs is a ms
a compute thread waits: the per-process table says who takes it.

Needs root and the kernel's tracefs (mounted at /sys/kernel/tracing here if it is not).
Usage: python tests/bench/cpu_trace.py [--steps 15] [--hidden 256] [--layers 4] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, process_tree, train_worker, write_job

TRACEFS = Path("/sys/kernel/tracing")
WARM_STEPS = 8  # start-up, first steps and DeepSpeed's warm-up stay out of the window
SWITCH = re.compile(r"\[(\d+)\].*?\s(\d+\.\d+): sched_switch: .*?prev_pid=(\d+) .*?==> next_comm=.*? next_pid=(\d+)")


def tracefs_ready() -> None:
    if os.geteuid() != 0:
        sys.exit("error: cpu_trace.py reads the kernel's scheduler trace; run it as root")
    if not (TRACEFS / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False, capture_output=True)
    if not (TRACEFS / "events/sched/sched_switch").exists():
        sys.exit(f"error: no scheduler trace events under {TRACEFS}; mount tracefs there "
                 "(mount -t tracefs nodev /sys/kernel/tracing) or use a kernel with tracing")


def set_trace(path: str, value: str) -> None:
    (TRACEFS / path).write_text(value)


def schedstat(pid: int) -> dict[int, tuple[int, int, int]]:
    """Per thread: ns on a CPU, ns waiting in the run queue, time slices."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = tuple(map(int, (task / "schedstat").read_text().split()))
        except OSError:
            pass
    return out


def process_label(pid: str) -> str:
    """A short name for a process: Ray's process titles, a Python script or module, a binary."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return "(exited)"
    if not argv[0]:
        return "(kernel threads)"
    title = argv[0].split()[0]
    if title.startswith("ray-dashboard-"):
        return "ray dashboard head modules"
    if title.startswith("ray::"):
        return title
    if "python" in Path(title).name:
        if "-m" in argv:
            return "python -m " + argv[argv.index("-m") + 1]
        script = next((a for a in argv[1:] if a.endswith(".py")), "")
        return "python " + "/".join(Path(script).parts[-2:])
    return Path(title).name


def owners() -> dict[str, str]:
    """Thread id -> label of its process, for every thread alive now."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            label = process_label(proc.name)
            try:
                for task in (proc / "task").iterdir():
                    out[task.name] = label
            except OSError:
                pass
    return out


def cpu_by_process(trace: str, labels: dict[str, str]) -> tuple[float, collections.Counter, collections.Counter]:
    """Wall seconds the trace spans; per process label, CPU seconds and times put on a CPU."""
    running: dict[str, tuple[str, float]] = {}  # cpu -> (thread id, since)
    cpu_s, runs = collections.Counter(), collections.Counter()
    first = last = None
    for line in trace.splitlines():
        match = SWITCH.search(line)
        if not match:
            continue
        cpu, stamp, _, next_tid = match.groups()
        stamp = float(stamp)
        first, last = first or stamp, stamp
        if cpu in running:
            tid, since = running[cpu]
            cpu_s["(idle)" if tid == "0" else labels.get(tid, "(exited)")] += stamp - since
        running[cpu] = (next_tid, stamp)
        runs["(idle)" if next_tid == "0" else labels.get(next_tid, "(exited)")] += 1
    return (last - first) if first else 0.0, cpu_s, runs


class Side:
    """One run of one side, with its training process and a live count of finished steps."""

    def __init__(self, name: str, job: Path, overrides: list[str]):
        self.name, self.steps = name, 0
        if name == "baseline":
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/bench/baseline_loop.py"), str(job)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self.pid = self.proc.pid
            threading.Thread(target=self._count_baseline_steps, daemon=True).start()
        else:
            runs = job.parent / "runs"
            before = set(runs.glob("*/metrics.jsonl"))
            sets = [arg for override in overrides for arg in ("--set", override)]
            self.proc = subprocess.Popen([sys.executable, "-m", "swarm", "train", str(job), *sets],
                                         stdout=subprocess.DEVNULL, stderr=(job.parent / "swarm-stderr.log").open("w"))
            self.pid = None
            threading.Thread(target=self._count_swarm_steps, args=(runs, before), daemon=True).start()

    def _count_baseline_steps(self) -> None:
        for line in self.proc.stderr:  # baseline_loop.py writes "step N" to stderr after each step
            if line.startswith("step "):
                self.steps = int(line.split()[1])

    def _count_swarm_steps(self, runs: Path, before: set[Path]) -> None:
        metrics = None
        while self.proc.poll() is None:
            if metrics is None:
                found = [m for m in runs.glob("*/metrics.jsonl") if m not in before]
                metrics = found[0] if found else None
            if metrics is not None and self.pid is None:
                try:
                    self.pid = train_worker(process_tree(psutil.Process(self.proc.pid))).pid
                except (psutil.Error, StopIteration):
                    pass
            if metrics is not None:
                self.steps = len(metrics.read_text().splitlines())
            # Polled gently: this thread's CPU shows up in the table it helps to measure.
            time.sleep(0.25)

    def wait_for_step(self, step: int) -> None:
        while self.steps < step or self.pid is None:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} ended before step {step} (exit status {self.proc.returncode})")
            time.sleep(0.1)


def trace_side(name: str, job: Path, steps: int, overrides: list[str]) -> None:
    side = Side(name, job, overrides)
    side.wait_for_step(WARM_STEPS)
    start_step, started, before = side.steps, time.perf_counter(), schedstat(side.pid)
    buffer_kb = (TRACEFS / "buffer_size_kb").read_text().split()[0]
    try:
        # About 3,000 switches a second on two CPUs: room for a minute of them, so the
        # oldest are not overwritten before they are read.
        set_trace("buffer_size_kb", "20000")
        set_trace("trace", "")
        set_trace("set_event", "sched:sched_switch")
        set_trace("tracing_on", "1")
        side.wait_for_step(start_step + steps)
        set_trace("tracing_on", "0")
        done, wall, after = side.steps - start_step, time.perf_counter() - started, schedstat(side.pid)
        labels, trace = owners(), (TRACEFS / "trace").read_text()
    finally:  # also on Ctrl-C or a failed run: leave the kernel's tracer as it was
        set_trace("tracing_on", "0")
        set_trace("set_event", "")
        set_trace("trace", "")
        set_trace("buffer_size_kb", buffer_kb)
    side.proc.wait()

    print(f"\n{name}: {done} steps in {wall:.1f} s ({wall / done:.3f} s/step)")
    for tid, (run, wait, slices) in sorted(after.items()):
        run0, wait0, slices0 = before.get(tid, (0, 0, 0))
        if (run - run0) / 1e9 / done > 0.1:  # a compute thread: busy for most of each step
            print(f"  compute thread {tid}: on CPU {(run - run0) / 1e9 / done:.3f} s/step, waited in the run queue "
                  f"{(wait - wait0) / 1e6 / done:.1f} ms/step, {(slices - slices0) / done:.0f} time slices/step")
    span, cpu_s, runs = cpu_by_process(trace, labels)
    training = labels.get(str(side.pid))
    others = sum(s for label, s in cpu_s.items() if label not in (training, "(idle)"))
    print(f"  {'CPU ms/s':>9} {'runs/s':>7}  process (trace over {span:.1f} s)")
    for label, seconds in cpu_s.most_common(18):
        print(f"  {seconds * 1000 / span:9.1f} {runs[label] / span:7.0f}  {label}")
    print(f"  all processes but the training process and idle: {others * 1000 / span:.1f} ms/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="steady steps to trace on each side")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to swarm train only")
    args = parser.parse_args()
    tracefs_ready()

    from swarm.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_tiny_model(folder / "model", [REPO / "configs/data/demo.txt"],
                                hidden=args.hidden, layers=args.layers)
        job = write_job(folder, model, WARM_STEPS + args.steps + 2)
        for name in ("baseline", "swarm"):
            trace_side(name, job, args.steps, args.set)


if __name__ == "__main__":
    main()
