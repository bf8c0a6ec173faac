"""The diloco exchange with real DeepSpeed engines in real processes: two "PCs" of one or two
workers each (gloo on this machine), ZeRO-2 and ZeRO-3 kept inside each PC by the run's
``mpu``, trained on different data, then one exchange.

The model is a peft LoRA adapter on two linear layers (tiny: the exchange's arithmetic is what is
checked; tests/bench/study_diloco_outer.py compares the outer optimizers on a real model). With outer lr 1 and no momentum every
PC must end with exactly the token-weighted mean of the PCs' adapters; with DiLoCo's defaults,
with the Nesterov step computed by hand on the B factors and the mean on the A factors.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

WORKER = r'''
import json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, torch.distributed as dist, deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from peft import LoraConfig, get_peft_model
from swarm.train.worker import collectives
from swarm.train.worker.diloco.exchange import Exchange
from swarm.train.worker.diloco.groups import PcGroups

rank, world, stage, lr, momentum, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
addresses = json.loads(sys.argv[7])
differ = sys.argv[8] == "differ"  # each PC draws its own adapter (another peft, torch or CPU)
collectives.join("gloo", "cpu", rank=rank, world_size=world)
deepspeed.init_distributed(dist_backend="gloo")
groups = PcGroups.build(addresses, rank)
torch.manual_seed(groups.pc if differ else 0)
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.Linear(300, 4)),
                       LoraConfig(r=4, target_modules=["0", "1"]))
config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100},
          "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}, "steps_per_print": 10**9}
named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for _, p in named], config=config,
                                  mpu=groups.mpu())
initial = torch.cat([safe_get_full_fp32_param(p).detach().flatten() for _, p in named])
exchange = Exchange(engine, named, groups, {"outer_optimizer": "nesterov-b", "outer_lr": lr, "outer_momentum": momentum})
start = exchange.global_flat.clone()
torch.manual_seed(100 + groups.pc)  # each PC its own data
# PCs step in lockstep, as in swarm's loop (ZeRO-3 makes a check across all ranks after its
# first step); the second PC is told it trained twice the tokens, as a faster PC would.
steps = 2
for _ in range(steps):
    x = torch.randn(1, 8)
    loss = engine(x).pow(2).sum()
    engine.backward(loss)
    engine.step()
local = torch.cat([safe_get_full_fp32_param(p).detach().flatten() for _, p in named])
tokens = 10.0 * (1 + groups.pc)
pc_tokens = torch.tensor([tokens])
exchange.tokens = tokens if groups.is_leader else 0.0
figures = exchange.sync(steps)
after = torch.cat([safe_get_full_fp32_param(p).detach().flatten() for _, p in named])
if stage == 3:
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        computed = torch.cat([p.detach().flatten().clone() for _, p in named])
else:
    computed = torch.cat([p.detach().flatten().clone() for _, p in named])
is_a = torch.cat([torch.full((getattr(p, "ds_numel", p.numel()),), ".lora_A." in n) for n, p in named])
torch.save({"initial": initial, "start": start, "local": local, "is_a": is_a, "after": after, "computed": computed, "tokens": tokens,
            "pc": groups.pc, "leader": groups.is_leader, "sent": figures.bytes_sent}, f"{out}/rank{rank}.pt")
dist.barrier()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, addresses: list[str], stage: int, lr: float, momentum: float,
              starts: str = "same") -> list[dict]:
    import subprocess

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    world = len(addresses)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(stage), str(lr), str(momentum),
                               str(tmp_path), json.dumps(addresses), starts], env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("stage", [2, 3])
def test_plain_averaging_gives_every_pc_the_token_weighted_mean(tmp_path, stage):
    # Two PCs: the first with one worker, the second with two (ZeRO inside it).
    ranks = run_ranks(tmp_path, ["10.0.0.1", "10.0.0.2", "10.0.0.2"], stage, lr=1.0, momentum=0.0)
    leaders = {r["pc"]: r for r in ranks if r["leader"]}
    weights = {pc: r["tokens"] / sum(x["tokens"] for x in leaders.values()) for pc, r in leaders.items()}
    mean = sum(weights[pc] * r["local"] for pc, r in leaders.items())
    assert not torch.allclose(leaders[0]["local"], leaders[1]["local"])  # the PCs did train apart
    for r in ranks:
        # bf16 pseudo-gradients: the mean to bf16 precision of the deltas.
        assert torch.allclose(r["after"], mean, atol=2e-3, rtol=0), (r["after"] - mean).abs().max()
        assert torch.equal(r["after"], ranks[0]["after"])  # every worker of every PC: one adapter
        assert torch.allclose(r["computed"], r["after"])  # the weights the model computes with too
    payload = mean.numel() * 2  # bf16
    assert leaders[0]["sent"] == payload  # ring all-reduce of two: 2 (n-1)/n of the payload


def test_the_outer_step_is_nesterov_sgd_on_the_mean_pseudo_gradient(tmp_path):
    lr, momentum = 0.7, 0.9
    ranks = run_ranks(tmp_path, ["10.0.0.1", "10.0.0.2"], 3, lr=lr, momentum=momentum)
    weights = [r["tokens"] / sum(x["tokens"] for x in ranks) for r in ranks]
    delta = sum(w * (r["start"] - r["local"]) for w, r in zip(weights, ranks))
    buf = delta  # momentum starts at zero
    nesterov = ranks[0]["start"] - lr * (delta + momentum * buf)
    mean = ranks[0]["start"] - delta
    is_a = ranks[0]["is_a"]
    assert 0 < is_a.sum() < is_a.numel()
    expected = torch.where(is_a, mean, nesterov)
    for r in ranks:
        assert torch.allclose(r["after"], expected, atol=3e-3, rtol=0)
        assert torch.equal(r["after"], ranks[0]["after"])


def test_pcs_that_draw_different_adapters_start_from_the_first_pcs_and_agree_after_an_exchange(tmp_path):
    ranks = run_ranks(tmp_path, ["10.0.0.1", "10.0.0.2", "10.0.0.2"], 3, lr=0.7, momentum=0.9, starts="differ")
    first, second = (next(r for r in ranks if r["pc"] == pc and r["leader"]) for pc in (0, 1))
    assert not torch.equal(first["initial"], second["initial"])  # the PCs drew different adapters
    for r in ranks:
        assert torch.equal(r["start"], first["initial"])  # PC 0's, broadcast before the first step
        assert torch.equal(r["after"], ranks[0]["after"])
        assert torch.allclose(r["computed"], r["after"])


PARTITION_WORKER = r'''
import json, math, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, torch.distributed as dist, deepspeed
from safetensors.torch import load_file
from swarm.config.models import JobConfig
from swarm.train.worker import collectives
from swarm.train.worker.diloco.groups import PcGroups
from swarm.train.worker.model import load_model

rank, world, out, model_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
addresses = json.loads(sys.argv[5])
collectives.join("gloo", "cpu", rank=rank, world_size=world)
deepspeed.init_distributed(dist_backend="gloo")
groups = PcGroups.build(addresses, rank)
job = JobConfig.model_validate({"model": {"path": model_path}, "quantization": {"bits": None},
                                "data": {"files": ["unused.txt"]}, "lora": {"r": 4, "alpha": 8}})
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
plan = {"precision": "fp32", "deepspeed": ds, "strategy": {"zero_stage": 3}}
model = load_model(job, plan, "cpu", group=groups.intra)
name, weight = next((n, p) for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
with deepspeed.zero.GatheredParameters([weight]):
    whole = weight.detach().clone()
stored = load_file(os.path.join(model_path, "model.safetensors"))
expected = next(t for k, t in stored.items() if k.endswith("embed_tokens.weight")).float()
sizes = {dist.get_world_size(p.ds_process_group) for p in model.parameters()}
torch.save({"pc": groups.pc, "group_sizes": sorted(sizes), "numel": weight.ds_numel,
            "partition": weight.ds_tensor.numel(), "equal": torch.equal(whole, expected)}, f"{out}/rank{rank}.pt")
dist.barrier()
'''


def test_a_16bit_base_sharded_inside_each_pc_is_partitioned_over_that_pc_only(tmp_path, tiny_models):
    """transformers' zero.Init partitions over every worker and reads the weights on global rank 0
    only; a diloco PC must hold its base among its own workers (issue 31)."""
    import subprocess

    script = tmp_path / "partition.py"
    script.write_text(PARTITION_WORKER)
    addresses = ["10.0.0.1", "10.0.0.2", "10.0.0.2"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "3", str(tmp_path), str(tiny_models("llama")),
                               json.dumps(addresses)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "3"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(3)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for r in ranks:
        pc_size = 1 if r["pc"] == 0 else 2
        assert r["group_sizes"] == [pc_size]  # every parameter partitioned over its PC's workers
        assert r["partition"] == -(-r["numel"] // pc_size)
        assert r["equal"]  # every PC holds the stored weights, not only global rank 0's
