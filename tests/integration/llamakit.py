"""llama.cpp (llama-cpp-python) evaluating GGUF files in a child process, for the tests and benchmarks.

A crash in llama.cpp's native code (a build for another CPU, a bad tensor) kills the process
that runs it. Run in the pytest process, it ended the whole suite with no report of any test
(a native build made on an Intel Xeon with AMX segfaulted on quantized GGUFs there). Here each
call starts ``python llamakit.py REQUEST.json``, which loads the GGUF, computes, writes its
answer as .npy or JSON and exits; when it dies instead, the caller gets one AssertionError
naming the signal and the file, and the suite goes on.

Results travel as files the parent reads as data (``np.load(allow_pickle=False)``, JSON), never
as pickles. ``SWARM_TEST_LLAMA_CRASH=1`` makes the child segfault after loading the model,
where the AMX crash happened: the tests use it to show how a crash is reported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CRASH_SWITCH = "SWARM_TEST_LLAMA_CRASH"
# A real model's GGUF loads in seconds; a child still running after this is stuck.
TIMEOUT_S = 600
# The child's command; the tests replace it to check how a child that dies is reported.
CHILD = [sys.executable, str(Path(__file__).resolve())]


def llama_logits(path: str | Path, ids: list[int], lora: str | Path | None = None) -> np.ndarray:
    """llama.cpp's logits (float32, ``len(ids)`` x vocabulary) at every position of ``ids``.

    ``lora``: a GGUF LoRA applied on the model, as ``llama-cli --lora`` does.
    """
    return _ask({"op": "logits", "ids": list(map(int, ids)), "lora": str(lora) if lora else None}, path)


def llama_tokenize(path: str | Path, text: str, special: bool = True, *, add_bos: bool = True) -> list[int]:
    """llama.cpp's token ids for ``text`` with the GGUF's vocabulary (only the vocabulary is loaded).

    ``special``: special-token text (``<|im_start|>``) becomes its token, as in a chat template.
    ``add_bos``: prepend the beginning-of-sequence token when the model's metadata asks for one.
    """
    return _ask({"op": "tokenize", "text": text, "special": special, "add_bos": add_bos}, path)


def llama_greedy(path: str | Path, ids: list[int], n: int) -> list[int]:
    """The ``n`` tokens llama.cpp picks greedily (the largest logit, the first on a tie) after ``ids``.

    Exactly ``n``: the end-of-sequence token is a token like any other here.
    """
    return _ask({"op": "greedy", "ids": list(map(int, ids)), "n": int(n)}, path)


def _ask(request: dict, path: str | Path):
    """Run one request in a child process; its answer, or one AssertionError saying how it ended."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="llamakit-") as tmp:
        request = {**request, "path": str(path), "out": str(Path(tmp) / "answer")}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        try:
            result = subprocess.run([*CHILD, str(Path(tmp) / "request.json")], capture_output=True, text=True,
                                    timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"llama.cpp did not finish {request['op']} of {path.name} in {TIMEOUT_S} s") from None
        if result.returncode < 0:
            name = signal.Signals(-result.returncode).name
            raise AssertionError(
                f"llama.cpp died with {name} evaluating {path.name}: a native build for another CPU? "
                "check with `python -m swarm.export.llama_build`; see docs/export.md"
            )
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["no output"]
            raise AssertionError(f"llama.cpp failed ({request['op']}) on {path}: {lines[-1]}")
        answer = Path(request["out"])
        if request["op"] == "logits":
            return np.load(answer.with_suffix(".npy"), allow_pickle=False)
        return json.loads(answer.with_suffix(".json").read_text())


# ---- the child ---------------------------------------------------------------------------


def _child(request_file: str) -> None:
    """Load the GGUF, answer the request into ``out`` (.npy or .json), exit."""
    import llama_cpp

    request = json.loads(Path(request_file).read_text())
    op, out = request["op"], Path(request["out"])
    if op == "tokenize":
        llm = llama_cpp.Llama(model_path=request["path"], vocab_only=True, n_ctx=64, verbose=False)
        ids = llm.tokenize(request["text"].encode(), add_bos=request["add_bos"], special=request["special"])
        out.with_suffix(".json").write_text(json.dumps(ids))
        return
    ids, n = request["ids"], request.get("n", 0)
    kwargs = {"lora_path": request["lora"]} if request.get("lora") else {}
    # logits_all: every position's logits are kept (scores), not only the last one's.
    llm = llama_cpp.Llama(model_path=request["path"], logits_all=True, n_ctx=max(64, len(ids) + n),
                          n_threads=min(8, os.cpu_count() or 1), verbose=False, **kwargs)
    if os.environ.get(CRASH_SWITCH) == "1":
        import ctypes

        ctypes.string_at(0)  # a read of address 0 in native code: a real SIGSEGV, like the AMX build's
    llm.eval(ids)
    if op == "logits":
        np.save(out.with_suffix(".npy"), np.array(llm.scores[: len(ids)], dtype=np.float32))
        return
    picked = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        picked.append(token)
        if len(picked) < n:
            llm.eval([token])
    out.with_suffix(".json").write_text(json.dumps(picked))


if __name__ == "__main__":
    _child(sys.argv[1])
