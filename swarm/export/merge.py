"""Fold a LoRA adapter into its base model, one tensor at a time, outside DeepSpeed.

The merged weight of a layer is what the layer computed during training, as one matrix::

    W_merged = W_seen + scale * B @ A        scale = alpha / r  (alpha / sqrt(r) with rsLoRA)

and with DoRA (Liu et al., arXiv:2402.09353, eq. 5; peft's ``DoraLinearVariant.merge_safe``),
each output row rescaled to the learned magnitude ``m``::

    W_merged = m / ||W_seen + scale * B @ A||_row * (W_seen + scale * B @ A)

``W_seen`` is the base weight as training saw it. The trainer loads the base with
``dtype`` = the run's precision, so every floating tensor is first cast to that dtype; for a
QLoRA run, the linear layers bitsandbytes quantized (every ``nn.Linear`` transformers
converts: those in the decoder blocks, not the output head or the embeddings) are then
quantized to 4 bits exactly as transformers did (blocksize 64, nf4/fp4, double
quantization per the run's config) and dequantized. That is all 4-bit layers, with a LoRA
pair or not: merging into the original full-precision weights would give a model the
adapter was never trained against.

Memory stays bounded: base tensors are read one by one from the safetensors shards
(``safe_open``, which maps the file rather than reading it), and merged tensors are held
only until a shard of ``max_shard_size`` bytes is full and written. Peak RAM is about two
shards (safetensors serializes a shard before writing it) plus a few fp32 copies of the
largest layer, whatever the model's depth. The output is a folder ``from_pretrained``
loads: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json``, ``config.json`` (dtype set, quantization dropped) and
``generation_config.json``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from swarm.durable import fsync_path

import torch

from swarm.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCKSIZE = 64  # bitsandbytes' Params4bit default, the one transformers quantizes with
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_MAGNITUDE_KEY = re.compile(r"base_model\.model\.(.+)\.lora_magnitude_vector(?:\.weight)?")


def parse_size(text: str | int) -> int:
    """Bytes in a size like ``2GB``, ``500MB``, ``64MiB`` or ``1000000`` (GB = 10^9, GiB = 2^30).

    Raises:
        UserError: not a positive size.
    """
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        size = int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        size = 0
    if size <= 0:
        raise UserError(f"size {text!r} is not a size like 2GB, 500MB or 64MiB")
    return size


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    dest: Path,
    *,
    bits: int | None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    load_dtype: str = "bf16",
    dtype: str = "bf16",
    max_shard_size: int = 2 * 10**9,
    trust_remote_code: bool = False,
) -> list[Path]:
    """Write the base model in ``base_dir`` with the adapter in ``adapter_dir`` folded in to ``dest``.

    Args:
        base_dir: local folder of the base model (config.json + safetensors weights).
        adapter_dir: peft LoRA adapter folder.
        dest: empty or missing folder to write the merged model to.
        bits: 4 when training quantized the base with bitsandbytes, else None.
        quant_type: ``nf4`` or ``fp4``, as in training.
        double_quant: whether training quantized the absmax statistics too.
        load_dtype: the dtype training loaded the base in (its precision): bf16, fp16, fp32.
        dtype: the dtype of the merged weights: bf16, fp16 or fp32.
        max_shard_size: bytes of tensor data per shard; a larger tensor gets a shard alone.
        trust_remote_code: build the model skeleton with the base's own code (as training did).

    Returns:
        The weight files written.

    Raises:
        UserError: the base has no safetensors weights or is already quantized, or the adapter
            is not a plain LoRA adapter of this base.
    """
    base_dir, dest = Path(base_dir), Path(dest)
    config = _base_config(base_dir)
    shards = _weight_files(base_dir)
    lora, adapter_config = read_lora(adapter_dir)
    keys = _tensor_keys(shards)
    quantized = _quantized_modules(base_dir, trust_remote_code) if bits == 4 else {}
    for module in [*quantized, *lora]:
        if f"{module}.weight" not in keys:
            raise UserError(
                f"the base model's weights have no {module}.weight, which the model (or the adapter) has; "
                "swarm cannot merge this architecture: export the adapter without --merge"
            )
    seen_dtype, out_dtype = DTYPES[load_dtype], DTYPES[dtype]
    dest.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(dest, max_shard_size)
    with _progress(len(keys)) as advance:
        from safetensors import safe_open

        for shard in shards:
            with safe_open(str(shard), framework="pt") as reader:
                for key in reader.keys():
                    tensor = reader.get_tensor(key)
                    if tensor.is_floating_point():
                        module = key.removesuffix(".weight")
                        tensor = tensor.to(seen_dtype)
                        if module in quantized:
                            tensor = _roundtrip_4bit(tensor, quant_type, double_quant, quantized[module])
                        if module in lora:
                            tensor = _merged(tensor.float(), module, lora[module], adapter_config)
                        tensor = tensor.to(out_dtype)
                    writer.add(key, tensor)
                    advance()
    files = writer.finish()
    config.pop("quantization_config", None)
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    _write(dest / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in ["generation_config.json", *(p.name for p in base_dir.glob("*.py"))]:
        if (base_dir / extra).is_file():
            shutil.copyfile(base_dir / extra, dest / extra)
    return files


def read_lora(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict]:
    """The LoRA pairs of a peft adapter folder by base module name (with DoRA's magnitude
    vector as a third tensor), and its adapter_config.

    Raises:
        UserError: the adapter is not LoRA or DoRA (trained biases, extra saved modules).
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = {
        "peft_type is not LORA": config.get("peft_type", "LORA") != "LORA",
        "it trains biases": config.get("bias", "none") != "none" or config.get("lora_bias"),
        "it saves whole modules (modules_to_save)": config.get("modules_to_save"),
        "it trains token embeddings": config.get("trainable_token_indices"),
        "it replicates layers": config.get("layer_replication"),
    }
    for reason, present in unsupported.items():
        if present:
            raise UserError(f"adapter {adapter_dir} cannot be merged by swarm: {reason}; export it without --merge")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        match = _LORA_KEY.fullmatch(key)
        magnitude = _MAGNITUDE_KEY.fullmatch(key) if config.get("use_dora") else None
        if magnitude:
            halves.setdefault(magnitude.group(1), {})["m"] = tensor
            continue
        if not match:
            raise UserError(
                f"adapter {adapter_dir} holds {key}, which is not a LoRA A/B weight; export it without --merge"
            )
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor
    pairs = {}
    wanted = {"A", "B", "m"} if config.get("use_dora") else {"A", "B"}
    for module, half in halves.items():
        if set(half) != wanted:
            raise UserError(f"adapter {adapter_dir} lacks {', '.join(sorted(wanted - set(half)))} for {module}")
        pairs[module] = (half["A"], half["B"], *((half["m"],) if "m" in half else ()))
    return pairs, config


def _merged(weight: torch.Tensor, module: str, tensors: tuple[torch.Tensor, ...], config: dict) -> torch.Tensor:
    """``weight`` (fp32, as training saw it) with the module's LoRA (and DoRA magnitude) folded in."""
    summed = weight + _delta(module, tensors[0], tensors[1], config)
    if len(tensors) == 2:
        return summed
    # The norm runs over each output row; GPT-2 style Conv1D weights are stored (in, out).
    rows = summed.T if config.get("fan_in_fan_out") else summed
    scaled = rows * (tensors[2].float() / torch.linalg.norm(rows, dim=1)).view(-1, 1)
    return scaled.T if config.get("fan_in_fan_out") else scaled


def _delta(module: str, a: torch.Tensor, b: torch.Tensor, config: dict) -> torch.Tensor:
    """``scale * B @ A`` in fp32, with peft's per-module alpha and rsLoRA scaling."""
    from peft.utils.other import get_pattern_key

    rank = a.shape[0]
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    delta = (b.float() @ a.float()) * scale
    # GPT-2 style Conv1D stores weights as (in, out); peft marks that with fan_in_fan_out.
    return delta.T if config.get("fan_in_fan_out") else delta


def _roundtrip_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool, transposed: bool) -> torch.Tensor:
    """``weight`` quantized to 4 bits as transformers did at load time, then dequantized."""
    import bitsandbytes.functional as bnbf

    # transformers transposes Conv1D weights before quantizing, so the blocks run along rows.
    source = (weight.T if transposed else weight).contiguous()
    packed, state = bnbf.quantize_4bit(
        source, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
    )
    restored = bnbf.dequantize_4bit(packed, state)
    return restored.T if transposed else restored


def _quantized_modules(base_dir: Path, trust_remote_code: bool) -> dict[str, bool]:
    """Names of the modules transformers replaces with bitsandbytes 4-bit layers.

    Built the way transformers does it at load time, on a skeleton with no weights (meta
    device), so the answer is transformers' own. The value says whether the module is a
    Conv1D, whose weight is stored transposed.
    """
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    model = replace_with_bnb_linear(
        model, modules_to_not_convert=skip, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    return {
        name: issubclass(module.source_cls, Conv1D)
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def _base_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not path.is_file():
        raise UserError(f"base model folder {base_dir} has no config.json")
    config = json.loads(path.read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "some method")
        raise UserError(
            f"base model {base_dir} is stored quantized ({method}); merging needs the full-precision base"
        )
    return config


def _weight_files(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base_dir / name for name in names]
    if (base_dir / "model.safetensors").is_file():
        return [base_dir / "model.safetensors"]
    raise UserError(
        f"base model folder {base_dir} has no safetensors weights (model.safetensors or its index); "
        "merging reads safetensors only"
    )


def _tensor_keys(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as reader:  # reads the header only
            keys.update(reader.keys())
    return keys


class _ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the next would overflow it."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        # Final names need the shard count, known only at the end; rename then.
        path = self.folder / f"shard-{len(self.shards) + 1:05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        fsync_path(path)
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            final = self.folder / "model.safetensors"
            self.shards[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for number, (path, keys) in enumerate(self.shards, start=1):
            final = self.folder / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({key: final.name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        _write(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return files


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    fsync_path(path)


class _progress:
    """A rich progress bar over the tensors on a terminal; silent otherwise (logs, tests)."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=True, disable=not console.is_terminal,
        )
        self.task = self.bar.add_task("merge", total=total)

    def __enter__(self):
        self.bar.start()
        return lambda: self.bar.advance(self.task)

    def __exit__(self, *exc) -> None:
        self.bar.stop()
