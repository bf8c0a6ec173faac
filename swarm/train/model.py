"""Worker side: the frozen 4-bit base with LoRA adapters, ready for DeepSpeed.

Order matters under ZeRO-3: the DeepSpeed config must be registered with transformers
(``HfDeepSpeedConfig``) before ``from_pretrained`` so that loading knows about ZeRO-3.
The quantized weights are stored in the training dtype (``bnb_4bit_quant_storage``) so
that DeepSpeed can partition them like any other parameter of that dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from swarm.config.models import JobConfig
from swarm.errors import UserError

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


def load_model(job: JobConfig, precision: str, ds_config: dict[str, Any], device: torch.device):
    """Load the base model (4-bit when asked), enable checkpointing and add LoRA.

    Args:
        job: The validated job.
        precision: "bf16", "fp16" or "fp32".
        ds_config: The DeepSpeed config this worker will initialise with.
        device: Where the quantized weights live before DeepSpeed takes over.

    Returns:
        ``(model, hf_ds_config)``. Keep ``hf_ds_config`` alive until
        ``deepspeed.initialize`` returns: transformers only sees ZeRO-3 through it.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import HfDeepSpeedConfig

    dtype = DTYPES[precision]
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    quantization = None
    if job.quantization.bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=job.quantization.quant_type,
            bnb_4bit_use_double_quant=job.quantization.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        job.model.path,
        revision=job.model.revision,
        quantization_config=quantization,
        dtype=dtype,
        attn_implementation=attention_implementation(job.model.attention),
        trust_remote_code=job.model.trust_remote_code,
        # bitsandbytes quantizes while moving weights to the device; on CPU they stay put.
        device_map={"": device} if device.type == "cuda" else None,
    )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    keep_4bit_layout(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if job.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and with ZeRO-3's hooks;
        # input gradients must be on, or no gradient reaches the adapters through it.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=job.lora.r,
        lora_alpha=job.lora.alpha,
        lora_dropout=job.lora.dropout,
        target_modules=job.lora.targets,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # peft names the target modules it could not find
        raise UserError(f"lora.targets: {' '.join(str(exc).split())}") from None
    return model, hf_ds_config


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
                "in-place CPU repacking of 4-bit weights (see swarm/train/model.py keep_4bit_layout)"
            )
        module.support_avx512bf16_for_cpu = False
        count += 1
    return count


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs that train, in a stable order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
