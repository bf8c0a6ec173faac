"""What a worker minimises: the loss of one micro-batch, and its eval sums, per ``train.method``.

The training loop (``swarm.train.worker.loop``) asks ``objective_for(job)`` once and then only
calls ``loss`` and ``eval_sums``; supervised fine-tuning lives here, preference training
in ``swarm.train.worker.preference``.
"""

from __future__ import annotations

from swarm.config.models import JobConfig


class SupervisedObjective:
    """Next-token cross-entropy on the labelled tokens (the model's own loss)."""

    figures: tuple[str, ...] = ()

    def loss(self, engine, inputs: dict):
        """The model's loss, or a zero that still runs the forward pass when no label counts.

        Every ZeRO-3 rank must run the same forward passes (they gather parameters together),
        so a micro-batch made only of prompt tokens cannot simply be skipped.
        """
        out = engine(**inputs)
        if bool((inputs["labels"][:, 1:] != -100).any()):
            return out.loss, []
        return out.logits.sum() * 0.0, []

    def eval_sums(self, engine, inputs: dict) -> list[float]:
        """Token-weighted loss sum and the number of labelled tokens."""
        counted = int((inputs["labels"][:, 1:] != -100).sum())
        if not counted:
            engine(**inputs)  # the same forward passes on every rank (see ``loss``)
            return [0.0, 0.0]
        return [engine(**inputs).loss.item() * counted, float(counted)]


def objective_for(job: JobConfig):
    """The objective of ``train.method``."""
    if job.train.method in ("dpo", "orpo"):
        from swarm.train.worker.preference import PreferenceObjective

        return PreferenceObjective(job.train.method, job.train.beta)
    return SupervisedObjective()


def eval_figures(objective, sums: list[float]) -> dict[str, float]:
    """The eval message's figures from sums over every rank: ``eval_loss`` and ``eval_<figure>``."""
    if not sums[1]:
        return {"eval_loss": float("nan")}
    figures = {"eval_loss": sums[0] / sums[1]}
    for name, total in zip(objective.figures, sums[2:]):
        figures[f"eval_{name}"] = total / sums[1]
    return figures
