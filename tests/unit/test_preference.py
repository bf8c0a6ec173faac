"""DPO and ORPO losses against TRL's own code, on a real (tiny) model's logits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from trainkit import perturb_lora

from swarm.train.worker.preference import PreferenceObjective, dpo_loss, orpo_loss, sequence_logps

ROWS = [{"prompt": "the keeper climbed", "chosen": " the stairs", "rejected": " a gull flew"},
        {"prompt": "he lit", "chosen": " the lamp", "rejected": " nothing at all"}]


class Engine:
    """What a worker's DeepSpeed engine offers the objective: a call, and the peft model as ``module``."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **inputs):
        return self.module(**inputs)


@pytest.fixture(scope="module")
def trl_dpo(tiny_models, tmp_path_factory):
    """A TRL DPOTrainer on a tiny Llama with a LoRA adapter (its reference: the adapter switched off)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base = tiny_models("llama")
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, beta=0.1,
                     bf16=False, per_device_train_batch_size=2)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    perturb_lora(trainer.model, seed=0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    return trainer, batch


def test_dpo_loss_and_reward_margin_equal_trls(trl_dpo):
    trainer, batch = trl_dpo
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, batch).item()
    trl_margin = trainer._metrics["train"]["rewards/margins"][-1]
    # The same batch as swarm's Pairs give it: chosen rows, then rejected, labels on the answers.
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
    loss, (margin, accuracy, logp_margin) = PreferenceObjective("dpo", 0.1).loss(Engine(trainer.model), inputs)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert margin == pytest.approx(trl_margin, abs=1e-5)
    assert abs(expected - math.log(2)) > 1e-3  # the adapter moved the policy away from its reference
    logps = trainer._metrics["train"]
    assert logp_margin == pytest.approx(logps["logps/chosen"][-1] - logps["logps/rejected"][-1], abs=1e-3)


def test_sequence_log_probabilities_equal_trls():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (4, 7), generator=gen)
    labels[:, :3] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    total, count = sequence_logps(logits, labels)
    assert torch.allclose(total, ORPOTrainer.get_batch_logps(logits, labels), atol=1e-5)
    assert torch.allclose(total / count, ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True), atol=1e-5)


def test_orpo_odds_ratio_equals_trls():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen = torch.tensor([-0.2, -1.5, -3.0, -1e-4])
    rejected = torch.tensor([-0.9, -0.7, -6.0, -2.0])
    nll = torch.tensor([0.5, 1.0, 2.0, 0.1])
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_terms, _, _, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    losses, log_odds = orpo_loss(chosen, rejected, nll, beta=0.25)
    assert torch.allclose(losses, nll - trl_terms, atol=1e-6)  # TRL's loss: nll - mean(beta * logsigmoid(.))
    assert log_odds.mean().item() == pytest.approx(trl_log_odds.item(), abs=1e-6)


def test_dpo_loss_is_the_papers_formula():
    """Rafailov et al. 2023, eq. 7: -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected))."""
    losses, margins = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]),
                               beta=0.5)
    margin = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    assert margins.item() == pytest.approx(margin)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))))


def test_the_reference_is_the_model_with_its_adapter_off(tiny_models):
    """No second model: with the adapter's B at zero (a new adapter), the policy is its reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 11]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": torch.tensor([[-100, -100, -100, 8, 9], [-100, -100, -100, 10, 11]])}
    objective = PreferenceObjective("dpo", 0.1)
    losses, margins, _ = objective.pair_losses(Engine(model), inputs)
    assert margins.abs().max() < 1e-6 and losses.item() == pytest.approx(math.log(2), abs=1e-6)
    perturb_lora(model, seed=2)
    _, margins, _ = objective.pair_losses(Engine(model), inputs)
    assert margins.abs().max() > 1e-4
