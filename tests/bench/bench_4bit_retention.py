"""Plain torch + bitsandbytes: what ``MatMul4Bit`` keeps of a weight that ZeRO-3 released.

Eight 1024 x 1024 ``Linear4bit`` layers (bf16 storage, as swarm stores them), each with its
packed weight "gathered" into a fresh buffer before its forward and "released" after it
(``param.data`` emptied), as ZeRO-3 does; and "gathered" again before its backward. After the
forward, the bytes the autograd graph still holds through the nodes' ``ctx`` are counted,
once per storage, for three ways of checkpointing and two autograd functions: bitsandbytes'
own, which keeps a view of the gathered buffer (``ctx.tensors = (None, B)``), and one that
keeps the parameter object instead, whose ``.data`` ZeRO-3 gathers again for backward.

    python tests/bench/bench_4bit_retention.py
"""

from __future__ import annotations

import time

import bitsandbytes as bnb
import torch
from torch.utils.checkpoint import checkpoint

EMPTY = torch.empty(0, dtype=torch.bfloat16)


class KeepParameter(torch.autograd.Function):
    """A 4-bit matmul whose node keeps the parameter, not a view of what it held in the forward."""

    @staticmethod
    def forward(ctx, x, weight, state):
        ctx.weight, ctx.state = weight, state
        return torch.nn.functional.linear(x, bnb.functional.dequantize_4bit(weight.data, state).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        assert ctx.weight.data.numel(), "the weight was not gathered again for backward"
        return grad @ bnb.functional.dequantize_4bit(ctx.weight.data, ctx.state).to(grad.dtype), None, None


class Layer(torch.nn.Module):
    """A residual 4-bit linear layer whose weight is gathered and released around each use."""

    def __init__(self, h: int, keep_parameter: bool):
        super().__init__()
        self.lin = bnb.nn.Linear4bit(h, h, bias=False, compute_dtype=torch.bfloat16,
                                     quant_storage=torch.bfloat16).to("cpu")
        self.lin.support_avx512bf16_for_cpu = False  # bitsandbytes' own CPU repacking off, as in swarm
        self.partition = self.lin.weight.data.clone()
        self.lin.weight.data = EMPTY
        self.keep_parameter = keep_parameter
        self.register_forward_pre_hook(lambda m, a: m.gather())
        self.register_forward_hook(lambda m, a, o: m.release())
        self.register_full_backward_pre_hook(lambda m, g: m.gather())

    def gather(self):
        self.lin.weight.data = self.partition.clone()  # a new buffer, as a gather to the device is

    def release(self):
        self.lin.weight.data = EMPTY

    def forward(self, x):
        if self.keep_parameter:
            return x + KeepParameter.apply(x, self.lin.weight, self.lin.weight.quant_state)
        return x + self.lin(x)


def held_by_graph(root) -> int:
    """Bytes that autograd nodes reachable from ``root`` keep in ``ctx`` attributes, once per storage."""
    seen, stack, held = set(), [root], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in [*(getattr(node, "tensors", None) or ()), getattr(node, "weight", None)]:
            if isinstance(t, torch.Tensor):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [n for n, _ in node.next_functions]
    return sum(held.values())


def run(mode: str, keep_parameter: bool, h: int = 1024, n: int = 8) -> None:
    torch.manual_seed(0)
    layers = [Layer(h, keep_parameter) for _ in range(n)]
    packed = sum(layer.partition.untyped_storage().nbytes() for layer in layers)
    x = torch.randn(4, 64, h, dtype=torch.bfloat16, requires_grad=True)
    started = time.perf_counter()
    y = x
    for layer in layers:
        y = layer(y) if mode == "none" else checkpoint(layer, y, use_reentrant=mode == "reentrant")
    loss = y.float().pow(2).mean()
    held = held_by_graph(loss.grad_fn)
    loss.backward()
    ms = (time.perf_counter() - started) * 1e3
    print(f"| {'parameter' if keep_parameter else 'bitsandbytes'} | {mode} | {packed / 2**20:.2f} | "
          f"{held / 2**20:.2f} ({100 * held / packed:.0f}%) | {x.grad.float().norm():.4f} | {ms:.0f} |")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    print("| node keeps | checkpointing | 4-bit base MiB | held after the forward MiB | input grad norm | ms |")
    print("|---|---|---|---|---|---|")
    for keep in (False, True):
        for mode in ("non-reentrant", "reentrant", "none"):
            run(mode, keep)
