"""Pydantic models of a job file, one per section.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored
setting. Cross-section rules (NVMe offload needs a folder, an offloaded optimizer must be
DeepSpeed's CPU Adam) live on ``JobConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OffloadTarget = Literal["auto", "none", "cpu", "nvme"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str = Field(description="Local model folder or Hugging Face hub id.")
    revision: str | None = None
    attention: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    trust_remote_code: bool = False


class QuantizationSection(Section):
    bits: Literal[4] | None = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    @field_validator("bits", mode="before")
    @classmethod
    def _none_word(cls, value):
        # YAML users write `bits: none`; treat it like null.
        return None if isinstance(value, str) and value.lower() == "none" else value


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" is peft's shorthand for every linear layer except the output head.
    targets: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = Field(False, description="DoRA (peft): a learned magnitude per output row beside LoRA.")
    use_rslora: bool = Field(False, description="rsLoRA (peft): scale alpha / sqrt(r) instead of alpha / r.")


# The fields each data format reads from a record; data.columns may rename any of them.
FORMAT_FIELDS = {
    "text": ("text",),
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "preference": ("prompt", "chosen", "rejected"),
}
HUB_PREFIX = "hf:"


class DataSource(Section):
    """One data set: a local path or a Hugging Face Hub id, with the part of it to read.

    A plain string in ``data.files`` is the short form: a local path, or ``hf:ORG/NAME``.
    """

    path: str | None = Field(None, description="Local file, save_to_disk folder or .arrow file.")
    hub: str | None = Field(None, description="Hugging Face data set ORG/NAME (offline: from the local cache).")
    config: str | None = Field(None, description="Configuration (subset) of a Hub data set.")
    split: str | None = Field(None, description="Split to read; default train (or the only one).")
    revision: str | None = Field(None, description="Commit of a Hub data set.")

    @model_validator(mode="after")
    def _one_place(self) -> "DataSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("a data source has either path (a local file or folder) or hub (ORG/NAME), not both")
        if self.path is not None and (self.config or self.revision):
            raise ValueError(f"config and revision belong to Hub data sets (hub: ORG/NAME), not to path {self.path}")
        if self.hub is not None and self.hub.count("/") != 1:
            raise ValueError(f"hub {self.hub!r} is not a Hugging Face data set id of the form ORG/NAME")
        return self

    @property
    def label(self) -> str:
        """How messages and the model card name this source."""
        if self.path is not None:
            return self.path
        extras = [f"{k}={v}" for k, v in (("config", self.config), ("split", self.split),
                                          ("revision", self.revision)) if v]
        return HUB_PREFIX + self.hub + (f" ({', '.join(extras)})" if extras else "")


def data_source(entry: "str | DataSource") -> DataSource:
    """The ``DataSource`` an entry of ``data.files`` stands for."""
    if isinstance(entry, DataSource):
        return entry
    if entry.startswith(HUB_PREFIX):
        return DataSource(hub=entry.removeprefix(HUB_PREFIX))
    return DataSource(path=entry)


class DataSection(Section):
    files: list[str | DataSource] = Field(min_length=1)
    format: Literal["text", "instruction", "chat", "sharegpt", "preference"] = "text"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="The format's field -> the column that holds it, e.g. {instruction: prompt, output: response}.",
    )
    seq_len: int = Field(512, ge=1)
    isolate_examples: bool | Literal["auto"] = Field(
        "auto",
        description="Examples packed into one block attend only to themselves (positions restart per example); "
        "auto: on for instruction, chat and sharegpt, off for text.",
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    skip_bad_records: bool = False
    seed: int = 0

    @field_validator("files", mode="before")
    @classmethod
    def _single_file(cls, value):
        return [value] if isinstance(value, str | dict) else value

    @field_validator("files")
    @classmethod
    def _hub_ids(cls, value):
        for entry in value:
            if isinstance(entry, str) and entry.startswith(HUB_PREFIX) and entry.count("/") != 1:
                raise ValueError(f"{entry!r} is not a Hugging Face data set of the form hf:ORG/NAME")
        return value

    @model_validator(mode="after")
    def _known_columns(self) -> "DataSection":
        unknown = sorted(set(self.columns) - set(FORMAT_FIELDS[self.format]))
        if unknown:
            raise ValueError(
                f"data.columns names {', '.join(unknown)}, which format '{self.format}' does not read; "
                f"it reads {', '.join(FORMAT_FIELDS[self.format])}"
            )
        return self

    @property
    def sources(self) -> list[DataSource]:
        """Every entry of ``files`` in its long form."""
        return [data_source(entry) for entry in self.files]

    @property
    def labels(self) -> list[str]:
        """How messages, run names and the model card name each entry of ``files``."""
        return [entry if isinstance(entry, str) else entry.label for entry in self.files]

    @property
    def isolates(self) -> bool:
        """Whether packed examples are kept apart (``isolate_examples`` resolved)."""
        if self.isolate_examples == "auto":
            return self.format != "text"
        return self.isolate_examples


class TrainSection(Section):
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="sft: next-token loss on the labelled tokens; dpo: direct preference optimisation against "
        "the base with the adapter off; orpo: odds-ratio preference optimisation (no reference). dpo and orpo "
        "need data.format preference.",
    )
    beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference; orpo: weight of "
                        "the odds-ratio term (lambda).")
    max_steps: int = Field(100, ge=1, le=100_000_000)
    # Upper bounds far beyond any card, so that a typo fails at once instead of planning a
    # step of a billion blocks.
    micro_batch: int = Field(1, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=65_536)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = "adamw"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    seed: int = 42
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (also saved on Ctrl-C/SIGTERM).")
    keep_checkpoints: int = Field(3, ge=1)
    workers: int | Literal["auto"] = Field(
        "auto",
        description="Training workers. auto: every slot the swarm offers (one per GPU, or one per node on "
        "CPU-only swarms); on a local Ray one worker (one per GPU).",
    )
    min_workers: int | None = Field(
        None, ge=1,
        description="Keep training with at least this many workers when a PC drops out (elastic); "
        "default: as many as train.workers (a lost PC is waited for).",
    )
    placement: Literal["auto", "per_gpu", "per_node"] = Field(
        "auto",
        description="per_gpu: one worker per GPU; per_node: one worker per swarm node (CPU-only PCs); "
        "auto: per_gpu when the swarm has GPUs. A local Ray packs its workers on this machine.",
    )
    strategy: Literal["auto", "replicate", "shard", "diloco"] = Field(
        "auto",
        description="replicate: the 4-bit base on every worker, only LoRA gradients cross the network; "
        "shard: ZeRO-3 across workers; diloco: each PC trains on its own (with its own offload) and the PCs "
        "average their adapters every sync_every steps; auto: the fastest that fits.",
    )
    sync_every: int | Literal["auto"] = Field(
        "auto", description="diloco: steps between adapter exchanges; auto: proposed from the link and step time.",
    )
    outer_optimizer: Literal["average", "nesterov", "nesterov-b"] = Field(
        "average", description="diloco: how the PCs' adapters make the global one: average (their token-weighted "
        "mean; the best in a 3-seed study on SmolLM2-135M, docs/benchmarks.md), nesterov (DiLoCo's Nesterov SGD on "
        "the whole adapter), nesterov-b (Nesterov on LoRA's B factors, the mean on A).")
    outer_lr: float = Field(0.7, gt=0, le=2, description="diloco, nesterov and nesterov-b: the outer optimizer's "
                            "learning rate.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco, nesterov and nesterov-b: the outer "
                                  "optimizer's Nesterov momentum.")
    max_restarts: int = Field(3, ge=0, description="Times a failed worker group restarts from the newest checkpoint.")
    regrow_check_s: float = Field(
        60.0, gt=0, description="Seconds between checks for a returned PC while training with fewer workers."
    )

    @field_validator("workers", "sync_every")
    @classmethod
    def _positive_or_auto(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 or auto")
        return value


class OffloadSection(Section):
    """Where ZeRO keeps the base's partitions and the optimizer state.

    ``auto`` lets the planner choose the fastest placement that fits (NVMe only when
    ``nvme_path`` is set); ``none``, ``cpu`` and ``nvme`` fix it.
    """

    params: OffloadTarget = "auto"
    optimizer: OffloadTarget = "auto"
    nvme_path: str | None = None


class LogSection(Section):
    """Where metrics go besides RUN/metrics.jsonl (each an optional extra: swarm-train[trackers])."""

    to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="tensorboard: event files in RUN/tensorboard; wandb: Weights & Biases (WANDB_MODE=offline "
        "writes RUN/wandb only); mlflow: MLflow, by default a local store in RUN/mlruns.",
    )
    project: str = Field("swarm", min_length=1, description="W&B project and MLflow experiment.")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else RUN/mlruns.")

    @field_validator("to", mode="before")
    @classmethod
    def _single_tracker(cls, value):
        return [value] if isinstance(value, str) else value


class OutputSection(Section):
    dir: str = "runs"
    name: str | None = None


class RaySection(Section):
    address: str | None = Field(None, description="Existing cluster to join; none starts a local Ray.")
    object_store_mb: int = Field(512, ge=75)
    dashboard: bool = True
    dashboard_port: int = Field(8265, ge=1, le=65535)


class JobConfig(Section):
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    offload: OffloadSection = OffloadSection()
    output: OutputSection = OutputSection()
    log: LogSection = LogSection()
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "JobConfig":
        uses_nvme = "nvme" in (self.offload.params, self.offload.optimizer)
        if uses_nvme and not self.offload.nvme_path:
            raise ValueError(
                "offload.nvme_path is required when offload.params or offload.optimizer is nvme; "
                "set it to a folder on a fast drive"
            )
        if (self.train.min_workers is not None and isinstance(self.train.workers, int)
                and self.train.min_workers > self.train.workers):
            raise ValueError(
                f"train.min_workers={self.train.min_workers} is above train.workers={self.train.workers}; "
                "lower min_workers or raise workers"
            )
        preference_method = self.train.method in ("dpo", "orpo")
        if preference_method != (self.data.format == "preference"):
            raise ValueError(
                f"train.method={self.train.method} with data.format={self.data.format}: preference data trains "
                "with train.method dpo or orpo, and dpo and orpo need data.format preference; change one of them"
            )
        if self.offload.optimizer in ("cpu", "nvme") and self.train.optimizer != "adamw":
            raise ValueError(
                f"train.optimizer={self.train.optimizer} runs on the device and cannot be offloaded; "
                "use train.optimizer=adamw (DeepSpeed CPU Adam) or offload.optimizer=none"
            )
        return self
