"""`swarm tiny-model --tokenizer sentencepiece`: Llama 2's tokenizer layout, kept through a reload."""

from __future__ import annotations

import json
from pathlib import Path

from swarm.cli import main

DEMO = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.txt"


def test_sentencepiece_tiny_model(tmp_path, capsys):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path / "tiny"
    assert main(["tiny-model", str(out), "--text", str(DEMO), "--tokenizer", "sentencepiece", "--arch", "mistral"]) == 0
    capsys.readouterr()
    assert {"tokenizer.model", "added_tokens.json", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, 512)
    assert json.loads((out / "added_tokens.json").read_text()) == {"<|im_start|>": 3, "<|im_end|>": 4}

    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    text = "The keeper lit  the lamp at 1906, ü"
    assert tokenizer(text).input_ids == [1, *processor.encode(text)]  # BOS, then sentencepiece's own pieces
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = tokenizer(chat).input_ids
    assert ids[:2] == [1, 3] and 4 in ids  # the ChatML markers are single tokens
    tokenizer.save_pretrained(tmp_path / "again")  # as `swarm train` saves it into the run
    assert AutoTokenizer.from_pretrained(tmp_path / "again")(chat).input_ids == ids

    assert main(["tiny-model", str(tmp_path / "small"), "--text", str(DEMO), "--tokenizer", "sentencepiece",
                 "--vocab-size", "200"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SentencePiece tokenizer of 200 tokens on this text (its bytes and" in err
    assert err.endswith("raise --vocab-size")
