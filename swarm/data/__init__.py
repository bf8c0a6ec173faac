"""Training data, from ``data.files`` to each worker's micro-batches; usable without a run.

- ``prepare``: ``prepare_data``, what the driver makes of the job's data (read, check,
  tokenize, hold out eval records, pack), once, before any worker starts.
- ``sources``: every entry of ``data.files`` opened as a memory-mapped data set.
  ``records``: what a record of each format must hold. ``tokenize``: tokens and loss masks.
- ``packing``: the packed blocks (or preference pairs) as numpy arrays; they travel to the
  workers through Ray's object store as they are.
- ``sampling``: which blocks each worker trains on at each step (the worker's side).
"""
