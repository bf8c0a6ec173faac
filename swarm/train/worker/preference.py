"""Preference training: DPO and ORPO losses on pairs of answers (``swarm.data.packing.Pairs``).

A micro-batch holds the chosen answers of its pairs, then their rejected ones (one forward
pass for both). What each loss reads is the log-probability of every answer, summed over
its tokens (the loss mask) after its prompt.

- DPO (Rafailov et al., "Direct Preference Optimization", arXiv:2305.18290, eq. 7)::

      loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

  The reference is the policy with its LoRA adapter switched off (peft's
  ``disable_adapter``): the frozen base itself, so no second copy of the model is held. It
  is run without gradients before the policy's pass; the planner counts that pass.
- ORPO (Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv:2403.07691, eq. 6-7), with per-token mean log-probabilities ``c`` and ``r``::

      loss = NLL(chosen) - beta * log sigmoid(log(odds(c) / odds(r))),  odds(p) = p / (1 - p)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    Args:
        logits: [rows, length, vocab], position t predicting token t + 1.
        labels: [rows, length], -100 where no target.
    """
    targets = labels[:, 1:]
    # cross_entropy fuses log_softmax and the gather: no fp32 copy of the log-probabilities is kept.
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(-1)
    return -nll.sum(-1), counts


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and reward margin ``beta * (chosen log-ratio - rejected log-ratio)``."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss and log odds ratio, from per-token mean log-probabilities.

    Args:
        chosen_mean, rejected_mean: mean log-probability per answer token.
        chosen_nll: the chosen answer's mean negative log-likelihood (the SFT term).
        beta: the weight of the odds-ratio term (the paper's lambda).
    """
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return chosen_nll - beta * F.logsigmoid(log_odds), log_odds


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, "Accurately Computing log(1 - exp(-|a|))")."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceObjective:
    """The loss of one micro-batch of pairs, for ``train.method`` dpo or orpo.

    Figures reported per step and at eval (means over pairs): ``reward_margin`` (DPO: the
    implicit reward of the chosen over the rejected answer; ORPO: the log odds ratio),
    ``reward_accuracy`` (share of pairs where it is positive) and ``logp_margin`` (the
    policy's log-probability of the chosen answer minus the rejected one).
    """

    figures = ("reward_margin", "reward_accuracy", "logp_margin")

    def __init__(self, method: str, beta: float):
        self.method, self.beta = method, beta

    def pair_losses(self, engine, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses, margins and policy log-probability margins of one micro-batch."""
        reference = None
        if self.method == "dpo":
            with torch.no_grad(), engine.module.disable_adapter():
                reference, _ = sequence_logps(engine(**_model_inputs(inputs)).logits, inputs["labels"])
        logps, counts = sequence_logps(engine(**_model_inputs(inputs)).logits, inputs["labels"])
        half = len(logps) // 2
        chosen, rejected = logps[:half], logps[half:]
        if self.method == "dpo":
            losses, margins = dpo_loss(chosen, rejected, reference[:half], reference[half:], self.beta)
        else:
            means = logps / counts.clamp(min=1)
            losses, margins = orpo_loss(means[:half], means[half:], -means[:half], self.beta)
        return losses, margins, (chosen - rejected).detach()

    def loss(self, engine, inputs: dict) -> tuple[torch.Tensor, list[float]]:
        """The micro-batch's mean loss (to backpropagate) and its figures."""
        losses, margins, logp_margins = self.pair_losses(engine, inputs)
        margins = margins.detach()
        return losses.mean(), [margins.mean().item(), (margins > 0).float().mean().item(),
                               logp_margins.mean().item()]

    def eval_sums(self, engine, inputs: dict) -> list[float]:
        """Sums over the pairs of one eval micro-batch: loss, pairs, then each figure."""
        losses, margins, logp_margins = self.pair_losses(engine, inputs)
        return [losses.sum().item(), float(len(losses)), margins.sum().item(),
                (margins > 0).float().sum().item(), logp_margins.sum().item()]


def _model_inputs(inputs: dict) -> dict:
    # Labels stay out: the model would compute a mean loss over both answers, unused here.
    return {k: v for k, v in inputs.items() if k != "labels"}
