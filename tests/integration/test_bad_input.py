"""Bad input, verb by verb: one ``error:`` line naming the input and the fix, exit status 2,
no traceback, and nothing written.

Each case runs the real command line (``swarm.cli.main``) in a workspace of real files: a
tiny model made locally, job files, data files of every kind of wrongness. After each case
the workspace (and ``$SWARM_HOME``) must hold exactly what it held before.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from swarm.cli import main

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.txt"


@pytest.fixture(scope="module")
def ws(tiny_models, tmp_path_factory):
    """The workspace: a tiny model, a good job and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("bad-input")
    model = tiny_models("llama")
    (root / "no-config").mkdir()
    truncated = root / "truncated-model"
    truncated.mkdir()
    (truncated / "config.json").write_text((model / "config.json").read_text()[:40])
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "bad-json.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    (root / "no-output.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    (root / "chat-not-list.jsonl").write_text('{"messages": "hello"}\n')
    (root / "pairs-no-rejected.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                                  '{"prompt": "d", "chosen": "e"}\n')
    (root / "qa.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (root / "runs" / "taken").mkdir(parents=True)
    (root / "cluster-bad-yaml.yaml").write_text("nodes: [unclosed\n")
    (root / "cluster-bad-address.yaml").write_text(
        "head: 999.1.2.3\nnodes:\n  - address: 999.1.2.3\n  - address: not an address\n")
    (root / "hardware-bad.yaml").write_text("nodes: [{name: a, ram_gb: -1}]\n")
    (root / "a-file").write_text("not a folder")
    (root / "home").mkdir()
    good = {
        "model": {"path": str(model)},
        "data": {"files": [str(DEMO)], "format": "text", "seq_len": 32},
        "train": {"max_steps": 2},
        "output": {"dir": str(root / "runs")},
        "ray": {"dashboard": False},
    }
    write_yaml(root / "job.yaml", good)
    import datasets

    # Hugging Face data sets come from an empty cache, offline (as HF_HUB_OFFLINE=1 would have it).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
        yield root


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def job_with(ws: Path, name: str, **changes) -> str:
    """A copy of the good job with ``section.key`` changes, as a file in the workspace."""
    job = yaml.safe_load((ws / "job.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        job.setdefault(section, {})[key] = value
    return str(write_yaml(ws / f"job-{name}.yaml", job))


def text_file(ws: Path, name: str, text: str) -> str:
    (ws / name).write_text(text)
    return str(ws / name)


# (id, argv built from the workspace, a piece of the one line the user must see)
CASES = [
    # swarm train: the job file
    ("train-job-missing", lambda ws: ["train", str(ws / "nope.yaml")], "does not exist"),
    ("train-job-is-folder", lambda ws: ["train", str(ws)], "is a folder"),
    ("train-job-empty", lambda ws: ["train", text_file(ws, "empty.yaml", "")], "missing required key 'model'"),
    ("train-job-malformed", lambda ws: ["train", text_file(ws, "bad.yaml", "model:\n  path: [x\n")], "not valid YAML"),
    ("train-job-list", lambda ws: ["train", text_file(ws, "list.yaml", "- a\n- b\n")], "must be a mapping"),
    ("train-unknown-key", lambda ws: ["train", job_with(ws, "typo", train__max_stpes=3)], "unknown key 'train.max_stpes'"),
    ("train-wrong-type", lambda ws: ["train", job_with(ws, "type", train__max_steps="ten")], "train.max_steps"),
    ("train-negative-lr", lambda ws: ["train", job_with(ws, "lr", train__lr=-1)], "train.lr"),
    ("train-huge-batch", lambda ws: ["train", job_with(ws, "mb", train__micro_batch=10**9)], "train.micro_batch"),
    ("train-rank-zero", lambda ws: ["train", job_with(ws, "r", lora__r=0)], "lora.r"),
    ("train-seq-len-zero", lambda ws: ["train", job_with(ws, "seq", data__seq_len=0)], "data.seq_len"),
    ("train-format-unknown", lambda ws: ["train", job_with(ws, "fmt", data__format="xml")], "data.format"),
    ("train-workers-zero", lambda ws: ["train", job_with(ws, "w0", train__workers=0)], "train.workers"),
    ("train-min-above-workers", lambda ws: ["train", job_with(ws, "min", train__workers=1, train__min_workers=2)],
     "min_workers=2 is above train.workers=1"),
    ("train-nvme-without-path", lambda ws: ["train", job_with(ws, "nvme", offload__params="nvme")], "offload.nvme_path"),
    ("train-offloaded-8bit-adam", lambda ws: ["train", job_with(ws, "8bit", train__optimizer="adamw_8bit",
                                                                offload__optimizer="cpu")], "cannot be offloaded"),
    # swarm train: what the job points at
    ("train-model-missing", lambda ws: ["train", job_with(ws, "nomodel", model__path=str(ws / "gone"))],
     "model.path: folder"),
    ("train-model-no-config", lambda ws: ["train", job_with(ws, "nocfg", model__path=str(ws / "no-config"))],
     "has no config.json"),
    ("train-model-truncated-config", lambda ws: ["train", job_with(ws, "trunc", model__path=str(ws / "truncated-model"))],
     "config.json"),
    ("train-data-missing", lambda ws: ["train", job_with(ws, "nodata", data__files=[str(ws / "nope.txt")])], "not found"),
    ("train-data-unicode-missing", lambda ws: ["train", job_with(ws, "uni", data__files=[str(ws / "données" / "ü.jsonl")])],
     "ü.jsonl"),
    ("train-data-empty", lambda ws: ["train", job_with(ws, "empty", data__files=[str(ws / "empty.txt")])], "is empty"),
    ("train-data-binary", lambda ws: ["train", job_with(ws, "bin", data__files=[str(ws / "binary.txt")])], "UTF-8"),
    ("train-data-bad-json", lambda ws: ["train", job_with(ws, "badjson", data__files=[str(ws / "bad-json.jsonl")],
                                                          data__format="instruction")], "line 2"),
    ("train-data-no-output", lambda ws: ["train", job_with(ws, "noout", data__files=[str(ws / "no-output.jsonl")],
                                                           data__format="instruction")], "no 'output' field"),
    ("train-data-chat-not-list", lambda ws: ["train", job_with(ws, "chat", data__files=[str(ws / "chat-not-list.jsonl")],
                                                               data__format="chat")], "'messages' must be"),
    ("train-lora-target-unknown", lambda ws: ["train", job_with(ws, "tgt", lora__targets=["no_such_proj"])],
     "lora.targets"),
    # swarm train: data people bring, methods, trackers
    ("train-pair-without-rejected", lambda ws: ["train", job_with(ws, "pair", data__files=[str(ws / "pairs-no-rejected.jsonl")],
                                                              data__format="preference", train__method="dpo")],
     "line 2: record has no 'rejected' field"),
    ("train-column-missing", lambda ws: ["train", job_with(ws, "col", data__files=[str(ws / "qa.jsonl")],
                                                           data__format="instruction",
                                                           data__columns={"instruction": "prompt", "output": "answer"})],
     "data.columns maps output to column 'answer', which"),
    ("train-column-unknown-field", lambda ws: ["train", job_with(ws, "colf", data__columns={"body": "text"})],
     "data.columns names body, which format 'text' does not read"),
    ("train-hub-not-cached", lambda ws: ["train", job_with(ws, "hub", data__files=["hf:swarm-tests/not-cached"])],
     "hf:swarm-tests/not-cached is not in the local cache"),
    ("train-hub-malformed", lambda ws: ["train", job_with(ws, "hubbad", data__files=["hf:no-organisation"])],
     "not a Hugging Face data set of the form hf:ORG/NAME"),
    ("train-dpo-on-text", lambda ws: ["train", job_with(ws, "dpo", train__method="dpo")],
     "train.method=dpo with data.format=text"),
    ("train-dora-zero3", lambda ws: ["train", job_with(ws, "dora", lora__use_dora=True, train__strategy="shard")],
     "lora.use_dora with a 4-bit base cannot train under ZeRO-3"),
    ("train-tracker-unknown", lambda ws: ["train", job_with(ws, "trk", log__to=["comet"])], "log.to"),
    ("train-wandb-no-key", lambda ws: ["train", job_with(ws, "wandb", log__to=["wandb"])],
     "log.to: wandb has no API key"),
    ("train-set-no-equals", lambda ws: ["train", str(ws / "job.yaml"), "--set", "train.max_steps"],
     "not of the form section.key=value"),
    ("train-set-bad-yaml", lambda ws: ["train", str(ws / "job.yaml"), "--set", "data.files=[x"], "not valid YAML"),
    ("train-set-into-a-value", lambda ws: ["train", str(ws / "job.yaml"), "--set", "train.max_steps.x=1"], "is a value"),
    ("train-set-unknown", lambda ws: ["train", str(ws / "job.yaml"), "--set", "lora.rank=8"], "unknown key 'lora.rank'"),
    ("train-output-name-bad", lambda ws: ["train", job_with(ws, "name", output__name="Bad_Name")], "upper-case"),
    ("train-output-name-taken", lambda ws: ["train", job_with(ws, "taken", output__name="taken")], "exists"),
    ("train-resume-missing", lambda ws: ["train", str(ws / "job.yaml"), "--resume", str(ws / "nope")], "does not exist"),
    ("train-resume-nothing", lambda ws: ["train", str(ws / "job.yaml"), "--resume"], "no earlier run"),
    ("train-ray-unreachable", lambda ws: ["train", job_with(ws, "ray", ray__address="127.0.0.1:1")], "nothing answers"),
    ("train-ray-malformed", lambda ws: ["train", job_with(ws, "raybad", ray__address="nohost")], "not HOST:PORT"),
    ("train-no-job", lambda ws: ["train"], "required"),
    # swarm plan
    ("plan-job-missing", lambda ws: ["plan", str(ws / "nope.yaml")], "does not exist"),
    ("plan-hardware-missing", lambda ws: ["plan", str(ws / "job.yaml"), "--hardware", str(ws / "nope.yaml")],
     "does not exist"),
    ("plan-hardware-bad", lambda ws: ["plan", str(ws / "job.yaml"), "--hardware", str(ws / "hardware-bad.yaml")],
     "ram_gb"),
    ("plan-unknown-model", lambda ws: ["plan", str(ws / "job.yaml"), "--set", "model.path=acme/secret"],
     "give a local folder"),
    ("plan-two-sources", lambda ws: ["plan", str(ws / "job.yaml"), "--cluster", "--hardware", "x"], "not allowed"),
    # swarm export
    ("export-missing", lambda ws: ["export", str(ws / "nowhere")], "does not exist"),
    ("export-not-a-run", lambda ws: ["export", str(ws)], "not a swarm run folder"),
    ("export-a-file", lambda ws: ["export", str(ws / "a-file")], "a-file"),
    ("export-dtype", lambda ws: ["export", str(ws), "--dtype", "int8"], "invalid choice"),
    # swarm merge
    ("merge-not-a-run", lambda ws: ["merge", str(ws), str(ws / "a-file"), "--out", str(ws / "merged")],
     "neither a swarm run folder"),
    # swarm tiny-model
    ("tiny-hidden-negative", lambda ws: ["tiny-model", str(ws / "m1"), "--text", str(DEMO), "--hidden", "-4"],
     "--hidden"),
    ("tiny-layers-zero", lambda ws: ["tiny-model", str(ws / "m2"), "--text", str(DEMO), "--layers", "0"], "--layers"),
    ("tiny-vocab-too-small", lambda ws: ["tiny-model", str(ws / "m3"), "--text", str(DEMO), "--vocab-size", "100"],
     "--vocab-size 100 is too small"),
    ("tiny-hidden-odd", lambda ws: ["tiny-model", str(ws / "m4"), "--text", str(DEMO), "--hidden", "130"],
     "multiple of 4"),
    ("tiny-text-binary", lambda ws: ["tiny-model", str(ws / "m5"), "--text", str(ws / "binary.txt")], "UTF-8"),
    ("tiny-text-missing", lambda ws: ["tiny-model", str(ws / "m6"), "--text", str(ws / "nope.txt")], "does not exist"),
    ("tiny-text-empty", lambda ws: ["tiny-model", str(ws / "m7"), "--text", str(ws / "empty.txt")], "is empty"),
    ("tiny-out-is-a-file", lambda ws: ["tiny-model", str(ws / "a-file"), "--text", str(DEMO)], "not a folder"),
    ("tiny-arch-unknown", lambda ws: ["tiny-model", str(ws / "m8"), "--text", str(DEMO), "--arch", "gpt9"],
     "invalid choice"),
    # the cluster verbs
    ("up-no-secret", lambda ws: ["up"], "no cluster secret"),
    ("up-cluster-file-missing", lambda ws: ["up", "--insecure", str(ws / "nope.yaml")], "nope.yaml"),
    ("up-cluster-file-malformed", lambda ws: ["up", "--insecure", str(ws / "cluster-bad-yaml.yaml")], "YAML"),
    ("up-cluster-bad-address", lambda ws: ["up", "--insecure", str(ws / "cluster-bad-address.yaml")], "address"),
    ("join-no-secret", lambda ws: ["join", "127.0.0.1"], "no cluster secret"),
    ("join-negative-store", lambda ws: ["join", "127.0.0.1", "--object-store-memory", "-5"], "--object-store-memory"),
    ("join-head-absent", lambda ws: ["join", "127.0.0.1:1", "--insecure"], "127.0.0.1"),
    ("status-no-secret", lambda ws: ["status"], "no cluster secret"),
    ("down-no-secret", lambda ws: ["down"], "no cluster secret"),
    ("agent-port-out-of-range", lambda ws: ["agent", "--listen", "127.0.0.1:99999"], "99999"),
    ("agent-listen-garbage", lambda ws: ["agent", "--listen", "everywhere"], "HOST:PORT"),
    ("unknown-verb", lambda ws: ["fly"], "invalid choice"),
]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size if p.is_file() else -1 for p in folder.rglob("*")}


@pytest.mark.parametrize(("argv", "expected"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(ws, argv, expected, capsys, monkeypatch):
    args = argv(ws)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("SWARM_HOME", str(ws / "home"))
    # W&B online, with no key anywhere it looks (a host nobody has a ~/.netrc entry for).
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.invalid")
    before = snapshot(ws)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err + out
    # Nothing written: no run folder, no export, no model; only the job files this case made.
    after = {k: v for k, v in snapshot(ws).items() if k not in before and not k.startswith("job-")}
    assert not after, after
    assert os.listdir(ws / "home") == []


def test_there_are_at_least_fifty_cases_across_every_verb():
    verbs = {case_id.split("-")[0] for case_id, _, _ in CASES}
    assert len(CASES) >= 50
    assert {"train", "plan", "export", "up", "join", "status", "down", "agent", "tiny", "merge"} <= verbs
