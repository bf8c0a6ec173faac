"""The model card (README.md) of an exported adapter or merged model.

Every figure comes from the run folder (run.json, config.yaml, metrics.jsonl) or, for a
checkpoint, from its manifest and the metrics logged up to its step; what the run did not
record is written as "not recorded", never guessed. The YAML front matter follows the
Hugging Face model card metadata (base_model, library_name, license, tags, datasets,
pipeline_tag). Node host names are left out: they identify people's PCs and say nothing
about how the model was made.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from swarm import __version__
from swarm.export.gguf_card import files_section, running_section
from swarm.export.names import file_stem
from swarm.export.run import RunRecord

MISSING = "not recorded"
_TORCH_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


def render_card(
    run: RunRecord,
    *,
    name: str,
    kind: str,
    folder: Path,
    base_ref: str,
    license_meta: dict,
    manifest: dict | None = None,
    dtype: str | None = None,
    has_tokenizer: bool = True,
    gguf_files: list | None = None,
    has_modelfile: bool = False,
) -> str:
    """The README.md text for an export.

    Args:
        run: the run the export comes from.
        name: the export's name (its title).
        kind: ``adapter``, ``merged`` or ``gguf``.
        folder: where the export will live, used in the loading code.
        base_ref: the base model as loading code names it (hub id or absolute folder).
        license_meta: ``license`` (and ``license_name``/``license_link``) of the base, or {}.
        manifest: the checkpoint's manifest when exporting a checkpoint, else None.
        dtype: the merged weights' dtype (``bf16``, ``fp16``, ``fp32``) for a merged model.
        has_tokenizer: whether the export folder holds the tokenizer (else the base's is used).
        gguf_files: for ``gguf``, the ``GgufFile`` list written to the folder.
        has_modelfile: for ``gguf``, whether an Ollama Modelfile is in the folder.
    """
    job, info = run.job, run.info
    qlora = job.quantization.bits == 4
    method = "QLoRA" if qlora else "LoRA"
    meta = {
        "base_model": base_ref,
        "base_model_relation": "adapter" if kind == "adapter" else "finetune",
        "library_name": {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind],
        **license_meta,
        "pipeline_tag": "text-generation",
        "tags": ["swarm", method.lower(), *(["lora", "bitsandbytes"] if qlora else []), "deepspeed"]
        + ([job.train.method] if job.train.method != "sft" else []) + (["dora"] if job.lora.use_dora else [])
        + (["peft", f"base_model:adapter:{base_ref}"] if kind == "adapter" else [])
        + (["gguf", "llama.cpp", "ollama"] if kind == "gguf" else []),
        # A Hub data set by its id (the Hub links it); a local file by its stem.
        "datasets": list(dict.fromkeys(s.hub or file_stem(s.path) for s in job.data.sources)),
    }
    files = ", ".join(f"`{s.hub or Path(s.path).name}`" for s in job.data.sources)
    what = {
        "adapter": f"A {method} adapter for `{base_ref}`",
        "merged": f"`{base_ref}` with a {method} adapter merged into its weights ({dtype})",
        "gguf": f"GGUF files for llama.cpp, Ollama and LM Studio of `{base_ref}` with a {method} adapter",
    }[kind]
    intro = f"{what}, fine-tuned with swarm on {files}."
    if manifest is not None:
        intro += f" Exported from the checkpoint at step {manifest['step']} of {info.get('steps', MISSING)}."
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {name}",
        intro,
        *([files_section(gguf_files), running_section(gguf_files, base_ref, has_modelfile)] if kind == "gguf" else []),
        _training(run, qlora),
        *([_merging(qlora, job, dtype, kind)] if dtype else []),  # merged weights, also those in GGUF files
        _data(run),
        _hyperparameters(run),
        _results(run, manifest),
        *([_loading(run, kind, folder, base_ref, has_tokenizer)] if kind != "gguf" else []),
        _software(run),
    ]
    return "\n\n".join(parts) + "\n"


def base_license(base_dir: Path | None) -> dict:
    """The license fields of a base model's README.md front matter, or {} when unknown."""
    readme = base_dir / "README.md" if base_dir else None
    meta = front_matter(readme.read_text(errors="replace")) if readme and readme.is_file() else {}
    if not meta.get("license"):
        return {}
    return {key: meta[key] for key in ("license", "license_name", "license_link") if meta.get(key)}


def front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a model card, or {} when it has none."""
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


OBJECTIVES = {
    "sft": "supervised fine-tuning: next-token loss on the target tokens",
    "dpo": "DPO on preference pairs (beta {beta:g}; reference: the base with the adapter off)",
    "orpo": "ORPO on preference pairs (odds-ratio weight {beta:g})",
}


def _training(run: RunRecord, qlora: bool) -> str:
    job, info = run.job, run.info
    q, lora = job.quantization, job.lora
    strategy = info.get("strategy") or {}
    offload_params = strategy.get("offload_params", job.offload.params)
    offload_optimizer = strategy.get("offload_optimizer", job.offload.optimizer)
    rows = [
        ("Method", f"{'QLoRA: frozen 4-bit base' if qlora else 'LoRA: frozen base'}, trained LoRA adapters"),
        ("Objective", OBJECTIVES[job.train.method].format(beta=job.train.beta)),
        ("Quantization", f"4-bit {q.quant_type}, double quantization {'on' if q.double_quant else 'off'} (bitsandbytes)"
         if qlora else "none"),
        ("LoRA", f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets: "
         + (lora.targets if isinstance(lora.targets, str) else ", ".join(lora.targets))
         + "".join(f", {name}" for name, on in (("DoRA", lora.use_dora), ("rsLoRA", lora.use_rslora)) if on)),
        ("Strategy", f"{strategy.get('name', MISSING)}, DeepSpeed ZeRO stage {strategy.get('zero_stage', 3)}"),
        ("Offload", f"parameters: {offload_params}, optimizer state: {offload_optimizer}"),
        ("Precision", info.get("precision", job.train.precision)),
        ("Workers", _value(info.get("world_size"))),
    ]
    nodes = (info.get("hardware") or {}).get("nodes") or []
    hardware = ["| Node | GPUs | RAM |", "| --- | --- | --- |"]
    for number, node in enumerate(nodes, start=1):
        gpus = Counter((g.get("name", "GPU"), g.get("vram_bytes")) for g in node.get("gpus") or [])
        gpu_text = ", ".join(f"{n} × {gpu} ({_gib(vram)})" for (gpu, vram), n in gpus.items()) or "none (CPU)"
        hardware.append(f"| {number} | {gpu_text} | {_gib(node.get('ram_bytes'))} |")
    hardware_text = "\n".join(hardware) if nodes else f"Hardware: {MISSING}."
    return f"## How it was trained\n\n{_table(rows)}\n\n{len(nodes) or MISSING} node(s):\n\n{hardware_text}"


def _merging(qlora: bool, job, dtype: str | None, kind: str) -> str:
    if qlora:
        how = (
            f"The base weights were quantized to 4-bit {job.quantization.quant_type} exactly as in training, "
            "dequantized, and the LoRA update (alpha/r · B·A) added to every adapted layer"
        )
    else:
        how = "The LoRA update (alpha/r · B·A) was added to every adapted layer of the base"
    if kind == "gguf":
        return f"## How it was merged\n\n{how}, in {dtype}; llama.cpp's converter and quantizer made the GGUF files."
    return f"## How it was merged\n\n{how}; the weights are stored in {dtype}. It loads without peft."


def _data(run: RunRecord) -> str:
    data = run.info.get("data") or {}
    files = data.get("files") or run.job.data.labels
    rows = [
        ("Files", ", ".join(f"`{f}`" for f in files)),
        ("Format", data.get("format", run.job.data.format)),
        ("Records", _value(data.get("records"))),
        ("Skipped records", _value(data.get("skipped"))),
        ("Training tokens", _value(data.get("train_tokens"))),
        ("Evaluation tokens", _value(data.get("eval_tokens"))),
        ("Content hash (SHA-256)", f"`{data['sha256']}`" if data.get("sha256") else MISSING),
    ]
    return f"## Data\n\n{_table(rows)}"


def _hyperparameters(run: RunRecord) -> str:
    t, d = run.job.train, run.job.data
    world = run.info.get("world_size")
    batch = f"{t.micro_batch} × {t.grad_accum} accumulation" + (
        f" × {world} workers = {t.micro_batch * t.grad_accum * world} sequences" if isinstance(world, int) else ""
    )
    rows = [
        ("Max steps", t.max_steps), ("Batch per step", batch), ("Sequence length", d.seq_len),
        ("Learning rate", f"{t.lr:g}, {t.warmup_steps} warm-up steps, decay to {t.min_lr_ratio:g}×"),
        ("Optimizer", f"{t.optimizer}, weight decay {t.weight_decay:g}, gradient clipping {t.max_grad_norm:g}"),
        ("Gradient checkpointing", "on" if t.gradient_checkpointing else "off"),
        ("Evaluation", f"{d.eval_fraction:g} of the data held out, every {t.eval_every} steps"),
        ("Seeds", f"training {t.seed}, data {d.seed}"),
    ]
    return f"## Hyperparameters\n\n{_table(rows)}"


def _results(run: RunRecord, manifest: dict | None) -> str:
    info = run.info
    if manifest is None:
        step, rows_seen = info.get("steps"), run.metrics
        figures = [
            ("Steps", _value(step)), ("Tokens trained on", _value(info.get("tokens"))),
            ("Train loss (last logged)", _loss(info.get("train_loss"))),
            ("Eval loss (last)", _loss(info.get("eval_loss"))), ("Wall time", _duration(info.get("wall_time_s"))),
        ]
    else:
        step = manifest["step"]
        rows_seen = [r for r in run.metrics if isinstance(r.get("step"), int) and r["step"] <= step]
        evals = [r["eval_loss"] for r in rows_seen if r.get("eval_loss") is not None]
        losses = [r["loss"] for r in rows_seen if r.get("loss") is not None]
        tokens = sum(r.get("tokens", 0) for r in rows_seen if r.get("loss") is not None) or None
        figures = [
            ("Steps", _value(step)), ("Tokens trained on", _value(tokens)),
            ("Train loss (last logged)", _loss(losses[-1] if losses else None)),
            ("Eval loss (last)", _loss(evals[-1] if evals else None)),
            ("Whole run", f"{_value(info.get('steps'))} steps, final train loss {_loss(info.get('train_loss'))}"),
        ]
    text = f"## Results\n\n{_table(figures)}"
    logged = [r for r in rows_seen if r.get("loss") is not None]
    if logged:
        # At most ten rows, evenly spaced, always ending with the last one logged.
        picks = sorted({round(i * (len(logged) - 1) / 9) for i in range(10)})
        curve = ["| Step | Train loss | Learning rate | Tokens/s |", "| --- | --- | --- | --- |"]
        for i in picks:
            r = logged[i]
            curve.append(f"| {r.get('step')} | {_loss(r['loss'])} | {_value(r.get('lr'), '{:.3g}')} | "
                         f"{_value(r.get('tokens_per_s'), '{:,.0f}')} |")
        text += "\n\nTraining loss:\n\n" + "\n".join(curve)
    evals = [r for r in rows_seen if r.get("eval_loss") is not None][-10:]
    if evals:
        by_step = ", ".join(f"{r.get('step')}: {_loss(r['eval_loss'])}" for r in evals)
        text += f"\n\nEvaluation loss by step: {by_step}."
    return text


def _loading(run: RunRecord, kind: str, folder: Path, base_ref: str, has_tokenizer: bool) -> str:
    job, precision = run.job, run.info.get("precision", run.job.train.precision)
    torch_dtype = _TORCH_DTYPE.get(precision, "torch.bfloat16")
    tokenizer_from = str(folder) if has_tokenizer else base_ref
    if kind == "merged":
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=\"auto\")\n"
        )
    else:
        quant = ""
        if job.quantization.bits == 4:
            q = job.quantization
            quant = (
                "    # The base quantized to 4 bits as in training; leave this out to load it unquantized.\n"
                "    quantization_config=BitsAndBytesConfig(\n"
                f"        load_in_4bit=True,\n        bnb_4bit_quant_type={q.quant_type!r},\n"
                f"        bnb_4bit_use_double_quant={q.double_quant},\n        bnb_4bit_compute_dtype={torch_dtype},\n"
                "    ),\n"
            )
        imports = "AutoModelForCausalLM, AutoTokenizer" + (", BitsAndBytesConfig" if quant else "")
        load = (
            f"import torch\nfrom peft import PeftModel\nfrom transformers import {imports}\n\n"
            f"base = AutoModelForCausalLM.from_pretrained(\n    {base_ref!r},\n{quant}    dtype={torch_dtype},\n)\n"
            f"model = PeftModel.from_pretrained(base, {str(folder)!r})\n"
        )
    code = (
        load + f"tokenizer = AutoTokenizer.from_pretrained({tokenizer_from!r})\n\n"
        'inputs = tokenizer("Once upon a time", return_tensors="pt").to(model.device)\n'
        "output = model.generate(**inputs, max_new_tokens=32)\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))\n"
    )
    where = "this folder" if kind == "merged" else "the base model and this adapter"
    note = "Replace the paths with the Hugging Face repository ids if you upload the folders."
    install = f"`pip install {_requirements(kind, job)}`"
    return f"## How to load it\n\nLoad {where} ({install}). {note}\n\n```python\n{code}```"


def _software(run: RunRecord) -> str:
    import importlib.metadata as md

    versions = ", ".join(
        f"{pkg} {md.version(pkg)}" for pkg in ("torch", "transformers", "peft", "bitsandbytes", "safetensors")
    )
    trained_with = run.info.get("swarm_version", MISSING)
    return (
        f"## Software and configuration\n\nTrained with swarm {trained_with}; exported with swarm {__version__} "
        f"({versions}).\n\nThe resolved job configuration of the run:\n\n```yaml\n{run.config_text.rstrip()}\n```"
    )


def _requirements(kind: str, job) -> str:
    packages = ["torch", "transformers"]
    if kind == "adapter":
        packages.append("peft")
        if job.quantization.bits == 4:
            packages.append("bitsandbytes")
    return " ".join(packages)


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in rows)])


def _value(value, fmt: str = "{:,}") -> str:
    if value is None:
        return MISSING
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _loss(value) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _gib(value) -> str:
    return MISSING if value is None else f"{value / 2**30:.1f} GiB"


def _duration(seconds) -> str:
    if seconds is None:
        return MISSING
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d} ({seconds:,.0f} s)"
