"""``swarm train``: a driver process and the Ray Train workers it starts.

- ``driver/``: what runs in the ``swarm train`` process (checks, data, plans, the Ray
  session, the run folder and what it shows); ``driver.launch.train`` is the entry point.
- ``worker/``: what runs in every Ray Train worker (model, DeepSpeed, the training loop,
  collectives, the ``diloco`` exchange between PCs).
- Beside them, what both sides (or ``swarm export``) use: ``mailbox`` (the Ray actor that
  carries messages, checkpoints and plans between workers and driver), ``checkpoint`` (the
  one checkpoint format), ``ops`` (DeepSpeed's compiled ops) and ``runtime`` (process set-up).

The driver imports worker code (it hands the loop to Ray Train); no worker module imports
the driver's.
"""
