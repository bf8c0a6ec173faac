"""GPU check cases: peak GPU memory of layer slices of Llama 3.1 8B and 70B against the plan.

A slice is the real shape (width, vocabulary, heads) with fewer decoder layers. For each
shape the check trains a 2-layer and a 6-layer slice the way one 16 GB PC would (``shard``:
ZeRO-3, parameters and optimizer in CPU RAM, bf16, seq_len 1024, micro-batch 1, the card
capped to 16 GiB) and fits ``peak = fixed + slope * layers`` through the two peaks, measured
(torch's peak allocated bytes in the second step) and planned (the plan's
``gpu_allocated_bytes`` for the same slice). The fixed part (embeddings, head, logits,
gathered parameters, LoRA state) and the per-layer slope (layer checkpoints, 4-bit
constants, and anything autograd keeps per layer, such as the 4-bit weights of issue 29)
must each be within 0.85-1.1 of the plan's.

The slices are built on the card with random weights and quantized there by bitsandbytes
(nothing is written to disk: a 6-layer 70B slice is 7.3 B parameters), then handed to
``swarm.train.worker.model.prepare_model``, the code every worker runs after reading its weights.
The plan is made for ``configs/hardware/one-4060ti-64gb-nvme.yaml`` (one 16 GB card, 64 GB
RAM), from a folder holding only the slice's ``config.json``.

``run(args)`` is the entry point for ``tests/gpu/check.py``; it reads ``args.work`` (a
folder for the configs) and returns one dict per shape (see ``run``).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HARDWARE = REPO / "configs" / "hardware" / "one-4060ti-64gb-nvme.yaml"
SHAPES = ("llama-3.1-8b", "llama-3.1-70b")  # ordered by value: the 8B runs in half the time
LAYERS = (2, 6)
SEQ_LEN = 1024
BAND = (0.85, 1.1)


def slice_config(shape: str, layers: int) -> dict:
    """The bundled ``config.json`` of ``shape`` with ``layers`` decoder layers."""
    from swarm.plan.shapes import bundled_config

    raw = bundled_config(shape)
    raw["num_hidden_layers"] = layers
    return raw


def slice_job(folder: Path, raw: dict):
    """The job for one slice: ``folder`` gets the slice's ``config.json`` (no weights)."""
    from swarm.config.models import JobConfig

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return JobConfig.model_validate({
        "model": {"path": str(folder)}, "data": {"files": ["unused.txt"], "seq_len": SEQ_LEN},
        "train": {"max_steps": 2, "micro_batch": 1, "grad_accum": 1, "lr": 1e-4, "strategy": "shard",
                  "precision": "bf16"},
        "offload": {"params": "cpu", "optimizer": "cpu"},
    })


def planned_allocated(job) -> tuple[int, object]:
    """The plan's GPU bytes that torch allocates (context and slack excluded), and the plan."""
    from swarm.plan import make_plan
    from swarm.plan.inventories import load_hardware

    plan = make_plan(job, load_hardware(HARDWARE).nodes)
    return plan.nodes[0].gpu_allocated_bytes, plan


def fixed_and_slope(points: dict[int, int]) -> tuple[float, float]:
    """``(fixed, per layer)`` of the line through two (layers, bytes) points."""
    (l1, b1), (l2, b2) = sorted(points.items())
    slope = (b2 - b1) / (l2 - l1)
    return b1 - slope * l1, slope


def within(measured: float, planned: float) -> bool:
    """The measured figure is within ``BAND`` of the planned one."""
    return planned > 0 and BAND[0] <= measured / planned <= BAND[1]


def build_slice(raw: dict, device: str, dtype):
    """A causal LM of ``raw``'s shape with random weights, every decoder linear layer in 4-bit.

    The layers transformers' bitsandbytes quantizer would quantize (every ``nn.Linear`` of
    the decoder layers; the head stays 16-bit), as it stores them for swarm: NF4, double
    quantization, codes stored in ``dtype`` so that ZeRO-3 partitions them. The model is
    made on the meta device and each part is given storage on ``device`` in turn, so that
    only one decoder layer is ever there in 16 bits.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    def materialise(module):
        module.to_empty(device=device, recurse=True)
        with torch.no_grad():
            for sub in module.modules():
                for param in sub.parameters(recurse=False):
                    if "Norm" in type(sub).__name__:
                        param.fill_(1.0)
                    else:
                        param.normal_(0.0, config.initializer_range)

    for layer in model.model.layers:
        materialise(layer)
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                              quant_storage=dtype, device="meta")
                # Params4bit quantizes when it is first moved to a device.
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4", quant_storage=dtype).to(device)
                if child.bias is not None:
                    quantized.bias = child.bias
                setattr(parent, name, quantized)
    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialise(part)
    # The rotary embedding's frequencies are a buffer computed at construction: make it again there.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.is_loaded_in_4bit = True  # what peft reads to wrap 4-bit layers (transformers sets it when loading)
    return model


def measure_peak(job, plan, device: str) -> tuple[int, float]:
    """Build, prepare and step one slice; torch's peak allocated bytes in the second step, and its seconds."""
    import deepspeed
    import torch

    from swarm.train.worker.model import DTYPES, prepare_model, trainable_parameters

    plan_dict = plan.to_dict()
    dtype = DTYPES[plan_dict["precision"]]
    model = prepare_model(build_slice(json.loads((Path(job.model.path) / "config.json").read_text()), device, dtype),
                          job, plan_dict, device)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for _, p in trainable_parameters(model)],
                                           config=plan_dict["deepspeed"])
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (1, SEQ_LEN), device=device)
    engine.train()
    for step in range(2):  # the first step records ZeRO-3's trace; the second runs as every later one
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated()
    engine.destroy()
    del engine, model, loss
    gc.collect()  # the pinned partitions and the optimizer go with the engine's last references
    torch.cuda.empty_cache()
    return peak, seconds


def compare(shape: str, measured: dict[int, int], planned: dict[int, int]) -> dict:
    """The row for one shape: both lines, their ratios, and whether each is within ``BAND``."""
    m_fixed, m_slope = fixed_and_slope(measured)
    p_fixed, p_slope = fixed_and_slope(planned)
    return {
        "case": f"slices-{shape}", "layers": sorted(measured),
        "measured_peak_bytes": measured, "planned_allocated_bytes": planned,
        "measured_fixed_bytes": round(m_fixed), "planned_fixed_bytes": round(p_fixed),
        "measured_per_layer_bytes": round(m_slope), "planned_per_layer_bytes": round(p_slope),
        "fixed_ratio": round(m_fixed / p_fixed, 3) if p_fixed else None,
        "per_layer_ratio": round(m_slope / p_slope, 3) if p_slope else None,
        "fixed_within": within(m_fixed, p_fixed), "per_layer_within": within(m_slope, p_slope),
    }


def run(args) -> list[dict]:
    """Every shape's slices on this machine's GPU, for ``tests/gpu/check.py``.

    Args:
        args: the check's parsed arguments; only ``args.work`` (a writable folder) is read.
            Call it after ``check.py`` has prepared the process
            (``swarm.train.runtime.prepare_process_env`` and the rendezvous variables); the
            card is capped to ``SWARM_GPU_MEMORY_GB`` (16 GiB when unset) here.

    Returns:
        One dict per shape: ``case``, the measured peaks and planned figures per layer count,
        the fixed part and per-layer slope of each with their ratios, and ``fixed_within`` /
        ``per_layer_within``; ``failed`` (one line) instead when a slice could not run, or
        ``skipped`` without a GPU. ``passed(row)`` says whether the check should count the row
        as passed, ``describe(row)`` gives its line of output.
    """
    import torch

    if not torch.cuda.is_available():
        return [{"case": f"slices-{shape}", "skipped": "no CUDA GPU"} for shape in SHAPES]
    import deepspeed

    from swarm.hardware import gpu_memory_cap_bytes
    from swarm.train.worker.device import memory_fraction

    device = f"cuda:{torch.cuda.current_device()}"
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = memory_fraction(gpu_memory_cap_bytes() or 16 * 2**30, total)
    if fraction:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    deepspeed.init_distributed(dist_backend="nccl")  # a no-op when check.py already made the group
    rows = []
    for shape in SHAPES:
        measured, planned, seconds = {}, {}, {}
        try:
            for layers in LAYERS:
                job = slice_job(Path(args.work) / f"{shape}-{layers}-layers", slice_config(shape, layers))
                planned[layers], plan = planned_allocated(job)
                measured[layers], seconds[layers] = measure_peak(job, plan, device)
        except Exception as exc:  # noqa: BLE001 - one shape failing must not hide the other's figures
            why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
            rows.append({"case": f"slices-{shape}", "failed": why, "measured_peak_bytes": measured,
                         "planned_allocated_bytes": planned})
            continue
        rows.append({**compare(shape, measured, planned), "step_s": seconds})
    return rows


def passed(row: dict) -> bool:
    """A row passes when it was skipped (no GPU) or both its ratios are within ``BAND``."""
    return "skipped" in row or (row.get("fixed_within", False) and row.get("per_layer_within", False))


def describe(row: dict) -> str:
    """One line for the check's output."""
    if "fixed_ratio" not in row:
        return f"{row['case']}: {row.get('skipped') or row.get('failed')}"
    gib, mib = 2**30, 2**20
    return (f"{row['case']}: fixed {row['measured_fixed_bytes'] / gib:.2f} GiB "
            f"(plan {row['planned_fixed_bytes'] / gib:.2f}, x{row['fixed_ratio']}), "
            f"per layer {row['measured_per_layer_bytes'] / mib:.0f} MiB "
            f"(plan {row['planned_per_layer_bytes'] / mib:.0f}, x{row['per_layer_ratio']})"
            f"{'' if passed(row) else ': OUTSIDE 0.85-1.1'}")
