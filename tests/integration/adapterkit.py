"""Run folders with real peft adapters of chosen rank and base, for merge tests (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from swarm.config.models import JobConfig
from trainkit import DEMO_TEXT


def make_lora_run(root: Path, name: str, base: Path, seed: int, r: int = 8, rslora: bool = False) -> Path:
    """A finished LoRA run (unquantized base, fp32) whose adapter has random, non-zero A and B (rsLoRA scaling if asked)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / name
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", use_rslora=rslora)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.normal_(0, 0.1)
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    job = JobConfig.model_validate({
        "model": {"path": str(base)}, "quantization": {"bits": None}, "lora": {"r": r, "alpha": 16, "use_rslora": rslora},
        "data": {"files": [str(DEMO_TEXT)]}, "train": {"max_steps": 10, "precision": "fp32"},
        "output": {"dir": str(root), "name": name},
    })
    (run / "config.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    info = {"name": name, "steps": 10, "train_loss": 1.25 + seed / 100, "eval_loss": 2.5, "precision": "fp32"}
    (run / "run.json").write_text(json.dumps(info))
    return run
