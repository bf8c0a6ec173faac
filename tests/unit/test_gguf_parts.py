"""Pure parts of the GGUF export: type lists, file names, the Ollama Modelfile, llama.cpp's errors."""

from __future__ import annotations

import re

import pytest

from swarm.cli import build_parser
from swarm.errors import UserError
from swarm.export.adapters_merge import METHODS
from swarm.export.gguf import ADAPTER_TYPES, file_name, parse_adapter_type, parse_types
from swarm.export.gguf_card import TYPE_NOTES, human_size
from swarm.export.llama_cpp import GGUF_TYPES, explain_failure, find_converter
from swarm.export.ollama import chat_family, modelfile
from swarm.tiny import CHAT_TEMPLATE

LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)
MISTRAL = "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}"


def test_types_parse_case_insensitively_in_order_once():
    assert parse_types("Q8_0,f16,q8_0") == ["q8_0", "f16"]
    assert parse_types("") == ["q4_k_m"] == parse_types(None)
    with pytest.raises(UserError, match=r"unknown type 'q9'; choose from f16, bf16, q8_0, q2_k"):
        parse_types("f16,q9")
    assert parse_adapter_type("") == "f16" and parse_adapter_type("Q8_0") == "q8_0"
    with pytest.raises(UserError, match="not one of f32, f16, bf16, q8_0"):
        parse_adapter_type("q4_k_m")


def test_help_lists_the_types_the_code_takes():
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    helps = {a.dest: a.help for a in export._actions}
    listed = re.search(r"types: (.*) \(default q4_k_m\)", helps["gguf"]).group(1).split(", ")
    assert sorted(listed) == sorted(GGUF_TYPES) and set(TYPE_NOTES) >= set(GGUF_TYPES)
    adapter = re.search(r"types: (.*) \(default f16\)", helps["gguf_adapter"]).group(1).split(", ")
    assert adapter == list(ADAPTER_TYPES)
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    assert next(a.choices for a in merge._actions if a.dest == "method") == list(METHODS)


def test_file_names_follow_llama_cpp_casing():
    assert file_name("my-bot", "q4_k_m") == "my-bot-Q4_K_M.gguf"
    assert file_name("my-bot", "f16", adapter=True) == "my-bot-lora-F16.gguf"


def test_modelfile_for_known_and_unknown_chat_templates():
    text = modelfile("bot-Q4_K_M.gguf", CHAT_TEMPLATE, "</s>")
    assert "FROM ./bot-Q4_K_M.gguf\n" in text
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == ["<|im_start|>", "<|im_end|>", "</s>"]
    assert '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>' in text
    assert chat_family(LLAMA3).name == "llama3" and chat_family(MISTRAL).name == "mistral"
    llama3 = modelfile("x.gguf", LLAMA3, "<|eot_id|>")
    assert re.findall(r'^PARAMETER stop "(.*)"$', llama3, re.M) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

    unknown = modelfile("x.gguf", "{{ messages[0]['content'] }}", 'end"quote')
    assert "TEMPLATE" not in unknown.replace("# No TEMPLATE", "") and 'PARAMETER stop "end\\"quote"' in unknown
    plain = modelfile("x.gguf", None, "</s>")
    assert 'TEMPLATE """{{ .Prompt }}"""' in plain


def test_llama_cpp_failures_are_explained():
    bpe = ["INFO:hf-to-gguf:Loading model", "WARNING:hf-to-gguf:** WARNING: The BPE pre-tokenizer was not recognized!",
           "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"]
    assert "--tokenizer sentencepiece" in explain_failure(bpe)
    arch = ["Traceback (most recent call last):", "NotImplementedError: Architecture 'FooForCausalLM' not supported!"]
    assert explain_failure(arch) == "Architecture 'FooForCausalLM' not supported by this llama.cpp version"
    assert explain_failure(["$ python convert", "ValueError: something odd"]) == "ValueError: something odd"
    assert explain_failure([]) == "it printed nothing"


def test_a_llama_cpp_folder_must_hold_the_converter(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is not a llama.cpp checkout"):
        find_converter(tmp_path)
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    assert find_converter() == tmp_path


def test_human_sizes():
    assert [human_size(n) for n in (512, 95_400, 812_300_000, 4_920_000_000, 150 * 10**9)] == [
        "512 B", "95.4 kB", "812 MB", "4.9 GB", "150 GB",
    ]
