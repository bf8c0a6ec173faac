"""Bad input to ``swarm train`` gets one line naming the problem and exit status 2,
before Ray starts or any weight is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from swarm.cli import main
from swarm.config import apply_overrides, load_job
from swarm.errors import UserError

DEMO_TEXT = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.txt"


def job_file(folder: Path, model: Path | str, **sections) -> Path:
    job = {
        "model": {"path": str(model)},
        "data": {"files": [str(DEMO_TEXT)], "format": "text", "seq_len": 32},
        "train": {"max_steps": 2},
        "output": {"dir": str(folder / "runs")},
    }
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def one_error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what fixtures printed (making a tiny model shows a progress bar)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_model_folder(tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(job_file(tmp_path, tmp_path / "nowhere"))])
    assert "model.path" in line and "does not exist" in line


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  path: [unclosed\n")
    line = one_error_line(capsys, ["train", str(path)])
    assert str(path) in line and "not valid YAML" in line


def test_unknown_key_names_key_and_file(tmp_path, capsys):
    path = job_file(tmp_path, tmp_path, train={"max_stpes": 3})
    line = one_error_line(capsys, ["train", str(path)])
    assert "unknown key 'train.max_stpes'" in line and str(path) in line


def test_unknown_key_from_set(tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(job_file(tmp_path, tmp_path)), "--set", "lora.rank=8"])
    assert "unknown key 'lora.rank'" in line


def test_seq_len_below_one(tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(job_file(tmp_path, tmp_path)), "--set", "data.seq_len=0"])
    assert "data.seq_len" in line


def test_nvme_offload_without_folder(tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(job_file(tmp_path, tmp_path, offload={"params": "nvme"}))])
    assert "offload.nvme_path is required" in line


def test_offloaded_optimizer_must_be_adamw(tmp_path, capsys):
    path = job_file(tmp_path, tmp_path, offload={"optimizer": "cpu"}, train={"optimizer": "adamw_8bit"})
    assert "train.optimizer=adamw_8bit" in one_error_line(capsys, ["train", str(path)])


def test_empty_data_file(tmp_path, capsys, tiny_models):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = job_file(tmp_path, tiny_models("llama"), data={"files": [str(empty)]})
    line = one_error_line(capsys, ["train", str(path)])
    assert "empty.jsonl" in line and "empty" in line


def test_record_without_needed_fields(tmp_path, capsys, tiny_models):
    data = tmp_path / "alpaca.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "No answer"}\n')
    path = job_file(tmp_path, tiny_models("llama"), data={"files": [str(data)], "format": "instruction"})
    line = one_error_line(capsys, ["train", str(path)])
    assert "alpaca.jsonl line 2" in line and "output" in line


def test_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    line = one_error_line(capsys, ["train", str(job_file(tmp_path, tmp_path / "model"))])
    assert "no config.json" in line


def test_set_values_are_yaml():
    raw = apply_overrides({}, ["data.files=[a.jsonl,b.jsonl]", "train.lr=1e-4", "quantization.bits=none"])
    assert raw == {"data": {"files": ["a.jsonl", "b.jsonl"]}, "train": {"lr": 1e-4}, "quantization": {"bits": "none"}}


def test_set_without_equals_is_refused():
    with pytest.raises(UserError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_quantization_none_turns_4bit_off(tmp_path):
    job = load_job(job_file(tmp_path, tmp_path), ["quantization.bits=none"])
    assert job.quantization.bits is None
