"""Ray Train's private parts swarm relies on (swarm/train/trainer.py) are still there.

A Ray upgrade that moves or renames one fails here, naming it, before any training run
does; pyproject.toml's Ray range is the range this test has passed on.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import ray
from packaging.specifiers import SpecifierSet

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# (module, attribute, methods the attribute must have)
RELIED_ON = [
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer",
     ["_create_default_callbacks", "_initialize_and_run_controller"]),
    ("ray.train.v2._internal.callbacks.datasets", "DatasetsCallback", []),
    ("ray.train.v2._internal.callbacks.placement_group_callback", "PlacementGroupCleanerCallback", []),
    ("ray.train.v2._internal.execution.scaling_policy", "FixedScalingPolicy",
     ["after_controller_start", "_maybe_send_resource_request", "_send_resource_request"]),
    ("ray.train._internal.utils", "get_address_and_port", []),
]


def test_the_installed_ray_is_in_the_range_pyproject_allows():
    spec = re.search(r'"ray\[[^\]]*\]([^"]+)"', PYPROJECT.read_text()).group(1)
    assert ray.__version__ in SpecifierSet(spec), f"Ray {ray.__version__} is outside pyproject's {spec}"


@pytest.mark.parametrize(("module", "name", "methods"), RELIED_ON, ids=[f"{m}.{n}" for m, n, _ in RELIED_ON])
def test_each_private_part_is_there(module, name, methods):
    where = "swarm/train/trainer.py relies on it; see its docstring"
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(f"Ray {ray.__version__} has no {module}.{name}; {where}")
    for method in methods:
        assert hasattr(found, method), f"Ray {ray.__version__}: {name}.{method} is gone; {where}"


def test_the_controller_still_takes_its_scaling_policy_by_name():
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    source = inspect.getsource(DataParallelTrainer)
    assert "scaling_policy" in source, (
        f"Ray {ray.__version__}: DataParallelTrainer no longer passes scaling_policy to its controller; "
        "swarm/train/trainer.py replaces it for a Ray started for one run")


def test_the_preemption_watcher_switch_is_read_by_ray_train():
    import ray.train.v2 as v2

    root = Path(v2.__file__).parent
    assert any("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" in p.read_text() for p in root.rglob("*.py")), (
        f"Ray {ray.__version__} no longer reads RAY_TRAIN_ENABLE_PREEMPTION_WATCHER; swarm/train/trainer.py sets it")
