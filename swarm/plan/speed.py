"""Bytes exchanged per step and an estimate of step time, per strategy.

The estimate is a roofline: each micro-step takes the longest of its compute, its memory
traffic for 4-bit dequantization, its PCIe or NVMe transfers and its network transfers, plus
a share of the others for the overlap DeepSpeed does not achieve. It ranks strategies and
gives an order of magnitude; calibration against measured steps can set its constants.

FLOPs follow Kaplan et al. / Narayanan et al. (arXiv:2104.04473 §5.1): a matmul with N
weights costs 2N FLOPs per token forward. The frozen base needs no weight gradients, so
backward costs 2N (input gradients only) instead of 4N, and checkpointing recomputes the
forward once: 6N per token with checkpointing, 4N without. Causal attention adds
2 * seq * heads * head_dim per layer and token forward (half of QK^T and AV), twice that
backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.plan.gpus import CPU_DEVICE, GpuSpec
from swarm.plan.memory import ZeroKnobs, zero3_elements
from swarm.plan.shapes import ModelShape
from swarm.plan.strategy import Strategy
from swarm.plan.workload import Workload

MATMUL_EFFICIENCY = 0.4  # share of peak tensor TFLOPS a QLoRA step reaches on consumer cards
MEMORY_EFFICIENCY = 0.7  # share of peak memory bandwidth a dequantize kernel reaches
OVERLAP_PENALTY = 0.25  # share of the non-dominant times that does not overlap
DEFAULT_LINK_GBPS = 1.0  # home Ethernet
LINK_EFFICIENCY = 0.9  # TCP payload share of a link's rate
DEFAULT_NVME_BYTES_PER_S = 2.0e9  # consumer PCIe 3/4 drive, sustained
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed's CPUAdam on a desktop CPU
# CPU step times are rough, and every one shown says so. On a real 30-layer model,
# SmolLM2-135M-Instruct with seq_len 256 and micro_batch 4 x grad_accum 2 on a 2-core machine,
# the plan said 11.4 s per step and swarm train measured 6.8 s (1.7x too slow; issue 33). On
# configs/demo.yaml's tiny model the plan says 5 ms and a step takes 0.14 s (README's 1,824
# tok/s) to 2.4 s (a run on a busy 2-core machine, 2026-12-07): fixed per-step costs (DeepSpeed,
# gloo, Ray, offload bookkeeping), which the roofline leaves out, dominate there.
CPU_STEP_CAVEAT = "rough on CPUs: about 2x off for a 135M model, far more for tiny ones"
# Collectives that run once per optimizer step; the others run in every micro-step.
AT_STEP_BOUNDARY = ("all-gather LoRA weights",)


@dataclass(frozen=True)
class Links:
    """Transfer rates seen by one worker, bytes per second."""

    network: float | None  # between nodes; None when the job stays on one node
    intra_node: float  # between GPUs of one node (through the host)
    pcie: float
    nvme: float


@dataclass(frozen=True)
class StepEstimate:
    """Time of one optimizer step on one worker.

    Attributes:
        seconds: the whole step (all micro-steps and the optimizer step).
        parts: seconds per micro-step by kind (compute, dequantize, pcie, nvme, network) and
            the optimizer step.
        bottleneck: the largest part.
        bytes_sent: bytes this worker sends to other workers per optimizer step.
    """

    seconds: float
    parts: dict[str, float]
    bottleneck: str
    bytes_sent: int

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "parts": self.parts, "bottleneck": self.bottleneck,
                "bytes_sent": self.bytes_sent}


def flops_per_token(shape: ModelShape, work: Workload) -> float:
    """Training FLOPs per token for QLoRA (frozen base, trainable adapters)."""
    lora = shape.lora_params(work.lora_targets, work.lora_r)
    embeddings = sum(g.params for g in shape.groups if g.kind == "embedding")
    matmul = shape.total_params - embeddings + (embeddings if shape.tie_word_embeddings else 0)
    forward = 2 * (matmul + lora)
    attention = 2 * work.seq_len * shape.num_heads * shape.head_dim * shape.num_layers
    passes = 3 if work.gradient_checkpointing else 2  # forward, backward, recompute
    # Backward of the base: input gradients (2N); of the adapters: also weight gradients.
    total = passes * forward + 2 * 2 * lora
    # DPO's reference: one more forward pass, without gradients.
    return total + (passes + 1) * attention + work.reference_passes * (forward + attention)


def traffic_per_step(shape: ModelShape, work: Workload, strategy: Strategy, world: int,
                     knobs: ZeroKnobs, grad_accum: int) -> dict[str, int]:
    """Bytes one worker sends to the others per optimizer step, by collective.

    Ring collectives send (W-1)/W of the data per worker for a reduce-scatter or an
    all-gather and twice that for an all-reduce. Replicated training (ZeRO-2) exchanges
    only LoRA gradients and the updated LoRA weights; sharded training (ZeRO-3) also gathers every
    partitioned frozen parameter in each forward, backward and recomputation.
    """
    if world <= 1:
        return {}
    d = work.compute_bytes
    share = (world - 1) / world
    lora = shape.lora_params(work.lora_targets, work.lora_r)
    if strategy.zero_stage == 2:
        # DeepSpeed ZeRO-2 reduces gradients during every backward, not only at the boundary.
        return {"reduce-scatter LoRA gradients": int(grad_accum * share * lora * d),
                "all-gather LoRA weights": int(share * lora * d)}
    _, partitioned, _ = zero3_elements(shape, work, knobs)
    passes = weight_passes(work)
    return {"all-gather parameters": int(grad_accum * passes * share * partitioned * d),
            "reduce-scatter LoRA gradients": int(grad_accum * share * lora * d)}


def weight_passes(work: Workload) -> int:
    """Passes over the base's weights per micro-step: forward, backward, recomputation, reference."""
    return (3 if work.gradient_checkpointing else 2) + work.reference_passes


def estimate_step(shape: ModelShape, work: Workload, strategy: Strategy, world: int,
                  knobs: ZeroKnobs, grad_accum: int, device: GpuSpec, links: Links) -> StepEstimate:
    """Seconds per optimizer step of one worker on ``device``.

    Args:
        shape, work, strategy, world, knobs: as for the memory estimate.
        grad_accum: micro-steps per optimizer step.
        device: the worker's GPU figures (``gpus.CPU_DEVICE`` for a CPU worker).
        links: its network, PCIe and NVMe rates.
    """
    d = work.compute_bytes
    on_cpu = device is CPU_DEVICE
    tokens = work.seq_len * work.micro_batch * work.sequences
    passes = weight_passes(work)
    quantized = shape.quantizable_params if work.bits == 4 else 0
    lora = shape.lora_params(work.lora_targets, work.lora_r)
    micro: dict[str, float] = {
        "compute": flops_per_token(shape, work) * tokens / (device.tflops * 1e12 * MATMUL_EFFICIENCY),
        # Each pass reads the packed weight, writes the 16-bit one and the matmul reads it back;
        # DoRA dequantizes each adapted weight once more for its norm.
        "dequantize": (passes + work.dora * passes) * quantized * (0.5 + 2 * d)
        / (device.mem_gbs * 1e9 * MEMORY_EFFICIENCY),
    }
    if strategy.zero_stage == 3 and strategy.offload_params != "none":
        _, partitioned, _ = zero3_elements(shape, work, knobs)
        moved = passes * math.ceil(partitioned / world) * d
        if not on_cpu:
            micro["pcie"] = moved / links.pcie
        if strategy.offload_params == "nvme":
            micro["nvme"] = moved / links.nvme
    traffic = traffic_per_step(shape, work, strategy, world, knobs, grad_accum)
    sent = sum(traffic.values())
    rate = links.network if links.network else links.intra_node
    per_micro = sum(v for k, v in traffic.items() if k not in AT_STEP_BOUNDARY)
    if per_micro:
        micro["network"] = per_micro / grad_accum / rate
    dominant = max(micro.values())
    micro_seconds = dominant + OVERLAP_PENALTY * (sum(micro.values()) - dominant)

    share = math.ceil(lora / world)
    if strategy.offload_optimizer == "none":
        opt = share * 32 / (device.mem_gbs * 1e9 * MEMORY_EFFICIENCY)  # read and write 16 B/param
    else:
        opt = share / CPU_ADAM_PARAMS_PER_S
        if not on_cpu:
            opt += share * (4 + d) / links.pcie  # fp32 gradients down, 16-bit weights up
        if strategy.offload_optimizer == "nvme":
            opt += 2 * share * 12 / links.nvme
    opt += (sent - per_micro) / rate if sent - per_micro else 0.0
    parts = {k: round(v, 6) for k, v in micro.items()}
    parts["optimizer step"] = round(opt, 6)
    seconds = grad_accum * micro_seconds + opt
    bottleneck = max(micro, key=micro.get)
    if opt > grad_accum * micro[bottleneck]:
        bottleneck = "optimizer step"
    return StepEstimate(seconds=seconds, parts=parts, bottleneck=bottleneck, bytes_sent=int(sent))


def links_for(pcie_gbs: float, nvme_bytes_per_s: float | None, link_gbps: float | None, multi_node: bool) -> Links:
    """Transfer rates of a worker, from its card's PCIe rate, its drive and the home link."""
    network = None
    if multi_node:
        network = (link_gbps or DEFAULT_LINK_GBPS) * 1e9 / 8 * LINK_EFFICIENCY
    return Links(
        network=network,
        intra_node=pcie_gbs * 1e9 / 2,  # GPU to GPU through host memory: two PCIe hops
        pcie=pcie_gbs * 1e9,
        nvme=nvme_bytes_per_s or DEFAULT_NVME_BYTES_PER_S,
    )
