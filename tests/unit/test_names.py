"""Standard run names: the parts they are built from, the rules, and refusal of bad names."""

from __future__ import annotations

import datetime as dt
import re

import pytest
import yaml

from swarm.cli import main
from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.export.names import (
    MAX_LENGTH,
    base_model_part,
    checkpoint_name,
    dataset_part,
    run_name,
    slugify,
    validate_name,
)

DAY = dt.date(2026, 11, 28)
RULES = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")


def job(path="meta-llama/Llama-3.1-8B", files=("data/alpaca.jsonl",), bits=4, r=16) -> JobConfig:
    return JobConfig.model_validate(
        {"model": {"path": path}, "data": {"files": list(files)}, "quantization": {"bits": bits}, "lora": {"r": r}}
    )


def follows_rules(name: str) -> bool:
    return bool(RULES.fullmatch(name)) and "--" not in name and ".." not in name and len(name) <= MAX_LENGTH


def test_the_standard_example():
    assert run_name(job(), DAY) == "llama-3.1-8b-qlora-alpaca-r16-20261128"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(bits=None, r=8), "llama-3.1-8b-lora-alpaca-r8-20261128"),
        (dict(path="/home/me/models/Llama-2-7b-hf/"), "llama-2-7b-qlora-alpaca-r16-20261128"),
        (dict(path="unsloth/Mistral-7B-Instruct-v0.3-bnb-4bit"), "mistral-7b-instruct-v0.3-qlora-alpaca-r16-20261128"),
        (
            dict(path="/cache/hub/models--Qwen--Qwen2.5-Coder-7B-Instruct/snapshots/0a1b2c3d"),
            "qwen2.5-coder-7b-instruct-qlora-alpaca-r16-20261128",
        ),
        (dict(files=["data/dolly/train-00000-of-00004.parquet"]), "llama-3.1-8b-qlora-dolly-r16-20261128"),
        (dict(files=["a/alpaca.jsonl", "b/dolly.jsonl"]), "llama-3.1-8b-qlora-alpaca-mix-r16-20261128"),
        (dict(files=["a/alpaca.jsonl", "b/alpaca.jsonl"]), "llama-3.1-8b-qlora-alpaca-r16-20261128"),
        (dict(files=["My Chats (v1.2).json.gz"]), "llama-3.1-8b-qlora-my-chats-v1.2-r16-20261128"),
    ],
)
def test_parts(kwargs, expected):
    assert run_name(job(**kwargs), DAY) == expected


def test_long_parts_are_shortened_keeping_method_rank_and_date():
    name = run_name(job(path="org/" + "Very_Long.Model-Name" * 10, files=["x/" + "Data Set " * 20 + ".jsonl"]), DAY)
    assert len(name) <= MAX_LENGTH and follows_rules(name)
    assert name.startswith("very-long.model-name") and name.endswith("-r16-20261128") and "-qlora-" in name


@pytest.mark.parametrize("path", ["/", ".", "__/", "ORG/--", "a/b/c/ÜBER modell", "x" * 300, "weird..name--hf"])
@pytest.mark.parametrize("data", ["-.jsonl", "..", "Ünïcode.txt", "a" * 300 + ".txt", "train.jsonl"])
def test_every_generated_name_follows_the_rules(path, data):
    name = run_name(job(path=path, files=[data]), dt.datetime(2026, 1, 2, 23, 59))
    assert follows_rules(name), name
    assert validate_name(name) == name
    assert name.endswith("-r16-20260102")


def test_checkpoint_names():
    name = "llama-3.1-8b-qlora-alpaca-r16-20261128"
    assert checkpoint_name(name, 250) == f"{name}-step250"
    long = checkpoint_name("a" * 90 + "-b.c", 1234567)
    assert len(long) == MAX_LENGTH and long.endswith("a-step1234567") and follows_rules(long)


def test_date_defaults_to_today():
    assert run_name(job()).endswith(f"-{dt.date.today():%Y%m%d}")


def test_slug_and_part_helpers():
    assert slugify("  Foo_Bar..v2.-x  ") == "foo-bar.v2-x"
    assert base_model_part("Llama-2-7b-chat-hf") == "llama-2-7b-chat"
    assert base_model_part("meta-llama/Meta-Llama-3-8B") == "meta-llama-3-8b"
    assert base_model_part("-hf") == "hf"  # a suffix is noise only after something
    assert dataset_part(["data.jsonl"]) == "data"  # generic stem, but no folder to name it


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        ("", "empty"),
        ("a" * 97, "97 characters long; the limit is 96"),
        ("My-Model", "upper-case letters"),
        ("my_model", "the characters '_'"),
        ("my model/v2", "the characters ' ' '/'"),
        ("-my-model", "must start and end with a letter or a digit"),
        ("my-model.", "must start and end with a letter or a digit"),
        ("my--model", "contains '--' or '..'"),
        ("my..model", "contains '--' or '..'"),
    ],
)
def test_bad_names_are_refused_naming_the_rule(bad, rule):
    with pytest.raises(UserError) as info:
        validate_name(bad)
    message = str(info.value)
    assert rule in message and "\n" not in message


def test_refusal_suggests_a_valid_name():
    with pytest.raises(UserError, match=r"e\.g\. 'my-model'$"):
        validate_name("My_Model")


@pytest.mark.parametrize("good", ["a", "7", "my-support-bot", "llama-3.1-8b-qlora-alpaca-r16-20261128", "x" * 96])
def test_good_names_pass(good):
    assert validate_name(good) == good


def test_cli_refuses_a_bad_name_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(job().model_dump(mode="json")))
    assert main(["export", str(run), "--name", "Bad_Name"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: run name 'Bad_Name' has upper-case letters")
    assert not (run / "export").exists()


def test_cli_refuses_a_bad_name_recorded_in_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(job().model_dump(mode="json")))
    (run / "run.json").write_text('{"name": "Old Run"}')
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run name 'Old Run' has upper-case letters and the characters ' '")
    assert err.endswith("; e.g. 'old-run'; give the export a valid name with --name\n")
