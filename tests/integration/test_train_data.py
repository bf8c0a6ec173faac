"""``swarm train`` on the data and methods people bring: a cached Hub data set and a
save_to_disk folder with mapped columns, ShareGPT, DPO preference pairs, DoRA and rsLoRA,
and the run's figures in TensorBoard, W&B (offline) and MLflow (local store)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainkit import (DEMO_TEXT, cache_hub_dataset, falls_by_a_third, losses, run_dir_of, swarm, trained_model,
                      wandb_history, write_job)

pytestmark = pytest.mark.integration

LINES = [line.strip() for line in DEMO_TEXT.read_text().splitlines() if line.strip()]
COMMIT = "5" * 40


def qa_rows(lines: list[str]) -> list[dict]:
    """Instruction records under other column names (prompt, response), as many Hub sets have them."""
    return [{"prompt": f"Say line {i} of the story.", "response": line} for i, line in enumerate(lines)]


def test_hub_and_save_to_disk_data_train_and_every_tracker_holds_the_run(tiny_models, tmp_path, monkeypatch):
    import datasets

    rows = qa_rows(LINES)
    cache = tmp_path / "hf" / "datasets"
    cache_hub_dataset(cache, "swarm-tests/keeper-qa", COMMIT, {"train": rows[: len(rows) // 2]})
    datasets.Dataset.from_list(rows[len(rows) // 2:]).save_to_disk(tmp_path / "local-qa")
    job = write_job(
        tmp_path, tiny_models("llama"),
        data={"files": [str(tmp_path / "local-qa"), "hf:swarm-tests/keeper-qa"], "format": "instruction",
              "columns": {"instruction": "prompt", "output": "response"}, "eval_fraction": 0.2},
        log={"to": ["tensorboard", "wandb", "mlflow"], "project": "keeper"},
    )
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"),
               "WANDB_MODE": "offline"}
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path, env=offline))
    assert falls_by_a_third(run_dir), losses(run_dir)
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["data"]["records"] == len(rows)
    assert summary["data"]["files"] == [str(tmp_path / "local-qa"), "hf:swarm-tests/keeper-qa"]
    expected = losses(run_dir)
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(expected)
    assert {e.step: e.value for e in events.Scalars("eval_loss")} == pytest.approx(evals)

    history, final = wandb_history(run_dir)
    assert history["loss"] == pytest.approx(expected) and history["eval_loss"] == pytest.approx(evals)
    assert final["train_loss"] == pytest.approx(summary["train_loss"]) and final["steps"] == 16

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store on request only
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("keeper").experiment_id])
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")} == pytest.approx(expected)
    assert run.data.params["data.format"] == "instruction" and run.data.params["lora.r"] == "16"
    assert run.data.metrics["final.train_loss"] == pytest.approx(summary["train_loss"])
    assert run.info.status == "FINISHED"


def test_sharegpt_conversations_train(tiny_models, tmp_path):
    conversations = [{"conversations": [{"from": "system", "value": "You tell the keeper's story."},
                                        {"from": "human", "value": f"What comes after line {i}?"},
                                        {"from": "gpt", "value": line}]} for i, line in enumerate(LINES)]
    data = tmp_path / "story.sharegpt.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    job = write_job(tmp_path, tiny_models("llama"), data={"files": [str(data)], "format": "sharegpt"},
                    train={"max_steps": 24, "checkpoint_every": 100})
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path))
    assert falls_by_a_third(run_dir), losses(run_dir)
    resolved = json.loads((run_dir / "run.json").read_text())
    assert resolved["data"]["format"] == "sharegpt" and resolved["data"]["records"] == len(LINES)


def preference_rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": f"Q: {p}? A:", "chosen": " the keeper lights the lamp.", "rejected": " the gull eats the fish."}
            for p in prompts]


def answer_logp(model, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer | prompt) under ``model``, summed over the answer's tokens."""
    head = tokenizer(prompt, add_special_tokens=False).input_ids
    tail = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return sum(logps[len(head) - 1 + k, t].item() for k, t in enumerate(tail))


def test_dpo_raises_the_chosen_over_rejected_margin_on_held_out_pairs(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    prompts = [" ".join(line.split()[:6]) for line in LINES]
    train, held_out = preference_rows(prompts[:-4]), preference_rows(prompts[-4:])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    base = tiny_models("llama")
    job = write_job(tmp_path, base, data={"files": [str(data)], "format": "preference", "eval_fraction": 0.2},
                    train={"method": "dpo", "beta": 0.1, "max_steps": 12, "grad_accum": 1, "eval_every": 6,
                           "checkpoint_every": 100})
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    assert steps[-1]["loss"] < 0.3 and steps[-1]["reward_accuracy"] == 1.0
    last_eval = [r for r in rows if "eval_loss" in r][-1]
    assert last_eval["eval_reward_margin"] > 1.0 and last_eval["eval_loss"] < math.log(2) / 2

    # Independently of the trainer: the adapter prefers the chosen answers of pairs it never saw.
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = trained_model(base, run_dir / "adapter")

    def margin(row) -> float:
        return answer_logp(model, tokenizer, row["prompt"], row["chosen"]) - answer_logp(
            model, tokenizer, row["prompt"], row["rejected"])

    trained = [margin(r) for r in held_out]
    with model.disable_adapter():
        before = [margin(r) for r in held_out]
    assert all(t > b + 5 for t, b in zip(trained, before)), (trained, before)

    from swarm.export import export_run
    from swarm.export.card import front_matter

    card = (export_run(run_dir, out_dir=tmp_path / "export").adapter / "README.md").read_text()
    assert "DPO on preference pairs (beta 0.1; reference: the base with the adapter off)" in card
    assert "dpo" in front_matter(card)["tags"]


def test_dora_and_rslora_train_and_export(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from swarm.export import export_run

    base = tiny_models("llama")
    # A 4-bit base takes DoRA without ZeRO-3 only: the replicated base, no parameter offload.
    job = write_job(tmp_path, base, lora={"use_dora": True, "use_rslora": True},
                    train={"strategy": "replicate", "checkpoint_every": 100}, offload={"params": "none", "optimizer": "cpu"})
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path))
    assert falls_by_a_third(run_dir), losses(run_dir)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]

    merged = export_run(run_dir, out_dir=tmp_path / "export", merge=True, dtype="fp32").merged
    ids = torch.tensor([list(range(5, 45))])
    trained = trained_model(base, run_dir / "adapter")
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
        with trained.disable_adapter():
            untrained = trained(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-3
    assert (expected - untrained).abs().max() > 0.1
