"""Train one tiny QLoRA job on namespace "PCs" joined by a slow, shaped link: strategies and scaling.

Run as root on Linux (needs `ip` and `tc`, Debian's iproute2):
    python tests/bench/bench_swarm_train.py [--rate 100mbit] [--steps 20] [--insecure]

One lab (configs/cluster-lab.yaml: a head that only coordinates, two worker hosts) is brought
up; every host's outgoing link is capped with `tc` (a token bucket at --rate, like a
home LAN over Wi-Fi or an old switch). The same job then runs three times: replicated on both worker
hosts, sharded (ZeRO-3) on both, and on one host alone. For each run it prints the median
step time, the bytes each worker's PC sent per step (from the run's metrics), and the
throughput; then the throughput of two hosts against one. It prints figures; it does not pass
or fail on them. Both worker hosts share this machine's cores, so two hosts cannot beat one
here on compute; the figures show what the link costs each strategy. With --insecure the
swarm runs without secret (Ray without token and TLS): the difference is what TLS costs a step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cluster-lab.yaml"
DEMO_TEXT = REPO / "configs" / "data" / "demo.txt"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # lab: the network-namespace hosts

sys.path.insert(0, str(REPO / "tests" / "bench"))

from bench_up import start_agents  # noqa: E402

from lab.netlab import NetLab  # noqa: E402


def shape(lab: NetLab, rate: str) -> None:
    """Cap every host's outgoing traffic with a token bucket (tbf; this kernel has no netem),
    replacing an earlier cap."""
    for host in (1, 2, 3):
        lab.run(host, ["tc", "qdisc", "del", "dev", "lan0", "root"])  # none yet: fails, harmlessly
        r = lab.run(host, ["tc", "qdisc", "add", "dev", "lan0", "root", "tbf",
                           "rate", rate, "burst", "64kb", "latency", "100ms"])
        if r.returncode != 0:
            raise SystemExit(f"tc failed on host {host}: {r.stderr}")


def job_file(folder: Path, model: Path, steps: int, text: Path = DEMO_TEXT, lora_r: int = 16,
             eval_fraction: float = 0.1, **train) -> Path:
    """A QLoRA job on ``text`` for the lab; ``train`` overrides the train section's keys."""
    job = {
        "model": {"path": str(model)},
        "quantization": {"bits": 4},
        "lora": {"r": lora_r, "alpha": 2 * lora_r},
        "data": {"files": [str(text)], "format": "text", "seq_len": 128, "eval_fraction": eval_fraction},
        "train": {"max_steps": steps, "micro_batch": 2, "grad_accum": 1, "lr": 5e-3, "warmup_steps": 2,
                  "log_every": 1, "eval_every": 10_000, "checkpoint_every": 10_000, **train},
        # Replication keeps the whole base on every worker; only the optimizer is offloaded.
        "offload": {"params": "none" if train.get("strategy") == "replicate" else "cpu", "optimizer": "cpu"},
        "output": {"dir": str(folder / "runs")},
        "ray": {"address": "198.18.0.1:6379", "object_store_mb": 100},
    }
    path = folder / f"job-{len(list(folder.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run(lab: NetLab, job: Path) -> dict:
    result = lab.swarm(1, "train", str(job), timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"swarm train failed:\n{result.stderr[-4000:]}")
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("run: "))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][2:]  # the first steps include warm-up work
    summary = json.loads((run_dir / "run.json").read_text())
    step_s = statistics.median(r["step_time_s"] for r in steps)
    return {
        "strategy": summary["strategy"]["name"],
        "workers": summary["world_size"],
        "step_s": step_s,
        "sent_mb": statistics.median(r["sent_bytes_per_worker"] for r in steps) / 1e6,
        "tokens_per_s": statistics.median(r["tokens"] for r in steps) / step_s,
        "loss": summary["train_loss"],
    }


def bring_up(lab: NetLab, flags: list[str] | tuple[str, ...] = (), insecure: bool = False) -> None:
    """One secret on the three hosts, an agent on each, then `swarm up` from host 1."""
    start_agents(lab, flags, insecure)
    up = lab.swarm(1, "up", str(CONFIG), *flags, timeout=600)
    if up.returncode != 0:
        raise SystemExit(f"swarm up failed:\n{up.stdout}\n{up.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100mbit", help="link rate per host (tc syntax), default 100mbit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--insecure", action="store_true", help="no secret: Ray without token and TLS")
    args = parser.parse_args()
    flags = ["--insecure"] if args.insecure else []
    if os.geteuid() != 0:
        raise SystemExit("run as root: the lab makes network namespaces")
    from swarm.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    model = make_tiny_model(work / "tiny-llama", [DEMO_TEXT], hidden=256, layers=4)
    print(f"tiny Llama (hidden 256, 4 layers), QLoRA r16, seq 128, micro-batch 2; link capped at {args.rate} "
          f"per host; {'--insecure (no token, no TLS)' if args.insecure else 'token and TLS'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    results = []
    with NetLab(3) as lab:
        bring_up(lab, flags, insecure=args.insecure)
        shape(lab, args.rate)
        for train in ({"strategy": "replicate"}, {"strategy": "shard"}, {"workers": 1}):
            results.append(run(lab, job_file(work, model, args.steps, **train)))
            r = results[-1]
            print(f"  {r['strategy']:9s} {r['workers']} host(s): step {r['step_s']:.2f} s, "
                  f"sent {r['sent_mb']:.2f} MB/step/worker, {r['tokens_per_s']:.0f} tok/s, loss {r['loss']:.3f}",
                  flush=True)
        lab.swarm(1, "down", *flags, timeout=300)
    shutil.rmtree(work, ignore_errors=True)

    print("\n| strategy | hosts | median step (s) | sent per step per worker (MB) | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['strategy']} | {r['workers']} | {r['step_s']:.2f} | {r['sent_mb']:.2f} | {r['tokens_per_s']:.0f} |")
    one = results[2]["tokens_per_s"]
    print(f"\nthroughput 2 hosts / 1 host: replicate {results[0]['tokens_per_s'] / one:.2f}x, "
          f"shard {results[1]['tokens_per_s'] / one:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
