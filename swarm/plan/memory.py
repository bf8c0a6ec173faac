"""Memory of one training worker and one node, term by term, for each strategy.

Every figure is a named :class:`Term` so that a plan can show what dominates and which term
breaks a node. Terms belong to a phase: ``load`` (reading the checkpoint), ``train`` (steps)
or ``always``; a peak is the larger of the two phases. They also have a scope: ``worker``
(inside one training process, comparable with its RSS or torch's peak allocated memory) or
``node`` (shared daemons: Ray, the object store, the operating system).

Sources of the formulas:

- Model states: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models" (arXiv:1910.02054) §3.1 (2 + 2 + 12 bytes per trainable parameter for
  mixed-precision Adam) and DeepSpeed's ``estimate_zero3_model_states_mem_needs``
  (deepspeed/runtime/zero/stage3.py: 18 bytes per parameter including the fp32 gradient
  partition). Here those bytes apply to the LoRA parameters only; the base is frozen.
- 4-bit storage: Dettmers et al., "QLoRA" (arXiv:2305.14314) §3: NF4 codes take 4 bits; one
  fp32 absmax per 64-weight block is 0.5 bit per weight, and double quantization stores it as
  8 bits plus one fp32 constant per 256 blocks, 8/64 + 32/(64*256) = 0.127 bit per weight.
- Activations: Korthikanti et al. (arXiv:2205.05198), redone for Llama-style blocks in
  ``swarm.plan.activations``.
- DeepSpeed buffers: the ZeRO-3 config reference (stage3_prefetch_bucket_size,
  stage3_max_live_parameters, stage3_param_persistence_threshold, reduce_bucket_size) and
  deepspeed/runtime/zero/stage3.py, which allocates the reduce bucket eagerly at full size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.plan.activations import activation_terms
from swarm.plan.shapes import ModelShape
from swarm.plan.strategy import Strategy
from swarm.plan.workload import Workload

GiB = 1024**3
PLACES = ("gpu", "ram", "nvme")
KEPT_4BIT = "4-bit weights kept by autograd (no checkpointing)"


@dataclass(frozen=True)
class Overheads:
    """Fixed costs, kept in one place so that calibration against measured peaks can set them."""

    cuda_context: int = int(0.6 * GiB)  # context, cuBLAS workspace, kernels; outside torch's allocator
    allocator_slack: float = 0.07  # fragmentation of the caching allocator, share of allocations
    gpu_worker_process: int = int(2.0 * GiB)  # host RSS of a CUDA worker: python, torch, CUDA libraries
    # CPU workers, measured here (docs/plan.md, "Calibration"; RSS sampled every 3 ms inside
    # the Ray Train worker of `swarm train`): just before its model loads, a CPU worker
    # (python, torch, DeepSpeed, transformers, peft, bitsandbytes, Ray, the packed data) held
    # 570-590 MiB in 10 runs; a whole run on the 426k-parameter tiny model, whose model terms
    # are a few MiB, peaked at 616 MiB then and at 673-674 MiB on 2026-12-07 (4 runs, with and
    # without swarm's malloc thresholds: the worker has grown, not its allocator).
    cpu_worker_process: int = int(0.65 * GiB)
    # Loading on a CPU worker copies every weight out of the mapped checkpoint into a full-size
    # buffer (ZeRO-3 gathers each module to write it into its partition; bitsandbytes casts
    # and quantizes each weight). A worker loads with glibc's mmap threshold fixed at 1 MiB
    # (swarm.train.runtime.LOADING), so each copy goes back when freed; what stays beyond the
    # kept weights and the mapped file, as a share of the weights' bytes, was -0.06 (fp32
    # Llama), 0.06 (4-bit Llama, with torch's AVX512 and its AVX2 kernels) and 0.09 (4-bit
    # Qwen2) on the 129M calibration models (docs/plan.md, "Calibration"). Under glibc's
    # dynamic threshold it was 0.37-0.82, and varied with the CPU's kernels.
    cpu_load_retained: float = 0.05
    # Training a 4-bit base on a CPU worker dequantizes every weight to the compute dtype in
    # each forward, recomputation and backward. A worker trains with glibc's mmap threshold
    # at 32 MiB (swarm.train.runtime.TRAINING), so the heap keeps those buffers for the
    # next step, as many as the order of allocations leaves unused: 0.44-0.85 of the
    # quantized weights' bytes in the compute dtype, above the other training terms, in
    # 3-12-step runs of the 129M 4-bit Llama with torch's AVX512 and AVX2 kernels. At 0.8 the
    # largest (1332 MiB, in 3- and 8-step runs) is 2% above the plan, the loading peak 5% below.
    cpu_dequant_retained: float = 0.8
    ray_node: int = int(0.3 * GiB)  # raylet and dashboard agent on every node
    ray_head: int = int(1.0 * GiB)  # GCS and dashboard on the first node
    # The swarm driver (`swarm train`'s own process): python with torch, transformers,
    # datasets, Ray's client and the tokenizer. Its peak RSS in a run of configs/demo.yaml
    # was 669 MiB (PSS 533 MiB), sampled every 0.3 s, 2026-12-02.
    driver_process: int = int(0.65 * GiB)
    # Preparing the data (swarm.data.prepare: numpy arrays, never a Python object per token)
    # raises the driver's peak by this much per token, and once the blocks are in Ray's
    # object store it keeps this much: `python tests/bench/bench_data.py --tokens 1e7` and
    # `--tokens 5e7`, instruction records, seq_len 2048: peak 590 and 1,370 MiB over 241 MiB
    # before (10.8M and 54.1M tokens: 19 bytes a token between them), kept 100 and 213 MiB
    # (2.7 bytes a token) (docs/data.md, "How far it scales").
    driver_bytes_per_token: float = 19.0
    driver_kept_bytes_per_token: float = 2.7
    # Bytes a token takes in Ray's object store: ids (4), loss mask (1), positions (2), padding.
    stored_bytes_per_token: float = 7.5
    os_and_desktop: int = int(2.0 * GiB)
    shard_bytes: int = 5 * 10**9  # transformers' default max_shard_size
    ram_limit_fraction: float = 0.95  # Ray's memory monitor kills workers above this share


OVERHEADS = Overheads()


@dataclass(frozen=True)
class ZeroKnobs:
    """DeepSpeed buffer sizes (in elements) the plan assumes and the DeepSpeed config must use."""

    reduce_bucket_size: int
    param_buffer_size: int
    # DeepSpeed's 5e8-1e9 defaults suit datacenter cards; swarm.plan.deepspeed writes these.
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 100_000_000
    max_reuse_distance: int = 100_000_000
    param_persistence_threshold: int = 100_000
    sub_group_size: int = 100_000_000
    param_buffer_count: int = 5
    optimizer_buffer_count: int = 4


@dataclass(frozen=True)
class Term:
    """One named memory figure of a worker or a node."""

    name: str
    where: str  # gpu, ram or nvme
    bytes: int
    phase: str = "always"  # always, load or train
    scope: str = "worker"  # worker or node

    def to_dict(self) -> dict:
        return {"name": self.name, "where": self.where, "bytes": self.bytes, "phase": self.phase, "scope": self.scope}


def quant_constant_bytes(quantized: int, double_quant: bool) -> int:
    """Bytes of bitsandbytes' 4-bit block constants for ``quantized`` weights (blocksize 64)."""
    blocks = math.ceil(quantized / 64)
    if not double_quant:
        return blocks * 4  # one fp32 absmax per block
    return blocks + math.ceil(blocks / 256) * 4 + 4  # 8-bit absmax, fp32 per 256 blocks, offset


def optimizer_bytes_per_param(optimizer: str, compute_bytes: int) -> int:
    """Optimizer-side bytes per trainable parameter: fp32 master and gradient, plus moments.

    AdamW keeps two fp32 moments (8 bytes), bitsandbytes' 8-bit AdamW two 8-bit ones, and
    Adafactor a factored second moment of negligible size. Under fp32 training the weights
    are their own master copy.
    """
    moments = {"adamw": 8, "adamw_8bit": 2, "adafactor": 0}[optimizer]
    master_and_grad = 8 if compute_bytes < 4 else 4
    return master_and_grad + moments


def choose_knobs(shape: ModelShape, work: Workload, world: int) -> ZeroKnobs:
    """DeepSpeed buffer sizes that suit a QLoRA job.

    The reduce bucket is allocated at full size, so it is capped at the trainable parameter
    count (DeepSpeed's 5e8 default would cost 1 GB for a few million LoRA elements). An NVMe
    parameter buffer must hold the largest partition (DeepSpeed asserts it does).
    """
    lora = shape.lora_params(work.lora_targets, work.lora_r)
    largest = max(_storage_numel(g.weight_numel, g.quantizable and work.bits == 4, work.compute_bytes)
                  for g in shape.groups)
    return ZeroKnobs(
        reduce_bucket_size=max(1, min(50_000_000, lora)),
        param_buffer_size=max(100_000_000, math.ceil(largest / world)),
    )


def worker_terms(shape: ModelShape, work: Workload, strategy: Strategy, world: int,
                 knobs: ZeroKnobs, device: str = "gpu", overheads: Overheads = OVERHEADS) -> list[Term]:
    """Memory of one training worker.

    Args:
        shape: the model.
        work: sequence length, micro-batch, LoRA and quantization settings.
        strategy: ZeRO stage and offload targets.
        world: number of workers across all nodes (ZeRO partitions over all of them).
        knobs: DeepSpeed buffer sizes.
        device: ``gpu`` or ``cpu``; on a CPU worker every device term lives in RAM.
        overheads: fixed costs.

    Returns:
        Terms of this worker; ``where`` says which memory each one uses.
    """
    d = work.compute_bytes
    dev = "gpu" if device == "gpu" else "ram"
    quantized = shape.quantizable_params if work.bits == 4 else 0
    lora = shape.lora_params(work.lora_targets, work.lora_r)
    terms: list[Term] = []

    def add(name, where, nbytes, phase="always"):
        if nbytes > 0:
            terms.append(Term(name, where, int(nbytes), phase))

    # Frozen base and adapter weights.
    if strategy.zero_stage < 3:
        add("4-bit base weights", dev, quantized // 2)
        add("16-bit weights (embeddings, head, norms)", dev, (shape.total_params - quantized) * d)
        add("LoRA weights", dev, lora * d)
    else:
        persistent, partitioned, largest_module = zero3_elements(shape, work, knobs)
        part_bytes = math.ceil(partitioned / world) * d
        add("ZeRO-3 small persistent params", dev, persistent * d)
        if strategy.offload_params == "none":
            add("ZeRO-3 parameter partition", dev, part_bytes)
        elif strategy.offload_params == "cpu":
            # A GPU worker partitions the base it loaded into RAM one parameter at a time,
            # freeing each whole copy as its partition is made: at the load peak the two
            # together never exceed the loaded base, which the load term below counts.
            add("offloaded parameter partition (pinned)", "ram", part_bytes,
                "train" if device == "gpu" and quantized else "always")
        else:
            add("parameter partition on NVMe", "nvme", part_bytes)
            add("NVMe parameter swap buffers (pinned)", "ram", knobs.param_buffer_count * knobs.param_buffer_size * d)
        # Gathered for compute: the module running now, plus what is prefetched for the next
        # ones or kept for reuse (both bounded by max_live_parameters).
        ahead = knobs.prefetch_bucket_size + knobs.max_reuse_distance
        live = largest_module + min(ahead, knobs.max_live_parameters)
        add("ZeRO-3 gathered params (live + prefetch)", dev, min(live, partitioned) * d, "train")
    # The absmax constants are attributes of the weight (its quant_state), not parameters, so
    # ZeRO neither partitions nor offloads them: every worker holds all of them.
    add("4-bit quantization constants", dev, quant_constant_bytes(quantized, work.double_quant))
    if quantized:
        # bitsandbytes dequantizes one weight at a time to 16-bit for the matmul.
        add("4-bit dequantize buffer", dev, shape.largest_quantizable_numel * d, "train")
        if device == "cpu":
            add("4-bit dequantized copies kept by malloc", "ram", overheads.cpu_dequant_retained * quantized * d, "train")
    if quantized and strategy.zero_stage == 3 and not work.gradient_checkpointing:
        # bitsandbytes' MatMul4Bit keeps a view of the weight it multiplied by in its autograd
        # node (ctx.tensors) until backward. Without checkpointing every layer's node lives
        # through the forward, so every gathered 4-bit weight that ZeRO-3 released stays on the
        # device: the whole 4-bit base. (With checkpointing swarm recomputes reentrantly and the
        # forward keeps no node; under ZeRO-2 the view is of the resident weight itself.)
        add(KEPT_4BIT, dev, sum(_storage_numel(g.weight_numel, True, d) * d * g.count
                                for g in shape.groups if g.quantizable), "train")
    if work.dora:
        # peft's DoRA takes the norm of W + scale * B @ A per layer: the dequantized weight,
        # B @ A and their sum, in fp32, for the largest adapted layer at a time.
        add("DoRA weight norm (one layer's matrices)", dev, 3 * shape.largest_quantizable_numel * 4, "train")

    # Trainable state: gradients and optimizer (LoRA parameters only), partitioned by ZeRO.
    per_param = optimizer_bytes_per_param(work.optimizer, d)
    share = math.ceil(lora / world)
    # DeepSpeed allocates the bucket at full size; on a CPU only the pages written (at
    # most the trainable count) become resident.
    bucket = knobs.reduce_bucket_size if device == "gpu" else min(knobs.reduce_bucket_size, lora)
    add("gradient reduce bucket", dev, bucket * d, "train")
    if strategy.offload_optimizer == "none":
        add("optimizer state partition", dev, share * per_param, "train")
    elif strategy.offload_optimizer == "cpu":
        add("offloaded optimizer state (CPU Adam)", "ram", share * per_param, "train")
    else:
        group = min(share, knobs.sub_group_size)
        add("optimizer state on NVMe", "nvme", share * (per_param - 4), "train")
        add("fp32 gradient partition", "ram", share * 4, "train")
        add("NVMe optimizer swap buffers (pinned)", "ram", knobs.optimizer_buffer_count * group * 4, "train")
        add("CPU Adam working sub-group", "ram", group * (per_param - 4), "train")

    for name, nbytes in activation_terms(shape, work):
        add(name, dev, nbytes, "train")

    # Loading: transformers reads one checkpoint shard at a time and quantizes tensor by tensor.
    # The shard is memory-mapped; its pages count in the RSS once read (on CPU workers the
    # shared RSS rose by 95-105% of the file's size at the load peak in every calibration run).
    # A 4-bit base that ZeRO-3 will shard is loaded into host RAM first (a GPU worker cannot
    # hold it whole; see swarm.train.worker.device.loading_arguments), then partitioned; so is any
    # base a diloco PC shards (partitioned over the PC's workers, not by transformers).
    largest_tensor = max(g.weight_numel for g in shape.groups)
    loads_in_ram = strategy.zero_stage == 3 and ((device == "gpu" and quantized) or work.partition_per_pc)
    add("loading: one tensor in 16-bit", "ram" if loads_in_ram else dev, largest_tensor * shape.checkpoint_dtype_bytes,
        "load")
    if loads_in_ram:
        kind = "4-bit" if quantized else "16-bit"
        add(f"loading: whole {kind} base in RAM before ZeRO-3 partitions it", "ram",
            quantized // 2 + (shape.total_params - quantized) * d, "load")
    add("loading: checkpoint shard in memory", "ram",
        min(overheads.shard_bytes, shape.total_params * shape.checkpoint_dtype_bytes), "load")

    if device == "gpu":
        allocated = sum(t.bytes for t in terms if t.where == "gpu" and t.phase != "load")
        add("CUDA allocator slack", "gpu", allocated * overheads.allocator_slack, "train")
        add("CUDA context", "gpu", overheads.cuda_context)
        add("worker process (python, torch, CUDA)", "ram", overheads.gpu_worker_process)
    else:
        allocated = sum(t.bytes for t in terms if t.where == "ram" and t.phase != "load")
        add("allocator slack", "ram", allocated * overheads.allocator_slack, "train")
        add("loading: freed copies kept by malloc", "ram", overheads.cpu_load_retained * shape.total_params * d, "load")
        add("worker process (python, torch)", "ram", overheads.cpu_worker_process)
    return terms


def checkpoint_bytes(lora_params: int, optimizer: str) -> int:
    """Bytes of one checkpoint's tensors: fp32 LoRA weights and, for AdamW, its two fp32 moments."""
    return lora_params * (4 + (8 if optimizer == "adamw" else 0))


def node_terms(work: Workload, is_head: bool, overheads: Overheads = OVERHEADS, lora_params: int = 0) -> list[Term]:
    """Memory shared by the workers of one node: Ray, its object store, the operating system.

    On the head, the driver's share grows with the data it prepares (``work.data_tokens``)
    and includes the newest checkpoint twice: the run's mailbox
    keeps it (so a restarted worker group resumes from it before it is on disk) and the
    driver holds it while writing it (2.5 GB each for Llama 3.1 70B at r=16 with AdamW).
    """
    terms = [
        Term("operating system and desktop", "ram", overheads.os_and_desktop, scope="node"),
        Term("Ray object store", "ram", work.object_store_bytes, scope="node"),
        Term("Ray daemons (raylet, agent)", "ram", overheads.ray_node, scope="node"),
    ]
    if is_head:
        terms.append(Term("Ray head (GCS, dashboard)", "ram", overheads.ray_head, scope="node"))
        terms.append(Term("swarm driver", "ram", overheads.driver_process, scope="node"))
        if work.data_tokens:
            # Counted with the loading phase: the driver prepares the data before the workers
            # load the model, so this overstates the loading peak a little, never the training one.
            terms.append(Term("swarm driver: preparing the data", "ram",
                              int(overheads.driver_bytes_per_token * work.data_tokens), "load", "node"))
            terms.append(Term("swarm driver: kept after preparing the data", "ram",
                              int(overheads.driver_kept_bytes_per_token * work.data_tokens), "train", "node"))
        terms.append(Term("newest checkpoint in the mailbox and the driver", "ram",
                          2 * checkpoint_bytes(lora_params, work.optimizer), "train", "node"))
    return terms


def peak(terms: list[Term], where: str) -> int:
    """The larger of the loading and the training phase for one memory."""
    return max(sum(t.bytes for t in terms if t.where == where and t.phase in ("always", phase))
               for phase in ("load", "train"))


def peak_terms(terms: list[Term], where: str) -> list[Term]:
    """The terms of the phase that gives ``where`` its peak, largest first."""
    phases = {ph: [t for t in terms if t.where == where and t.phase in ("always", ph)] for ph in ("load", "train")}
    worst = max(phases.values(), key=lambda ts: sum(t.bytes for t in ts))
    return sorted(worst, key=lambda t: -t.bytes)


def _storage_numel(numel: int, quantized: bool, d: int) -> int:
    # A 4-bit weight is stored packed in a d-byte dtype (bnb_4bit_quant_storage) so that
    # ZeRO-3 can partition it: numel/2 bytes, numel/(2d) elements.
    return math.ceil(numel / (2 * d)) if quantized else numel


def zero3_elements(shape: ModelShape, work: Workload, knobs: ZeroKnobs) -> tuple[int, int, int]:
    """(persistent, partitioned, largest gathered module) in storage elements under ZeRO-3.

    DeepSpeed keeps every parameter with at most ``param_persistence_threshold`` elements
    whole on every worker (norms, biases, most LoRA A matrices) and partitions the rest.
    """
    d = work.compute_bytes
    threshold = knobs.param_persistence_threshold
    persistent = partitioned = largest = 0
    params: list[tuple[int, int]] = []
    for g in shape.groups:
        weight = _storage_numel(g.weight_numel, g.quantizable and work.bits == 4, d)
        params += [(weight, g.count), (g.other_numel, g.count)]
        module = sum(n for n in (weight, g.other_numel) if n > threshold)
        largest = max(largest, module)
    params += shape.lora_numels(work.lora_targets, work.lora_r)
    for numel, count in params:
        if numel == 0:
            continue
        if numel <= threshold:
            persistent += numel * count
        else:
            partitioned += numel * count
    return persistent, partitioned, largest
