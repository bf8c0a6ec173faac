"""The shape of a model, counted without reading a single weight.

A model's ``config.json`` (from a local folder, or one of the bundled architectures under
``swarm/plan/architectures/``) is turned into the real transformers model on PyTorch's meta
device, where tensors have shapes but no storage. Walking that model gives exact counts:
which parameters bitsandbytes would quantize to 4-bit, which stay 16-bit, and how many LoRA
parameters a target list and rank add. Nothing here allocates more than a few megabytes, so
a 70B model is counted in about a second.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from swarm.errors import UserError

# Hub ids whose name does not reduce to a bundled name by the rule in ``_bundled_name_for``;
# the shapes are identical (Llama 3 / 3.3 differ from 3.1 only in rope scaling and context).
HUB_ALIASES = {
    "meta-llama/meta-llama-3-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3-70b": "llama-3.1-70b",
    "meta-llama/meta-llama-3-70b-instruct": "llama-3.1-70b",
    "meta-llama/llama-3.3-70b-instruct": "llama-3.1-70b",
    "mistralai/mistral-7b-v0.3": "mistral-7b",
    "mistralai/mistral-7b-instruct-v0.3": "mistral-7b",
}

_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True)
class ModuleGroup:
    """Modules that differ only in their layer index (``model.layers.*.mlp.up_proj``).

    Attributes:
        pattern: the module name with each layer index replaced by ``*``.
        count: how many modules share the pattern.
        kind: ``linear``, ``embedding``, ``norm`` or ``other``.
        weight_numel: elements of the module's weight (0 when the weight is tied elsewhere).
        other_numel: elements of its other direct parameters (the bias of a linear).
        in_features / out_features: for linears, else 0.
        quantizable: bitsandbytes would replace it with ``Linear4bit``.
        is_output: it is the output head (never quantized, never a LoRA target).
    """

    pattern: str
    count: int
    kind: str
    weight_numel: int
    other_numel: int
    in_features: int = 0
    out_features: int = 0
    quantizable: bool = False
    is_output: bool = False

    @property
    def params(self) -> int:
        return self.count * (self.weight_numel + self.other_numel)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model, exact to the parameter.

    Attributes:
        name: bundled name, folder or hub id the shape was read from.
        model_type: transformers' ``model_type`` (``llama``, ``qwen2``, ``gemma2`` ...).
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size:
            the config's dimensions (head_dim as the model uses it).
        tie_word_embeddings: the output head shares the input embedding.
        checkpoint_dtype_bytes: bytes per element of the weights on disk (``torch_dtype``).
        groups: every module with direct parameters, grouped across layers.
        attention_softcapping: Gemma 2 style logit soft-capping, which needs eager attention.
    """

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    checkpoint_dtype_bytes: int
    groups: tuple[ModuleGroup, ...]
    attention_softcapping: bool = False

    @property
    def total_params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def quantizable_params(self) -> int:
        """Weight elements that 4-bit quantization turns into packed nibbles."""
        return sum(g.count * g.weight_numel for g in self.groups if g.quantizable)

    @property
    def params_16bit_when_quantized(self) -> int:
        """Elements that stay 16-bit under 4-bit quantization: embeddings, head, norms, biases."""
        return self.total_params - self.quantizable_params

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder block (all blocks of these architectures are equal)."""
        return sum(g.params for g in self.groups if "*" in g.pattern) // self.num_layers

    @property
    def largest_quantizable_numel(self) -> int:
        return max((g.weight_numel for g in self.groups if g.quantizable), default=0)

    @property
    def linear_names(self) -> list[str]:
        """Short names of the linears LoRA can target (``q_proj``, ``gate_proj`` ...)."""
        return sorted({g.pattern.rsplit(".", 1)[-1] for g in self.groups if g.kind == "linear" and not g.is_output})

    def lora_groups(self, targets: list[str] | str) -> list[ModuleGroup]:
        """The module groups LoRA adapts for ``targets``, matched the way peft matches them.

        Args:
            targets: ``"all-linear"`` (every linear except the output head) or module names;
                a name matches a module whose full name equals it or ends with ``.name``.

        Raises:
            UserError: a target that matches no linear of this model.
        """
        linears = [g for g in self.groups if g.kind == "linear" and not g.is_output]
        if targets == "all-linear":
            return linears
        chosen = []
        for target in targets:
            hits = [g for g in linears if g.pattern == target or g.pattern.endswith("." + target)]
            if not hits:
                raise UserError(
                    f"lora.targets: {target!r} matches no linear layer of {self.name}; "
                    f"its linears are {', '.join(self.linear_names)}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        return chosen

    def lora_params(self, targets: list[str] | str, r: int) -> int:
        """LoRA parameters added: ``r * (in + out)`` per adapted linear (A is r x in, B is out x r)."""
        return sum(g.count * r * (g.in_features + g.out_features) for g in self.lora_groups(targets))

    def lora_numels(self, targets: list[str] | str, r: int) -> list[tuple[int, int]]:
        """(elements, count) of each LoRA matrix, for ZeRO-3's per-parameter persistence rule."""
        out = []
        for g in self.lora_groups(targets):
            out += [(r * g.in_features, g.count), (r * g.out_features, g.count)]
        return out


def bundled_names() -> list[str]:
    """Names of the bundled architectures (``llama-3.1-8b``, ``qwen2.5-72b`` ...)."""
    folder = resources.files("swarm.plan") / "architectures"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def bundled_config(name: str) -> dict:
    """The bundled ``config.json`` of ``name`` as a dict."""
    path = resources.files("swarm.plan") / "architectures" / f"{name}.json"
    return json.loads(path.read_text())


def resolve_config(model_path: str) -> tuple[str, dict]:
    """Find the ``config.json`` for ``model.path``: a local folder, a bundled name or a known hub id.

    Returns:
        (label, config dict).

    Raises:
        UserError: a folder without a readable config.json, or an unknown hub id.
    """
    path = Path(model_path).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"model folder {path} has no config.json")
        try:
            return str(path), json.loads(cfg_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{cfg_file} is not readable JSON ({exc})") from None
    name = _bundled_name_for(model_path)
    if name is None:
        raise UserError(
            f"model.path {model_path!r} is not a local folder and not a known architecture; "
            f"give a local folder with config.json, or one of: {', '.join(bundled_names())}"
        )
    return name, bundled_config(name)


def _bundled_name_for(model_path: str) -> str | None:
    # "Qwen/Qwen2.5-7B-Instruct" -> "qwen2.5-7b"; "meta-llama/Llama-3.1-8B-Instruct" -> "llama-3.1-8b".
    key = model_path.strip().lower()
    if key in HUB_ALIASES:
        return HUB_ALIASES[key]
    names = set(bundled_names())
    base = key.rsplit("/", 1)[-1].removeprefix("meta-")
    for candidate in (base, base.removesuffix("-instruct"), base.removesuffix("-it")):
        if candidate in names:
            return candidate
    return None


def load_shape(model_path: str) -> ModelShape:
    """The :class:`ModelShape` of ``model.path`` (local folder, bundled name or known hub id).

    Raises:
        UserError: see :func:`resolve_config`; also an architecture transformers does not know.
    """
    label, cfg = resolve_config(model_path)
    return shape_from_config(label, json.dumps(cfg, sort_keys=True))


@lru_cache(maxsize=32)
def shape_from_config(label: str, config_json: str) -> ModelShape:
    """Build the model of ``config_json`` on the meta device and group its parameters.

    Cached on the JSON text, because planning tries many strategies for the same model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_json)
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.for_model(**raw)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{label}: transformers does not know model_type {model_type!r} ({exc})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{label}: transformers cannot build a causal language model from this config ({exc})") from None
    groups = _group_modules(model)
    text = getattr(config, "get_text_config", lambda: config)()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        name=label,
        model_type=model_type or type(config).model_type,
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        checkpoint_dtype_bytes=_dtype_bytes(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        groups=groups,
        attention_softcapping=bool(getattr(text, "attn_logit_softcapping", None)),
    )


def _group_modules(model) -> tuple[ModuleGroup, ...]:
    import torch.nn as nn
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    # The same rule transformers applies when it swaps nn.Linear for bnb.nn.Linear4bit:
    # tied weights, the last module and the output embeddings stay unquantized.
    keep_16bit = get_keys_to_not_convert(model)
    output = model.get_output_embeddings()
    seen: set[int] = set()
    grouped: dict[tuple, int] = {}
    for name, module in model.named_modules():
        direct = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not direct:
            continue
        weight_numel = other = 0
        for pname, param in direct:
            if id(param) in seen:  # a tied weight is counted once, where it first appears
                continue
            seen.add(id(param))
            if pname == "weight":
                weight_numel = param.numel()
            else:
                other += param.numel()
        is_linear = type(module) is nn.Linear
        kind = (
            "linear" if is_linear
            else "embedding" if isinstance(module, nn.Embedding)
            else "norm" if "norm" in type(module).__name__.lower()
            else "other"
        )
        key = (
            _LAYER_INDEX.sub(".*", name),
            kind,
            weight_numel,
            other,
            module.in_features if is_linear else 0,
            module.out_features if is_linear else 0,
            is_linear and weight_numel > 0 and should_convert_module(name, keep_16bit),
            module is output,
        )
        grouped[key] = grouped.get(key, 0) + 1
    return tuple(
        ModuleGroup(pattern=k[0], count=c, kind=k[1], weight_numel=k[2], other_numel=k[3],
                    in_features=k[4], out_features=k[5], quantizable=k[6], is_output=k[7])
        for k, c in grouped.items()
    )


def _dtype_bytes(name: str) -> int:
    name = str(name).removeprefix("torch.")
    return {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}.get(name, 2)
