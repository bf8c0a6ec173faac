"""What every Ray Train worker runs: ``loop.train_loop_per_worker`` and what it calls.

- ``model`` (the 4-bit base with LoRA) and ``device`` (its device decisions, pure);
  ``objective`` and ``preference`` (the loss per ``train.method``); ``trainable_state``
  (gathered from and restored to ZeRO shards).
- ``driver_link``: rank 0's line to the driver (messages, its group's plan, step figures).
- ``collectives``: every torch.distributed call, tensors only, each on its group's device.
- ``diloco/``: the ``diloco`` strategy's process groups and exchange between PCs.
"""
