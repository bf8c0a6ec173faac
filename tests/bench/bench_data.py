"""How far data preparation scales: tokens per second and the driver's peak RSS.

Run from the repository root:
    python tests/bench/bench_data.py [--tokens 50e6] [--format instruction] [--seq-len 2048]
                                     [--before REV] [--keep DIR]

Writes a synthetic JSON-lines data set of about --tokens tokens (records of random words of
configs/data/demo.txt, in the tiny-model tokenizer, whose 512 entries make about 1.5 tokens
per word), then, each in a fresh process with a local Ray as `swarm train` has it, prepares
it (``swarm.data.prepare.prepare_data``: read, check, tokenize, split, pack) and hands the
blocks to Ray's object store (``ray.put``, what the driver does next). It prints the
tokens per second of preparation, the process's RSS before (python, libraries, tokenizer),
its peak while preparing and while handing the blocks to Ray (whose object store maps them
into the driver too), what the driver keeps of its own once they are handed over (private
pages), and the preparing peak's excess per token: the figures behind the planner's
"swarm driver" terms (swarm/plan/memory.py, Overheads). --before REV also runs the
preparation of git revision REV (its data.py and launch.pack_arrays) on the same file.
It prints figures; it does not pass or fail on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DEMO = REPO / "configs" / "data" / "demo.txt"
MIB = 2**20

# Run in a child process: imports, tokenizer, then preparation, then the object store.
CHILD = r"""
import json, os, resource, sys, time
import psutil
sys.path.insert(0, sys.argv[1])
args = json.loads(sys.argv[2])
from swarm.config.models import DataSection
from swarm.tiny import train_tokenizer
from pathlib import Path
tokenizer = train_tokenizer([Path(args["demo"])], 512)
cfg = DataSection(files=[args["data"]], format=args["format"], seq_len=args["seq_len"], eval_fraction=0.01)
if args["before"]:
    sys.path.insert(0, args["before"])  # the old revision's modules shadow the new ones
    import importlib
    old_data = importlib.import_module("old_swarm_data")
    old_launch = importlib.import_module("old_swarm_pack")
    prepare = lambda: old_launch.pack_arrays(old_data.prepare_data(cfg, tokenizer))
else:
    from swarm.data.prepare import prepare_data
    def prepare():
        prepared = prepare_data(cfg, tokenizer)
        return {"train": prepared.train, "eval": prepared.eval, "stats": prepared.stats}
import datasets, ray  # as the driver has them loaded
ray.init(address="local", object_store_memory=args["store"], include_dashboard=False, logging_level="ERROR",
         log_to_driver=False)
base = psutil.Process().memory_info().rss
def own():  # private pages of this process, less Ray's object store (shared memory mapped into it)
    return sum(m.private_clean + m.private_dirty for m in psutil.Process().memory_maps() if "plasma" not in m.path)
base_uss = own()
started = time.perf_counter()
result = prepare()
seconds = time.perf_counter() - started
prepared_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if args["before"]:
    masks = [result[f"{s}_attention_mask"] for s in ("train", "eval")]
    tokens = sum(int(m.sum()) for m in masks if m is not None)
    data = result
else:
    tokens = result["stats"].train_tokens + result["stats"].eval_tokens
    data = {"train": result["train"], "eval": result["eval"]}
nbytes = sum(a.nbytes for v in data.values() if v is not None
             for a in ([v] if hasattr(v, "nbytes") else [x for x in vars(v).values() if hasattr(x, "nbytes")]))
ref = ray.put(data)
if not args["before"]:
    data.clear()  # as swarm.train.driver.fit.fit does
del data, result
if not args["before"]:
    import gc
    from swarm.train.runtime import return_freed_memory
    gc.collect()
    return_freed_memory()
put_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
kept = own()
ray.shutdown()
print(json.dumps({"tokens": tokens, "seconds": seconds, "base": base, "prepared_peak": prepared_peak,
                  "put_peak": put_peak, "kept": kept - base_uss, "nbytes": nbytes}))
"""


def write_data(path: Path, tokens: float, fmt: str) -> None:
    """Records of random demo words until about ``tokens`` tokens (measured on a sample)."""
    from swarm.tiny import train_tokenizer

    words = DEMO.read_text().split()
    rng = random.Random(0)
    tokenizer = train_tokenizer([DEMO], 512)
    sample = " ".join(rng.choice(words) for _ in range(20000))
    per_word = len(tokenizer(sample)["input_ids"]) / 20000
    target_words = int(tokens / per_word)
    written = 0
    with path.open("w") as f:
        while written < target_words:
            n = rng.randint(40, 400)
            text = [rng.choice(words) for _ in range(n)]
            written += n
            cut = n // 4
            if fmt == "text":
                row = {"text": " ".join(text)}
            else:
                row = {"instruction": " ".join(text[:cut]), "output": " ".join(text[cut:])}
            f.write(json.dumps(row) + "\n")


def old_modules(rev: str, folder: Path) -> Path:
    """REV's data.py (as old_swarm_data) and its pack_arrays (as old_swarm_pack) in ``folder``.

    The paths are those of the revisions that had ``pack_arrays`` (before ``swarm/data/``)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = subprocess.run(["git", "show", f"{rev}:swarm/train/data.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    (folder / "old_swarm_data.py").write_text(source)
    launch = subprocess.run(["git", "show", f"{rev}:swarm/train/launch.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    start = launch.index("def pack_arrays(")
    end = launch.index("\n\n\n", start)
    (folder / "old_swarm_pack.py").write_text("from typing import Any\nimport numpy as np\n\n\n" + launch[start:end] + "\n")
    return folder


def measure(data: Path, fmt: str, seq_len: int, before: Path | None) -> dict:
    # An object store that holds the blocks (ids, loss mask and positions: about 7.5 bytes a token).
    store = max(256 * MIB, int(16 * data.stat().st_size / 3))
    args = {"demo": str(DEMO), "data": str(data), "format": fmt, "seq_len": seq_len,
            "before": str(before) if before else None, "store": store}
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO), json.dumps(args)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=50e6)
    parser.add_argument("--format", choices=["instruction", "text"], default="instruction")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--before", metavar="REV", help="also measure the preparation of git revision REV")
    parser.add_argument("--keep", metavar="DIR", help="write (or reuse) the data set in DIR")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="swarm-bench-data-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / f"synthetic-{args.format}-{args.tokens:.0e}.jsonl"
        if not data.is_file():
            started = time.perf_counter()
            write_data(data, args.tokens, args.format)
            print(f"wrote {data} ({data.stat().st_size / MIB:,.0f} MiB) in {time.perf_counter() - started:.0f} s")
        runs = [("this tree", None)]
        if args.before:
            runs.append((args.before, old_modules(args.before, Path(tmp) / "old")))
        print(f"\n{args.format} records, seq_len {args.seq_len}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores")
        print("| code | tokens | seconds | tokens/s | RSS before (MiB) | peak preparing (MiB) | "
              "peak with ray.put (MiB) | arrays (MiB) | kept after ray.put (MiB) | peak excess per token (bytes) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, before in runs:
            m = measure(data, args.format, args.seq_len, before)
            excess = (m["prepared_peak"] - m["base"]) / m["tokens"]
            print(f"| {name} | {m['tokens']:,} | {m['seconds']:.0f} | {m['tokens'] / m['seconds']:,.0f} | "
                  f"{m['base'] / MIB:,.0f} | {m['prepared_peak'] / MIB:,.0f} | {m['put_peak'] / MIB:,.0f} | "
                  f"{m['nbytes'] / MIB:,.0f} | {m['kept'] / MIB:,.0f} | {excess:.1f} |", flush=True)


if __name__ == "__main__":
    main()
