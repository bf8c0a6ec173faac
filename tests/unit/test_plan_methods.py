"""What the planner counts for preference training, DoRA, and the data the driver prepares."""

from __future__ import annotations

from dataclasses import replace

import pytest

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import GpuInfo, NodeInventory
from swarm.plan import memory as mem
from swarm.plan.activations import activation_terms
from swarm.plan.decide import make_plan, workload_from_job
from swarm.plan.shapes import load_shape
from swarm.plan.speed import flops_per_token, traffic_per_step
from swarm.plan.strategy import Strategy, allowed_strategies

GiB = 1024**3
PC = NodeInventory(hostname="desktop", ram_bytes=64 * GiB, gpus=(GpuInfo("RTX 4090", 24 * GiB),))


def job(method="sft", **sections) -> JobConfig:
    data = {"files": ["pairs.jsonl" if method != "sft" else "train.jsonl"], "seq_len": 1024,
            "format": "preference" if method != "sft" else "instruction", **sections.pop("data", {})}
    train = {"method": method, "micro_batch": 2, "grad_accum": 8, **sections.pop("train", {})}
    return JobConfig.model_validate({"model": {"path": "llama-3.1-8b"}, "data": data, "train": train, **sections})


def test_dpo_counts_both_answers_and_the_reference_pass():
    shape = load_shape("llama-3.1-8b")
    sft, dpo, orpo = (workload_from_job(job(m)) for m in ("sft", "dpo", "orpo"))
    assert (dpo.sequences, dpo.reference_passes) == (2, 1) and (orpo.sequences, orpo.reference_passes) == (2, 0)
    # A pair is two sequences: the activations of micro-batch 2 are those of 4 sequences.
    assert activation_terms(shape, dpo) == activation_terms(shape, replace(sft, micro_batch=4))
    assert activation_terms(shape, orpo) == activation_terms(shape, dpo)
    # The reference adds one forward pass (2N per token) to forward, recomputation and
    # backward (6N with checkpointing): a third more compute per token. ZeRO-3 gathers for it too.
    assert flops_per_token(shape, orpo) == flops_per_token(shape, sft)
    assert 0.3 < flops_per_token(shape, dpo) / flops_per_token(shape, sft) - 1 < 0.36
    knobs = mem.choose_knobs(shape, sft, 2)
    zero3 = Strategy(3)
    gathered = {w: traffic_per_step(shape, w, zero3, 2, knobs, 8)["all-gather parameters"] for w in (sft, dpo)}
    assert gathered[dpo] == gathered[sft] * 4 // 3  # forward, recomputation, backward + the reference


def test_a_dpo_plan_needs_more_than_the_same_sft_plan():
    sft, dpo = make_plan(job("sft"), [PC]), make_plan(job("dpo"), [PC])
    assert sft.fits and dpo.fits
    if dpo.micro_batch == sft.micro_batch and dpo.strategy == sft.strategy:
        assert dpo.nodes[0].gpu_bytes > sft.nodes[0].gpu_bytes
        assert dpo.step_seconds > sft.step_seconds
    else:  # the planner had to give DPO a smaller micro-batch or another strategy
        assert dpo.micro_batch < sft.micro_batch or dpo.strategy != sft.strategy


def test_dora_on_a_4bit_base_is_kept_off_zero3():
    dora = job(lora={"use_dora": True})
    assert all(s.zero_stage == 2 for s in allowed_strategies(dora))
    plan = make_plan(dora, [PC])
    assert plan.strategy.zero_stage == 2
    assert any(t.name.startswith("DoRA weight norm") for t in plan.nodes[0].terms)
    with pytest.raises(UserError, match="lora.use_dora with a 4-bit base cannot train under ZeRO-3"):
        allowed_strategies(job(lora={"use_dora": True}, train={"strategy": "shard"}))
    with pytest.raises(UserError, match="lora.use_dora with a 4-bit base"):
        allowed_strategies(job(lora={"use_dora": True}, offload={"params": "cpu"}))
    sixteen = job(lora={"use_dora": True}, quantization={"bits": None}, train={"strategy": "shard"})
    assert {s.zero_stage for s in allowed_strategies(sixteen)} == {3}


def test_the_driver_counts_the_data_it_prepares():
    work = workload_from_job(job(), data_tokens=50_000_000)
    head = {t.name: t for t in mem.node_terms(work, True)}
    preparing = head["swarm driver: preparing the data"]
    assert preparing.phase == "load" and preparing.bytes == 19 * 50_000_000
    assert head["swarm driver: kept after preparing the data"].bytes == int(2.7 * 50_000_000)
    assert head["swarm driver"].bytes == int(0.65 * GiB)
    assert not any("driver" in t.name for t in mem.node_terms(work, False))  # only the head runs the driver
    small = make_plan(job(), [PC], data_tokens=1_000_000)
    big = make_plan(job(), [PC], data_tokens=500_000_000)
    assert not any("object store" in n for n in small.notes)
    assert any("larger than Ray's object store" in n for n in big.notes)
    assert big.nodes[0].ram_bytes > small.nodes[0].ram_bytes
