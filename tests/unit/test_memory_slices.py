"""The GPU check's memory-slice cases (tests/gpu/memory_slices.py): what runs without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import memory_slices as ms  # noqa: E402

from swarm.plan import memory as mem  # noqa: E402
from swarm.plan.shapes import load_shape  # noqa: E402


def test_fixed_part_and_slope_of_a_line_through_two_slices():
    assert ms.fixed_and_slope({6: 700, 2: 300}) == (100.0, 100.0)
    row = ms.compare("x", {2: 300, 6: 700}, {2: 320, 6: 660})
    assert row["fixed_ratio"] == pytest.approx(100 / 150, abs=1e-3) and not row["fixed_within"]
    assert row["per_layer_ratio"] == pytest.approx(100 / 85, abs=1e-3) and not row["per_layer_within"]
    close = ms.compare("x", {2: 300, 6: 700}, {2: 305, 6: 695})  # fixed 100 vs 110, slope 100 vs 97.5
    assert close["fixed_within"] and close["per_layer_within"] and ms.passed(close)
    assert not ms.passed(row) and not ms.passed({"case": "x", "failed": "OutOfMemoryError: ..."})
    assert ms.describe(row).endswith("OUTSIDE 0.85-1.1")


@pytest.mark.parametrize("shape", ms.SHAPES)
def test_the_plans_slope_is_what_each_layer_adds(shape, tmp_path):
    """Planned on the 16 GB card: each layer adds its checkpoint, its 4-bit constants and its
    LoRA's small state, and no 4-bit weight kept by autograd (checkpointing recomputes
    reentrantly); everything else is the fixed part."""
    planned, terms = {}, {}
    for layers in ms.LAYERS:
        job = ms.slice_job(tmp_path / str(layers), ms.slice_config(shape, layers))
        planned[layers], plan = ms.planned_allocated(job)
        assert plan.fits and plan.strategy.name == "shard-params-cpu-opt-cpu" and plan.precision == "bf16"
        terms[layers] = {t.name: t.bytes for t in plan.nodes[0].terms if t.where == "gpu" and t.phase != "load"}
        assert mem.KEPT_4BIT not in terms[layers]
    fixed, slope = ms.fixed_and_slope(planned)
    grows = {name for name in terms[6] if terms[6][name] != terms[2].get(name)}
    assert grows <= {"activations: layer checkpoints", "4-bit quantization constants", "ZeRO-3 small persistent params",
                     "gradient reduce bucket", "CUDA allocator slack"}
    hidden = load_shape(shape).hidden_size
    per_layer_checkpoint = (terms[6]["activations: layer checkpoints"] - terms[2]["activations: layer checkpoints"]) / 4
    assert per_layer_checkpoint == 2 * hidden * ms.SEQ_LEN
    assert per_layer_checkpoint < slope < 3 * per_layer_checkpoint
    assert 1 * 2**30 < fixed < 12 * 2**30  # head, embeddings, logits, gathered parameters


def test_a_slice_is_built_in_4bit_and_trains_through_prepare_model(tmp_path):
    """A shrunk Llama built as the GPU case builds its slices, on the CPU, through swarm's own preparation."""
    import torch

    from swarm.plan import make_plan
    from swarm.plan.inventories import load_hardware
    from swarm.train.worker.model import prepare_model, trainable_parameters

    raw = {**ms.slice_config("llama-3.1-8b", 2), "hidden_size": 256, "intermediate_size": 512,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
           "bos_token_id": 1, "eos_token_id": 2}
    model = ms.build_slice(raw, "cpu", torch.bfloat16)
    kinds = {type(m).__name__ for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"Linear4bit"} and type(model.lm_head) is torch.nn.Linear
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # codes stored in the training dtype
    job = ms.slice_job(tmp_path, raw)
    job = job.model_copy(update={"train": job.train.model_copy(update={"strategy": "replicate"}),
                                 "offload": job.offload.model_copy(update={"params": "none", "optimizer": "none"})})
    plan = make_plan(job, load_hardware(ms.HARDWARE).nodes).to_dict()
    model = prepare_model(model, job, plan, "cpu")
    ids = torch.randint(0, 1000, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for name, p in trainable_parameters(model) if "lora_B" in name]  # A gets none while B is zero
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_without_a_gpu_every_shape_is_skipped(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check runs the cases")
    rows = ms.run(SimpleNamespace(work=tmp_path))
    assert [r["case"] for r in rows] == [f"slices-{s}" for s in ms.SHAPES]
    assert all(r["skipped"] == "no CUDA GPU" and ms.passed(r) for r in rows)
    assert ms.describe(rows[0]) == "slices-llama-3.1-8b: no CUDA GPU"
