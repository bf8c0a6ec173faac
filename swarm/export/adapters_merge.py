"""``swarm merge``: combine LoRA adapters trained on one base into one adapter, with peft's own arithmetic.

The sources are run folders (their final adapter) or earlier merges. peft's
``add_weighted_adapter`` does the combining (linear, cat, svd, ties, dare_linear, dare_ties);
swarm checks before it runs that the sources can be combined, and records what it did. The
base's weights are not needed: the adapters are loaded onto a skeleton of the base built on
the meta device, so merging adapters of a 70B model takes the adapters' memory, not the
model's.

The output folder is a peft adapter (``adapter_config.json``, ``adapter_model.safetensors``)
with the tokenizer of the first source, ``swarm-merge.json`` (method, weights, sources, and
the base and quantization they were all trained on, which ``swarm export`` needs to fold
the merge into the base exactly as training saw it) and a model card.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from swarm.errors import UserError
from swarm.durable import atomic_folder
from swarm.export.names import base_model_part, validate_name
from swarm.export.run import ADAPTER_FILES, load_run

RECORD = "swarm-merge.json"
# peft's combination types offered, and whether each one prunes (needs a density).
METHODS = {"cat": False, "linear": False, "svd": False, "ties": True, "dare_linear": True, "dare_ties": True}
# The default is the exact one: cat's update is sum_i w_i s_i B_i A_i. linear sums the A and the B
# matrices separately, so its product also holds every B_i A_j of two different adapters (cross
# terms as large as the updates themselves for adapters trained apart); it is smaller (equal
# ranks), which is no reason to be wrong by default.
DEFAULT_METHOD = "cat"
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties")  # peft stacks the A and B matrices as they are


@dataclass(frozen=True)
class MergeSource:
    """An adapter to merge and what swarm knows about how it was trained.

    Attributes:
        name: the run's (or earlier merge's) name.
        folder: the folder the user named.
        adapter_dir: the folder with the peft adapter files.
        tokenizer_dir: the folder with its tokenizer files, or None.
        base: the base model: ``path`` (absolute folder or hub id), ``revision``, ``trust_remote_code``.
        training: how training loaded the base: ``bits``, ``quant_type``, ``double_quant``, ``precision``.
        summary: figures for the model card (data files, steps, losses, or the merge's method).
    """

    name: str
    folder: Path
    adapter_dir: Path
    tokenizer_dir: Path | None
    base: dict
    training: dict
    summary: dict = field(default_factory=dict)

    @property
    def lora(self) -> dict:
        """The adapter's ``adapter_config.json``."""
        return json.loads((self.adapter_dir / "adapter_config.json").read_text())

    @property
    def rank(self) -> int:
        """The largest LoRA rank of the adapter (its ``r``, or more in its ``rank_pattern``)."""
        config = self.lora
        return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def read_source(folder: str | Path) -> MergeSource:
    """A run folder (its final adapter) or a folder written by ``swarm merge``.

    Raises:
        UserError: neither, or the run has no final adapter.
    """
    folder = Path(folder)
    if (folder / RECORD).is_file():
        record = json.loads((folder / RECORD).read_text())
        summary = {"method": record["method"], "sources": [s["name"] for s in record["sources"]]}
        tokenizer = folder if (folder / "tokenizer_config.json").is_file() else None
        return MergeSource(record["name"], folder, folder, tokenizer, record["base"], record["training"], summary)
    if not (folder / "config.yaml").is_file():
        what = "does not exist" if not folder.exists() else "is neither a swarm run folder nor a `swarm merge` folder"
        raise UserError(f"{folder} {what}")
    run = load_run(folder)
    adapter = run.dir / "adapter"
    if not all((adapter / f).is_file() for f in ADAPTER_FILES):
        raise UserError(f"{run.dir} has no final adapter (training did not finish); merge finished runs")
    model, q = run.job.model, run.job.quantization
    local = Path(model.path).expanduser()
    base = {"path": str(local.resolve()) if local.is_dir() else model.path, "revision": model.revision,
            "trust_remote_code": model.trust_remote_code}
    training = {"bits": q.bits, "quant_type": q.quant_type, "double_quant": q.double_quant, "precision": run.precision}
    info = run.info
    summary = {"data": [s.hub or Path(s.path).name for s in run.job.data.sources], "steps": info.get("steps"),
               "train_loss": info.get("train_loss"), "eval_loss": info.get("eval_loss")}
    tokenizer = run.dir / "tokenizer"
    name = info.get("name") or run.job.output.name or run.dir.name
    return MergeSource(name, run.dir, adapter, tokenizer if tokenizer.is_dir() else None, base, training, summary)


def check_sources(
    sources: list[MergeSource], method: str, weights: list[float], density: float | None
) -> None:
    """Refuse, in one line, what peft cannot combine or swarm could not fold into one base.

    Raises:
        UserError: fewer than two sources, mismatched weights, a density where it means nothing
            (or none where it is needed), different bases or base loading, unequal ranks for
            a method that stacks the matrices, or an adapter that is not plain LoRA.
    """
    if method not in METHODS:
        raise UserError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if len(sources) < 2:
        raise UserError("swarm merge needs at least two adapters")
    if len(weights) != len(sources):
        raise UserError(f"--weights gives {len(weights)} weight(s) for {len(sources)} adapters; give one per adapter")
    if METHODS[method] and density is None:
        raise UserError(f"method {method} needs --density (the fraction of each adapter's weights kept, e.g. 0.5)")
    if not METHODS[method] and density is not None:
        raise UserError(f"--density applies to ties, dare_linear and dare_ties, not to {method}")
    if density is not None and not 0 < density <= 1:
        raise UserError(f"--density {density:g} must be above 0 and at most 1")
    first = sources[0]
    for other in sources[1:]:
        if (other.base["path"], other.base.get("revision")) != (first.base["path"], first.base.get("revision")):
            raise UserError(
                f"{first.name} and {other.name} were trained on different bases ({first.base['path']} and "
                f"{other.base['path']}); adapters merge only onto the base they were trained on"
            )
        if other.training != first.training:
            raise UserError(
                f"{first.name} and {other.name} saw the base loaded differently ({_loading(first)} against "
                f"{_loading(other)}); swarm export could not reproduce both bases in one merged model"
            )
    ranks = [s.rank for s in sources]
    if method in EQUAL_RANKS and len(set(ranks)) > 1:
        pairs = ", ".join(f"{s.name} r={r}" for s, r in zip(sources, ranks))
        raise UserError(f"method {method} needs adapters of equal rank ({pairs}); use svd or cat for unequal ranks")
    for source in sources:
        config = source.lora
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
            raise UserError(f"{source.name} is not a plain LoRA adapter (DoRA, or whole modules saved); peft cannot merge it")


def _loading(source: MergeSource) -> str:
    t = source.training
    quant = f"4-bit {t['quant_type']}, double quantization {'on' if t['double_quant'] else 'off'}" if t["bits"] == 4 else "not quantized"
    return f"{quant}, {t['precision']}"


def merge_adapters(
    folders: list[str | Path],
    out: str | Path | None = None,
    *,
    method: str = DEFAULT_METHOD,
    weights: list[float] | None = None,
    density: float | None = None,
    svd_rank: int | None = None,
    seed: int = 0,
    base: str | Path | None = None,
) -> Path:
    """Combine the adapters of ``folders`` (runs or merges) and write one adapter folder.

    Args:
        folders: run folders or ``swarm merge`` folders, all trained on one base.
        out: the folder to write; default ``{base}-{method}-merge-r{rank}-{yyyymmdd}`` in the
            current folder. Its name must follow the naming rules.
        method: peft's combination type: cat (the default: exact), linear, svd, ties, dare_linear, dare_ties.
        weights: one weight per adapter; default 1 each (the sum of their updates).
        density: the fraction of weights each adapter keeps, for ties and the dare methods.
        svd_rank: the merged rank for svd; default the largest source rank.
        seed: seeds the random pruning of the dare methods.
        base: a local folder with the base's config.json, when the sources' base is a hub id
            not in the local cache.

    Returns:
        The folder written.

    Raises:
        UserError: see ``check_sources``; an existing output folder; no base config.
    """
    sources = [read_source(f) for f in folders]
    weights = list(weights) if weights is not None else [1.0] * len(sources)
    check_sources(sources, method, weights, density)
    if svd_rank is not None and (method != "svd" or svd_rank < 1):
        raise UserError("--rank applies to method svd only, and must be at least 1")
    rank = _merged_rank(sources, method, svd_rank)
    if out is None:
        part = base_model_part(sources[0].base["path"])
        out = Path(f"{part}-{method.replace('_', '-')}-merge-r{rank}-{dt.date.today():%Y%m%d}")
    out = Path(out)
    validate_name(out.name)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another --out")
    config_dir = Path(base) if base is not None else _base_config_dir(sources[0].base)

    with atomic_folder(out) as tmp:
        _combine(sources, config_dir, tmp, method, weights, density, svd_rank, seed)
        if sources[0].tokenizer_dir is not None:
            for file in sources[0].tokenizer_dir.iterdir():
                if file.is_file() and file.name not in (*ADAPTER_FILES, "README.md", RECORD):
                    shutil.copyfile(file, tmp / file.name)
        record = {
            "name": out.name, "method": method, "weights": weights, "density": density, "svd_rank": svd_rank,
            "seed": seed, "rank": rank, "base": sources[0].base, "training": sources[0].training,
            "sources": [{"name": s.name, "path": str(s.folder.resolve()), "rank": s.rank,
                         "alpha": s.lora.get("lora_alpha"), **s.summary} for s in sources],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        from swarm.export.merge_card import render_merge_card

        (tmp / "README.md").write_text(render_merge_card(record, "adapter", out.resolve()))
    return out


def _merged_rank(sources: list[MergeSource], method: str, svd_rank: int | None) -> int:
    ranks = [s.rank for s in sources]
    if method == "cat":
        return sum(ranks)
    if method == "svd":
        return svd_rank or max(ranks)
    return ranks[0]


def _base_config_dir(base: dict) -> Path:
    from swarm.export.run import resolve_base

    try:
        return resolve_base(base["path"], base.get("revision"))
    except UserError:
        raise UserError(
            f"the base {base['path']} is not on this machine; merging adapters needs its config.json: pass --base DIR"
        ) from None


def _combine(sources, config_dir: Path, dest: Path, method, weights, density, svd_rank, seed) -> None:
    """Load every adapter onto a weightless skeleton of the base, combine with peft, save the result."""
    import torch
    from peft import PeftModel

    names = [f"source{i}" for i in range(len(sources))]
    model = PeftModel.from_pretrained(_skeleton(config_dir, sources[0].base), sources[0].adapter_dir, adapter_name=names[0])
    for name, source in zip(names[1:], sources[1:]):
        model.load_adapter(source.adapter_dir, adapter_name=name)
    torch.manual_seed(seed)
    try:
        model.add_weighted_adapter(
            names, weights, "default", combination_type=method, density=density, svd_rank=svd_rank,
        )
    except (ValueError, TypeError) as exc:
        raise UserError(f"peft cannot combine these adapters: {' '.join(str(exc).split())}") from None
    model.save_pretrained(dest, selected_adapters=["default"])
    config_file = dest / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = sources[0].base["path"]
    # peft folds each source's scaling into the merged matrices and gives the result lora_alpha = r,
    # a scaling of 1, but keeps the first source's use_rslora, which would scale it by sqrt(r) again.
    saved["use_rslora"] = False
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _skeleton(config_dir: Path, base: dict):
    """The base model's modules with no weights: each parameter a view of one zero, in its real shape.

    peft needs the layers' shapes, dtypes and a real device to put adapters beside them; the
    combining reads only the adapters. (Meta tensors do not do: peft assigns the merged
    matrices through ``.data``, which refuses to move a parameter off the meta device.)
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = bool(base.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            zero = torch.zeros((), dtype=param.dtype).expand(param.shape)
            setattr(module, name, torch.nn.Parameter(zero, requires_grad=False))
    return model


def record_of(folder: Path) -> dict:
    """The ``swarm-merge.json`` of a merge folder."""
    return json.loads((Path(folder) / RECORD).read_text())


__all__ = ["DEFAULT_METHOD", "METHODS", "MergeSource", "check_sources", "merge_adapters", "read_source", "record_of"]
