"""bitsandbytes' CPU repacking of 4-bit weights, forced on every CPU, and swarm's guard.

On a CPU with AVX512-BF16 ``Linear4bit.forward`` in eval mode without gradients converts
its weight in place to a packed layout and marks the quant state. Under ZeRO-3 the next
gather brings back the unpacked data while the mark stays: training computes with garbage
after the first eval. These tests switch bitsandbytes' per-module CPU flag on by hand, so
the hazard is shown on every machine; on a CPU that has the instruction the packed kernel
runs for real, elsewhere the matmul after the repack is replaced (its kernel would need the
instruction), since only the repack itself matters here.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import has_avx512bf16  # noqa: E402

from swarm.train.worker.model import keep_4bit_layout  # noqa: E402

CPU_HAS_PACKED_KERNEL = has_avx512bf16()


def quantized_layer(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              quant_storage=torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    return layer.to("cpu")  # Params4bit quantizes when it is moved to a device


@pytest.fixture
def packed_matmul_where_needed(monkeypatch):
    """Without AVX512-BF16, stand in for the packed matmul (the repack is what is tested)."""
    if not CPU_HAS_PACKED_KERNEL:
        monkeypatch.setattr(bnb, "matmul_4bit", lambda x, w, bias=None, quant_state=None: x @ torch.zeros(64, 64, dtype=x.dtype))


def eval_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.eval()
    with torch.no_grad():
        return layer(x)


def test_bitsandbytes_repacks_the_weight_in_place_when_its_cpu_flag_is_on(packed_matmul_where_needed):
    """The hazard itself: the stored weight and its quant state change under an eval forward."""
    layer = quantized_layer()
    layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on a CPU with AVX512-BF16
    before = layer.weight.data.clone()
    eval_forward(layer, torch.randn(3, 64, dtype=torch.bfloat16))
    assert layer.weight.quant_state.packing_format_for_cpu is True
    assert layer.weight.data.shape != before.shape or not torch.equal(layer.weight.data.view(torch.uint8),
                                                                      before.view(torch.uint8))


def test_keep_4bit_layout_leaves_the_weight_as_quantized_through_eval(packed_matmul_where_needed):
    model = torch.nn.Sequential(quantized_layer(1), torch.nn.ReLU(), quantized_layer(2))
    for layer in (model[0], model[2]):
        layer.support_avx512bf16_for_cpu = True
    stored = [m.weight.data.clone() for m in (model[0], model[2])]
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    model.train()
    trained_view = model(x).detach()

    assert keep_4bit_layout(model) == 2
    evaluated = eval_forward(model, x)

    for layer, data in zip((model[0], model[2]), stored):
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(layer.weight.data.view(torch.uint8), data.view(torch.uint8))  # bytes: packed codes
    # Eval computes exactly what training computes: one code path, whatever the CPU.
    assert torch.equal(evaluated, trained_view)


def test_keep_4bit_layout_refuses_a_bitsandbytes_without_the_flag():
    model = torch.nn.Sequential(quantized_layer())
    del model[0].support_avx512bf16_for_cpu
    with pytest.raises(RuntimeError, match="support_avx512bf16_for_cpu"):
        keep_4bit_layout(model)


def test_a_16bit_model_has_nothing_to_keep():
    assert keep_4bit_layout(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


@pytest.mark.skipif(not CPU_HAS_PACKED_KERNEL, reason="the packed kernel needs a CPU with AVX512-BF16")
def test_on_this_cpu_bitsandbytes_would_repack_by_itself():
    """Where the instruction exists, bitsandbytes turns the flag on by itself: the guard is needed here."""
    layer = quantized_layer()
    assert layer.support_avx512bf16_for_cpu
    eval_forward(layer, torch.randn(3, 64, dtype=torch.bfloat16))
    assert layer.weight.quant_state.packing_format_for_cpu is True
