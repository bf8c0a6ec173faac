"""What a ``diloco`` checkpoint keeps of each PC, and how a resume gives it back.

A checkpoint may fall between exchanges (``train.checkpoint_every`` need not be a multiple of
``H``, and a stop comes at any step). An exact resume then needs, beside the global adapter
and the outer momentum, each PC's own adapter, its inner optimizer's moments and the tokens
it trained since the last exchange (its weight in the next mean). Each PC's leader sends its
state to global rank 0 (a gather over the PCs' group on host memory); rank 0 puts it in the
checkpoint it delivers to the driver, as named tensors (``extra/pc<k>/...``) beside a JSON
note of the PCs and the last exchange (``trainer["diloco"]``).

On resume, every PC restores its own state when the run has the same PCs (by address). On
other PCs, or from a checkpoint written before swarm kept each PC's state, every PC starts
from the checkpoint's (global) adapter with the moments of the PC that wrote it, and the run
says so: an approximation.
"""

from __future__ import annotations


def _moment_keys(state: dict) -> list[str]:
    return sorted(state["trainer"]["moments"])


def add_pc_state(exchange, state: dict) -> None:
    """Put every PC's own state and the global adapter into ``state`` (a
    ``gather_trainable_state`` result) on global rank 0. Collective: every rank calls it."""
    import torch
    from peft import get_peft_model_state_dict

    from swarm.train.worker import collectives

    groups = exchange.groups
    keys = _moment_keys(state)
    tokens = exchange.pc_tokens()  # collective inside the PC
    own = exchange._local_flat()  # collective inside the PC
    trainer = state["trainer"]
    if groups.is_leader:
        moments = [torch.cat([trainer["moments"][key][name].float().flatten() for name, _ in exchange.named])
                   for key in keys]
        packed = torch.cat([own, *moments, torch.tensor([tokens])])
        every_pc = collectives.gather(packed, dst=0, group=groups.leaders)
    else:
        every_pc = None
    if every_pc is None:
        return
    size = own.numel()
    extra = {"outer_momentum": exchange.momentum_buf.clone()}
    # torch orders a group by global rank: the gathered states come in the order of the PCs'
    # first ranks, not in the PCs' (address) order.
    by_rank = sorted(range(groups.pcs), key=lambda k: groups.pc_ranks[k][0])
    for pc, packed in zip(by_rank, every_pc):
        extra[f"pc{pc}/adapter"] = packed[:size].clone()
        for i, key in enumerate(keys):
            extra[f"pc{pc}/{key}"] = packed[size * (i + 1):size * (i + 2)].clone()
        extra[f"pc{pc}/tokens"] = packed[-1:].clone()
    trainer["extra"] = extra
    trainer["diloco"] = {"pcs": list(groups.addresses), "pc_ranks": groups.pc_ranks,
                         "last_exchange": exchange.last_exchange, "moment_keys": keys}
    # The checkpoint's adapter is the global one: what an export of the checkpoint holds. Each
    # tensor its own copy: a view would carry the whole flat adapter into the pickle that takes
    # the checkpoint to the driver, once per tensor (8 GB for SmolLM2's 420 LoRA tensors).
    whole = {name: value.clone() for (name, _), value in zip(exchange.named, exchange.unflatten(exchange.global_flat))}
    state["adapter"] = get_peft_model_state_dict(exchange.engine.module, state_dict=whole)


def restore_pc_state(exchange, resume: dict) -> None:
    """Give this PC its own state from ``resume``, or note why every PC shares one. Collective."""
    from deepspeed.utils import safe_set_full_optimizer_state

    trainer = resume["trainer"]
    info = trainer.get("diloco")
    if info is None:
        exchange.notes.append(
            "this checkpoint was written before swarm kept each PC's state: every PC resumes with the inner "
            "optimizer moments of the PC that wrote it (an approximation)")
        return
    exchange.last_exchange = info["last_exchange"]
    groups = exchange.groups
    # A PC's state follows its workers' global ranks, which choose the data each trains on
    # (swarm.data.sampling): Ray may give the ranks to the PCs in another order on resume.
    saved = [list(r) for r in info.get("pc_ranks", [])]
    if list(info["pcs"]) != list(groups.addresses) or sorted(saved) != sorted(groups.pc_ranks):
        exchange.notes.append(
            f"the checkpoint's PCs ({', '.join(info['pcs'])}) are not this run's "
            f"({', '.join(groups.addresses)}): every PC resumes from the global adapter of step "
            f"{info['last_exchange']} with the first PC's inner moments, and the steps trained since that "
            "exchange are not in it (an approximation)")
        return
    extra, pc = trainer["extra"], saved.index(list(groups.pc_ranks[groups.pc]))
    exchange.set_adapter(extra[f"pc{pc}/adapter"])
    for key in info["moment_keys"]:
        for (_, p), value in zip(exchange.named, exchange.unflatten(extra[f"pc{pc}/{key}"])):
            safe_set_full_optimizer_state(p, value.to(p.device), key)
    # The PC's tokens since the last exchange count once: on its leader.
    exchange.tokens = float(extra[f"pc{pc}/tokens"][0]) if exchange.groups.is_leader else 0.0
