"""The GPU check's NCCL case: swarm's collectives in a one-rank NCCL process group, on the card.

A world of one is enough to catch what NCCL refuses and gloo accepts (a host tensor in any
group, a collective before ``set_device``): NCCL checks each tensor's device whatever the
group's size. The case joins the group as a Ray Train worker does
(``swarm.train.worker.collectives.join``), then runs what a worker runs across processes: the
group's plan and the hosts' facts, the per-step sums, a PC's token count, and a diloco
exchange between a real DeepSpeed engine's LoRA weights and the global adapter (the PC's
group on NCCL, the group between PCs on gloo).

On a machine without a GPU, tests/integration/test_gpu_check.py runs it under
``lab.nccl_rules.NcclStandIn``: gloo underneath, NCCL's device rules enforced.
"""

from __future__ import annotations

import time


def run(device: str, model_device: str | None = None) -> dict:
    """Run the case; a dict of what each collective gave back and how long the exchange took.

    Args:
        device: the worker's device for the process group (``cuda:0`` on a GPU machine).
        model_device: where the LoRA model trains (default ``device``; the CPU stand-in
            trains on the CPU while its collectives play the card).
    """
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model

    from swarm.train.worker import collectives
    from swarm.train.worker.diloco.exchange import Exchange
    from swarm.train.worker.diloco.groups import PcGroups
    from swarm.train.worker.diloco.outer import outer_step
    from swarm.train.worker.driver_link import gather_hosts

    model_device = model_device or device
    collectives.join("nccl", device, init_method="env://", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="nccl")
    plan = collectives.broadcast_json({"strategy": {"name": "diloco"}, "sync": {"every": 8}}, src=0)
    addresses = collectives.all_gather_json("127.0.0.1")
    hosts = gather_hosts(model_device != "cpu")
    step_sums = collectives.reduce_numbers([2.5, 128.0, 0.0])
    groups = PcGroups.build(addresses, 0)

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 8)),
                           LoraConfig(r=4, target_modules=["0", "1"], init_lora_weights=False)).to(model_device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for _, p in named], config=config,
                                      mpu=groups.mpu())
    sync = {"outer_optimizer": "nesterov-b", "outer_lr": 0.7, "outer_momentum": 0.9}
    exchange = Exchange(engine, named, groups, sync)  # broadcasts PC 0's adapter: collectives on both groups
    exchange.tokens = 128
    tokens = exchange.pc_tokens()
    start = exchange.global_flat.clone()
    for _ in range(2):
        loss = engine(torch.randn(1, 16, device=model_device)).pow(2).sum()
        engine.backward(loss)
        engine.step()
    local = exchange._local_flat()
    started = time.perf_counter()
    figures = exchange.sync(8)
    sync_s = time.perf_counter() - started
    # One PC: the token-weighted mean is its own pseudo-gradient (sent in bf16), and the outer
    # step moves B by Nesterov and sets A to the mean.
    delta = (start - local).to(torch.bfloat16).float()
    expected, _ = outer_step(start, delta, torch.zeros_like(start), "nesterov-b", 0.7, 0.9, exchange.a_slices)
    error = float((exchange._local_flat() - expected).abs().max())
    # The group stays: the training cases after this one train in it, as a worker would.
    return {
        "case": "nccl", "device": device, "plan_round_trip": plan == {"strategy": {"name": "diloco"}, "sync": {"every": 8}},
        "addresses": addresses, "host": hosts[0]["hostname"], "step_sums": step_sums, "pc_tokens": tokens,
        "exchange_max_error": error, "exchange_ok": error < 1e-5 and len(figures.checksums) == 1,
        "exchange_s": round(sync_s, 4),
    }
