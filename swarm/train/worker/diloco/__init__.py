"""The ``diloco`` strategy on the workers: each PC trains on its own, PCs exchange adapters.

- ``groups``: the process groups (each PC's, and one of the PCs' leaders) and the ``mpu``
  that keeps DeepSpeed inside a PC.
- ``exchange``: the start from PC 0's adapter, the exchange every ``H`` steps, checkpoints.
- ``outer``: the outer optimizers (pure tensor arithmetic). ``pc_state``: what a checkpoint
  keeps of each PC, and how a resume gives it back.

The planner's side (each PC's plan, ``H``, the exchange's cost) is ``swarm.plan.diloco``.
"""
