"""Tokens and loss masks of normalized records (``swarm.data.records``), a batch at a time.

Where the loss falls (the mask is True there):

- ``text``: every token.
- ``instruction``: the output and the EOS after it; the prompt is the plain template below
  rather than the tokenizer's chat template, so one data set gives the same text for every
  model (``chat`` is for chat-tuned ones).
- ``chat`` and ``sharegpt``: the assistant turns, in the tokenizer's chat template.
- ``preference``: each answer (chosen, rejected) after its prompt: strings are joined as
  they are and the answer ends with EOS, conversations are rendered with the chat template
  (the prompt with the assistant header, then the answer turns).

BOS, and the EOS that ends a document of a supervised format, are added by the packer
(``swarm.data.packing``).
"""

from __future__ import annotations

import contextlib
import json
import re

from swarm.errors import UserError

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")

Tokens = tuple[list[int], list[bool]]  # token ids and where the loss falls


class RecordError(Exception):
    """One record the tokenizer (its chat template) refused; the caller names its place."""


def tokenize(rows: list[dict], fmt: str, tokenizer) -> list[Tokens | RecordError]:
    """(ids, loss mask) of each record of a supervised format, or the error of one that failed."""
    if fmt == "text":
        return [(ids, [True] * len(ids)) for ids in encode(tokenizer, [r["text"] for r in rows])]
    if fmt == "instruction":
        prompts = [(PROMPT_WITH_INPUT if r.get("input") else PROMPT).format(**r) for r in rows]
        heads, tails = encode(tokenizer, prompts), encode(tokenizer, [r["output"] for r in rows])
        return [(h + t, [False] * len(h) + [True] * len(t)) for h, t in zip(heads, tails)]
    needs_template(tokenizer, fmt)
    convs = [r["messages"] for r in rows]
    try:
        return _chat(convs, tokenizer)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - the template refused a conversation: find which
        return [_one(lambda conv=conv: _chat([conv], tokenizer)[0]) for conv in convs]


def tokenize_pairs(rows: list[dict], tokenizer) -> list[tuple[Tokens, Tokens] | RecordError]:
    """(chosen, rejected) sequences of each preference record: prompt then answer, the answer masked in."""
    if rows and isinstance(rows[0]["chosen"], list):
        needs_template(tokenizer, "preference")
        return [_one(lambda r=r: _chat_pair(r, tokenizer)) for r in rows]
    prompts = encode(tokenizer, [r["prompt"] for r in rows])
    chosen = encode(tokenizer, [r["chosen"] for r in rows])
    rejected = encode(tokenizer, [r["rejected"] for r in rows])
    eos = [tokenizer.eos_token_id]  # as for instruction data, the answer ends with EOS (a target)
    return [(_joined(p, c + eos), _joined(p, r + eos)) for p, c, r in zip(prompts, chosen, rejected)]


def needs_template(tokenizer, fmt: str) -> None:
    if not tokenizer.chat_template:
        raise UserError(f"format '{fmt}' needs a tokenizer with a chat template; this one has none")


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # Prompt and answer are encoded apart, so the mask's edge is exact; BOS is added once
    # per document by the packer, not once per piece.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _joined(prompt: list[int], answer: list[int]) -> Tokens:
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def _one(work):
    try:
        return work()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the record's place
        return RecordError(f"chat template failed ({' '.join(str(exc).split())[:200]})")


def _chat_pair(row: dict, tokenizer) -> tuple[Tokens, Tokens]:
    prompt = row["prompt"]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if prompt else ""
    pair = []
    for answer in (row["chosen"], row["rejected"]):
        whole = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not whole.startswith(head):
            raise ValueError("the template does not render the prompt as the start of the conversation")
        ids_head, ids_answer = encode(tokenizer, [head, whole[len(head):]])
        pair.append(_joined(ids_head, ids_answer))
    return pair[0], pair[1]


def _chat(convs: list[list[dict]], tokenizer) -> list[Tokens]:
    template = tokenizer.chat_template
    if _GENERATION.search(template if isinstance(template, str) else json.dumps(template)):
        enc = tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return [(ids, [bool(m) for m in mask]) for ids, mask in zip(enc["input_ids"], enc["assistant_masks"])]
    # Without {% generation %} markers transformers cannot mask; find each assistant turn's
    # characters by rendering the conversation up to it, then map characters to tokens.
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in convs]
    spans = [
        [_turn_span(tokenizer, conv, i, text) for i, m in enumerate(conv) if m["role"] == "assistant"]
        for conv, text in zip(convs, texts)
    ]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        (ids, [any(a <= start < b for a, b in turns) for start, _ in offsets])
        for ids, offsets, turns in zip(enc["input_ids"], enc["offset_mapping"], spans)
    ]


def _turn_span(tokenizer, conv: list[dict], i: int, text: str) -> tuple[int, int]:
    """Characters of assistant turn ``i`` in ``text`` (the whole conversation rendered)."""
    end = tokenizer.apply_chat_template(conv[: i + 1], tokenize=False)
    heads = []
    if i == 0:  # transformers will not render an empty conversation: start at the content
        heads.append(end[: max(end.find(conv[0]["content"].strip()), 0)])
    for header in (False, True):  # the assistant header, if any, is prompt, not answer
        with contextlib.suppress(Exception):  # some refuse one that does not end with a user turn
            heads.insert(0, tokenizer.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=header))
    for head in heads:
        if text.startswith(end) and end.startswith(head):
            return len(head), len(end)
    raise UserError(
        "the tokenizer's chat template has no {% generation %} markers and does not render "
        "conversations incrementally, so assistant turns cannot be found; add the markers"
    )


def bos_of(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself starts text with it (Llama's does, GPT-2's does not)."""
    bos = tokenizer.bos_token_id
    plain, special = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    return [bos] if bos is not None and special[:1] == [bos] and plain[:1] != [bos] else []
