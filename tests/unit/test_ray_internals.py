"""Ray Train's private parts swarm relies on (swarm/train/driver/trainer.py) are still there.

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
    where = "swarm/train/driver/trainer.py relies on it; see its docstring"
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
        "swarm/train/driver/trainer.py replaces it for a Ray started for one run")


def test_the_preemption_watcher_switch_is_read_by_ray_train():
    import ray.train.v2 as v2

    root = Path(v2.__file__).parent
    assert any("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" in p.read_text() for p in root.rglob("*.py")), (
        f"Ray {ray.__version__} no longer reads RAY_TRAIN_ENABLE_PREEMPTION_WATCHER; "
        "swarm/train/driver/trainer.py sets it")


DEAD_NODE = ("\x1b[33m(raylet)\x1b[0m The node with node id: 5f2a and address: 198.18.0.3 and node name: "
             "198.18.0.3 has been marked dead because the detector has missed too many heartbeats from it. "
             "This can happen when a \n\t(1) raylet crashes unexpectedly (OOM, etc.) \n"
             "\t(2) raylet has lagging heartbeats due to slow network or busy workload.")


def test_cluster_errors_reach_swarm_as_one_note_line(monkeypatch):
    """Ray's driver prints each cluster error through print_to_stdstream, in colour, over
    several lines; swarm takes that function's place and keeps the first sentence."""
    import ray._private.worker as ray_worker

    from swarm.train.driver.trainer import route_ray_errors

    listener = inspect.getsource(ray_worker.listen_error_messages)
    assert "print_to_stdstream(" in listener, (
        f"Ray {ray.__version__}: listen_error_messages no longer prints through print_to_stdstream; "
        "swarm/train/driver/trainer.py route_ray_errors relies on it")
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    notes = []
    route_ray_errors(notes.append)
    ray_worker.print_to_stdstream({"lines": [DEAD_NODE], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert notes == ["note: Ray: (raylet) The node with node id: 5f2a and address: 198.18.0.3 and node name: "
                     "198.18.0.3 has been marked dead because the detector has missed too many heartbeats from it."]
