"""A training step's memory, measured on the CPU term by term, against the plan's terms.

For each architecture (Llama, Qwen2, Mistral; random weights from a config, nothing
downloaded) and each strategy (``shard``: ZeRO-3 with parameters and optimizer in CPU
RAM; ``replicate``: ZeRO-2), the model is loaded by ``swarm.train.worker.model.load_model`` as a
worker loads it, initialised with the plan's DeepSpeed config, and stepped twice; the
second step is measured by ``tests/lab/memory_ledger.py`` (bytes alive after the forward,
each storage once; the logits' peak in backward). Each measured term is printed beside the
planner's term for the same job (``swarm.plan.memory.worker_terms``,
``swarm.plan.activations``); the device-independent terms must agree within 15%.

    python tests/bench/bench_memory_ledger.py [--arch llama ...] [--no-checkpointing] [--json FILE]

Exit status 1 when a term is off by more than 15% (or a term planned as zero is not).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

STRATEGIES = {"shard": ("shard", "cpu", "cpu"), "replicate": ("replicate", "none", "none")}
TOLERANCE = 0.15
KEPT_4BIT = "4-bit weights kept by autograd"


def make_model(arch: str, folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A bf16 model of ``arch`` with random weights in ``folder`` (made once)."""
    import torch
    from transformers import AutoModelForCausalLM

    from swarm.tiny import model_config

    if not (folder / "config.json").is_file():
        config = model_config(arch, vocab, hidden=hidden, layers=layers)
        config.intermediate_size = hidden * 11 // 4  # Llama-like 2.7x, not the tiny models' 2x
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def planned_terms(plan, checkpointing: bool) -> dict[str, int]:
    """The planner's figures for the ledger's terms, for the plan's own job."""
    from swarm.plan import memory as mem
    from swarm.plan.activations import logits_peak_bytes

    work, shape = plan.workload, plan.model
    terms = {t.name: t.bytes for t in mem.worker_terms(shape, work, plan.strategy, plan.workers, plan.knobs, "cpu")}
    tokens = work.seq_len * work.micro_batch * work.sequences
    planned = {KEPT_4BIT: sum(b for name, b in terms.items() if name.startswith(KEPT_4BIT)),
               "logits and loss": logits_peak_bytes(shape, work) * tokens}
    if plan.strategy.zero_stage == 3:
        planned["gathered parameters alive"] = terms.get("ZeRO-3 gathered params (live + prefetch)", 0)
    if checkpointing:
        planned["layer checkpoints"] = terms["activations: layer checkpoints"]
    return planned


def scaled(plan, job, scale: float):
    """The plan with ZeRO-3's prefetch, live and reuse limits scaled by ``scale``, config and figures alike.

    swarm's limits (50M-100M elements) are 0.3-0.5% of a 70B base but more than the whole
    bench model: at full size ZeRO-3 would never release a parameter here, and what a large
    model meets (released weights, a bounded live set) would go unmeasured.
    """
    from dataclasses import replace

    from swarm.plan.deepspeed import deepspeed_config

    if plan.strategy.zero_stage < 3 or scale == 1:
        return plan
    k = plan.knobs
    knobs = replace(k, prefetch_bucket_size=int(k.prefetch_bucket_size * scale),
                    max_live_parameters=int(k.max_live_parameters * scale),
                    max_reuse_distance=int(k.max_reuse_distance * scale))
    config = deepspeed_config(job, plan.strategy, plan.precision, plan.micro_batch, plan.grad_accum, knobs,
                              pin_memory=False)
    return replace(plan, knobs=knobs, deepspeed=config)


def measure(arch: str, strategy: str, args, checkpointing: bool) -> dict:
    """Plan, load and step one job; the ledger's terms and the plan's, in bytes."""
    import deepspeed
    import torch

    from lab.memory_ledger import StepLedger
    from swarm.config.models import JobConfig
    from swarm.hardware import inventory
    from swarm.plan import make_plan
    from swarm.train.worker.model import load_model, trainable_parameters
    from swarm.train.worker.objective import SupervisedObjective

    kind, params, optimizer = STRATEGIES[strategy]
    folder = make_model(arch, args.work / f"{arch}-{args.hidden}x{args.layers}", args.hidden, args.layers, args.vocab)
    job = JobConfig.model_validate({
        "model": {"path": str(folder)}, "data": {"files": ["unused.txt"], "seq_len": args.seq_len},
        "train": {"max_steps": 2, "micro_batch": args.micro_batch, "grad_accum": 1, "lr": 1e-3, "strategy": kind,
                  "precision": "bf16", "gradient_checkpointing": checkpointing},
        "offload": {"params": params, "optimizer": optimizer},
    })
    plan = scaled(make_plan(job, [inventory()]), job, args.knob_scale)
    model = load_model(job, plan.to_dict(), "cpu")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for _, p in trainable_parameters(model)],
                                           config=plan.deepspeed)
    decoder = engine.module.base_model.model.model
    ledger = StepLedger()
    ledger.watch(list(decoder.layers), decoder.norm)
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (plan.micro_batch, args.seq_len))
    objective = SupervisedObjective()  # the loop's own loss: the model's output is dropped before backward
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    engine.train()
    started = time.perf_counter()
    for step in range(2):  # the first step lets ZeRO-3 record its trace, as every later step runs
        if step == 0:
            loss, _ = objective.loss(engine, inputs)
            engine.backward(loss)
        else:
            with ledger.forward():
                loss, _ = objective.loss(engine, inputs)
            measured = dict(ledger.after_forward(engine.module, loss))
            with ledger.backward():
                engine.backward(loss)
            measured["logits and loss"] = ledger.head_peak
        engine.step()
    seconds = (time.perf_counter() - started) / 2
    del engine, model, loss
    gc.collect()
    return {"arch": arch, "strategy": plan.strategy.name, "checkpointing": checkpointing,
            "planned": planned_terms(plan, checkpointing), "measured": measured, "step_s": seconds}


def compare(row: dict, kept_floor: int) -> list[tuple[str, int, int, str, bool]]:
    """(term, planned, measured, ratio, within tolerance) for each planned term."""
    out = []
    for term, planned in row["planned"].items():
        measured = row["measured"][term]
        if planned == 0:
            ok = measured <= kept_floor  # planned as nothing: nothing of note may be there
            out.append((term, planned, measured, "-", ok))
        else:
            ratio = measured / planned
            out.append((term, planned, measured, f"{ratio:.2f}", abs(ratio - 1) <= TOLERANCE))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=("llama", "qwen2", "mistral"))
    parser.add_argument("--strategy", action="append", choices=sorted(STRATEGIES))
    parser.add_argument("--no-checkpointing", action="store_true", help="also measure shard without checkpointing")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--knob-scale", type=float, default=0.02,
                        help="ZeRO-3 prefetch/live/reuse limits as a share of swarm's (see scaled())")
    parser.add_argument("--json", type=Path, help="also write every row (bytes) to this file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/swarm-bench-ledger"))
    args = parser.parse_args()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29573", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    from swarm.train.runtime import prepare_process_env

    prepare_process_env()
    deepspeed.init_distributed(dist_backend="gloo")
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [(a, s, True) for a in args.arch or ["llama", "qwen2", "mistral"] for s in args.strategy or ["shard", "replicate"]]
    if args.no_checkpointing:
        runs += [(a, "shard", False) for a in args.arch or ["llama", "qwen2", "mistral"]]
    print("| arch | strategy | checkpointing | term | plan MiB | measured MiB | measured / plan |")
    print("|---|---|---|---|---|---|---|")
    failed, rows = 0, []
    for arch, strategy, checkpointing in runs:
        row = measure(arch, strategy, args, checkpointing)
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        floor = row["measured"]["layer checkpoints"] // 100 or 1 << 20  # 1% of one small term: noise
        for term, planned, measured, ratio, ok in compare(row, floor):
            failed += not ok
            print(f"| {arch} | {row['strategy']} | {'on' if checkpointing else 'off'} | {term} | "
                  f"{planned / 2**20:.1f} | {measured / 2**20:.1f} | {ratio}{'' if ok else ' (off)'} |", flush=True)
        print(f"<!-- {arch} {strategy}: all the forward left alive "
              f"{row['measured']['all the forward left alive'] / 2**20:.1f} MiB, {row['step_s']:.1f} s/step -->",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
