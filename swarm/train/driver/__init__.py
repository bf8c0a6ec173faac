"""The ``swarm train`` process: one run from checks to ``run.json`` (``launch``).

- Before any weight is read: ``preflight`` (checks), ``resume`` (which checkpoint, and
  whether the job still fits it), ``survey`` (what the Ray cluster offers), ``plans`` (the
  plan of each worker group, answered through the mailbox).
- Ray: ``ray_session`` (a swarm's Ray or a local one), ``fit`` (runs the workers, signals
  as a stop), ``trainer`` (the lean Ray Train trainer), ``failures`` (why workers restart).
- The run folder: ``run_folder``, ``recorder`` (the only writer while workers run),
  ``progress`` (what the terminal shows), ``trackers`` (TensorBoard, W&B, MLflow).
"""
