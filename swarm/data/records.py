"""What a record of each data format must hold, and its normal form for tokenizing.

Formats and the fields they read (``data.columns`` may rename them):

- ``text``: ``text``.
- ``instruction``: ``instruction``, optional ``input``, ``output`` (alpaca).
- ``chat``: ``messages``, a list of ``{role, content}``.
- ``sharegpt``: ``conversations``, a list of ``{from, value}``; ``human`` (or ``user``),
  ``gpt`` (or ``assistant``) and ``system`` (first only) become chat roles.
- ``preference``: ``chosen`` and ``rejected`` answers to a ``prompt``; either three strings
  (the prompt as it is, no template), or conversations: ``chosen`` and ``rejected`` lists of
  ``{role, content}`` (whole conversations sharing their start, or only the answers after a
  ``prompt`` list; a string prompt is one user turn, a string answer one assistant turn).

``problem`` says why a record cannot serve (None when it can); ``normalize`` turns a good
record into what ``swarm.data.tokenize`` takes.
"""

from __future__ import annotations

from swarm.data.sources import Unreadable

NEEDS = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",),
         "sharegpt": ("conversations",), "preference": ("chosen", "rejected")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def problem(row, fmt: str) -> str | None:
    """Why ``row`` cannot serve as a ``fmt`` example, or None."""
    if isinstance(row, Unreadable):
        return row["error"]
    if not isinstance(row, dict):
        return f"record is {kind(row)}, not an object"
    for name in NEEDS[fmt]:
        if row.get(name) is None:
            return f"record has no '{name}' field (format '{fmt}' needs {' and '.join(NEEDS[fmt])})"
    if fmt in ("text", "instruction"):
        for name in (*NEEDS[fmt], "input"):
            if row.get(name) is not None and not isinstance(row[name], str):
                return f"'{name}' must be a string, not {kind(row[name])}"
        return None
    if fmt == "chat":
        return _messages_problem(row["messages"], "messages", fmt)
    if fmt == "sharegpt":
        return _sharegpt_problem(row["conversations"])
    return _preference_problem(row)


def normalize(row: dict, fmt: str) -> dict:
    """A good record in the form ``swarm.data.tokenize`` reads.

    chat and sharegpt give ``{"messages": [...]}``; preference gives ``{"prompt", "chosen",
    "rejected"}``, all strings, or all lists of messages with the prompt split off.
    """
    if fmt == "chat":
        return {"messages": _clean(row["messages"])}
    if fmt == "sharegpt":
        return {"messages": [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]}
    if fmt != "preference":
        return row
    if not _conversational(row):
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    prompt, chosen, rejected = (_as_messages(row.get(k), role) for k, role in
                                (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")))
    if row.get("prompt") is None:  # whole conversations: the prompt is what they share
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def kind(value) -> str:
    """``a list``, ``an object``... for messages about a value of the wrong type."""
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _clean(messages: list[dict]) -> list[dict]:
    # Keys that Arrow filled in as null (for messages that lacked them) would reach the template.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _messages_problem(messages, name: str, fmt: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{name}' must be a non-empty list of {{role, content}} objects, not {kind(messages)}"
    of = "" if name == "messages" else f" of '{name}'"
    return _items_problem(messages, lambda i: f"message {i}{of}", ("role", "content"),
                          f"format '{fmt}' needs messages with role and content")


def _sharegpt_problem(turns) -> str | None:
    if not isinstance(turns, list) or not turns:
        return f"'conversations' must be a non-empty list of {{from, value}} objects, not {kind(turns)}"
    issue = _items_problem(turns, lambda i: f"turn {i}", ("from", "value"), "format 'sharegpt' needs from and value")
    if issue:
        return issue
    for i, turn in enumerate(turns, 1):
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            return f"turn {i} is from '{turn['from']}'; format 'sharegpt' knows human, gpt and system"
        if role == "system" and i > 1:
            return f"turn {i} is a system turn after the conversation started; only the first turn may be system"
    if not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns):
        return "the conversation has no gpt turn, so nothing would be learned from it"
    return None


def _items_problem(items: list, place, keys: tuple[str, str], needs: str) -> str | None:
    """Why an item of ``items`` is not an object with string ``keys`` (``place(i)`` names it), or None."""
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            return f"{place(i)} must be a {{{keys[0]}, {keys[1]}}} object, not {kind(item)}"
        for key in keys:
            if not isinstance(item.get(key), str):
                what = "has no" if item.get(key) is None else "has a non-string"
                return f"{place(i)} {what} '{key}' field ({needs})"
    return None


def _conversational(row: dict) -> bool:
    return any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected"))


def _preference_problem(row: dict) -> str | None:
    if not _conversational(row):
        for name in ("prompt", "chosen", "rejected"):
            if row.get(name) is None:
                return (f"record has no '{name}' field (format 'preference' needs prompt, chosen and rejected as "
                        "strings, or chosen and rejected conversations)")
            if not isinstance(row[name], str):
                return f"'{name}' must be a string or a list of {{role, content}} objects, not {kind(row[name])}"
        return None
    for name in ("prompt", "chosen", "rejected"):
        value = row.get(name)
        if value is None or isinstance(value, str):
            continue
        issue = _messages_problem(value, name, "preference")
        if issue:
            return issue
    if row.get("prompt") is None and row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are the same conversation"
    return None


def _as_messages(value, role: str) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _clean(value)
