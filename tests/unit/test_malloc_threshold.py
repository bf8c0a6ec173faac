"""A worker's fixed malloc thresholds: when they are set, and that freed buffers really go back.

The RSS of a CPU worker must not depend on the order its libraries allocate in (which
differs with the CPU's kernels): tests/integration/test_plan_calibration.py checks the plan
against runs on both of torch's kernel sets; here, the allocator itself, in a fresh process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from swarm.errors import UserError
from swarm.train.runtime import TRAINING, swarm_sets_malloc

# Frees a 24 MiB tensor (under glibc's dynamic rule the mmap threshold rises to 24 MiB),
# then makes 40 tensors of 8 MiB and frees every other one: each freed buffer lies between
# two kept ones, so the heap cannot give it back by shrinking from its top. Prints the RSS
# growth in MiB beyond the 160 MiB kept.
PROBE = """
import sys, psutil, torch
from swarm.train.runtime import LOADING, set_malloc_thresholds

def rss():
    return psutil.Process().memory_info().rss / 2**20

if sys.argv[1] == "loading":
    assert set_malloc_thresholds(LOADING)
before = rss()
big = torch.ones(6 << 20)
del big
buffers = [torch.ones(2 << 20) for _ in range(40)]
kept = buffers[1::2]
del buffers
print(rss() - before - 160)
"""


def test_workers_set_the_thresholds_unless_told_to_keep_glibcs_rule():
    assert swarm_sets_malloc({})
    assert swarm_sets_malloc({"SWARM_MALLOC": "swarm"})
    assert not swarm_sets_malloc({"SWARM_MALLOC": "glibc"})
    # glibc was given a threshold through its own variable: the user chose, swarm leaves it.
    assert not swarm_sets_malloc({"MALLOC_MMAP_THRESHOLD_": "65536"})


def test_a_bad_rule_is_refused_in_one_line():
    with pytest.raises(UserError, match="SWARM_MALLOC='tcmalloc': use 'swarm'") as refused:
        swarm_sets_malloc({"SWARM_MALLOC": "tcmalloc"})
    assert "\n" not in str(refused.value)


def test_glibc_takes_both_phases_thresholds():
    # In a fresh process: the thresholds would stay set in this one.
    taken = subprocess.run(
        [sys.executable, "-c", "from swarm.train.runtime import LOADING, TRAINING, set_malloc_thresholds as s; "
                               "print(s(LOADING), s(TRAINING))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert taken == ["True", "True"]
    assert TRAINING.mmap == 32 << 20  # glibc's dynamic rule stops there (DEFAULT_MMAP_THRESHOLD_MAX)


def growth_mib(rule: str) -> float:
    result = subprocess.run([sys.executable, "-c", PROBE, rule], capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def test_freed_buffers_go_back_with_the_loading_thresholds_and_stay_under_glibcs_rule():
    kept_dynamic, kept_fixed = growth_mib("glibc"), growth_mib("loading")
    # 160 MiB were freed: glibc's rule keeps them in the heap; the fixed threshold unmaps each.
    assert kept_dynamic > 120, kept_dynamic
    assert kept_fixed < 30, kept_fixed
