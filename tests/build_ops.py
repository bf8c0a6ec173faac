"""Compile DeepSpeed's CPU ops once, before the tests (each takes minutes the first time).

A test that hits a first-time compile can run past its timeout; a compile killed half-way
leaves a lock file behind that makes every later build wait forever. Building here, in one
process with no timeout, keeps both out of the test run.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.accelerator import get_accelerator  # noqa: E402

# ShareMemCommBuilder: the shared-memory collectives DeepSpeed loads when it starts on a CPU.
for name in ("CPUAdamBuilder", "AsyncIOBuilder", "ShareMemCommBuilder"):
    builder = get_accelerator().create_op_builder(name)
    builder.load(verbose=False)
    print(f"deepspeed op ready: {builder.name}")
