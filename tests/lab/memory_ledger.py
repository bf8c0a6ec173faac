"""What a training step holds, measured on the CPU: the device-independent terms of the plan.

A :class:`StepLedger` watches one forward and backward of a model that ``swarm.train.worker.model``
loaded (and ``deepspeed.initialize`` wrapped). Every storage an operator creates while it
watches is remembered by a weak reference (a ``TorchDispatchMode``: it sees each aten and
bitsandbytes operator, DeepSpeed's gathers included), so the bytes still alive at any
moment are known, each storage counted once however many views share it. Parameters and
their partitions made before the step are never counted as created by it.

After the forward it splits what is alive into the plan's terms:

- **4-bit weights kept by autograd**: storages that bitsandbytes' ``MatMul4Bit`` nodes hold
  in ``ctx.tensors`` (a plain attribute, invisible to ``saved_tensors_hooks``: found by
  walking ``grad_fn``), other than the parameters' current data. Under ZeRO-3 these are
  gathered buffers that DeepSpeed already released;
- **gathered parameters alive**: ZeRO-3 parameters whose status is still available
  (persistent ones excepted, the plan counts them apart);
- **layer checkpoints**: the decoder layers' inputs still alive;
- **logits and loss**: the largest number of bytes alive, among those created after the
  last decoder layer, while backward passes from the loss to the final norm's output.

On a CPU with one worker, DeepSpeed "gathers" an offloaded parameter by pointing it at its
partition (``NoGatherHandle``: ``ds_tensor.data.to(device)`` copies nothing on a CPU), so a
kept view pins the partition and costs no more RAM here; on a GPU the same view pins a copy
on the card. The kept-weights term counts what the nodes pin beyond the parameters' current
data: the bytes a card would hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tree) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"]


class _Created(TorchDispatchMode):
    """Remembers every storage an operator creates (not views or in-place results of its inputs)."""

    def __init__(self, ledger: StepLedger):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {s.data_ptr() for s in _storages((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        for storage in _storages(out):
            ptr = storage.data_ptr()
            if ptr and ptr not in inputs:
                self.ledger._remember(ptr, storage)
        self.ledger._sample()
        return out


@dataclass
class StepLedger:
    """Live bytes of one step, by term (see the module docstring).

    Use ``with ledger.forward(): loss = ...``, then ``ledger.after_forward(model, loss)``,
    then ``with ledger.backward(): loss.backward()``.
    """

    phase: str = "idle"
    alive: dict[int, tuple[StorageWeakRef, int, str]] = field(default_factory=dict)
    layer_inputs: dict[int, tuple[StorageWeakRef, int]] = field(default_factory=dict)
    head_peak: int = 0
    watch_head: bool = False
    terms: dict[str, int] = field(default_factory=dict)

    def _remember(self, ptr: int, storage: torch.UntypedStorage) -> None:
        known = self.alive.get(ptr)
        if known is None or known[0].expired():
            self.alive[ptr] = (StorageWeakRef(storage), storage.nbytes(), self.phase)

    def live_bytes(self, phases: tuple[str, ...] | None = None, skip: set[int] = frozenset()) -> int:
        """Bytes of the remembered storages still alive (created in ``phases``, all when None)."""
        for ptr in [p for p, (ref, _, _) in self.alive.items() if ref.expired()]:
            del self.alive[ptr]
        return sum(n for p, (_, n, ph) in self.alive.items() if p not in skip and (phases is None or ph in phases))

    def _sample(self) -> None:
        if self.watch_head:
            self.head_peak = max(self.head_peak, self.live_bytes(("head", "head-backward")))

    def watch(self, decoder_layers, final_norm) -> None:
        """Hook the decoder layers (their inputs, and where the head starts) and the final norm."""
        def layer_input(module, args, kwargs):
            if self.phase != "forward":  # a recomputation in backward
                return
            storage = (args[0] if args else kwargs["hidden_states"]).untyped_storage()
            self.layer_inputs[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())

        def layer_done(module, args, output):
            if module is decoder_layers[-1] and self.phase == "forward":
                self.phase = "head"  # what the forward creates from here on: final norm, logits, loss

        def norm_input_grad(grad):
            self.watch_head = False  # backward has passed the logits and the loss
            self.phase = "backward"
            return grad

        def norm_output(module, args, output):
            if self.phase == "head" and output.requires_grad:
                output.register_hook(norm_input_grad)

        for layer in decoder_layers:
            layer.register_forward_pre_hook(layer_input, with_kwargs=True)
            layer.register_forward_hook(layer_done)
        final_norm.register_forward_hook(norm_output)

    def forward(self):
        """Context for the forward pass."""
        self.phase = "forward"
        self.layer_inputs.clear()
        return _Created(self)

    def backward(self):
        """Context for the backward pass; the logits' peak is sampled until the final norm's gradient."""
        self.phase, self.watch_head, self.head_peak = "head-backward", True, 0
        return _Created(self)

    def after_forward(self, model, loss: torch.Tensor) -> dict[str, int]:
        """Split what the forward left alive into terms (bytes); also kept in ``self.terms``."""
        params = list(model.parameters())
        current = {p.data.untyped_storage().data_ptr() for p in params if p.data.numel()}
        views = {}
        for node in graph_nodes(loss.grad_fn):
            for t in getattr(node, "tensors", None) or ():
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in current:
                    views[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        checkpoints = sum(n for ref, n in self.layer_inputs.values() if not ref.expired())
        self.terms = {
            "4-bit weights kept by autograd": sum(views.values()),
            "gathered parameters alive": gathered_bytes(params),
            "layer checkpoints": checkpoints,
            "logits and loss after the forward": self.live_bytes(("head",), skip=current),
            "all the forward left alive": self.live_bytes(skip=current),
        }
        return self.terms


def graph_nodes(root):
    """Every autograd node reachable from ``root``, each once."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
    return seen


def gathered_bytes(params) -> int:
    """Bytes of ZeRO-3 parameters gathered now, persistent ones excepted (0 without ZeRO-3)."""
    total = 0
    for p in params:
        status = getattr(p, "ds_status", None)
        if status is not None and status.name == "AVAILABLE" and not getattr(p, "ds_persist", False):
            total += p.ds_numel * p.element_size()
    return total
