"""The trainable state of a run, gathered from and restored to ZeRO shards.

Only what training changes is gathered: the LoRA weights in fp32, Adam's moments and step,
the LR schedule, the samples seen and the RNG states, never the frozen base. Tensors are
whole (DeepSpeed's ``safe_get_full_*``), so a checkpoint written by two workers resumes on
one, and the other way round.
"""

from __future__ import annotations


def gather_adapter(engine, named) -> dict:
    """The full fp32 LoRA weights under peft's names, gathered from every ZeRO-3 shard.

    Collective: every rank must call it. Only rank 0 needs the result.
    """
    from deepspeed.utils import safe_get_full_fp32_param
    from peft import get_peft_model_state_dict

    full = {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in named}
    return get_peft_model_state_dict(engine.module, state_dict=full)


# Adam's moments, the only optimizer state swarm can gather whole from ZeRO-3 shards.
# 8-bit AdamW and Adafactor keep quantized or factored state that does not map onto
# parameters one to one; their moments restart after a resume (said in the log).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def gather_trainable_state(engine, scheduler, named, step: int, samples_seen: int) -> dict:
    """Everything a resume needs, whole and independent of the number of workers.

    Collective: every rank must call it (gathering a ZeRO-3 tensor is an all-gather).
    """
    import random

    import numpy as np
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    moments = {}
    if isinstance(engine.optimizer.optimizer, torch.optim.Adam | torch.optim.AdamW) or _is_ds_adam(engine):
        for key in MOMENT_KEYS:
            moments[key] = {
                name: safe_get_full_optimizer_state(p, key).detach().cpu().clone() for name, p in named
            }
    inner_state = engine.optimizer.optimizer.state
    adam_steps = [s["step"] for s in inner_state.values() if "step" in s]
    trainer = {
        "step": step,
        "samples_seen": samples_seen,
        "moments": moments,
        "optimizer_step": int(adam_steps[0]) if adam_steps else 0,
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    return {
        "step": step, "samples_seen": samples_seen,
        "adapter": gather_adapter(engine, named), "trainer": trainer,
    }


def _is_ds_adam(engine) -> bool:
    return type(engine.optimizer.optimizer).__name__ in {"DeepSpeedCPUAdam", "FusedAdam"}


def _create_optimizer_state(engine, step: int) -> None:
    """Create Adam's state before its first step, so that moments can be written into it.

    Adam creates its state lazily, on the first step; DeepSpeed's setters expect it to
    exist. Zeros of the flat fp32 partition's shape are what Adam itself would create.
    """
    import torch

    zero = engine.optimizer
    inner = zero.optimizer
    tensor_step = isinstance(inner, torch.optim.Optimizer) and type(inner).__module__.startswith("torch.optim")
    # ZeRO-3 and ZeRO-2 name their flat fp32 partitions differently.
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    for flat in flats:
        state = inner.state[flat]
        for key in MOMENT_KEYS:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        state["step"] = torch.tensor(float(step)) if tensor_step else step
    # ZeRO-2 maps each parameter onto its slice of the state when the state first
    # exists (normally after the first step); map it now, so the setters can write.
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._lazy_init_hp_params_optimizer_state()
    if type(inner).__name__ == "DeepSpeedCPUAdam":
        _replay_bias_correction(inner, step)


def _replay_bias_correction(cpu_adam, step: int) -> None:
    """Bring DeepSpeed's CPU Adam to ``step`` the way an uninterrupted run reaches it.

    Its C++ side keeps beta**t as a float product, one factor a step; a run that resumes at
    step t jumps there and gets pow(beta, t) instead, which rounds otherwise in the last bit.
    That bit made a resumed run drift from the uninterrupted one (2e-7 after 25 steps of one
    tensor; a few percent by the end of a diloco run, whose bf16 exchanges round it up). Empty
    updates of a one-element tensor at steps 1..t (learning rate 0) multiply the factors in.
    """
    import torch

    group = cpu_adam.param_groups[0]
    beta1, beta2 = group["betas"]
    scratch = [torch.zeros(1) for _ in range(4)]  # parameter, gradient, and both moments
    for t in range(1, step + 1):
        cpu_adam.ds_opt_adam.adam_update(cpu_adam.opt_id, t, 0.0, beta1, beta2, group["eps"], 0.0,
                                         group["bias_correction"], *scratch)


def restore_trainer_state(engine, scheduler, named, resume: dict) -> tuple[int, int]:
    """Put the fp32 master weights, moments, schedule and RNG back; return the position.

    Collective under ZeRO-3: every rank writes its own partition of each tensor.
    """
    import random

    import numpy as np
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from peft import get_peft_model_state_dict

    trainer = resume["trainer"]
    # Master weights: the peft-named checkpoint tensors, mapped back to parameter names.
    by_peft_name = get_peft_model_state_dict(engine.module, state_dict={n: p for n, p in named})
    peft_name_of = {id(p): k for k, p in by_peft_name.items()}
    for name, p in named:
        safe_set_full_fp32_param(p, resume["adapter"][peft_name_of[id(p)]].to(torch.float32))
    if trainer["moments"]:
        _create_optimizer_state(engine, trainer["optimizer_step"])
    for key, tensors in trainer["moments"].items():
        for name, p in named:
            if name in tensors:
                safe_set_full_optimizer_state(p, tensors[name].to(torch.float32), key)
    scheduler.load_state_dict(trainer["scheduler"])
    for group, lr in zip(engine.optimizer.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    rng = trainer["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return trainer["step"], trainer["samples_seen"]
