"""GGUF export: a run trained for real, exported with llama.cpp's own tools, run in llama.cpp.

llama.cpp runs through llama-cpp-python (the `gguf` extra), in child processes (llamakit): a
crash in its native code fails one test with the signal's name instead of ending the suite.
Its converters come from the same release's source (tests/run.sh fetches them with
`python -m swarm.export.llama_cpp`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from swarm.cli import main
from swarm.export import export_run
from swarm.export.card import front_matter
from swarm.export.gguf_card import human_size
from llamakit import CRASH_SWITCH, llama_greedy, llama_logits, llama_tokenize
from swarm.tiny import make_tiny_model
from trainkit import DEMO_TEXT, run_dir_of, swarm, write_job

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp", reason="GGUF tests need the gguf extra (docs/export.md: the portable build)")

PROMPT = "The keeper climbed the stairs and lit the lamp"
# llama.cpp (f16 weights, its own kernels) against transformers (fp32): the largest difference
# of a logit, as a fraction of the largest logit. Measured 0.35% on the tiny Llama; the
# adapter moves the logits by far more (checked below), so a GGUF without it cannot pass.
TOLERANCE = 0.01
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's llama_ftype, in general.file_type


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def file_type(path: Path) -> int:
    from gguf import GGUFReader

    field = GGUFReader(path).fields["general.file_type"]
    return int(field.parts[field.data[0]][0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama with a SentencePiece tokenizer, QLoRA-trained by `swarm train` (fp32 on any CPU)."""
    root = tmp_path_factory.mktemp("gguf")
    base = make_tiny_model(root / "tiny-llama", [DEMO_TEXT], tokenizer="sentencepiece")
    job = write_job(
        root, base, train={"max_steps": 12, "lr": 1e-2, "precision": "fp32", "checkpoint_every": 12, "eval_every": 12},
        offload={"params": "none", "optimizer": "none"}, output={"dir": str(root / "runs"), "name": "tiny-gguf"},
    )
    run_dir = run_dir_of(swarm("train", str(job), cwd=root))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base)(PROMPT).input_ids
    return SimpleNamespace(root=root, base=base, run=run_dir, ids=ids)


@pytest.fixture(scope="module")
def exported(trained):
    out = trained.root / "out"
    result = export_run(trained.run, out_dir=out, merge=True, dtype="fp32", gguf=["f16", "q8_0", "q4_k_m"], gguf_adapter="f16")
    return result


def test_f16_gguf_gives_the_merged_models_logits(trained, exported):
    from transformers import AutoModelForCausalLM

    gguf = exported.gguf / "tiny-gguf-F16.gguf"
    assert [f.path for f in exported.gguf_files][:3] == [exported.gguf / f"tiny-gguf-{t}.gguf" for t in ("F16", "Q8_0", "Q4_K_M")]
    merged = hf_logits(AutoModelForCausalLM.from_pretrained(exported.merged).eval(), trained.ids)
    base = hf_logits(AutoModelForCausalLM.from_pretrained(trained.base, dtype=torch.float32).eval(), trained.ids)
    got = llama_logits(gguf, trained.ids)
    scale = np.abs(merged).max()
    assert np.abs(got - merged).max() < TOLERANCE * scale
    assert np.abs(merged - base).max() > 10 * TOLERANCE * scale  # the adapter shows: a base-only GGUF fails
    # llama.cpp reads the SentencePiece vocabulary as transformers does, chat markers included.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported.merged)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who lit the lamp?"}, {"role": "assistant", "content": PROMPT}], tokenize=False,
    )
    assert llama_tokenize(gguf, PROMPT) == trained.ids
    assert llama_tokenize(gguf, chat, special=True) == tokenizer(chat).input_ids
    # Greedy decoding goes on from the merged model's own choice.
    greedy = llama_greedy(gguf, trained.ids, 4)
    assert len(greedy) == 4 and greedy[0] == int(np.argmax(merged[-1]))


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_quantized_ggufs_generate(trained, exported, gguf_type):
    path = exported.gguf / f"tiny-gguf-{gguf_type.upper()}.gguf"
    assert file_type(path) == FILE_TYPES[gguf_type]
    assert path.stat().st_size < (exported.gguf / "tiny-gguf-F16.gguf").stat().st_size
    # A quantized model still computes roughly what the merged model does, and generates from it.
    f16 = llama_logits(exported.gguf / "tiny-gguf-F16.gguf", trained.ids)
    quant = llama_logits(path, trained.ids)
    assert np.corrcoef(f16.ravel(), quant.ravel())[0, 1] > 0.9
    tokens = llama_greedy(path, trained.ids, 8)
    assert len(tokens) == 8 and tokens[0] == int(np.argmax(quant[-1])) and max(tokens) < quant.shape[1]


def test_gguf_adapter_on_the_base_gguf_changes_logits_as_the_merge_does(trained, exported, tmp_path):
    """The GGUF LoRA on a GGUF of the (unquantized) base gives what merging into that base gives.

    A QLoRA adapter trained on the 4-bit base; a base GGUF people keep is made from the
    unquantized weights, so the reference is the merge into those: the run's config with
    quantization off (on this tiny random model the 4-bit rounding alone moves the logits
    as much as the adapter does, so the QLoRA merge is no reference for an unquantized base).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swarm.export.llama_cpp import convert_model, find_converter

    base_gguf = tmp_path / "base-F16.gguf"
    convert_model(find_converter(), trained.base, base_gguf, "f16", tmp_path / "log")
    lora = exported.gguf / "tiny-gguf-lora-F16.gguf"
    with_lora = llama_logits(base_gguf, trained.ids, lora=lora)
    without = llama_logits(base_gguf, trained.ids)

    unquantized = tmp_path / "run"
    shutil.copytree(trained.run, unquantized, ignore=shutil.ignore_patterns("export", "checkpoints"))
    config = yaml.safe_load((unquantized / "config.yaml").read_text())
    config["quantization"]["bits"] = None
    (unquantized / "config.yaml").write_text(yaml.safe_dump(config))
    merged = export_run(unquantized, merge=True, dtype="fp32", gguf=["f16"], name="unquantized")
    merged_gguf = llama_logits(merged.gguf / "unquantized-F16.gguf", trained.ids)

    full_base = AutoModelForCausalLM.from_pretrained(trained.base, dtype=torch.float32)
    peft = hf_logits(PeftModel.from_pretrained(full_base, exported.adapter).eval(), trained.ids)
    scale = np.abs(peft).max()
    assert np.abs(with_lora - peft).max() < TOLERANCE * scale  # the adapter as peft applies it
    assert np.abs(with_lora - merged_gguf).max() < TOLERANCE * scale  # the merge as llama.cpp runs it
    assert np.abs(with_lora - without).max() > 10 * TOLERANCE * scale  # and the adapter matters


def test_modelfile_and_card(trained, exported):
    modelfile = (exported.gguf / "Modelfile").read_text()
    assert "FROM ./tiny-gguf-F16.gguf\n" in modelfile
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    assert "<|im_start|>{{ .Role }}" in template and "{{ .Content }}<|im_end|>" in template
    stops = re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)
    assert stops == ["<|im_start|>", "<|im_end|>", "</s>"]
    # Each stop is one token of the model's vocabulary, so generation can end on it.
    f16 = exported.gguf / "tiny-gguf-F16.gguf"
    assert all(len(llama_tokenize(f16, s, special=True, add_bos=False)) == 1 for s in stops)

    readme = (exported.gguf / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    for f in exported.gguf_files:
        size = f.path.stat().st_size
        assert f"| `{f.path.name}` | {f.gguf_type.upper()} (" in readme and f"{human_size(size)} ({size:,} bytes)" in readme
    assert "ollama create" in readme and "--lora tiny-gguf-lora-F16.gguf" in readme
    # The merged model folder carries the SentencePiece model the converter needs.
    assert (exported.merged / "tokenizer.model").read_bytes() == (trained.base / "tokenizer.model").read_bytes()


def test_cli_gguf_only_and_refusals(trained, tmp_path, capsys):
    assert main(["export", str(trained.run), "--out", str(tmp_path), "--gguf", "Q8_0", "--name", "cli"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"adapter: {tmp_path / 'cli'}" and lines[1].startswith(f"gguf: {tmp_path / 'cli-gguf' / 'cli-Q8_0.gguf'} (q8_0, ")
    assert not (tmp_path / "cli-merged").exists() and not list(tmp_path.glob(".*"))  # the merge was scratch

    for args, message in [
        (["--gguf", "q4_k_m,q9"], "unknown type 'q9'"),
        (["--gguf-adapter", "q4_k_m"], "--gguf-adapter: type 'q4_k_m' is not one of f32, f16, bf16, q8_0"),
        (["--gguf", "--llama-cpp", str(tmp_path)], "is not a llama.cpp checkout"),
    ]:
        assert main(["export", str(trained.run), "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
        assert not (tmp_path / "x").exists()


def test_unknown_bpe_tokenizer_is_refused_in_one_line(trained, tmp_path, capsys):
    """A byte-level BPE tokenizer llama.cpp does not know: one line naming the cause and the fix."""
    bpe = make_tiny_model(tmp_path / "bpe-llama", [DEMO_TEXT], tokenizer="bpe")
    capsys.readouterr()
    run = tmp_path / "run"
    shutil.copytree(trained.run, run, ignore=shutil.ignore_patterns("export", "checkpoints"))
    shutil.rmtree(run / "tokenizer")
    shutil.copytree(bpe, run / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["path"] = str(bpe)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["export", str(run), "--gguf", "f16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not know this model's BPE tokenizer" in err
    assert "--tokenizer sentencepiece" in err
    assert not (run / "export" / f"{json.loads((run / 'run.json').read_text())['name']}-gguf").exists()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_convert(arch, tmp_path):
    """Qwen2 (attention biases) and Mistral convert; llama.cpp computes what transformers does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.export.llama_cpp import convert_model, find_converter

    model = make_tiny_model(tmp_path / f"tiny-{arch}", [DEMO_TEXT], arch=arch, tokenizer="sentencepiece")
    if arch == "qwen2":  # its q, k, v projections have biases; make them non-zero, so a dropped one shows
        hf = AutoModelForCausalLM.from_pretrained(model)
        with torch.no_grad():
            biases = [p for n, p in hf.named_parameters() if n.endswith(".bias")]
            assert len(biases) == 6
            for bias in biases:
                bias.normal_(0, 0.5)
        hf.save_pretrained(model)
    gguf = tmp_path / f"{arch}.gguf"
    convert_model(find_converter(), model, gguf, "f16", tmp_path / "log")
    ids = AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
    expected = hf_logits(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval(), ids)
    assert np.abs(llama_logits(gguf, ids) - expected).max() < TOLERANCE * np.abs(expected).max()


CRASH_MESSAGE = ("llama.cpp died with SIGSEGV evaluating tiny-gguf-F16.gguf: a native build for another CPU? "
                 "check with `python -m swarm.export.llama_build`; see docs/export.md")


def test_a_crash_in_llama_cpp_fails_with_its_signal(trained, exported, monkeypatch):
    """The child segfaults (a real one, in native code) after loading the model: one clear AssertionError."""
    monkeypatch.setenv(CRASH_SWITCH, "1")
    with pytest.raises(AssertionError) as crash:
        llama_logits(exported.gguf / "tiny-gguf-F16.gguf", trained.ids)
    assert str(crash.value) == CRASH_MESSAGE
    monkeypatch.delenv(CRASH_SWITCH)
    assert llama_logits(exported.gguf / "tiny-gguf-F16.gguf", trained.ids).shape[0] == len(trained.ids)
    with pytest.raises(AssertionError, match=r"llama.cpp failed \(tokenize\) on .*missing.gguf: .*"):
        llama_tokenize(exported.gguf / "missing.gguf", PROMPT)


def test_a_suite_goes_on_after_a_crash_in_llama_cpp(trained, exported, tmp_path):
    """In a pytest run of its own: the test whose llama.cpp crashes fails with the message, the next one runs."""
    (tmp_path / "test_crash.py").write_text(
        "import os\nfrom llamakit import llama_logits\n\n"
        "def test_crashes():\n    os.environ['SWARM_TEST_LLAMA_CRASH'] = '1'\n"
        "    llama_logits(os.environ['GGUF'], [1, 2, 3])\n\n"
        "def test_runs_after():\n    os.environ.pop('SWARM_TEST_LLAMA_CRASH')\n"
        "    assert llama_logits(os.environ['GGUF'], [1, 2, 3]).shape[0] == 3\n"
    )
    env = {**os.environ, "GGUF": str(exported.gguf / "tiny-gguf-F16.gguf"),
           "PYTHONPATH": str(Path(__file__).parent)}
    env.pop(CRASH_SWITCH, None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_crash.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr  # tests failed; not killed by a signal (negative)
    assert "1 failed, 1 passed" in run.stdout and f"AssertionError: {CRASH_MESSAGE}" in run.stdout, run.stdout
