"""diloco against replicate and shard on two namespace "PCs" over a capped link: bytes and loss.

Run as root on Linux (needs `ip` and `tc`, Debian's iproute2):
    python tests/bench/bench_diloco.py [--rates 100mbit,20mbit] [--steps 64]

One lab (configs/cluster-lab.yaml: a head that only coordinates, two worker hosts) is
brought up. For each link rate (a token bucket on every host's link) the same tiny QLoRA job,
the same tokens, runs sharded (ZeRO-3 across the hosts), replicated (ZeRO-2 across them), and
with diloco exchanging adapters every H = 1, 8 and 32 steps (and at H=8 by plain averaging:
outer lr 1, no momentum).

The job is shaped like configs/llama-70b-swarm.yaml where that decides the traffic: 8
accumulation steps (ZeRO-2 and ZeRO-3 communicate in every one) and a base many times larger
than its adapter (hidden 512, LoRA r2 on every linear layer: 144 base weights per adapter
weight in each layer; Llama 3.1 70B at r16 has about 340). The text is CPython's own
documentation (pydoc_data, on every Python): the tiny base is first pretrained (every weight,
in this process) on half of its topics, and the runs fine-tune it on the other half, about a
quarter of a million characters, so that, as in a user's fine-tune, the base knows the language
and the eval loss measures learning new text rather than undoing a random initialisation.

Before the runs it measures what Ray sends from each worker host while the swarm is idle (its
dashboard agent's node reports to the head). It prints, per run, the bytes each worker's PC sent
per step (interface counters over the training steps, exchanges included in full), the bytes the
two training PCs sent each other (counted on the lab's bridge over the whole run, set-up and
final exchange included, divided by the steps: the gradients, exchanges and collectives, without
Ray's traffic to the head), the seconds per step, tokens/s, the final train loss, the eval
loss and the norms of the output adapter's A and B factors (how far each run carried it);
then the byte ratios at H=8 (both counts) and the eval loss against replicate's.
It prints figures; it does not pass or fail on them. Both worker hosts share this machine's
cores: compare bytes and loss, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # lab: the network-namespace hosts
sys.path.insert(0, str(REPO / "tests" / "bench"))

from bench_swarm_train import bring_up, job_file, shape  # noqa: E402

from lab.netlab import NetLab  # noqa: E402

# diloco with DiLoCo's outer optimizer (lr 0.7, Nesterov momentum 0.9, swarm's defaults), and
# at H=8 also with plain averaging (outer lr 1, no momentum).
RUNS = [("replicate", {"strategy": "replicate"})] + [
    (f"diloco H={h}", {"strategy": "diloco", "sync_every": h}) for h in (8, 1, 32)] + [
    ("diloco H=8 mean", {"strategy": "diloco", "sync_every": 8, "outer_lr": 1.0, "outer_momentum": 0.0}),
    ("shard", {"strategy": "shard"})]


PCS = ("198.18.0.2", "198.18.0.3")  # the lab's two worker hosts (configs/cluster-lab.yaml)


def write_corpus(folder: Path) -> tuple[Path, Path]:
    """CPython's help topics (pydoc_data: real prose, the same on every Python) as two text
    files: the first half of the topics to pretrain the base on, the second half to fine-tune on."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    half = len(names) // 2
    parts = (folder / "pydoc-topics-pretrain.txt", folder / "pydoc-topics-finetune.txt")
    for path, chosen in zip(parts, (names[:half], names[half:])):
        path.write_text("\n\n".join(topics[name] for name in chosen))
    return parts


def pretrain(model: Path, text: Path, steps: int, lr: float = 1e-3, batch: int = 16) -> None:
    """Train every weight of the freshly made tiny model on ``text`` and save it in place.

    A fine-tune starts from a base that knows its language; a random tiny base starts at a loss
    of about 14 (more than twice a uniform guess over its 512 tokens), and a LoRA run on it
    spends its steps undoing the initialisation, not learning the text.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(text.read_text())["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    for step in range(steps):
        sample = blocks[torch.randint(len(blocks), (batch,))]
        loss = net(input_ids=sample, labels=sample).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"  pretraining the base: step {step}, loss {loss.item():.2f}", flush=True)
    net.save_pretrained(model)


def ray_idle_rate(lab: NetLab, seconds: float = 60) -> float:
    """Bytes per second a worker host sends while the swarm is up and idle (Ray's own traffic)."""
    def sent() -> list[int]:
        return [int(lab.run(h, ["cat", "/sys/class/net/lan0/statistics/tx_bytes"]).stdout) for h in (2, 3)]

    time.sleep(10)  # let the bring-up's own traffic end
    before, start = sent(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = sent(), time.monotonic() - start
    return sum(a - b for a, b in zip(after, before)) / 2 / elapsed


def measure(lab: NetLab, job: Path, max_steps: int) -> dict:
    counting = lab.capture("--count")  # bytes per address pair crossing the bridge
    try:
        result = lab.swarm(1, "train", str(job), timeout=3600)
    finally:
        pairs = json.loads(lab.stop_capture(counting))
    if result.returncode != 0:
        raise SystemExit(f"swarm train failed:\n{result.stderr[-4000:]}")
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("run: "))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = 3  # the first steps include warm-up work
    steps = [r for r in rows if "loss" in r and r["step"] >= first]
    syncs = [r for r in rows if "sync_bytes" in r and r["step"] >= first]
    summary = json.loads((run_dir / "run.json").read_text())
    # An exchange runs after its step's figures: add its bytes and seconds to the steps'.
    sent = sum(r["sent_bytes_per_worker"] for r in steps) + sum(r["sync_sent_bytes"] for r in syncs)
    seconds = sum(r["step_time_s"] for r in steps) + sum(r["sync_seconds"] for r in syncs)
    return {
        "sent_bytes": sent / len(steps), "step_s": seconds / len(steps),
        # per worker per step: the two worker PCs' bytes to each other, over the whole run
        "between_pcs": sum(pairs.get(f"{a}>{b}", 0) for a, b in (PCS, PCS[::-1])) / 2 / max_steps,
        "tokens_per_s": sum(r["tokens"] for r in steps) / seconds,
        "loss": summary["train_loss"], "eval_loss": summary["eval_loss"], **adapter_norms(run_dir / "adapter"),
    }


def adapter_norms(adapter: Path) -> dict:
    """The L2 norms of the run's LoRA A and B factors, all layers together: how far the outer
    optimizer carried the adapter, against replicate's."""
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    def norm(factor: str) -> float:
        return sum(float(w.float().pow(2).sum()) for k, w in weights.items() if f".{factor}." in k) ** 0.5
    return {"norm_a": norm("lora_A"), "norm_b": norm("lora_B")}


def ratio(run: dict, diloco: dict, key: str) -> float:
    """How many times more bytes per step ``run`` sent than ``diloco``, by ``key``'s count."""
    return run[key] / diloco[key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100mbit,20mbit")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=400,
                        help="full-weight steps on the first half of the topics before the fine-tunes")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (printed)")
    parser.add_argument("--only", help="run only these, e.g. 'replicate,diloco H=8'")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the lab makes network namespaces")
    from swarm.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-diloco-"))
    print(f"runs in {work}")
    pretrain_text, corpus = write_corpus(work)
    model = make_tiny_model(work / "tiny-llama", [pretrain_text, corpus], hidden=args.hidden, layers=args.layers)
    pretrain(model, pretrain_text, args.pretrain_steps)
    print(f"tiny Llama (hidden {args.hidden}, {args.layers} layers, pretrained {args.pretrain_steps} steps on half the "
          f"topics), QLoRA r{args.lora_r} on the other half, seq 128, micro-batch {args.micro_batch}, "
          f"8 accumulation steps, {args.steps} steps per run, CPU offload where the strategy allows; "
          f"{os.cpu_count()} CPUs")
    table = []
    with NetLab(3) as lab:
        bring_up(lab)
        idle = ray_idle_rate(lab)
        print(f"Ray's traffic from an idle worker host: {idle / 1e3:.1f} kB/s", flush=True)
        for rate in args.rates.split(","):
            shape(lab, rate)
            for name, train in RUNS:
                if args.only and name not in args.only.split(","):
                    continue
                job = job_file(work, model, args.steps, text=corpus, lora_r=args.lora_r, eval_fraction=0.05,
                               micro_batch=args.micro_batch, grad_accum=8, warmup_steps=4, **train)
                r = {"rate": rate, "run": name, **measure(lab, job, args.steps)}
                table.append(r)
                print(f"  {rate:8s} {name:12s} sent {r['sent_bytes'] / 1e3:9.1f} kB/step "
                      f"({r['between_pcs'] / 1e3:.1f} between the PCs), step {r['step_s']:.2f} s, "
                      f"{r['tokens_per_s']:.0f} tok/s, loss {r['loss']:.3f}, eval {r['eval_loss']:.3f}, "
                      f"|A| {r['norm_a']:.2f}, |B| {r['norm_b']:.2f}", flush=True)
        lab.swarm(1, "down", timeout=300)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    print("\n| link | run | sent per step per worker (kB) | between the PCs, whole run / steps (kB) | mean step (s) | tokens/s "
          "| train loss | eval loss | adapter norm A / B |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['rate']} | {r['run']} | {r['sent_bytes'] / 1e3:.1f} | {r['between_pcs'] / 1e3:.1f} | "
              f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['loss']:.3f} | {r['eval_loss']:.3f} | "
              f"{r['norm_a']:.2f} / {r['norm_b']:.2f} |")
    for rate in args.rates.split(","):
        by = {r["run"]: r for r in table if r["rate"] == rate}
        if not {"replicate", "diloco H=8", "shard"} <= by.keys():
            continue
        h8 = by["diloco H=8"]
        print(f"\n{rate}: at H=8, {ratio(by['replicate'], h8, 'sent_bytes'):.0f}x fewer bytes per step than "
              f"replicate ({ratio(by['replicate'], h8, 'between_pcs'):.0f}x between the PCs), "
              f"{ratio(by['shard'], h8, 'sent_bytes'):.0f}x fewer than shard ({ratio(by['shard'], h8, 'between_pcs'):.0f}x); eval loss "
              f"{h8['eval_loss'] / by['replicate']['eval_loss'] - 1:+.1%} against replicate's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
