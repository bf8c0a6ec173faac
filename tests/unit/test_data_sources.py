"""Data people bring: save_to_disk folders, Arrow files, Hub data sets from the local cache
(offline, config, split, revision), column mapping, ShareGPT and preference records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from trainkit import cache_hub_dataset

from swarm.config.models import DataSection, DataSource
from swarm.data.prepare import prepare_data
from swarm.errors import UserError
from swarm.tiny import train_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.txt"
ROWS = [{"prompt": f"Count to {i}", "response": f"one to {i}", "id": i} for i in range(12)]
OLD, NEW = "1" * 40, "2" * 40  # two commits of the Hub data set


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([DEMO], 512)


def cfg(files, fmt="instruction", **kw) -> DataSection:
    kw.setdefault("seq_len", 64)
    kw.setdefault("eval_fraction", 0)
    return DataSection(files=files, format=fmt, **kw)


def texts(tok, split) -> list[str]:
    """Each block's real tokens, decoded."""
    return [tok.decode(row[:n]) for row, n in zip(split.input_ids.tolist(), split.real.tolist())]


def targets(tok, split) -> str:
    return tok.decode(split.input_ids[split.loss_mask].tolist())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding swarm-tests/tiny-alpaca at two commits, the newer with a test split."""
    import datasets

    cache = tmp_path / "hf-datasets"
    cache_hub_dataset(cache, "swarm-tests/tiny-alpaca", OLD, {"train": ROWS[:4]})
    cache_hub_dataset(cache, "swarm-tests/tiny-alpaca", NEW, {"train": ROWS, "test": ROWS[:2]})
    old = cache / "swarm-tests___tiny-alpaca" / "default" / "0.0.0" / OLD
    os.utime(old, (1, 1))  # the older commit is the older folder
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


MAPPED = {"instruction": "prompt", "output": "response"}


def test_hub_data_set_from_the_cache_offline(hub, tok):
    data = prepare_data(cfg(["hf:swarm-tests/tiny-alpaca"], columns=MAPPED), tok)
    assert data.stats.records == len(ROWS)  # the newest commit, its train split
    assert targets(tok, data.train).count(tok.eos_token) == len(ROWS)
    assert "### Instruction:\nCount to 11" in "".join(texts(tok, data.train))
    test = prepare_data(cfg([DataSource(hub="swarm-tests/tiny-alpaca", split="test", config="default")],
                            columns=MAPPED), tok)
    assert test.stats.records == 2


def test_hub_revision_pins_a_cached_commit(hub, tok):
    pinned = prepare_data(cfg([DataSource(hub="swarm-tests/tiny-alpaca", revision=OLD)], columns=MAPPED), tok)
    assert pinned.stats.records == 4
    with pytest.raises(UserError, match=f"revision {'3' * 40} is not in the local cache .* cached revisions: {OLD}, {NEW}"):
        prepare_data(cfg([DataSource(hub="swarm-tests/tiny-alpaca", revision="3" * 40)], columns=MAPPED), tok)


def test_hub_data_set_not_cached_offline_is_one_line(hub, tok):
    with pytest.raises(UserError) as err:
        prepare_data(cfg(["hf:swarm-tests/not-there"]), tok)
    assert str(err.value) == (
        f"data file hf:swarm-tests/not-there is not in the local cache ({hub}) and the Hub is offline "
        "(HF_HUB_OFFLINE=1); load it once with network, or point HF_DATASETS_CACHE at the cache that holds it"
    )
    with pytest.raises(UserError, match="has no split validation; choose one with split: .*train, test"):
        prepare_data(cfg([DataSource(hub="swarm-tests/tiny-alpaca", split="validation")], columns=MAPPED), tok)


def test_save_to_disk_folders_and_arrow_files(tmp_path, tok):
    import datasets

    rows = [{"instruction": r["prompt"], "output": r["response"]} for r in ROWS]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]),
                          "test": datasets.Dataset.from_list(rows[5:7])}).save_to_disk(tmp_path / "two")
    plain = prepare_data(cfg([str(tmp_path / "one")]), tok)
    assert plain.stats.records == 12
    assert prepare_data(cfg([str(tmp_path / "two")]), tok).stats.records == 5  # train by default
    assert prepare_data(cfg([DataSource(path=str(tmp_path / "two"), split="test")]), tok).stats.records == 2
    arrow = next((tmp_path / "one").glob("*.arrow"))
    from_arrow = prepare_data(cfg([str(arrow)]), tok)
    assert texts(tok, from_arrow.train) == texts(tok, plain.train)
    # The content hash covers the Arrow files: another content, another hash.
    datasets.Dataset.from_list(rows[:3]).save_to_disk(tmp_path / "three")
    assert prepare_data(cfg([str(tmp_path / "three")]), tok).stats.sha256 != plain.stats.sha256


def test_several_splits_need_a_choice(tmp_path, tok):
    import datasets

    rows = [{"text": "a"}]
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows), "b": datasets.Dataset.from_list(rows)}).save_to_disk(
        tmp_path / "dd")
    with pytest.raises(UserError, match=r"holds several splits; choose one with split: \(its splits: a, b\)"):
        prepare_data(cfg([str(tmp_path / "dd")], "text"), tok)


def test_columns_map_the_fields_the_format_reads(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({**r, "instruction": "not this one"}) + "\n" for r in ROWS[:3]))
    data = prepare_data(cfg([str(path)], columns=MAPPED), tok)
    assert texts(tok, data.train)[0].startswith("### Instruction:\nCount to 0\n")  # the mapped column wins
    assert targets(tok, data.train) == "".join(f"one to {i}{tok.eos_token}" for i in range(3))
    with pytest.raises(UserError) as err:
        prepare_data(cfg([str(path)], columns={"output": "answer"}), tok)
    assert str(err.value) == (f"data.columns maps output to column 'answer', which {path} does not have "
                              "(its columns: prompt, response, id, instruction)")


SHAREGPT = {"conversations": [
    {"from": "system", "value": "be calm"},
    {"from": "human", "value": "who climbs the stairs"},
    {"from": "gpt", "value": "the keeper"},
    {"from": "human", "value": "and then"},
    {"from": "gpt", "value": "he lights the lamp"},
]}


def test_sharegpt_loss_only_on_gpt_turns(tmp_path, tok):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n")
    data = prepare_data(cfg([str(path)], "sharegpt"), tok)
    assert targets(tok, data.train) == "the keeper<|im_end|>he lights the lamp<|im_end|>"
    text = texts(tok, data.train)[0]
    assert text.startswith("<|im_start|>system\nbe calm<|im_end|>\n<|im_start|>user\nwho climbs")
    # The same conversation as chat messages gives the same tokens and the same label mask.
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in SHAREGPT["conversations"]]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    chat = prepare_data(cfg([str(tmp_path / "c.jsonl")], "chat"), tok)
    assert (chat.train.loss_mask == data.train.loss_mask).all() and (chat.train.input_ids == data.train.input_ids).all()


@pytest.mark.parametrize("turns,message", [
    ([{"from": "bot", "value": "x"}], "turn 1 is from 'bot'; format 'sharegpt' knows human, gpt and system"),
    ([{"from": "human", "value": "x"}, {"from": "system", "value": "y"}, {"from": "gpt", "value": "z"}],
     "turn 2 is a system turn after the conversation started"),
    ([{"from": "human", "value": "x"}], "the conversation has no gpt turn"),
    ([{"from": "human"}], "turn 1 has no 'value' field"),
    ("hello", "'conversations' must be a non-empty list"),
])
def test_sharegpt_records_that_mix_roles_badly_are_named(tmp_path, tok, turns, message):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n" + json.dumps({"conversations": turns}) + "\n")
    with pytest.raises(UserError, match=rf"^data file .*s\.jsonl line 2: {message}"):
        prepare_data(cfg([str(path)], "sharegpt"), tok)


def pairs_of(tok, split) -> list[tuple[str, str]]:
    """(whole text, answer text) of every sequence of a Pairs split."""
    out = []
    for k in range(len(split.offsets) - 1):
        a, b = split.offsets[k], split.offsets[k + 1]
        ids, mask = split.input_ids[a:b], split.loss_mask[a:b]
        out.append((tok.decode(ids.tolist()), tok.decode(ids[mask].tolist())))
    return out


def test_preference_strings_mask_each_answer(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Q: who? A:", "chosen": " the keeper", "rejected": " a gull"}) + "\n")
    data = prepare_data(cfg([str(path)], "preference"), tok)
    assert pairs_of(tok, data.train) == [
        ("Q: who? A: the keeper" + tok.eos_token, " the keeper" + tok.eos_token),
        ("Q: who? A: a gull" + tok.eos_token, " a gull" + tok.eos_token),
    ]


def test_preference_conversations_with_and_without_a_prompt(tmp_path, tok):
    ask = [{"role": "user", "content": "who climbs"}]
    good, bad = [{"role": "assistant", "content": "the keeper"}], [{"role": "assistant", "content": "a gull"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": ask, "chosen": good, "rejected": bad}) + "\n"
                    + json.dumps({"chosen": ask + good, "rejected": ask + bad}) + "\n"
                    + json.dumps({"prompt": "who climbs", "chosen": "the keeper", "rejected": bad}) + "\n")
    data = prepare_data(cfg([str(path)], "preference"), tok)
    sequences = pairs_of(tok, data.train)
    head = "<|im_start|>user\nwho climbs<|im_end|>\n<|im_start|>assistant\n"
    expected = [(head + "the keeper<|im_end|>\n", "the keeper<|im_end|>\n"),
                (head + "a gull<|im_end|>\n", "a gull<|im_end|>\n")]
    assert sequences == expected * 3  # the three spellings mean the same pair


@pytest.mark.parametrize("row,message", [
    ({"prompt": "a", "chosen": "b"}, "record has no 'rejected' field (format 'preference' needs chosen and rejected)"),
    ({"chosen": "b", "rejected": "c"}, "record has no 'prompt' field"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "'chosen' must be a string or a list of {role, content} objects"),
    ({"chosen": [{"role": "user"}], "rejected": []}, "message 1 of 'chosen' has no 'content' field"),
])
def test_bad_preference_records_are_named(tmp_path, tok, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        prepare_data(cfg([str(path)], "preference"), tok)
    assert str(err.value).startswith(f"data file {path} line 2: {message}")


def test_preference_pairs_are_held_out_whole_and_cut_to_seq_len(tmp_path, tok):
    rows = [{"prompt": "the keeper climbed the stairs " * 3, "chosen": " and lit the lamp", "rejected": " and slept"}
            for _ in range(10)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_data(cfg([str(path)], "preference", seq_len=16, eval_fraction=0.2), tok)
    assert len(data.train) == 8 and len(data.eval) == 2
    assert data.stats.truncated == 10
    lengths = data.train.offsets[1:] - data.train.offsets[:-1]
    assert lengths.max() == 16
    for whole, answer in pairs_of(tok, data.train):  # the prompt's start goes, the answer stays whole
        assert answer in (" and lit the lamp" + tok.eos_token, " and slept" + tok.eos_token)
        assert whole.endswith(answer)
