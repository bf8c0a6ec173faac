"""A minimal hand-written DeepSpeed loop: the baseline ``bench_train.py`` compares against.

Same model, quantization, LoRA, checkpointing and DeepSpeed config as ``swarm train``, but
no Ray, no driver, no progress reporting: one process, one loop. Prints one JSON line.
"""

import json
import os
import resource
import statistics
import sys
import time

START = time.perf_counter()
os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
    os.environ.setdefault(key, value)

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from swarm.config import load_job  # noqa: E402
from swarm.data.prepare import prepare_data  # noqa: E402
from swarm.hardware import inventory  # noqa: E402
from swarm.plan import make_plan  # noqa: E402
from swarm.train.worker.model import load_model  # noqa: E402

job = load_job(sys.argv[1])
torch.set_num_threads(os.cpu_count() or 1)
tokenizer = AutoTokenizer.from_pretrained(job.model.path)
blocks = prepare_data(job.data, tokenizer).train

# The plan swarm would make on this machine: the same DeepSpeed config and precision.
plan = make_plan(job, [inventory(offload=job.offload.nvme_path)]).to_dict()
config = plan["deepspeed"]
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(job.train.seed)
model = load_model(job, plan, "cpu")
params = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
startup = time.perf_counter() - START

# from_pretrained leaves the model in eval mode, where transformers skips gradient
# checkpointing; train as swarm does, or the baseline would skip the recomputation.
engine.train()
mb, ga = plan["micro_batch"], plan["grad_accum"]
step_times, cpu_times, position = [], [], 0
for step in range(job.train.max_steps):
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(ga):
        idx = [(position + i) % len(blocks) for i in range(mb)]
        position += mb
        inputs, _ = blocks.batch(idx, "cpu")
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
    loss.item()
    step_times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - cpu0)  # all threads of this process
    print(f"step {step + 1}", file=sys.stderr, flush=True)  # progress, for tests/bench/cpu_trace.py
print(json.dumps({
    "startup_s": startup,
    "step_times": step_times,
    "median_step_s": statistics.median(step_times[2:]),
    "cpu_per_step_s": statistics.mean(cpu_times[2:]),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
