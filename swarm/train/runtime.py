"""Process set-up shared by the driver and the workers: device, threads, quiet logs."""

from __future__ import annotations

import logging
import os
import warnings


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


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Tokenizing makes millions of small Python objects; once the packed arrays are in Ray's
    object store they are gone, but glibc keeps most of their pages (384 MiB after 54M tokens
    of tests/bench/bench_data.py's data, 100 MiB after trimming), which the driver would hold
    for the whole run.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
