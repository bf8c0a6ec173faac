"""Export of a run: merged model vs 4-bit base + adapter, plain-peft adapter, model card, CLI.

The run folder is built here from real parts: a tiny Llama made locally, loaded 4-bit with
bitsandbytes on CPU, a peft LoRA with non-trivial weights, and checkpoints written by the
trainer's own writer (``swarm.train.checkpoint``). Its run.json describes a swarm of GPUs
this machine does not have, for the model card; tests/integration/test_train.py exports the
checkpoints of a run that really trained.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open

from swarm.cli import main
from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.export import export_run
from swarm.export.card import front_matter
from swarm.tiny import make_tiny_model
from trainkit import perturb_lora

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.txt"
NAME = "tiny-qlora-demo-r8-20261128"
SHA = "9f2c" * 16
RUN_INFO = {
    "name": NAME,
    "swarm_version": "0.1.0",
    "started": "2026-11-28T10:00:00+00:00",
    "finished": "2026-11-28T10:05:03+00:00",
    "wall_time_s": 303.2,
    "steps": 20,
    "tokens": 40960,
    "train_loss": 3.4567,
    "eval_loss": 3.6789,
    "world_size": 2,
    "precision": "fp32",
    "strategy": {
        "name": "zero3-offload-optimizer", "zero_stage": 3, "offload_params": "none", "offload_optimizer": "cpu",
    },
    "hardware": {"nodes": [
        {"hostname": "kitchen-pc", "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vram_bytes": 24 * 2**30}] * 2,
         "ram_bytes": 64 * 2**30},
        {"hostname": "attic-pc", "gpus": [{"name": "NVIDIA GeForce RTX 3060", "vram_bytes": 12 * 2**30}],
         "ram_bytes": 32 * 2**30},
    ]},
    "data": {"files": [str(DEMO)], "format": "text", "records": 1234, "skipped": 7,
             "train_tokens": 38912, "eval_tokens": 2048, "sha256": SHA},
}


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32,
    )


def load_4bit(base: Path):
    from transformers import AutoModelForCausalLM

    from swarm.train.worker.model import keep_4bit_layout

    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config(), dtype=torch.float32)
    # Compute as training does on every CPU (bitsandbytes' eval path would switch to its
    # packed bf16 kernel on a CPU with AVX512-BF16).
    keep_4bit_layout(model)
    return model.eval()


def write_real_checkpoint(run_dir: Path, model, step: int) -> Path:
    """A checkpoint of ``model``'s adapter at ``step``, written by the trainer's own writer."""
    import random

    import numpy as np
    from peft import get_peft_model_state_dict

    from swarm.train.checkpoint import write_checkpoint

    named = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = {
        "step": step, "samples_seen": step * 4, "optimizer_step": step, "scheduler": {"last_epoch": step},
        "moments": {"exp_avg": {n: torch.zeros_like(t) for n, t in named.items()},
                    "exp_avg_sq": {n: torch.ones_like(t) for n, t in named.items()}},
        "rng": {"torch": torch.get_rng_state(), "cuda": None, "numpy": np.random.get_state(),
                "python": random.getstate()},
    }
    state = {"step": step, "samples_seen": step * 4, "fingerprint": {"model.path": "tiny"},
             "peft_config": model.peft_config["default"], "adapter": get_peft_model_state_dict(model),
             "trainer": trainer}
    return write_checkpoint(run_dir / "checkpoints", state, keep=3)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    base = make_tiny_model(root / "base", [DEMO], arch="llama")
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- tiny\n---\n# tiny base\n")
    run_dir = root / "runs" / NAME
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(DEMO.read_text()[:400], return_tensors="pt").input_ids[:, :48]

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(load_4bit(base), lora)
    # A checkpoint at step 10 with other adapter weights, one at step 20 that a crash left
    # without its manifest, then the final adapter.
    perturb_lora(model, seed=10)
    write_real_checkpoint(run_dir, model, 10)
    (write_real_checkpoint(run_dir, model, 20) / "manifest.json").unlink()
    perturb_lora(model, seed=1)
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "tokenizer")
    model.eval()
    reference = logits(model, ids)
    with model.disable_adapter():
        base_only = logits(model, ids)
    # The same adapter on the full-precision base: what a merge that skips the 4-bit round trip gives.
    full_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    full = PeftModel.from_pretrained(full_base, run_dir / "adapter")
    full_precision = logits(full.eval(), ids)

    job = JobConfig.model_validate({
        "model": {"path": str(base)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"files": [str(DEMO)], "seq_len": 64},
        "train": {"max_steps": 20, "precision": "fp32", "workers": 2, "eval_every": 10},
        "offload": {"optimizer": "cpu"},
        "output": {"dir": str(root / "runs"), "name": NAME},
    })
    (run_dir / "config.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    (run_dir / "run.json").write_text(json.dumps(RUN_INFO, indent=2))
    rows = []
    for step in range(1, 21):
        row = {"step": step, "loss": round(5.0 - step * 0.05, 4), "lr": 2e-4, "tokens": 2048, "tokens_per_s": 1500.0,
               "grad_norm": 0.5}
        if step % 10 == 0:
            row["eval_loss"] = {10: 3.9012, 20: 3.6789}[step]
        rows.append(row)
    rows[-1]["loss"] = 3.4567
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(
        dir=run_dir, base=base, root=root, ids=ids, reference=reference, base_only=base_only,
        full_precision=full_precision,
    )


def card_code(readme: str) -> str:
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_merged_model_matches_4bit_base_plus_adapter(run, tmp_path):
    from transformers import AutoModelForCausalLM

    limit = 300_000
    merged = export_run(run.dir, out_dir=tmp_path, merge=True, dtype="fp32", max_shard_size=f"{limit}B").merged
    assert merged == tmp_path / f"{NAME}-merged"

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.dtype == torch.float32
    got = logits(model, run.ids)
    tolerance = 1e-3
    assert (got - run.reference).abs().max() < tolerance
    # The tolerance is tight enough to see a missing adapter or a merge into the unquantized base.
    assert (run.reference - run.base_only).abs().max() > 100 * tolerance
    assert (run.reference - run.full_precision).abs().max() > 10 * tolerance

    # Bounded shards: several, each within the limit (tensor data), all listed in the index.
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(merged.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    with safe_open(str(run.base / "model.safetensors"), "pt") as base_file:
        assert set(index["weight_map"]) == set(base_file.keys())
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
        assert shard.stat().st_size <= limit + 4096  # tensor data plus its small JSON header
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_default_export_bf16_merge_and_adapter_with_plain_peft(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = export_run(run.dir, merge=True).merged
    adapter = run.dir / "export" / NAME
    assert merged == run.dir / "export" / f"{NAME}-merged"

    # Merged: bf16 weights in one file (the model is far below 2 GB), close to the reference.
    assert (merged / "model.safetensors").is_file() and not (merged / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto").eval()
    assert model.dtype == torch.bfloat16
    got = logits(model, run.ids)
    assert (got - run.reference).abs().max() < 0.05 * run.reference.abs().max()
    text = " the keeper lights the lamp"
    assert AutoTokenizer.from_pretrained(merged)(text).input_ids == AutoTokenizer.from_pretrained(run.base)(text).input_ids

    # Adapter: plain peft on the 4-bit base gives the run's logits.
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    peft_model = PeftModel.from_pretrained(load_4bit(run.base), adapter).eval()
    assert torch.allclose(logits(peft_model, run.ids), run.reference, atol=1e-5)

    # Exporting again replaces the earlier export.
    (adapter / "stale.txt").write_text("from before")
    assert export_run(run.dir).adapter == adapter and not (adapter / "stale.txt").exists()


def test_card_code_works_as_written(run, tmp_path, capsys):
    adapter = export_run(run.dir, out_dir=tmp_path).adapter
    merged = export_run(run.dir, out_dir=tmp_path, merge=True).merged
    for folder in (adapter, merged):
        exec(compile(card_code((folder / "README.md").read_text()), str(folder / "README.md"), "exec"), {})
    assert len(capsys.readouterr().out.strip().splitlines()) >= 2  # each snippet printed its generation


def test_model_card_states_the_run(run, tmp_path):
    adapter = export_run(run.dir, out_dir=tmp_path, name="tiny-demo").adapter
    readme = (adapter / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == str(run.base.resolve())
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # copied from the base's README
    assert {"swarm", "qlora", "peft"} <= set(meta["tags"])
    assert meta["datasets"] == ["demo"]
    assert readme.splitlines()[meta_end(readme) + 2] == "# tiny-demo"
    for figure in ["3.4567", "3.6789", "40,960", "1,234", "38,912", "2,048", SHA, "r=8, alpha=16",
                   "ZeRO stage 3", "optimizer state: cpu", "2 × NVIDIA GeForce RTX 4090 (24.0 GiB)",
                   "1 × NVIDIA GeForce RTX 3060 (12.0 GiB)", "64.0 GiB", "0:05:03", "4-bit nf4", "10: 3.9012"]:
        assert figure in readme, figure
    assert "kitchen-pc" not in readme
    config_block = re.search(r"```yaml\n(.*?)```", readme, re.S).group(1)
    assert yaml.safe_load(config_block) == yaml.safe_load((run.dir / "config.yaml").read_text())

    merged_meta = front_matter((export_run(run.dir, out_dir=tmp_path, merge=True).merged / "README.md").read_text())
    assert merged_meta["library_name"] == "transformers" and "peft" not in merged_meta["tags"]


def meta_end(readme: str) -> int:
    return readme.splitlines().index("---", 1)


def test_checkpoint_export(run, tmp_path):
    adapter = export_run(run.dir, out_dir=tmp_path, checkpoint=10).adapter
    assert adapter == tmp_path / f"{NAME}-step10"  # never in place of the final export
    source = run.dir / "checkpoints" / "step-00000010" / "adapter" / "adapter_model.safetensors"
    assert (adapter / "adapter_model.safetensors").read_bytes() == source.read_bytes()
    readme = (adapter / "README.md").read_text()
    assert "checkpoint at step 10 of 20" in readme
    assert "| Train loss (last logged) | 4.5000 |" in readme and "| Tokens trained on | 20,480 |" in readme
    assert "3.6789" not in readme  # the step-20 evaluation came after this checkpoint

    with pytest.raises(UserError, match=r"cannot be exported: it has no manifest .*\(intact checkpoints: 10\)$"):
        export_run(run.dir, out_dir=tmp_path, checkpoint=20)
    with pytest.raises(UserError, match="no checkpoint at step 99"):
        export_run(run.dir, out_dir=tmp_path, checkpoint="99")
    by_path = export_run(run.dir, out_dir=tmp_path, checkpoint=source.parent.parent, name="by-path").adapter
    assert by_path.name == "by-path" and (by_path / "adapter_model.safetensors").read_bytes() == source.read_bytes()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_cli(run, tmp_path, capsys):
    assert main(["export", str(run.dir), "--out", str(tmp_path), "--name", "my-bot", "--merge", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"adapter: {tmp_path / 'my-bot'}", f"merged: {tmp_path / 'my-bot-merged'}"]
    assert json.loads((tmp_path / "my-bot-merged" / "config.json").read_text())["dtype"] == "float16"

    assert main(["export", str(run.dir), "--out", str(tmp_path), "--name", "My_Bot"]) == 2
    assert "upper-case letters" in one_error_line(capsys)
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert main(["export", str(run.base)]) == 2
    assert "not a swarm run folder" in one_error_line(capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", str(run.dir), "--out", str(tmp_path), "--name", "mine"]) == 2
    assert "not a swarm export" in one_error_line(capsys) and (tmp_path / "mine" / "notes.txt").exists()


@pytest.mark.parametrize(
    "lora_options",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"q_proj": 64, "down_proj": 3}},
        {"use_dora": True},
        {"use_dora": True, "use_rslora": True},
    ],
    ids=["plain", "rslora", "patterns", "dora", "dora-rslora"],
)
def test_lora_run_merges_into_the_unquantized_base(run, tmp_path, lora_options):
    """Without 4-bit training the update goes onto the stored weights, scaled as peft scales it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora_run = lora_run_copy(run, tmp_path)
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", **lora_options)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32), config)
    perturb_lora(model, seed=3)
    merged, expected = merge_with_adapter(lora_run, model, run.ids, "tiny-lora")
    meta = front_matter((merged / "README.md").read_text())
    assert "lora" in meta["tags"] and "qlora" not in meta["tags"]


def test_dora_run_merges_into_what_the_4bit_base_computed(run, tmp_path):
    """DoRA's norm is taken of the weight as training saw it: the 4-bit base, dequantized."""
    from peft import LoraConfig, get_peft_model

    dora_run = tmp_path / "dora-run"
    shutil.copytree(run.dir, dora_run, ignore=shutil.ignore_patterns("export"))
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    model = get_peft_model(load_4bit(run.base), config)
    perturb_lora(model, seed=5)
    with torch.no_grad():  # magnitudes away from the base's own norms, so that they matter
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=torch.Generator().manual_seed(6)))
    _, expected = merge_with_adapter(dora_run, model, run.ids, "tiny-dora")
    assert (expected - run.base_only).abs().max() > 0.1  # the adapter changes the output


def merge_with_adapter(run_dir: Path, model, ids, name: str):
    """Put ``model``'s adapter into the run, export it merged; the merged model must compute as ``model``.

    Returns:
        The merged folder and ``model``'s logits.
    """
    from transformers import AutoModelForCausalLM

    shutil.rmtree(run_dir / "adapter")
    model.save_pretrained(run_dir / "adapter")
    merged = export_run(run_dir, merge=True, dtype="fp32", name=name).merged
    got = logits(AutoModelForCausalLM.from_pretrained(merged).eval(), ids)
    expected = logits(model.eval(), ids)
    assert (got - expected).abs().max() < 1e-3
    return merged, expected


def test_merge_refuses_adapters_it_cannot_fold(run, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora_run = lora_run_copy(run, tmp_path)
    config = LoraConfig(r=4, target_modules="all-linear", bias="lora_only", task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(run.base), config).save_pretrained(lora_run / "adapter")
    with pytest.raises(UserError, match="cannot be merged by swarm: it trains biases; export it without --merge"):
        export_run(lora_run, merge=True)
    assert not (lora_run / "export" / f"{NAME}-merged").exists()


def lora_run_copy(run, tmp_path: Path) -> Path:
    """A copy of the run folder whose config says the base was not quantized."""
    lora_run = tmp_path / "lora-run"
    shutil.copytree(run.dir, lora_run, ignore=shutil.ignore_patterns("export"))
    config = yaml.safe_load((lora_run / "config.yaml").read_text())
    config["quantization"]["bits"] = None
    (lora_run / "config.yaml").write_text(yaml.safe_dump(config))
    return lora_run


def test_merge_needs_local_base(run, tmp_path, capsys):
    moved = tmp_path / "run"
    shutil.copytree(run.dir, moved, ignore=shutil.ignore_patterns("export"))
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["model"]["path"] = str(tmp_path / "gone" / "Tiny-Llama")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))

    assert main(["export", str(moved), "--merge"]) == 2
    assert "is not a local folder" in one_error_line(capsys)
    assert not (moved / "export").exists()  # refused before anything was written
    # --base points at the weights; the card still names the base as the run did.
    assert main(["export", str(moved), "--merge", "--base", str(run.base)]) == 0
    meta = front_matter((moved / "export" / f"{NAME}-merged" / "README.md").read_text())
    assert meta["base_model"] == config["model"]["path"] and meta["license"] == "apache-2.0"


# Run in a fresh interpreter: in this one, memory freed by earlier tests would be reused and
# hide growth. RssAnon leaves out the base file's pages, which safetensors maps, not copies.
MEMORY_PROBE = """
import sys, threading, time
from pathlib import Path
import bitsandbytes, safetensors, torch, transformers.models.llama.modeling_llama
from swarm.export.merge import merge_adapter

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

start, peak, done = anon(), [0], False
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
merge_adapter(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), bits=4, load_dtype="bf16",
              dtype="bf16", max_shard_size=int(sys.argv[4]))
done = True
thread.join()
print(start, peak[0])
"""


def test_merge_memory_stays_bounded(tmp_path):
    """Merging a deep model holds about two shards and a few layer tensors, not the model."""
    import os
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / "deep", [DEMO], hidden=256, layers=64)  # 38M parameters, 0.5 MB tensors
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    del model
    shard = 4_000_000
    # A fixed mmap threshold makes glibc hand freed blocks back at once, so resident memory
    # follows what the merge holds rather than what the allocator keeps for later.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(base), str(tmp_path / "adapter"), str(tmp_path / "out"), str(shard)],
        capture_output=True, text=True, check=True, env=env,
    )
    start, peak = map(int, result.stdout.split()[-2:])
    shards = list((tmp_path / "out").glob("*.safetensors"))
    output_bytes = sum(p.stat().st_size for p in shards)
    assert output_bytes > 75e6 and len(shards) >= 19
    # Holding the merged weights would take output_bytes (77 MB); the merge needs about 20 MB.
    assert peak - start < output_bytes / 2, f"merge grew resident memory by {(peak - start) / 1e6:.0f} MB"
