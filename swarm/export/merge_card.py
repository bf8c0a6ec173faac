"""The model card (README.md) of a ``swarm merge`` folder and of its exports (merged model, GGUF).

Everything comes from the merge's record (``swarm-merge.json``): the method and its settings,
and per source its name, folder, rank, data and final losses as its run recorded them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from swarm import __version__
from swarm.export.gguf_card import files_section, running_section

_MISSING = "not recorded"
_METHOD_NOTES = {
    "linear": "weighted sums of the adapters' A matrices and of their B matrices (each scaled by the square "
              "root of its weight): approximate, the product also holds each adapter's A times another's B",
    "cat": "the adapters' matrices side by side: exactly the weighted sum of their updates, at the sum of their ranks",
    "svd": "the weighted sum of the adapters' full updates, cut back to a low rank by a singular value decomposition",
    "ties": "TIES: each adapter trimmed to its largest weights, signs elected by majority, agreeing values averaged",
    "dare_linear": "DARE: weights dropped at random and the rest rescaled, then summed",
    "dare_ties": "DARE-TIES: weights dropped at random and the rest rescaled, then TIES' sign election",
}


def render_merge_card(
    record: dict, kind: str, folder: Path, *, dtype: str | None = None, gguf_files: list | None = None,
    has_modelfile: bool = False,
) -> str:
    """The README.md text for a merge (``adapter``), its merged model (``merged``) or GGUF files (``gguf``)."""
    base, training = record["base"], record["training"]
    qlora = training.get("bits") == 4
    method = record["method"]
    meta = {
        "base_model": base["path"],
        "base_model_relation": "adapter" if kind == "adapter" else "merge",
        "library_name": {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind],
        "pipeline_tag": "text-generation",
        "tags": ["swarm", "merge", method.replace("_", "-"), "lora"] + (["peft"] if kind == "adapter" else [])
        + (["gguf"] if kind == "gguf" else []),
    }
    sources = record["sources"]
    what = {
        "adapter": "A LoRA adapter",
        "merged": f"`{base['path']}` with a merged LoRA adapter folded into its weights ({dtype})",
        "gguf": f"GGUF files of `{base['path']}` with a merged LoRA adapter",
    }[kind]
    names = ", ".join(f"`{s['name']}`" for s in sources)
    intro = f"{what}: {len(sources)} adapters trained on `{base['path']}` ({names}), merged with {method} by swarm."
    settings = [
        ("Method", f"{method}: {_METHOD_NOTES[method]} (peft's `add_weighted_adapter`)"),
        ("Weights", ", ".join(f"{w:g}" for w in record["weights"])),
        ("Density", _MISSING if record.get("density") is None else f"{record['density']:g}"),
        ("Rank of the result", record["rank"]),
        ("Seed", f"{record['seed']} (used by the dare methods' random pruning)"),
        ("Base as training loaded it", _loading(training)),
    ]
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {record['name'] if kind == 'adapter' else folder.name}",
        intro,
        *([files_section(gguf_files), running_section(gguf_files, base["path"], has_modelfile)] if kind == "gguf" else []),
        "## How it was merged\n\n" + _table(settings),
        "## Sources\n\n" + _sources(sources),
    ]
    if dtype is not None:
        how = "quantized to 4 bits as in training and dequantized, " if qlora else ""
        parts.append(f"The merged weights are the base's, {how}plus the merged adapter's update, in {dtype}.")
    if kind != "gguf":
        parts.append(_loading_code(kind, folder, base["path"]))
    parts.append(f"Made with swarm {__version__}.")
    return "\n\n".join(parts) + "\n"


def _sources(sources: list[dict]) -> str:
    rows = ["| Adapter | Rank | Alpha | Data or method | Steps | Final train loss | Folder |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in sources:
        data = ", ".join(f"`{d}`" for d in s["data"]) if s.get("data") else (
            f"merge ({s['method']}) of {', '.join(s.get('sources', []))}" if s.get("method") else _MISSING)
        loss = _MISSING if s.get("train_loss") is None else f"{s['train_loss']:.4f}"
        rows.append(f"| {s['name']} | {s['rank']} | {s.get('alpha', _MISSING)} | {data} | "
                    f"{s.get('steps') or _MISSING} | {loss} | `{s['path']}` |")
    return "\n".join(rows)


def _loading(training: dict) -> str:
    if training.get("bits") == 4:
        double = "on" if training.get("double_quant") else "off"
        return f"4-bit {training.get('quant_type')}, double quantization {double}, in {training.get('precision')}"
    return f"not quantized, in {training.get('precision')}"


def _loading_code(kind: str, folder: Path, base_ref: str) -> str:
    if kind == "merged":
        code = ("from transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=\"auto\")\n")
    else:
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base_ref!r})\n"
                f"model = PeftModel.from_pretrained(base, {str(folder)!r})\n")
    return f"## How to load it\n\n```python\n{code}```"


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
