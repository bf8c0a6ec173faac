"""The GPU check: swarm's single-PC training path on a real-shape model, against its plan.

For each case: a model of a public architecture's shape (a bundled config, random weights,
written locally: nothing is downloaded) is planned by ``swarm.plan.make_plan`` on this
machine's inventory (NVML; ``SWARM_GPU_MEMORY_GB`` makes the card look like a consumer
one, and the worker caps torch's allocator to match), loaded by ``swarm.train.worker.model``
exactly as a worker loads it, initialised with the plan's DeepSpeed config, and trained
for a few steps on a repeating token sequence. It prints tokens/s and peak GPU memory
next to the plan's prediction and writes a JSON summary.

It runs the worker's code in one process, without Ray: the machine lent for this check
carries none of Ray's wheels (too large to bring along). ``swarm train`` adds only the
orchestration around these calls.

    python tests/gpu/check.py --out DIR [--case nccl --case cpu-offload --case nvme-offload ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "gpu"))

# The cases by value, most first: the whole check must fit about 8 minutes of a short lease.
# "nccl" (tests/gpu/nccl_case.py, seconds) runs swarm's collectives in a one-rank NCCL group;
# "slices" (tests/gpu/memory_slices.py, minutes) measures the peak of 8B and 70B layer slices
# against the plan; the others train a real shape.
DEFAULT_CASES = ["nccl", "slices", "cpu-offload", "nvme-offload"]
CASES = {
    # name: (bundled shape, offload params, offload optimizer, strategy)
    "cpu-offload": ("qwen2.5-0.5b", "cpu", "cpu", "shard"),
    "nvme-offload": ("qwen2.5-0.5b", "nvme", "cpu", "shard"),
    "replicate-8b": ("llama-3.1-8b", "none", "none", "replicate"),
}


def make_model(shape: str, folder: Path, layers: int | None) -> Path:
    """A model of ``shape``'s architecture with random weights, saved to ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from swarm.plan.shapes import bundled_config

    if (folder / "config.json").is_file():
        return folder
    raw = bundled_config(shape)
    if layers:
        raw["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def run_case(name: str, args) -> dict:
    import deepspeed
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from swarm.config.models import JobConfig
    from swarm.hardware import gpu_memory_cap_bytes, inventory
    from swarm.plan import make_plan
    from swarm.train.worker.device import memory_fraction, worker_device
    from swarm.train.worker.loop import lr_lambda
    from swarm.train.worker.model import load_model, trainable_parameters

    shape, params, optimizer, strategy = CASES[name]
    model_dir = make_model(shape, args.work / shape, args.layers)
    nvme = args.work / "nvme"
    job = JobConfig.model_validate({
        "model": {"path": str(model_dir)}, "data": {"files": ["unused.txt"], "seq_len": args.seq_len},
        "train": {"max_steps": args.steps, "micro_batch": 1, "grad_accum": 1, "lr": 2e-3, "strategy": strategy,
                  "precision": args.precision},
        "offload": {"params": params, "optimizer": optimizer, "nvme_path": str(nvme)},
    })
    plan = make_plan(job, [inventory(offload=nvme)]).to_dict()
    if not plan["fits"]:
        return {"case": name, "skipped": f"does not fit: {plan['reason']}"}
    device = worker_device(plan["placement"]["use_gpu"], 0, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device != "cpu":
        torch.cuda.set_device(device)
        fraction = memory_fraction(gpu_memory_cap_bytes(), torch.cuda.get_device_properties(device).total_memory)
        if fraction:
            torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.reset_peak_memory_stats()
    deepspeed.init_distributed(dist_backend=plan["placement"]["backend"])
    started = time.perf_counter()
    model = load_model(job, plan, device)
    named = trainable_parameters(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for _, p in named], config=plan["deepspeed"],
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(job)))
    load_s = time.perf_counter() - started
    # A repeating sequence: the adapters can learn it, so the loss must fall.
    torch.manual_seed(1)
    pattern = torch.randint(0, 1000, (64,))
    ids = pattern.repeat(args.seq_len // 64 + 1)[: args.seq_len].unsqueeze(0).to(device)
    engine.train()
    losses, times = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    node = plan["nodes"][0]
    steady = sorted(times[2:])[len(times[2:]) // 2] if len(times) > 2 else times[-1]
    result = {
        "case": name, "model": shape, "layers": args.layers, "strategy": plan["strategy"]["variant"],
        "precision": plan["precision"], "device": device, "load_s": round(load_s, 1),
        "first_loss": losses[0], "last_loss": losses[-1], "loss_fell_by_a_third": losses[-1] < losses[0] * 2 / 3,
        "median_step_s": round(steady, 4), "tokens_per_s": round(args.seq_len / steady, 1),
        "planned_tokens_per_s": round(plan["tokens_per_s"], 1),
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if device != "cpu" else 0,
        "planned_gpu_allocated_bytes": node["gpu_allocated_bytes"], "gpu_capacity_bytes": node["gpu_capacity"],
    }
    del engine, model
    if device != "cpu":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/swarm-gpu-check"))
    parser.add_argument("--case", action="append", choices=sorted([*CASES, "nccl", "slices"]))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the real shape (smoke runs)")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    from swarm.train.runtime import prepare_process_env

    prepare_process_env()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.case or DEFAULT_CASES:
        try:
            if name == "nccl":
                import nccl_case

                results.append(nccl_case.run("cuda:0"))
            elif name == "slices":
                import memory_slices

                for row in memory_slices.run(args):
                    results.append(row)
                    print(memory_slices.describe(row), flush=True)
                continue
            else:
                results.append(run_case(name, args))
        except Exception as exc:  # noqa: BLE001 - one case failing must not hide the others' figures
            results.append({"case": name, "failed": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"})
        r = results[-1]
        if r.get("case") == "nccl":
            print(f"nccl: plan, addresses, host facts, step sums and a diloco exchange on {r['device']}: "
                  f"{'ok' if r['exchange_ok'] and r['plan_round_trip'] else 'WRONG'} (exchange {r['exchange_s']} s, "
                  f"max error {r['exchange_max_error']:.1e})", flush=True)
        elif "tokens_per_s" in r:
            print(f"{name}: {r['strategy']} {r['precision']} on {r['device']}: loss {r['first_loss']:.3f} -> "
                  f"{r['last_loss']:.3f}, {r['tokens_per_s']} tokens/s (plan {r['planned_tokens_per_s']}), "
                  f"peak GPU {r['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB "
                  f"(plan {r['planned_gpu_allocated_bytes'] / 2**30:.2f} of {r['gpu_capacity_bytes'] / 2**30:.1f})",
                  flush=True)
        else:
            print(f"{name}: {r.get('skipped') or r.get('failed')}", flush=True)
    (args.out / "gpu-check.json").write_text(json.dumps(results, indent=2) + "\n")
    import memory_slices

    wrong = [r for r in results if "failed" in r or r.get("exchange_ok") is False or r.get("plan_round_trip") is False
             or (str(r.get("case", "")).startswith("slices-") and not memory_slices.passed(r))]
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
