"""Worker side: the frozen 4-bit base with LoRA adapters, placed as the plan says.

Where the base is loaded and how ZeRO-3 takes it is decided in ``swarm.train.worker.device``
(pure, tested on CPU); this module carries it out. The quantized weights are stored in the
training dtype (``bnb_4bit_quant_storage``) so that DeepSpeed can partition them like any
other parameter of that dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.train.worker.device import loading_arguments, quantization_kwargs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_implementation(requested: str) -> str:
    """The attention kernel to ask transformers for; FlashAttention-2 only when installed."""
    if requested == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise UserError(
                "model.attention=flash_attention_2 needs the flash-attn package and a CUDA GPU on every "
                "worker; install it (pip install 'swarm-train[flash]') or use model.attention=sdpa"
            )
    return requested


def load_model(job: JobConfig, plan: dict[str, Any], device: str, adapter: dict | None = None, group=None):
    """Load the base (4-bit when asked), enable checkpointing, add LoRA, place it for ZeRO.

    Args:
        job: The validated job.
        plan: The run's plan (``Plan.to_dict()``): precision, strategy, DeepSpeed config.
        device: This worker's device, ``cpu`` or ``cuda:N``.
        adapter: LoRA weights to start from (a checkpoint's, under peft's names); they are
            written while the weights are still whole on every worker.
        group: the process group ZeRO partitions over (a PC's workers under ``diloco``);
            None for all workers.

    Returns:
        The peft model, ready for ``deepspeed.initialize`` with ``plan["deepspeed"]``.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import HfDeepSpeedConfig

    precision, ds_config = plan["precision"], plan["deepspeed"]
    dtype = DTYPES[precision]
    loading = loading_arguments(job.quantization.bits == 4, plan["strategy"]["zero_stage"], device, group is not None)
    bnb = quantization_kwargs(job.quantization, precision)
    # transformers sees ZeRO-3 only through a live HfDeepSpeedConfig; keep it while loading.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if loading.zero3_init else None
    model = AutoModelForCausalLM.from_pretrained(
        job.model.path,
        revision=job.model.revision,
        quantization_config=BitsAndBytesConfig(**bnb) if bnb else None,
        dtype=dtype,
        attn_implementation=attention_implementation(job.model.attention),
        trust_remote_code=job.model.trust_remote_code,
        device_map=loading.device_map,
    )
    model = prepare_model(model, job, plan, device, adapter, group)
    del hf_ds_config
    return model


def prepare_model(model, job: JobConfig, plan: dict[str, Any], device: str, adapter: dict | None = None, group=None):
    """Freeze a loaded base, turn checkpointing on, add LoRA and partition it as the plan says.

    Everything ``load_model`` does after reading the weights; the GPU check also calls it on
    a base it builds on the card (random 4-bit weights, nothing read from disk).

    Args:
        model: The base as ``from_pretrained`` returns it (4-bit layers already quantized).
        job, plan, device, adapter, group: as for ``load_model``.

    Returns:
        The peft model, ready for ``deepspeed.initialize`` with ``plan["deepspeed"]``.
    """
    from peft import LoraConfig, get_peft_model

    dtype = DTYPES[plan["precision"]]
    loading = loading_arguments(job.quantization.bits == 4, plan["strategy"]["zero_stage"], device, group is not None)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    keep_4bit_layout(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if job.train.gradient_checkpointing:
        # Reentrant: the forward runs without autograd and backward recomputes one layer at a
        # time. Non-reentrant checkpointing builds every layer's autograd nodes in the forward,
        # and bitsandbytes' MatMul4Bit keeps in its node a view of the weight it multiplied by
        # (ctx.tensors, which checkpointing cannot drop): under ZeRO-3 that kept every layer's
        # gathered 4-bit weight alive until backward, the whole base on the card (issue 29,
        # docs/plan.md "What is counted"). Reentrant checkpointing passes a gradient only to
        # inputs that ask for one: the embedding output must, or no gradient reaches the adapters.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=job.lora.r,
        lora_alpha=job.lora.alpha,
        lora_dropout=job.lora.dropout,
        target_modules=job.lora.targets,
        use_dora=job.lora.use_dora,
        use_rslora=job.lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # peft names the target modules it could not find
        raise UserError(f"lora.targets: {' '.join(str(exc).split())}") from None
    if adapter is not None:
        load_adapter_weights(model, adapter)
    if loading.partition_after_load:
        partition_for_zero3(model, plan["deepspeed"], dtype, device, group)
    return model


def partition_for_zero3(model, ds_config: dict[str, Any], dtype: torch.dtype, device: str, group=None) -> None:
    """Partition a loaded model with ZeRO-3 before ``deepspeed.initialize`` sees it.

    The engine moves a model it finds unpartitioned to the device as a whole; partitioned,
    it leaves placement to ``zero.Init``, which moves one parameter at a time and keeps only
    its partition on the device or in the offload target. What ``zero.Init`` does not
    place is done here: floating parameters take the training dtype first (as the engine
    would cast them; peft makes LoRA weights in fp32), and buffers and the 4-bit weights'
    quantization constants (attributes, not parameters) go to the worker's device.
    """
    import deepspeed

    if dtype != torch.float32:
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype and not hasattr(param, "ds_id"):
                param.data = param.data.to(dtype)
    offload = ds_config["zero_optimization"].get("offload_param", {})
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, remote_device=offload.get("device"),
                        pin_memory=bool(offload.get("pin_memory")), dtype=dtype, data_parallel_group=group)
    move_state_to(model, torch.device(device))


def move_state_to(model, device: torch.device) -> None:
    """Move buffers and 4-bit quantization constants to ``device``; parameters stay put."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and state.absmax.device != device:
            state.to(device)  # QuantState.to moves its tensors in place


def keep_4bit_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with AVX512-BF16.

    ``Linear4bit.forward`` in eval mode without gradients (swarm's eval loss) converts its
    weight, in place, to a packed CPU layout and marks the weight's quant state. Under
    ZeRO-3 the weight is a partitioned parameter: its next gather brings back the unpacked
    data while the mark stays, and every later step computes with garbage. The switch is
    bitsandbytes' own per-module flag, read from the CPU once at construction; turning it
    off on every machine keeps one code path whatever the CPU.

    Returns:
        How many 4-bit layers were found (0 for a 16-bit base).

    Raises:
        RuntimeError: a 4-bit layer lacks the flag (a bitsandbytes release that changed
            it); training on would risk the silent corruption described above.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
            continue
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            raise RuntimeError(
                "this bitsandbytes release has no Linear4bit.support_avx512bf16_for_cpu; swarm cannot stop its "
                "in-place CPU repacking of 4-bit weights (see swarm/train/worker/model.py keep_4bit_layout)"
            )
        module.support_avx512bf16_for_cpu = False
        count += 1
    return count


def load_adapter_weights(model, adapter: dict) -> None:
    """Copy checkpointed LoRA weights into the model (before ZeRO partitions them)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, adapter)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"checkpoint lacks LoRA weights {missing[:3]}")


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs that train, in a stable order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
