"""A PC without what DeepSpeed needs to build its ops (a C++ compiler, Python's headers): it
says so when it joins, and a run whose plan loads a compiled op is refused before loading."""

from __future__ import annotations

from dataclasses import replace

import pytest

from swarm import hardware
from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.inventory import GpuInfo, NodeInventory
from swarm.plan.placement import NodeSlots
from swarm.train.driver.plans import run_planner
from swarm.train.ops import OPS

GiB = 1024**3
RTX_3090 = GpuInfo("NVIDIA GeForce RTX 3090", 24 * GiB, (8, 6))


def job(model: str, ray_address: str | None, offload: dict | None = None) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"path": model}, "data": {"files": ["d.jsonl"], "seq_len": 1024},
        "train": {"micro_batch": 1, "grad_accum": 8}, "offload": offload or {}, "ray": {"address": ray_address},
    })


@pytest.fixture
def no_build_tools(monkeypatch, tmp_path):
    """This PC as one without a C++ compiler (torch's cpp_extension runs $CXX) and without
    Python's headers (no Python.h in the include folder)."""
    import sysconfig

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**paths, "include": str(tmp_path)})


def python_minor() -> str:
    return ".".join(hardware.versions()["python"].split(".")[:2])


def test_a_pc_without_them_says_so_when_it_joins(no_build_tools):
    from swarm.cluster.join import join

    said = []
    with pytest.raises(UserError, match="no swarm agent answers"):
        join("127.0.0.1:1", None, say=said.append)  # no head there; the warning comes first
    [line] = said
    assert line.startswith("warning: this PC lacks a C++ compiler and the Python headers, so it cannot build "
                           "DeepSpeed's ops cpu_adam (optimizer offload), async_io (NVMe offload), deepspeed_shm_comm "
                           "(training on the CPU), and runs that need them are refused while it is in the swarm"), line
    assert f"sudo apt-get install g++ python{python_minor()}-dev (Debian/Ubuntu)" in line, line


def test_a_cpu_run_on_such_a_pc_is_refused_before_loading(no_build_tools):
    me = hardware.inventory()
    assert me.missing_build_tools == (hardware.COMPILER, hardware.PYTHON_HEADERS)
    assert me.unbuildable_ops == tuple(OPS)  # this DeepSpeed has none compiled in (JIT only)
    with pytest.raises(UserError) as err:
        run_planner(job("qwen2.5-0.5b", None), None, [me])
    line = str(err.value)
    assert "\n" not in line and line.startswith(
        f"{me.hostname} cannot build DeepSpeed's cpu_adam, deepspeed_shm_comm ops, which this plan needs: it lacks "
        "a C++ compiler and the Python headers; install them there (launcher/bootstrap.sh installs them, or: "
        f"sudo apt-get install g++ python{python_minor()}-dev (Debian/Ubuntu)"), line


def test_on_a_swarm_the_pc_is_named_and_only_plans_with_compiled_ops_are_refused():
    nodes = [NodeSlots(f"node{i}", f"10.0.0.{i}", slots=1, gpus=1) for i in (1, 2)]
    inventories = [NodeInventory("pc1", 64 * GiB, (RTX_3090,), address="10.0.0.1"),
                   NodeInventory("pc2", 64 * GiB, (RTX_3090,), address="10.0.0.2", versions={"python": "3.12.3"},
                                 missing_build_tools=(hardware.COMPILER,), unbuildable_ops=tuple(OPS))]
    # Optimizer states in CPU RAM: DeepSpeed's CPU Adam, compiled on every PC.
    with pytest.raises(UserError, match=r"^pc2 \(10\.0\.0\.2\) cannot build DeepSpeed's cpu_adam op, which this plan "
                                        r"needs: it lacks a C\+\+ compiler; .*sudo apt-get install g\+\+ \(Debian"):
        run_planner(job("llama-3.1-8b", "10.0.0.1:6379", {"optimizer": "cpu"}), nodes, inventories)
    # Everything on the cards: nothing is compiled, the PC trains.
    plan = run_planner(job("llama-3.1-8b", "10.0.0.1:6379", {"params": "none", "optimizer": "none"}),
                       nodes, inventories).current
    assert plan.fits and plan.workers == 2


def test_ops_compiled_into_deepspeed_need_no_tools(no_build_tools, monkeypatch):
    """The Docker image: DeepSpeed built with its CPU Adam and AIO ops, no compiler at run time."""
    monkeypatch.setattr(hardware, "prebuilt_ops", lambda: {"cpu_adam", "async_io", "fused_adam"})
    me = hardware.inventory()
    assert me.missing_build_tools and me.unbuildable_ops == ("deepspeed_shm_comm",)
    assert "cannot build DeepSpeed's ops deepspeed_shm_comm (training on the CPU), and" in hardware.build_tools_warning()
    nodes = [NodeSlots("node1", "10.0.0.1", slots=1, gpus=1)]
    me = replace(me, gpus=(RTX_3090,), address="10.0.0.1")
    assert run_planner(job("llama-3.1-8b", "10.0.0.1:6379", {"optimizer": "cpu"}), nodes, [me]).current.fits


def test_this_deepspeeds_compiled_ops_are_read_without_importing_it():
    import subprocess
    import sys

    script = "import sys; from swarm import hardware; print(sorted(hardware.prebuilt_ops()), 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]  # a JIT-only install here: DS_BUILD_OPS was not set


def test_the_inventory_carries_them_through_its_dict():
    inv = NodeInventory("pc", GiB, missing_build_tools=(hardware.PYTHON_HEADERS,), unbuildable_ops=("cpu_adam",))
    assert NodeInventory.from_dict(inv.to_dict()) == inv
    assert set(hardware.DEEPSPEED_OPS) == set(OPS)  # every op swarm builds is one the inventory speaks of


@pytest.fixture
def no_libaio(monkeypatch, tmp_path):
    """This PC as one without libaio's headers (Debian's libaio-dev), which async_io includes."""
    monkeypatch.setattr(hardware, "include_dirs", lambda: [tmp_path])


def test_without_libaio_only_nvme_offload_is_refused(no_libaio):
    me = hardware.inventory()
    assert me.missing_build_tools == (hardware.LIBAIO,) and me.unbuildable_ops == ("async_io",)
    assert hardware.build_tools_warning().startswith(
        "warning: this PC lacks the libaio headers, so it cannot build DeepSpeed's ops async_io (NVMe offload), ")
    assert "sudo apt-get install libaio-dev (Debian/Ubuntu), sudo dnf install libaio-devel" in hardware.build_tools_warning()
    nodes = [NodeSlots("node1", "10.0.0.1", slots=1, gpus=1)]
    me = replace(me, gpus=(RTX_3090,), address="10.0.0.1", offload_free_bytes=2000 * GiB)
    with pytest.raises(UserError, match=r"cannot build DeepSpeed's async_io op, which this plan needs: it lacks the "
                                        r"libaio headers; .*sudo apt-get install libaio-dev \(Debian"):
        run_planner(job("llama-3.1-8b", "10.0.0.1:6379", {"optimizer": "nvme", "nvme_path": "/tmp"}), nodes, [me])
    assert run_planner(job("llama-3.1-8b", "10.0.0.1:6379", {"optimizer": "cpu"}), nodes, [me]).current.fits


def test_libaio_is_found_where_the_compiler_looks(monkeypatch, tmp_path):
    (tmp_path / "libaio.h").write_text("")
    monkeypatch.setenv("CPATH", str(tmp_path))
    assert hardware.include_dirs()[0] == tmp_path
    monkeypatch.setattr(hardware, "include_dirs", lambda: [tmp_path])
    assert hardware.LIBAIO not in hardware.missing_build_tools()


def test_this_machine_has_them():
    # It builds DeepSpeed's ops for the suite (tests/build_ops.py).
    assert hardware.missing_build_tools() == () and hardware.build_tools_warning() is None
