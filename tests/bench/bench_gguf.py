"""Time and size of each GGUF type for the demo model: `swarm export --gguf` step by step.

Run from the repository root (needs the gguf extra: pip install -e '.[gguf]'):
    python tests/bench/bench_gguf.py [--hidden 128] [--layers 2] [--steps 60]

Makes the demo's tiny Llama (with a SentencePiece tokenizer, which llama.cpp converts),
trains it with configs/demo.yaml, merges the adapter into a bf16 model (`swarm export
--merge`), then converts that to every GGUF type with llama.cpp's converter and quantizer,
timing each file. Larger --hidden/--layers show how the figures grow. It prints figures; it
does not pass or fail on them.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from swarm.export import export_run  # noqa: E402
from swarm.export.gguf import write_adapter_gguf, write_model_ggufs  # noqa: E402
from swarm.export.gguf_card import human_size  # noqa: E402
from swarm.export.llama_cpp import GGUF_TYPES, find_converter  # noqa: E402
from swarm.tiny import make_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    converter = find_converter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "tiny-llama", [REPO / "configs/data/demo.txt"], hidden=args.hidden,
                                layers=args.layers, tokenizer="sentencepiece")
        overrides = [f"model.path={model}", f"output.dir={work / 'runs'}", f"train.max_steps={args.steps}",
                     "train.precision=fp32", "ray.dashboard=false"]
        started = time.perf_counter()
        train = subprocess.run(
            [sys.executable, "-m", "swarm", "train", str(REPO / "configs/demo.yaml"),
             *(x for o in overrides for x in ("--set", o))], capture_output=True, text=True, cwd=REPO,
        )
        if train.returncode != 0:
            raise SystemExit(train.stderr[-3000:])
        run = Path(train.stdout.strip().splitlines()[-1].removeprefix("run: "))
        print(f"trained {run.name} in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        merged = export_run(run, out_dir=work / "out", merge=True, dtype="bf16").merged
        merge_s = time.perf_counter() - started
        size = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
        print(f"\nmodel: Llama, hidden {args.hidden}, {args.layers} layers; {platform.processor() or platform.machine()}")
        print("| file | time (s) | size |\n| --- | --- | --- |")
        print(f"| merged safetensors (bf16) | {merge_s:.1f} | {human_size(size)} |")
        types = ["bf16", *(t for t in GGUF_TYPES if t != "bf16")]  # bf16 first: the quantizer's input
        log = work / "gguf.log"
        for f in write_model_ggufs(merged, work / "out", "demo", types, "bf16", converter, log):
            print(f"| {f.path.name} | {f.seconds:.1f} | {human_size(f.size_bytes)} |")
        lora = write_adapter_gguf(run / "adapter", model, work / "out", "demo", "f16", converter, log)
        print(f"| {lora.path.name} (`--gguf-adapter`) | {lora.seconds:.1f} | {human_size(lora.size_bytes)} |")


if __name__ == "__main__":
    main()
