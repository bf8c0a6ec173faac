"""This machine's inventory (no GPU here: NVML absent means an empty list, not an error)."""

from __future__ import annotations

import subprocess
import sys

import psutil

from swarm import hardware
from swarm.cluster.messages import inventory_from_proto, inventory_to_proto
from swarm.inventory import GpuInfo, NodeInventory


def test_versions_come_from_package_metadata():
    v = hardware.versions()
    import ray
    import swarm

    assert v["ray"] == ray.__version__ and v["swarm"] == swarm.__version__
    assert v["python"].count(".") == 2 and v["os"]
    assert {"torch", "deepspeed", "transformers", "peft", "bitsandbytes", "cuda"} <= set(v)


def test_inventory_of_this_machine(tmp_path):
    inv = hardware.inventory(peer="127.0.0.1", offload=tmp_path / "off", write_speed=None)
    assert inv.ram_bytes == psutil.virtual_memory().total
    assert inv.interface == "lo" and inv.address == "127.0.0.1"
    # The free space of the folder's filesystem; nothing is created to measure it.
    assert inv.offload_free_bytes > 0 and not (tmp_path / "off").exists()
    flags = subprocess.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout.split()
    assert inv.cpu_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_pc_without_an_nvidia_driver_has_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the import fails, as on a PC without the driver
    assert hardware.gpus() == () and hardware.inventory().gpus == ()


def test_write_speed_is_measured_and_leaves_nothing(tmp_path):
    speed = hardware.measure_write_speed(tmp_path, size_bytes=4 * 1024**2)
    assert speed > 0
    assert list(tmp_path.iterdir()) == []


def test_each_local_address_is_reached_through_its_own_interface():
    for name, addrs in hardware.interfaces().items():
        for addr, _ in addrs:
            assert hardware.interface_to(addr) == (name, addr)


def test_inventory_round_trips_through_the_wire_format():
    inv = NodeInventory(
        hostname="pc2", ram_bytes=64 * 1024**3,
        gpus=(GpuInfo("NVIDIA GeForce RTX 4090", 24 * 1024**3, (8, 9)), GpuInfo("Old", 8 * 1024**3, None)),
        address="192.168.1.11", interface="wlan0", offload_free_bytes=0,
        offload_write_bytes_per_s=2.5e9, versions={"swarm": "0.1.0"},
    )
    assert inventory_from_proto(inventory_to_proto(inv)) == inv
    bare = NodeInventory(hostname="x", ram_bytes=1)
    assert inventory_from_proto(inventory_to_proto(bare)) == bare
