"""Process set-up shared by the driver and the workers: device, threads, quiet logs, malloc."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from swarm.errors import UserError


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_bitsandbytes_kernel_fetch() -> None:
    """Silence bitsandbytes' warning that it could not fetch a kernel from the Hub.

    On a CPU with AVX512-BF16, bitsandbytes tries to fetch a faster 4-bit kernel from the
    Hugging Face Hub (the `kernels` package, which swarm does not install: nothing is
    downloaded at run time) and warns that it could not; it then uses its own kernel.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def prepare_process_env() -> None:
    """Environment that must be set before DeepSpeed is imported in this process.

    Without CUDA, DeepSpeed is told to use its CPU accelerator (it would guess the same,
    with a warning on every import). Library chatter that would break the progress bar is
    turned down.
    """
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from swarm.train.ops import pin_ninja

    pin_ninja()  # one ninja for every process, or DeepSpeed's ops rebuild (see swarm.train.ops)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_bitsandbytes_kernel_fetch()
    try:  # transformers shows a bar while writing shards even with its verbosity at error
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class MallocThresholds:
    """glibc's mmap and trim thresholds, in bytes, for one phase of a worker."""

    mmap: int
    trim: int


# Loading: every buffer of 1 MiB or more (a weight of a 576-wide model in 16-bit and up) gets
# its own mapping, given back when freed.
LOADING = MallocThresholds(mmap=1 << 20, trim=1 << 20)
# Training: the ceiling of glibc's dynamic rule (DEFAULT_MMAP_THRESHOLD_MAX), so that the weights
# dequantized or gathered in every step reuse the heap's pages instead of being mapped
# and zeroed again: with the loading thresholds, steps of the 4-bit calibration model took
# 1.3-1.5 times as long (tests/bench/bench_malloc.py).
TRAINING = MallocThresholds(mmap=32 << 20, trim=64 << 20)


def swarm_sets_malloc(environ: Mapping[str, str]) -> bool:
    """Whether a worker sets glibc's thresholds: ``SWARM_MALLOC=glibc`` keeps glibc's dynamic rule.

    The rule is kept for measuring what the thresholds save (tests/bench/bench_malloc.py),
    and where glibc was given a threshold through its own ``MALLOC_MMAP_THRESHOLD_``.
    """
    rule = environ.get("SWARM_MALLOC", "swarm")
    if rule not in ("swarm", "glibc"):
        raise UserError(f"SWARM_MALLOC={rule!r}: use 'swarm' (the default) or 'glibc' (glibc's dynamic thresholds)")
    return rule == "swarm" and "MALLOC_MMAP_THRESHOLD_" not in environ


def set_malloc_thresholds(thresholds: MallocThresholds) -> bool:
    """Fix glibc's mmap and trim thresholds for what this process allocates from now on.

    By default glibc raises its mmap threshold to the size of each mapped buffer that is
    freed (up to 32 MiB); from then on buffers of that size come from the heap, and what is
    freed there stays in the process. Which buffers end up where depends on the order of
    allocations, which differs with the CPU's kernels: a worker loading the 4-bit base of
    the 129M calibration model peaked at 1363-1632 MiB with torch's AVX512 kernels,
    1409-1668 MiB with its AVX2 ones (the same machine, ATEN_CPU_CAPABILITY=avx2) and
    1894 MiB on CI's machine; with fixed thresholds while loading, 1229-1242 MiB on both
    (docs/plan.md, "Calibration"). A fixed threshold turns the dynamic rule off for good.

    Returns whether glibc took the setting (False without glibc: macOS, musl).
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return mallopt(M_MMAP_THRESHOLD, thresholds.mmap) == 1 and mallopt(M_TRIM_THRESHOLD, thresholds.trim) == 1


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Tokenizing makes millions of small Python objects; once the packed arrays are in Ray's
    object store they are gone, but glibc keeps most of their pages (384 MiB after 54M tokens
    of tests/bench/bench_data.py's data, 100 MiB after trimming), which the driver would hold
    for the whole run.
    """
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:  # glibc only (not macOS, musl)
        malloc_trim(0)


@functools.cache
def _libc():
    """The C library, loaded once (``find_library`` runs ldconfig or a compiler), or None."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
