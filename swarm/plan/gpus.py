"""Figures of common GPUs, for filling in hardware files and estimating step time.

``tflops`` is dense 16-bit tensor throughput with fp32 accumulation, which is what PyTorch
matmuls use. GeForce cards run that at half their fp16-accumulate rate, so the figures are
the vendor's "AI TOPS" (sparse FP8 on Ada, sparse FP4 on Blackwell) divided by 8 or 16, or
the fp32-accumulate column of the Ampere and Turing whitepapers; professional and data-centre
cards run it at full rate. ``pcie_gbs`` is what a pinned host-to-device copy reaches in
practice on the card's link (PCIe 3.0 x16 ~12, 4.0 x8 ~13, 4.0 x16 ~25, 5.0 x8 ~25,
5.0 x16 ~50 GB/s). Turing has no bf16: jobs on it train in fp16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model."""

    name: str
    vram_gb: float  # GiB, as NVML reports the total
    compute_capability: tuple[int, int]
    tflops: float  # dense bf16 (fp16 on Turing) tensor TFLOPS, fp32 accumulate
    mem_gbs: float  # memory bandwidth, GB/s
    pcie_gbs: float  # practical host <-> device copy rate, GB/s

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gb * GiB)


GPUS = (
    GpuSpec("RTX 2080 Ti", 11, (7, 5), 53.8, 616, 12),
    GpuSpec("RTX 2080 Super", 8, (7, 5), 44.6, 496, 12),
    GpuSpec("RTX 3060", 12, (8, 6), 25.6, 360, 25),
    GpuSpec("RTX 3060 Ti", 8, (8, 6), 32.4, 448, 25),
    GpuSpec("RTX 3070", 8, (8, 6), 40.6, 448, 25),
    GpuSpec("RTX 3080", 10, (8, 6), 59.5, 760, 25),
    GpuSpec("RTX 3080 12GB", 12, (8, 6), 61.0, 912, 25),
    GpuSpec("RTX 3080 Ti", 12, (8, 6), 68.2, 912, 25),
    GpuSpec("RTX 3090", 24, (8, 6), 71.0, 936, 25),
    GpuSpec("RTX 3090 Ti", 24, (8, 6), 80.0, 1008, 25),
    GpuSpec("RTX 4060", 8, (8, 9), 30.2, 272, 13),
    GpuSpec("RTX 4060 Ti", 16, (8, 9), 44.1, 288, 13),
    GpuSpec("RTX 4060 Ti 8GB", 8, (8, 9), 44.1, 288, 13),
    GpuSpec("RTX 4070", 12, (8, 9), 58.3, 504, 25),
    GpuSpec("RTX 4070 Super", 12, (8, 9), 71.0, 504, 25),
    GpuSpec("RTX 4070 Ti", 12, (8, 9), 80.2, 504, 25),
    GpuSpec("RTX 4070 Ti Super", 16, (8, 9), 88.2, 672, 25),
    GpuSpec("RTX 4080", 16, (8, 9), 97.5, 717, 25),
    GpuSpec("RTX 4080 Super", 16, (8, 9), 104.4, 736, 25),
    GpuSpec("RTX 4090", 24, (8, 9), 165.2, 1008, 25),
    GpuSpec("RTX 5060 Ti", 16, (12, 0), 47.4, 448, 25),
    GpuSpec("RTX 5070", 12, (12, 0), 61.7, 672, 50),
    GpuSpec("RTX 5070 Ti", 16, (12, 0), 87.9, 896, 50),
    GpuSpec("RTX 5080", 16, (12, 0), 112.6, 960, 50),
    GpuSpec("RTX 5090", 32, (12, 0), 209.5, 1792, 50),
    GpuSpec("RTX A4000", 16, (8, 6), 76.7, 448, 25),
    GpuSpec("RTX A5000", 24, (8, 6), 111.1, 768, 25),
    GpuSpec("RTX A6000", 48, (8, 6), 154.8, 768, 25),
    GpuSpec("RTX 4000 Ada", 20, (8, 9), 106.9, 360, 25),
    GpuSpec("RTX 6000 Ada", 48, (8, 9), 364.2, 960, 25),
    GpuSpec("A100 40GB", 40, (8, 0), 312.0, 1555, 25),
    GpuSpec("A100 80GB", 80, (8, 0), 312.0, 2039, 25),
    GpuSpec("H100", 80, (9, 0), 989.0, 3350, 50),
    GpuSpec("H200", 141, (9, 0), 989.0, 4800, 50),
)

# Used for a GPU the table does not know (its VRAM must then be given): a mid-range Ampere card.
UNKNOWN_GPU = GpuSpec("unknown GPU", 0, (8, 6), 40.0, 450, 13)

# A CPU "device": a desktop's cores running bf16 matmuls through oneDNN, and dual-channel DDR.
CPU_DEVICE = GpuSpec("CPU", 0, (0, 0), 0.4, 40, 40)


def _key(name: str) -> str:
    key = name.lower()
    for word in ("nvidia", "geforce", "laptop gpu"):
        key = key.replace(word, "")
    key = re.sub(r"\b(pcie|sxm\d?|nvl)\b", "", key)
    key = re.sub(r"(\d+)\s*g(i)?b\b", r"\1gb", key)
    return re.sub(r"[^a-z0-9]", "", key)


_BY_KEY = {_key(g.name): g for g in GPUS}
# "RTX A4000" is often written "A4000"; "RTX 6000 Ada Generation" as NVML names it.
_BY_KEY.update({_key(g.name.removeprefix("RTX ")): g for g in GPUS if g.name.startswith("RTX A")})
_BY_KEY[_key("RTX 6000 Ada Generation")] = _BY_KEY[_key("RTX 6000 Ada")]


def find_gpu(name: str) -> GpuSpec | None:
    """The table entry for ``name`` as a user or NVML writes it, or None.

    ``NVIDIA GeForce RTX 4060 Ti`` and ``rtx 4060ti`` both find the RTX 4060 Ti; a variant
    with other memory (``RTX 4060 Ti 8GB``) has its own entry where the VRAM differs.
    """
    return _BY_KEY.get(_key(name))


def known_names() -> list[str]:
    return [g.name for g in GPUS]
