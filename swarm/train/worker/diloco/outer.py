"""diloco's outer optimizers: how the PCs' averaged pseudo-gradient moves the global adapter.

Pure tensor arithmetic on flat fp32 vectors (the adapter's trainable weights, concatenated in
a fixed order), so the same code runs in a run's exchange and in the study that chose the
default (tests/bench/study_diloco_outer.py, docs/benchmarks.md).

The rules:

- ``average`` (the default): the global adapter becomes the token-weighted mean of the PCs'
  adapters (FedAvg; DiLoCo's outer SGD at lr 1 without momentum).
- ``nesterov``: DiLoCo as published (Douillard et al., arXiv 2311.08105): Nesterov SGD on the
  whole adapter, the mean pseudo-gradient as its gradient.
- ``nesterov-b``: Nesterov on LoRA's B factors (and any other trained weight), the plain mean
  on the A factors: extrapolating both factors moves their product B A quadratically.

The study also tried freezing A at its shared initialisation (FFA-LoRA, arXiv 2403.12313:
averaging B is then exact and the exchange carries half the bytes); with half the weights
training it ended furthest from replicate, so it is not offered.
"""

from __future__ import annotations

RULES = ("average", "nesterov", "nesterov-b")


def outer_step(global_flat, mean_delta, momentum_buf, rule: str, lr: float, momentum: float, a_slices=()):
    """One outer step.

    Args:
        global_flat: the global adapter after the previous exchange (fp32).
        mean_delta: the PCs' token-weighted mean of (global adapter - their adapter now).
        momentum_buf: the outer momentum (zeros before the first exchange); ``average`` keeps it zero.
        rule: one of ``RULES``.
        a_slices: where LoRA's A factors lie in the flat adapter (``nesterov-b`` averages them).

    Returns:
        (new global adapter, new momentum buffer); new tensors, the arguments are not changed.
    """
    if rule not in RULES:
        raise ValueError(f"unknown outer rule {rule!r}: use one of {', '.join(RULES)}")
    if rule == "average":
        return global_flat - mean_delta, momentum_buf.clone()
    momentum_buf = momentum * momentum_buf + mean_delta
    update = lr * (mean_delta + momentum * momentum_buf)
    if rule == "nesterov-b":
        for part in a_slices:
            update[part] = mean_delta[part]
            momentum_buf[part] = 0.0
    return global_flat - update, momentum_buf
