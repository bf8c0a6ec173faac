"""A worker's device decisions, as pure functions of the facts they depend on.

Every branch that only a GPU takes is decided here, from its inputs (the plan's strategy,
the worker's local rank, the GPU's name, capability and memory), so the suite tests it on a
machine without one. ``swarm.train.worker.model`` and ``swarm.train.worker.loop`` carry the decisions out.

Loading a 4-bit base (``loading_arguments``), from reading transformers 5 and DeepSpeed 0.19:

- transformers refuses a ``device_map`` while a ZeRO-3 ``HfDeepSpeedConfig`` is alive
  (``integrations/accelerate.py``: "DeepSpeed Zero-3 is not compatible with passing a
  `device_map`"), and it never uses ``zero.Init`` for a quantized model
  (``modeling_utils``: ``is_deepspeed_zero3_enabled() and not _is_quantized``). Without a
  ``device_map`` its bitsandbytes quantizer loads onto the current CUDA device
  (``quantizer_bnb_4bit.update_device_map``): the whole 4-bit base on one card, which a
  70B base on a 16 GB card is not.
- So a 4-bit base that ZeRO-3 will shard is loaded into host RAM (``device_map`` cpu, no
  ``HfDeepSpeedConfig``), and the worker partitions it itself with ``zero.Init(module=...)``
  before ``deepspeed.initialize``: DeepSpeed's engine otherwise moves the whole module to
  the GPU first (``engine._configure_distributed_model``), and only then partitions it.
  ``zero.Init`` moves one parameter at a time to the device and keeps only its partition
  there (or in the offload target).
- A replicated 4-bit base (ZeRO-2) is loaded straight onto the worker's card: bitsandbytes
  quantizes each weight as it arrives there.
- A 16-bit base under ZeRO-3 is loaded inside ``zero.Init`` (an ``HfDeepSpeedConfig`` alive,
  no ``device_map``), so no worker ever holds it whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm.config.models import QuantizationSection
from swarm.errors import UserError

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class LoadingArguments:
    """How ``from_pretrained`` loads the base for one worker.

    Attributes:
        device_map: transformers' ``device_map``, or None (never together with zero3_init).
        zero3_init: keep an ``HfDeepSpeedConfig`` alive while loading, so transformers
            builds the model inside ``zero.Init`` (partitioned as it loads).
        partition_after_load: the worker partitions the loaded model with
            ``zero.Init(module=...)`` before ``deepspeed.initialize``.
    """

    device_map: dict[str, str] | None
    zero3_init: bool
    partition_after_load: bool


def loading_arguments(quantized: bool, zero_stage: int, device: str, per_pc: bool = False) -> LoadingArguments:
    """Where the base is loaded, given the plan's strategy and the worker's device.

    Args:
        quantized: the base is loaded in 4 bits by bitsandbytes.
        zero_stage: 2 (replicate) or 3 (shard), from the plan.
        device: the worker's device, ``cpu`` or ``cuda:N``.
        per_pc: ZeRO-3 partitions over this worker's PC only (``diloco``), not every worker.
    """
    if zero_stage == 3 and (quantized or per_pc):
        # A 16-bit base under diloco too: transformers' zero.Init would partition it over the
        # world group (it takes no data-parallel group) and read the weights on global rank 0
        # only; every forward would then gather the base over the home link. Each worker
        # loads it into host RAM instead and partitions it over its PC's group.
        return LoadingArguments({"": "cpu"}, zero3_init=False, partition_after_load=True)
    if zero_stage == 3:
        # The LoRA weights peft adds afterwards are not partitioned yet: zero.Init takes them.
        return LoadingArguments(None, zero3_init=True, partition_after_load=True)
    return LoadingArguments({"": device}, zero3_init=False, partition_after_load=False)


def quantization_kwargs(quantization: QuantizationSection, precision: str) -> dict[str, Any] | None:
    """``BitsAndBytesConfig`` arguments (dtype names as strings), or None for a 16-bit base.

    The 4-bit codes are stored in the training dtype (``bnb_4bit_quant_storage``), so that
    ZeRO partitions them like every other parameter of that dtype, and computed in it.
    """
    if quantization.bits != 4:
        return None
    dtype = DTYPE_NAMES[precision]
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quantization.quant_type,
        "bnb_4bit_use_double_quant": quantization.double_quant,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": dtype,
    }


def worker_device(use_gpu: bool, local_rank: int, visible_gpus: int) -> str:
    """The device of the worker at ``local_rank`` on its PC.

    Ray Train's backend lets every worker of a PC see all the PC's GPUs
    (``share_cuda_visible_devices``), and each takes the one at its local rank.

    Raises:
        UserError: the plan puts workers on GPUs this process cannot see.
    """
    if not use_gpu:
        return "cpu"
    if local_rank >= visible_gpus:
        raise UserError(
            f"the plan puts a worker on GPU {local_rank} of its PC, but CUDA sees {visible_gpus} GPU(s) there; "
            "check the NVIDIA driver and CUDA_VISIBLE_DEVICES on that PC (`swarm status` lists its GPUs)"
        )
    return f"cuda:{local_rank}"


def memory_fraction(cap_bytes: int | None, total_bytes: int) -> float | None:
    """The share of a card torch may allocate, so that it behaves like a card of ``cap_bytes``.

    None when there is no cap or the card is no larger than the cap.
    """
    if not cap_bytes or cap_bytes >= total_bytes:
        return None
    return cap_bytes / total_bytes


def collective_env(backend: str, gpus: list[tuple[str, tuple[int, int] | None]]) -> dict[str, str]:
    """Environment for torch's process group on one PC, before it is created.

    Args:
        backend: ``nccl`` or ``gloo``.
        gpus: (name, compute capability) of the PC's GPUs that host workers.

    The socket interface (``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME``) is set on each Ray
    node by ``swarm up`` and inherited; this adds what a home PC needs on top:

    - a collective that fails raises instead of hanging the worker;
    - no InfiniBand probing: home PCs talk over Ethernet or Wi-Fi;
    - GeForce cards from Ada on (compute capability 8.9+) have no peer-to-peer access, yet
      several of them in one PC have hung NCCL's P2P transport (nccl-tests issue 117,
      tinygrad open-gpu-kernel-modules issue 45: all-reduce hangs on two RTX 4090s, runs
      with ``NCCL_P2P_DISABLE=1``); their traffic goes through host memory instead.
    """
    if backend != "nccl":
        return {}
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_IB_DISABLE": "1"}
    geforce_ada = [name for name, cc in gpus if "GeForce" in name and cc is not None and tuple(cc) >= (8, 9)]
    if len(gpus) > 1 and geforce_ada:
        env["NCCL_P2P_DISABLE"] = "1"
    return env
