"""``swarm plan`` through ``swarm.cli.main``: output, JSON, exit codes, hardware files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm.cli import main
from swarm.plan.inventories import load_hardware

ROOT = Path(__file__).resolve().parents[2]
HARDWARE = sorted((ROOT / "configs" / "hardware").glob("*.yaml"))


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "model: {path: meta-llama/Llama-3.1-8B-Instruct}\n"
        "data: {files: [train.jsonl], seq_len: 2048}\n"
        "train: {micro_batch: 4, grad_accum: 4}\n"
    )
    return path


def write(tmp_path, text, name="hw.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_plan_prints_tables_and_decision(job_file, capsys):
    rc = main(["plan", str(job_file), "--hardware", str(ROOT / "configs/hardware/one-4060ti-32gb.yaml")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "plan: replicate" in out and "desktop" in out and "activations: logits and loss" in out


def test_cpu_step_times_are_said_to_be_rough(job_file, tmp_path, capsys):
    """The CPU estimate was 1.7x off on SmolLM2-135M (issue 33) and far more on tiny models."""
    caveat = "rough on CPUs: about 2x off for a 135M model, far more for tiny ones"
    hw = write(tmp_path, "nodes: [{name: box, ram_gb: 64}]\n")
    rc = main(["plan", str(job_file), "--hardware", hw, "--set", "model.path=qwen2.5-0.5b", "--set", "data.seq_len=256"])
    out = " ".join(capsys.readouterr().out.split())  # rich folds long lines
    assert rc == 0 and "plan: " in out and "(CPU, 1 worker)" in out
    assert f"step times {caveat}" in out  # the strategies table
    assert f"tokens/s ({caveat})," in out  # the decision
    # A GPU plan's figures carry no such note.
    assert main(["plan", str(job_file), "--hardware", str(ROOT / "configs/hardware/one-4060ti-32gb.yaml")]) == 0
    assert "rough" not in capsys.readouterr().out


def test_plan_json_is_one_object(job_file, capsys):
    rc = main(["plan", str(job_file), "--hardware", str(ROOT / "configs/hardware/two-pcs-3090.yaml"),
               "--set", "model.path=llama-3.1-70b", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["fits"] and data["strategy"]["name"] == "diloco"
    assert [n["name"] for n in data["nodes"]] == ["pc1", "pc2"]
    assert [p["name"] for p in data["pcs"]] == ["pc1", "pc2"] and data["sync"]["every"] >= 1


def test_nothing_fits_exits_1_with_the_reason(job_file, tmp_path, capsys):
    hw = write(tmp_path, "nodes: [{name: small, gpus: [{name: RTX 3060}], ram_gb: 16}]\n")
    rc = main(["plan", str(job_file), "--hardware", hw, "--set", "model.path=llama-3.1-70b"])
    out = capsys.readouterr().out
    assert rc == 1 and "does not fit:" in out and "largest:" in out


@pytest.mark.parametrize("text, message", [
    ("nodes: [{name: a, ram_gb: 32, vram: 8}]\n", "unknown key 'nodes.0.vram'"),
    ("nodes: [{name: a, gpus: [{name: Voodoo 5}], ram_gb: 32}]\n", "give its vram_gb"),
    ("nodes: [{name: a, ram_gb: -1}]\n", "nodes.0.ram_gb"),
    ("nodes: []\n", "nodes"),
    ("nodes: [{name: a, ram_gb: 8}, {name: a, ram_gb: 8}]\n", "repeated: a"),
    ("nodes: [{name: a, ram_gb: 8}\n", "not valid YAML"),
    ("- just a list\n", "must be a mapping"),
])
def test_bad_hardware_file_is_one_line_and_exit_2(job_file, tmp_path, capsys, text, message):
    rc = main(["plan", str(job_file), "--hardware", write(tmp_path, text)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_missing_hardware_file(job_file, capsys):
    assert main(["plan", str(job_file), "--hardware", "nope.yaml"]) == 2
    assert capsys.readouterr().err == "error: hardware file nope.yaml does not exist\n"


def test_unknown_model_is_a_user_error(job_file, capsys):
    rc = main(["plan", str(job_file), "--set", "model.path=acme/secret-model"])
    assert rc == 2 and "give a local folder" in capsys.readouterr().err


def test_cluster_without_a_running_swarm(job_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "home"))
    assert main(["plan", str(job_file), "--cluster"]) == 2
    assert capsys.readouterr().err == "error: no running swarm; run `swarm up` or pass --hardware FILE\n"


def test_this_machine_by_default(tmp_path, capsys):
    from swarm.tiny import model_config

    model_config("llama", 512).save_pretrained(tmp_path / "tiny")
    job = write(tmp_path, f"model: {{path: {tmp_path / 'tiny'}}}\ndata: {{files: [t.txt], seq_len: 64}}\n", "job.yaml")
    rc = main(["plan", job, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["fits"] and len(data["nodes"]) == 1


@pytest.mark.parametrize("path", HARDWARE, ids=lambda p: p.name)
def test_shipped_hardware_files_load_and_say_how_to_run(path):
    assert path.read_text().startswith(f"# swarm plan configs/demo.yaml --hardware configs/hardware/{path.name}")
    assert load_hardware(path).nodes


def test_hardware_files_are_shipped():
    assert len(HARDWARE) >= 3
