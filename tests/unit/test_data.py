"""Data preparation from local files: loading, formats, loss masks, packing, eval split, errors.

Data sets (save_to_disk, Arrow, the Hub cache), columns, ShareGPT, preference pairs and
isolated packing: tests/unit/test_data_sources.py and tests/unit/test_packing.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from swarm.config.models import DataSection
from swarm.data.prepare import prepare_data
from swarm.errors import UserError
from swarm.tiny import CHAT_TEMPLATE, train_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.txt"
CHAT = [
    {"role": "system", "content": "be calm"},
    {"role": "user", "content": "who climbs the stairs"},
    {"role": "assistant", "content": "the keeper"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "he lights the lamp"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([DEMO], 512)


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cfg(files, fmt="text", seq_len=32, **kw) -> DataSection:
    return DataSection(files=[str(f) for f in files], format=fmt, seq_len=seq_len, **kw)


def labelled(blocks) -> list[int]:
    """The target tokens of a split, in order (a label is the token itself where the mask says so)."""
    return blocks.input_ids[blocks.loss_mask].tolist() if blocks is not None else []


def real_ids(blocks) -> list[int]:
    """The tokens that are not padding, block after block."""
    return [t for row, n in zip(blocks.input_ids.tolist(), blocks.real.tolist()) for t in row[:n]] if blocks else []


def check_shapes(prepared, seq_len):
    for blocks in (b for b in (prepared.train, prepared.eval) if b is not None):
        assert blocks.input_ids.shape == blocks.loss_mask.shape == (len(blocks), seq_len)
        assert blocks.input_ids.dtype == np.int32 and blocks.loss_mask.dtype == bool
        assert blocks.real.shape == (len(blocks),) and (blocks.real <= seq_len).all()


def same(a, b) -> bool:
    """Two splits hold the same arrays."""
    if a is None or b is None:
        return a is b
    return all(np.array_equal(getattr(a, k), getattr(b, k)) if getattr(a, k) is not None else getattr(b, k) is None
               for k in ("input_ids", "loss_mask", "real", "position_ids"))


TEXTS = [{"text": f"The keeper climbed stair number {i} and counted."} for i in range(20)]
INSTRUCTIONS = [
    {"instruction": f"Count to {i}", "input": "" if i % 2 else "slowly", "output": f"one to {i}"} for i in range(20)
]
CHATS = [{"messages": CHAT} for _ in range(20)]


@pytest.mark.parametrize("fmt,rows", [("text", TEXTS), ("instruction", INSTRUCTIONS), ("chat", CHATS)])
def test_every_format_packs_into_exact_blocks(tmp_path, tok, fmt, rows):
    data = prepare_data(cfg([write_jsonl(tmp_path / "d.jsonl", rows)], fmt, seq_len=24), tok)
    check_shapes(data, 24)
    assert data.train and data.eval
    assert data.stats.records == 20 and data.stats.skipped == 0
    assert data.stats.train_tokens == len(real_ids(data.train))
    assert data.stats.eval_tokens == len(real_ids(data.eval))
    for split in (data.train, data.eval):
        # Padding ends a block: pad id, never a target.
        padding = np.arange(24)[None, :] >= split.real[:, None]
        assert (split.input_ids[padding] == tok.pad_token_id).all() and not split.loss_mask[padding].any()
        if fmt == "text":  # concatenated: only the last block is padded
            assert (split.real[:-1] == 24).all() and split.position_ids is None
        else:  # examples kept apart (the default for instruction and chat)
            assert split.position_ids is not None


def test_text_labels_every_token_and_ends_with_eos(tmp_path, tok):
    data = prepare_data(cfg([write_jsonl(tmp_path / "t.jsonl", TEXTS[:3])], eval_fraction=0), tok)
    ids = real_ids(data.train)
    assert labelled(data.train) == ids
    assert ids.count(tok.eos_token_id) == 3 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "".join(r["text"] + tok.eos_token for r in TEXTS[:3])


def test_instruction_loss_only_on_output_and_eos(tmp_path, tok):
    rows = [{"instruction": "Where is the lamp", "input": "in the tower", "output": "under a glass dome"}]
    data = prepare_data(cfg([write_jsonl(tmp_path / "i.jsonl", rows)], "instruction", 8, eval_fraction=0), tok)
    check_shapes(data, 8)
    assert tok.decode(labelled(data.train)) == "under a glass dome" + tok.eos_token
    text = tok.decode(real_ids(data.train))
    assert text.startswith("### Instruction:\nWhere is the lamp\n\n### Input:\nin the tower\n\n### Response:\n")


def test_instruction_without_input_uses_short_prompt(tmp_path, tok):
    rows = [{"instruction": "Name the sea", "output": "loud"}]
    data = prepare_data(cfg([write_jsonl(tmp_path / "i.jsonl", rows)], "instruction", 64, eval_fraction=0), tok)
    assert tok.decode(real_ids(data.train)) == "### Instruction:\nName the sea\n\n### Response:\nloud" + tok.eos_token
    assert tok.decode(labelled(data.train)) == "loud" + tok.eos_token


def test_chat_loss_only_on_assistant_turns(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    data = prepare_data(cfg([path], "chat", 16, eval_fraction=0), tok)
    check_shapes(data, 16)
    assert tok.decode(labelled(data.train)) == "the keeper<|im_end|>he lights the lamp<|im_end|>"
    text = tok.decode(real_ids(data.train))
    assert text.startswith("<|im_start|>system\nbe calm") and text.endswith(tok.eos_token)


def test_chat_template_without_generation_markers_falls_back_to_prefixes(tmp_path, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    data = prepare_data(cfg([path], "chat", 64, eval_fraction=0), plain)
    # The turn's span runs to the next turn, so its trailing newline is labelled too.
    assert tok.decode(labelled(data.train)) == "the keeper<|im_end|>\nhe lights the lamp<|im_end|>\n"


def test_chat_needs_a_template(tmp_path, tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        prepare_data(cfg([write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])], "chat"), bare)


def test_eval_split_holds_out_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", TEXTS)

    def eval_records(n_rows, fraction):
        write_jsonl(tmp_path / "t.jsonl", TEXTS[:n_rows])
        data = prepare_data(cfg([path], eval_fraction=fraction), tok)
        held = real_ids(data.eval).count(tok.eos_token_id)  # one EOS per record
        assert held + real_ids(data.train).count(tok.eos_token_id) == n_rows
        return held

    assert eval_records(20, 0.1) == 2
    assert eval_records(20, 0.01) == 1  # at least one
    assert eval_records(2, 0.9) == 1  # never all
    assert eval_records(1, 0.5) == 0  # too few to hold any out
    assert eval_records(20, 0.0) == 0


def test_same_records_from_json_jsonl_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps(INSTRUCTIONS, indent=2))
    pq.write_table(pa.Table.from_pylist(INSTRUCTIONS), tmp_path / "d.parquet")
    results = [
        prepare_data(cfg([f], "instruction", eval_fraction=0.1), tok)
        for f in (write_jsonl(tmp_path / "d.jsonl", INSTRUCTIONS), tmp_path / "d.json", tmp_path / "d.parquet")
    ]
    assert same(results[0].train, results[1].train) and same(results[0].train, results[2].train)
    assert same(results[0].eval, results[1].eval) and same(results[0].eval, results[2].eval)


def test_text_file_lines_are_records_of_one_document(tmp_path, tok):
    text = DEMO.read_text()
    data = prepare_data(cfg([DEMO], seq_len=64, eval_fraction=0), tok)
    assert data.stats.records == len(text.splitlines())
    assert tok.decode(real_ids(data.train)) == text + tok.eos_token  # EOS only at the file's end
    split = prepare_data(cfg([DEMO], seq_len=64, eval_fraction=0.2), tok)
    assert split.eval and split.stats.records == data.stats.records
    md = tmp_path / "notes.md"
    md.write_text("# Title\n\nbody\n")
    assert prepare_data(cfg([md], eval_fraction=0), tok).stats.records == 3


def test_several_files_in_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", TEXTS[2:5])
    data = prepare_data(cfg([a, b], eval_fraction=0), tok)
    assert data.stats.records == 5 and data.stats.files == [a, b]
    assert tok.decode(real_ids(data.train)).startswith(TEXTS[0]["text"] + tok.eos_token + TEXTS[1]["text"])


def test_missing_file_is_named(tmp_path, tok):
    with pytest.raises(UserError, match=r"data file .*nope\.jsonl not found"):
        prepare_data(cfg([tmp_path / "nope.jsonl"]), tok)


@pytest.mark.parametrize("name,content,message", [
    ("e.jsonl", "", "is empty"),
    ("e.txt", "", "is empty"),
    ("b.jsonl", "\n\n  \n", "has no records"),
    ("w.txt", "\n  \n", "has no text"),
    ("a.json", "[]", "has no records"),
])
def test_empty_file_is_named(tmp_path, tok, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=rf"data file .*{name} {message}"):
        prepare_data(cfg([tmp_path / name]), tok)


def test_missing_field_names_file_and_line(tmp_path, tok):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows, blank_after=1)  # the bad record sits on line 4
    with pytest.raises(UserError) as err:
        prepare_data(cfg([path], "instruction"), tok)
    assert str(err.value) == (
        f"data file {path} line 4: record has no 'output' field (format 'instruction' needs instruction and output)"
    )


@pytest.mark.parametrize("fmt,row,message", [
    ("text", {"txt": "x"}, "record has no 'text' field"),
    ("text", {"text": 5}, "'text' must be a string, not int"),
    ("instruction", {"instruction": "a", "output": ["b"]}, "'output' must be a string, not a list"),
    ("chat", {"messages": "hello"}, "'messages' must be a non-empty list"),
    ("chat", {"messages": []}, "'messages' must be a non-empty list"),
    ("chat", {"messages": [{"role": "user"}]}, "message 1 has no 'content' field"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, "b"]}, "message 2 must be a {role, content} object"),
    ("chat", {"prompt": "a"}, "record has no 'messages' field"),
])
def test_malformed_record_is_named(tmp_path, tok, fmt, row, message):
    good = {"text": {"text": "a"}, "instruction": {"instruction": "a", "output": "b"}, "chat": {"messages": CHAT}}
    path = write_jsonl(tmp_path / "m.jsonl", [good[fmt], row, good[fmt]])
    with pytest.raises(UserError, match=rf"^data file .*m\.jsonl line 2: {re.escape(message)}"):
        prepare_data(cfg([path], fmt), tok)


def test_json_and_parquet_name_the_record(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a"}, {"text": "b"}, {"text": None}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        with pytest.raises(UserError, match=rf"data file .*{name} record 3: record has no 'text' field"):
            prepare_data(cfg([tmp_path / name]), tok)


def test_bad_json_line_is_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n')
    with pytest.raises(UserError, match=r"data file .*bad\.jsonl line 3: not valid JSON"):
        prepare_data(cfg([path]), tok)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": b}\n]\n')
    with pytest.raises(UserError, match=r"data file .*broken\.json line 3: not valid JSON"):
        prepare_data(cfg([broken]), tok)


def test_skip_bad_records_counts_them(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n{"body": "c"}\n{"text": "d"}\n{"text": 7}\n')
    data = prepare_data(cfg([path], skip_bad_records=True, eval_fraction=0), tok)
    assert data.stats.records == 2 and data.stats.skipped == 3
    assert tok.decode(real_ids(data.train)) == "a" + tok.eos_token + "d" + tok.eos_token
    path.write_text('{"body": "c"}\n')
    with pytest.raises(UserError, match=r"no usable records \(1 skipped\)"):
        prepare_data(cfg([path], skip_bad_records=True), tok)


def test_chat_template_error_names_the_record(tmp_path, tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m['role'] + ': ' }}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    rows = [{"messages": CHAT}, {"messages": [{"role": "tool", "content": "x"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(UserError, match=r"c\.jsonl line 2: chat template failed \(no tools\)"):
        prepare_data(cfg([path], "chat"), strict)
    data = prepare_data(cfg([path], "chat", skip_bad_records=True), strict)
    assert data.stats.records == 1 and data.stats.skipped == 1


def test_text_file_needs_text_format(tok):
    with pytest.raises(UserError, match="plain text; format 'chat' needs JSON"):
        prepare_data(cfg([DEMO], "chat"), tok)


def test_sha256_covers_the_bytes_in_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS[:3])
    b = write_jsonl(tmp_path / "b.jsonl", TEXTS[3:6])
    first = prepare_data(cfg([a, b]), tok).stats.sha256
    assert first == hashlib.sha256(Path(a).read_bytes() + Path(b).read_bytes()).hexdigest()
    write_jsonl(tmp_path / "b.jsonl", TEXTS[3:7])
    assert prepare_data(cfg([a, b]), tok).stats.sha256 != first


def test_deterministic_and_seeded(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", TEXTS)
    one = prepare_data(cfg([path], eval_fraction=0.2, seed=1), tok)
    again = prepare_data(cfg([path], eval_fraction=0.2, seed=1), tok)
    assert same(again.train, one.train) and same(again.eval, one.eval) and again.stats == one.stats
    others = [prepare_data(cfg([path], eval_fraction=0.2, seed=s), tok).eval for s in range(2, 6)]
    assert any(not same(e, one.eval) for e in others)


def test_pad_falls_back_to_eos(tmp_path, tok):
    nopad = copy.deepcopy(tok)
    nopad.pad_token = None
    data = prepare_data(cfg([write_jsonl(tmp_path / "t.jsonl", TEXTS[:1])], seq_len=64, eval_fraction=0), nopad)
    assert data.train.real[0] < 64 and data.train.input_ids[0, -1] == tok.eos_token_id


def test_bos_once_per_document_when_the_tokenizer_adds_one(tmp_path, tok):
    from tokenizers import processors

    with_bos = copy.deepcopy(tok)
    with_bos.bos_token = "<|im_start|>"
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", with_bos.bos_token_id)]
    )
    data = prepare_data(cfg([write_jsonl(tmp_path / "t.jsonl", TEXTS[:2])], seq_len=64, eval_fraction=0), with_bos)
    expected = "".join("<|im_start|>" + r["text"] + tok.eos_token for r in TEXTS[:2])
    assert tok.decode(real_ids(data.train)) == expected
    assert with_bos.bos_token_id not in labelled(data.train)  # BOS is input, never a target
    lines = prepare_data(cfg([DEMO], seq_len=64, eval_fraction=0), with_bos)
    assert real_ids(lines.train).count(with_bos.bos_token_id) == 1  # a text file is one document


def test_unreadable_files_get_one_line(tmp_path, tok):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "d.txt").mkdir()
    for name, message in [
        ("latin1.txt", "is not UTF-8 text"),
        ("latin1.jsonl", "is not UTF-8 text"),
        ("fake.parquet", "cannot be read as parquet"),
        ("d.txt", "is a folder with no data in it"),
    ]:
        with pytest.raises(UserError, match=rf"data file .*{name} {message}"):
            prepare_data(cfg([tmp_path / name]), tok)


def test_leaves_datasets_settings_alone(tmp_path, tok):
    import datasets

    before = (datasets.config.HF_HUB_OFFLINE, datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity())
    prepare_data(cfg([write_jsonl(tmp_path / "t.jsonl", TEXTS[:2])]), tok)
    after = (datasets.config.HF_HUB_OFFLINE, datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity())
    assert after == before
