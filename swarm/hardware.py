"""What this machine has: versions, GPUs, CPU, RAM, offload disk, the interface to a peer.

The one place the project reads its hardware: the agent reports it through its Inventory
call, ``swarm plan`` and ``swarm train`` plan with it (on each node of a swarm, through a Ray
task), and the planner reads the same ``NodeInventory``. GPUs come from NVML
(``nvidia-ml-py``), not from CUDA: NVML needs no CUDA context and sees a node's cards even
in a Ray task, where Ray hides them from CUDA. On a PC without an NVIDIA driver the list is
simply empty.

``SWARM_GPU_MEMORY_GB`` caps what each card reports (and the worker caps its allocator to
match, ``swarm.train.worker.device.memory_fraction``): a large card then stands in for a consumer
one, as the GPU check does (tests/gpu/run.sh).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import socket
import time
from pathlib import Path

import psutil

import swarm
from swarm.cluster.builders import choose_interface
from swarm.inventory import GpuInfo, NodeInventory

# Distributions whose versions the inventory reports (name in the report -> PyPI name).
_PACKAGES = {
    "torch": "torch",
    "deepspeed": "deepspeed",
    "ray": "ray",
    "transformers": "transformers",
    "peft": "peft",
    "bitsandbytes": "bitsandbytes",
    "grpcio": "grpcio",
}
NOT_INSTALLED = "not installed"


def versions() -> dict[str, str]:
    """Versions of Python, the OS, swarm, torch (and its CUDA), Ray and the training stack.

    Read from package metadata, without importing torch or deepspeed (seconds and hundreds of
    MB each). ``cuda`` is the CUDA that torch was built for; ``cuda_driver`` the driver's.
    """
    out = {
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "swarm": swarm.__version__,
    }
    for key, dist in _PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = NOT_INSTALLED
    out["cuda"] = _torch_cuda() or "none"
    driver = _nvml(lambda nv: nv.nvmlSystemGetCudaDriverVersion_v2())
    if driver:
        out["cuda_driver"] = f"{driver // 1000}.{driver % 1000 // 10}"
    return out


def _torch_cuda() -> str | None:
    """The ``cuda`` line of torch/version.py, read as text."""
    try:
        path = importlib.metadata.distribution("torch").locate_file("torch/version.py")
        text = Path(path).read_text()
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    match = re.search(r"^cuda(?::[^=]*)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def _nvml(fn):
    """``fn(pynvml)`` inside nvmlInit/nvmlShutdown, or None when NVML is unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / library: a PC without NVIDIA GPU, not an error
        return None
    try:
        return fn(pynvml)
    finally:
        pynvml.nvmlShutdown()


GPU_MEMORY_CAP_ENV = "SWARM_GPU_MEMORY_GB"


def gpu_memory_cap_bytes() -> int | None:
    """The VRAM each card may use, from ``SWARM_GPU_MEMORY_GB``; None when unset."""
    value = os.environ.get(GPU_MEMORY_CAP_ENV)
    return int(float(value) * 1024**3) if value else None


def gpus() -> tuple[GpuInfo, ...]:
    """NVIDIA GPUs as NVML sees them (name, VRAM, compute capability); empty without NVML."""
    cap = gpu_memory_cap_bytes()

    def read(nv) -> tuple[GpuInfo, ...]:
        found = []
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            vram = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
            cc = tuple(int(x) for x in nv.nvmlDeviceGetCudaComputeCapability(handle))
            found.append(GpuInfo(name=name, vram_bytes=min(vram, cap) if cap else vram, compute_capability=cc))
        return tuple(found)

    return _nvml(read) or ()


def cpu_flags() -> set[str]:
    """CPU feature flags, e.g. {'avx2', 'amx_bf16'}; empty where /proc/cpuinfo is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def computes_bf16(flags: set[str]) -> bool:
    """Whether a CPU with these flags computes bf16 natively (AMX or AVX512-BF16)."""
    return bool(flags & {"amx_bf16", "avx512_bf16"})


# DeepSpeed's compiled ops that swarm loads (swarm.train.ops builds them), and what for.
DEEPSPEED_OPS = {"cpu_adam": "optimizer offload", "async_io": "NVMe offload",
                 "deepspeed_shm_comm": "training on the CPU"}
# What compiling them takes (torch's cpp_extension runs $CXX, else c++, and includes Python.h);
# async_io alone also includes libaio.h (DeepSpeed's AsyncIOBuilder).
COMPILER, PYTHON_HEADERS, LIBAIO = "a C++ compiler", "the Python headers", "the libaio headers"


def include_dirs() -> list[Path]:
    """Where the compiler finds a system header: the include variables, then its default folders."""
    extra = [d for var in ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH") for d in os.environ.get(var, "").split(":") if d]
    return [Path(d) for d in extra] + [Path("/usr/local/include"), Path("/usr/include")]


def missing_build_tools() -> tuple[str, ...]:
    """What this PC lacks to build DeepSpeed's ops: ``COMPILER``, ``PYTHON_HEADERS``, ``LIBAIO``, or nothing."""
    import sysconfig

    missing = []
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        missing.append(COMPILER)
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append(PYTHON_HEADERS)
    if not any((folder / "libaio.h").is_file() for folder in include_dirs()):
        missing.append(LIBAIO)
    return tuple(missing)


def prebuilt_ops() -> set[str]:
    """DeepSpeed's ops compiled into its install (``DS_BUILD_*``, as in the Docker image), read
    from its ``git_version_info_installed.py`` as text, without importing DeepSpeed."""
    import ast

    try:
        path = importlib.metadata.distribution("deepspeed").locate_file("deepspeed/git_version_info_installed.py")
        tree = ast.parse(Path(path).read_text())
    except (importlib.metadata.PackageNotFoundError, OSError, SyntaxError):
        return set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "installed_ops" for t in node.targets):
            try:
                return {name for name, built in ast.literal_eval(node.value).items() if built}
            except (ValueError, AttributeError):
                return set()
    return set()


def unbuildable_ops(missing: tuple[str, ...]) -> tuple[str, ...]:
    """The ops of ``DEEPSPEED_OPS`` this PC cannot load: not compiled in, and ``missing`` tools
    (the compiler or Python's headers for every op; libaio's headers for async_io alone)."""
    if not missing:
        return ()
    built = prebuilt_ops()
    every_op = bool(set(missing) - {LIBAIO})
    return tuple(op for op in DEEPSPEED_OPS if op not in built and (every_op or op == "async_io"))


def build_tools_advice(missing: tuple[str, ...] | list[str], python: str) -> str:
    """How to install ``missing`` on a PC with Python ``python`` ("3.11.7"): the packages
    launcher/bootstrap.sh installs on Debian/Ubuntu and on Fedora/RHEL."""
    minor = ".".join(python.split(".")[:2])
    apt = [p for tool, p in ((COMPILER, "g++"), (PYTHON_HEADERS, f"python{minor}-dev"), (LIBAIO, "libaio-dev"))
           if tool in missing]
    dnf = [p for tool, p in ((COMPILER, "gcc-c++"), (PYTHON_HEADERS, f"python{minor}-devel"), (LIBAIO, "libaio-devel"))
           if tool in missing]
    return (f"launcher/bootstrap.sh installs them, or: sudo apt-get install {' '.join(apt)} "
            f"(Debian/Ubuntu), sudo dnf install {' '.join(dnf)} (Fedora/RHEL)")


def build_tools_warning() -> str | None:
    """One line for a PC joining a swarm that cannot build the DeepSpeed ops it lacks; None when
    it has the tools, or every op compiled in."""
    missing = missing_build_tools()
    ops = unbuildable_ops(missing)
    if not ops:
        return None
    uses = ", ".join(f"{op} ({DEEPSPEED_OPS[op]})" for op in ops)
    return (f"warning: this PC lacks {' and '.join(missing)}, so it cannot build DeepSpeed's ops {uses}, and runs "
            f"that need them are refused while it is in the swarm; "
            f"{build_tools_advice(missing, platform.python_version())}")


def ram_bytes() -> int:
    """Total host RAM."""
    return int(psutil.virtual_memory().total)


def disk_free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem of ``folder``, or of its nearest existing parent.

    Nothing is created: planning a job must not leave folders behind.
    """
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return int(shutil.disk_usage(folder).free)


def measure_write_speed(folder: Path, size_bytes: int = 64 * 1024**2) -> float:
    """Bytes per second of a synced sequential write of ``size_bytes`` into ``folder``.

    fsync is included: DeepSpeed's NVMe offload is bound by what reaches the drive, not by
    the page cache. The test file is removed afterwards.
    """
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1024**2)  # random: compressing filesystems must not flatter the figure
    path = folder / f".swarm-write-test-{os.getpid()}"
    start = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as f:
            written = 0
            while written < size_bytes:
                written += f.write(block[: min(len(block), size_bytes - written)])
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return size_bytes / max(elapsed, 1e-9)


def interfaces() -> dict[str, list[tuple[str, str]]]:
    """IPv4 (address, netmask) per network interface."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        v4 = [(a.address, a.netmask) for a in addrs if a.family == socket.AF_INET and a.netmask]
        if v4:
            out[name] = v4
    return out


def routed_source_address(peer: str) -> str | None:
    """The source address the kernel would use for ``peer`` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_to(peer: str) -> tuple[str, str] | None:
    """(interface, local address) that reaches ``peer``, or None when nothing does."""
    return choose_interface(peer, interfaces(), routed_source_address(peer))


def inventory(peer: str | None = None, offload: str | Path | None = None,
              write_speed: float | None = None) -> NodeInventory:
    """This machine's ``NodeInventory``.

    Args:
        peer: address of the PC to reach (the head); fills ``address`` and ``interface``.
        offload: the offload folder whose free space is reported (that of its nearest
            existing parent when it does not exist yet).
        write_speed: an already measured write speed of ``offload`` (the agent caches it);
            None leaves it unmeasured.
    """
    reach = interface_to(peer) if peer else None
    missing = missing_build_tools()
    return NodeInventory(
        hostname=socket.gethostname(),
        ram_bytes=ram_bytes(),
        gpus=gpus(),
        cpu_bf16=computes_bf16(cpu_flags()),
        address=reach[1] if reach else None,
        interface=reach[0] if reach else None,
        offload_free_bytes=disk_free_bytes(Path(offload)) if offload else None,
        offload_write_bytes_per_s=write_speed,
        versions=versions(),
        missing_build_tools=missing,
        unbuildable_ops=unbuildable_ops(missing),
    )
