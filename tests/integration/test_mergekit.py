"""mergekit reads swarm's merged exports as they are: a SLERP of two of them with mergekit's own CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from adapterkit import make_lora_run
from swarm.export import export_run
from swarm.tiny import make_tiny_model
from trainkit import DEMO_TEXT

pytestmark = pytest.mark.integration
pytest.importorskip("mergekit", reason="mergekit is in the test extra")


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spherical interpolation of tensor ``a`` towards ``b``, both taken as one vector each."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    theta = np.arccos(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)))
    return ((np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)).reshape(a.shape)


def test_mergekit_slerps_two_merged_exports(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / "tiny-llama", [DEMO_TEXT], tokenizer="sentencepiece")
    merged = []
    for seed, name in [(1, "poems"), (2, "recipes")]:
        run = make_lora_run(tmp_path / "runs", name, base, seed=seed)
        merged.append(export_run(run, merge=True, dtype="fp32").merged)
    config = {
        "merge_method": "slerp", "base_model": str(merged[0]),
        "models": [{"model": str(m)} for m in merged], "parameters": {"t": 0.5}, "dtype": "float32",
    }
    (tmp_path / "slerp.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "slerp"
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    result = subprocess.run(
        [str(mergekit_yaml), str(tmp_path / "slerp.yaml"), str(out), "--copy-tokenizer", "--lazy-unpickle"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 293, 308, 286, 485]])).logits
    assert torch.isfinite(logits).all()
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors = []
    for folder in (*merged, out):
        with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
            tensors.append(f.get_tensor(key).numpy())
    a, b, mixed = tensors
    assert not np.allclose(a, b)  # the two fine-tunes differ ...
    np.testing.assert_allclose(mixed, slerp(0.5, a, b), atol=1e-6)  # ... and mergekit interpolated them
    assert np.abs(mixed - (a + b) / 2).max() > 1e-3  # on the sphere, not on the line between
    assert (out / "tokenizer.model").is_file()  # the base's SentencePiece model came along
