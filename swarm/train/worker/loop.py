"""Worker side: the training loop every Ray Train worker runs.

Each worker loads the 4-bit base with LoRA, initialises DeepSpeed with the config built
from the job, and steps through its share of the packed blocks. Rank 0 talks to the
driver through its mailbox (``driver_link``): metrics as they happen, checkpoints (the
state ``trainable_state`` gathers) and the gathered adapter at the end. Nothing is written
to disk here, so workers need no shared drive.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from swarm.config.models import JobConfig
from swarm.train.mailbox import unpack
from swarm.train.runtime import (
    LOADING,
    TRAINING,
    prepare_process_env,
    return_freed_memory,
    set_malloc_thresholds,
    swarm_sets_malloc,
)
from swarm.train.worker.diloco.exchange import Exchange, eval_due, exchange_due, full_numel
from swarm.train.worker.diloco.groups import PcGroups
from swarm.train.worker.diloco.pc_state import add_pc_state
from swarm.train.worker.driver_link import (DriverLink, gather_hosts, grad_norm, group_plan, memory_figures, plan_of_pc,
                                           sent_bytes_counter)
from swarm.train.worker.trainable_state import gather_adapter, gather_trainable_state, restore_trainer_state


def lr_lambda(job: JobConfig):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak at ``max_steps``."""
    warmup, total, floor = job.train.warmup_steps, job.train.max_steps, job.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def cpu_threads_per_worker(cores: int | None, local_workers: int, ray_cpus: float | None = None) -> int:
    """OpenMP threads for each of the ``local_workers`` training workers on a PC with ``cores``.

    ``ray_cpus`` is the CPU count this PC's Ray node was given (``ray.num_cpus`` in the
    swarm file, ``--num-cpus`` of ``swarm join``; Ray counts the cores, or the container's
    share of them, when it is unset): a PC told to lend Ray fewer cores than it has keeps
    the rest for its owner, and namespace PCs sharing one machine do not oversubscribe it.
    """
    usable = min(c for c in (cores, ray_cpus) if c) if (cores or ray_cpus) else 1
    return max(1, int(usable) // local_workers)


def ray_node_cpus() -> float | None:
    """The CPU resource of the Ray node this process runs on (None when Ray does not say)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("CPU") for n in ray.nodes() if n["NodeID"] == node_id), None)


def client_optimizer(job: JobConfig, params):
    """The optimizer object for DeepSpeed, or None when DeepSpeed builds AdamW itself."""
    train = job.train
    if train.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=train.lr, weight_decay=train.weight_decay,
            relative_step=False, scale_parameter=False, warmup_init=False,
        )
    return None


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker.

    Args:
        cfg: ``job`` (the job as a dict), ``data`` (ref to ``{"train", "eval"}``: numpy
            ``Blocks``, or ``Pairs`` for preference methods, see ``swarm.data.packing``),
            ``mailbox`` (the driver's ``Mailbox`` actor, which also holds the checkpoint
            to start from, if any, and the plans of the worker groups),
            ``fingerprint`` (what this run trains), ``local`` (a run on a Ray started for
            it) and ``count_sent_bytes`` (report the bytes each worker's PC sent per
            step; a swarm run).

    Ray Train calls it again on a new worker group after a failure or a resize; the group
    asks the driver for its plan (``swarm.train.driver.plans``) and continues from the newest
    checkpoint the mailbox holds.
    """
    prepare_process_env()
    # Loading is a worker's peak: each copy of a weight it frees goes back to the system,
    # or the peak depends on the CPU (swarm.train.runtime.set_malloc_thresholds).
    fixing_malloc = swarm_sets_malloc(os.environ)
    if fixing_malloc:
        set_malloc_thresholds(LOADING)
        return_freed_memory()
    import deepspeed
    import ray
    import ray.train
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from swarm.data.sampling import micro_batch_indices
    from swarm.hardware import gpu_memory_cap_bytes
    from swarm.train.worker import collectives
    from swarm.train.worker.device import memory_fraction, worker_device
    from swarm.train.worker.model import load_model, trainable_parameters
    from swarm.train.worker.objective import objective_for

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job = JobConfig.model_validate(cfg["job"])
    link = DriverLink(cfg["mailbox"]) if rank == 0 else None
    plan, addresses = group_plan(cfg["mailbox"], link, rank, world, cfg["local"])
    if "refused" in plan:
        if link is not None:
            link.deliver({"kind": "refused", "reason": plan["refused"]})
        return
    # diloco: this worker's PC trains alone with its own plan; DeepSpeed stays inside the PC.
    pc_groups = PcGroups.build(addresses, rank) if plan["strategy"]["name"] == "diloco" else None
    if pc_groups is not None:
        plan = plan_of_pc(plan, addresses[rank])
    data = ray.get(cfg["data"])
    packed_resume = ray.get(cfg["mailbox"].resume_state.remote())
    resume = unpack(packed_resume) if packed_resume is not None else None
    counting = bool(cfg.get("count_sent_bytes"))
    sent_bytes = sent_bytes_counter() if counting else (lambda: 0)

    placement = plan["placement"]
    device = worker_device(placement["use_gpu"], context.get_local_rank(),
                           torch.cuda.device_count() if torch.cuda.is_available() else 0)
    on_gpu = device != "cpu"
    if str(collectives.device_of()) != device:  # joining the process group set it (trainer.py)
        raise RuntimeError(f"the process group runs on {collectives.device_of()}, the plan puts this worker on {device}")
    if on_gpu:
        fraction = memory_fraction(gpu_memory_cap_bytes(), torch.cuda.get_device_properties(device).total_memory)
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction, device)
    # CPU work (the training itself on a CPU-only PC; DeepSpeed's CPU Adam and offload
    # copies beside a GPU) runs on this thread's OpenMP team, which Ray sized to the
    # worker's token CPU reservation: one thread. Share the cores this PC lends Ray among
    # its workers.
    torch.set_num_threads(cpu_threads_per_worker(os.cpu_count(), context.get_local_world_size(), ray_node_cpus()))
    precision, ds_config = plan["precision"], plan["deepspeed"]
    deepspeed.init_distributed(dist_backend=placement["backend"])

    torch.manual_seed(job.train.seed)
    model = load_model(job, plan, device, adapter=resume["adapter"] if resume is not None else None,
                       group=pc_groups.intra if pc_groups else None)
    named = trainable_parameters(model)
    params = [p for _, p in named]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=client_optimizer(job, params),
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(job)),
        config=ds_config,
        mpu=pc_groups.mpu() if pc_groups else None,
    )
    if engine.zero_optimization_stage() != plan["strategy"]["zero_stage"]:
        raise RuntimeError(f"DeepSpeed runs ZeRO-{engine.zero_optimization_stage()}, the plan says "
                           f"ZeRO-{plan['strategy']['zero_stage']}")
    start_step, samples_seen = 0, 0
    if resume is not None:
        start_step, samples_seen = restore_trainer_state(engine, scheduler, named, resume)
    # diloco: PC 0's adapter goes to every PC, or each PC takes its own state from the checkpoint.
    exchange = Exchange(engine, named, pc_groups, plan["sync"], resume) if pc_groups is not None else None

    hosts = gather_hosts(on_gpu)
    if link is not None:
        link.deliver({
            "kind": "start", "world_size": world, "precision": precision, "start_step": start_step,
            "deepspeed": ds_config, "strategy": plan["strategy"]["name"],
            "max_steps": job.train.max_steps, "hosts": hosts,
            "trainable_params": sum(full_numel(p) for p in params),
        })
        for text in exchange.notes if exchange is not None else []:
            link.send({"kind": "note", "text": text})

    # data: swarm.data.packing Blocks (or Pairs for preference methods) per split.
    objective = objective_for(job)
    num_blocks, mb, ga = len(data["train"]), plan["micro_batch"], plan["grad_accum"]

    def checkpoint(done: int) -> None:
        state = gather_trainable_state(engine, scheduler, named, done, samples_seen)
        if exchange is not None:  # the global adapter, and every PC's own state (collective)
            add_pc_state(exchange, state)
        if link is not None:
            state["fingerprint"] = cfg["fingerprint"]
            state["peft_config"] = model.peft_config["default"]
            # The driver holds the state before training goes on.
            link.deliver({"kind": "checkpoint", **state})

    if fixing_malloc:  # every step dequantizes or gathers the same weights: the heap keeps them
        set_malloc_thresholds(TRAINING)
    engine.train()
    for step in range(start_step, job.train.max_steps):
        started, sent_before = time.perf_counter(), sent_bytes()
        loss_sum = torch.zeros((), device=device)
        tokens, figures = 0, [0.0] * len(objective.figures)
        for micro in range(ga):
            idx = micro_batch_indices(samples_seen, micro, rank, world, mb, num_blocks, job.data.seed)
            inputs, real = data["train"].batch(idx, device)
            loss, micro_figures = objective.loss(engine, inputs)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            tokens += real
            figures = [f + m / ga for f, m in zip(figures, micro_figures)]
        samples_seen += mb * ga * world
        # Rank 0 alone asks the driver whether to stop; the answer rides on the one
        # all-reduce each step already makes, so every rank stops at the same step.
        stop = 1.0 if link is not None and link.stop_requested() else 0.0
        sent = sent_bytes() - sent_before
        reduced = time.perf_counter()
        totals = collectives.reduce_numbers([loss_sum.item() / ga, tokens, stop, sent, *figures])
        if exchange is not None:
            exchange.blocked(time.perf_counter() - reduced)  # waiting for the other PCs
            exchange.tokens += tokens
        elapsed = time.perf_counter() - started
        done = step + 1
        last = done == job.train.max_steps
        if link is not None and (done % job.train.log_every == 0 or last):
            link.send({
                "kind": "step", "step": done, "loss": totals[0] / world,
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm(engine),
                "tokens": int(totals[1]), "tokens_per_s": totals[1] / elapsed,
                "step_time_s": elapsed, **memory_figures(on_gpu),
                **({"sent_bytes_per_worker": round(totals[3] / world)} if counting else {}),
                **{name: totals[4 + i] / world for i, name in enumerate(objective.figures)},
            })
        stopping = totals[2] > 0
        saving = stopping or last or done % job.train.checkpoint_every == 0
        # diloco: one outer step every H steps and at the last, whatever else happens; evals
        # run at exchanges (the global adapter exists only there), checkpoints at any step.
        exchanging = exchange is not None and exchange_due(done, plan["sync"]["every"], last)
        if exchange is None:
            due = done % job.train.eval_every == 0 or last
        else:
            due = exchanging and eval_due(done, exchange.last_exchange, job.train.eval_every, last)
        evaluating = data["eval"] is not None and due
        if exchanging:
            sent_before = sent_bytes()
            figures = exchange.sync(done)
            if link is not None:
                link.send({"kind": "sync", "step": done, "sync_bytes": figures.bytes_sent,
                           # what this PC's interface carried during the exchange, Ray's share too
                           **({"sync_sent_bytes": sent_bytes() - sent_before} if counting else {}),
                           "sync_seconds": figures.seconds, "sync_wait_s": figures.wait_s,
                           "adapter_checksums": figures.checksums})
        if evaluating:
            figures = evaluate(engine, data["eval"], objective, job, mb, rank, world)
            if link is not None:
                link.send({"kind": "eval", "step": done, **figures})
        if saving:
            checkpoint(done)
        if stopping:
            if link is not None:
                link.deliver({"kind": "stopped", "step": done})
            return

    state = gather_adapter(engine, named)
    if link is not None:
        # Delivered: the driver holds the adapter before this worker may exit.
        link.deliver({"kind": "adapter", "peft_config": model.peft_config["default"], "state_dict": state})


def evaluate(engine, split, objective, job: JobConfig, mb: int, rank: int, world: int) -> dict[str, float]:
    """The eval figures (``eval_loss``, weighted by tokens or pairs) over up to ``eval_batches``
    micro-batches of ``mb`` blocks per worker."""
    import torch

    from swarm.train.worker import collectives
    from swarm.train.worker.objective import eval_figures

    batches = min(job.train.eval_batches, max(1, math.ceil(len(split) / (mb * world))))
    device = engine.device
    totals = [0.0] * (2 + len(objective.figures))
    engine.eval()
    with torch.no_grad():
        for b in range(batches):
            # Wrap around so every rank runs the same number of forward passes.
            idx = [(b * world * mb + rank * mb + i) % len(split) for i in range(mb)]
            inputs, _ = split.batch(idx, device)
            totals = [t + float(s) for t, s in zip(totals, objective.eval_sums(engine, inputs))]
    engine.train()
    return eval_figures(objective, collectives.reduce_numbers(totals))
