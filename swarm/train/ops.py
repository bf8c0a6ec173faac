"""DeepSpeed's compiled ops: built once, before the workers start, by one ninja.

DeepSpeed compiles some of its ops (CPU Adam, asynchronous I/O for NVMe, shared-memory
collectives on CPUs) the first time a process loads them, through torch's
``cpp_extension``, which runs the first ``ninja`` on ``PATH``. Two things made every run
of swarm wait minutes or for ever:

- Two ninjas: Debian's (1.11) and the pip package DeepSpeed installs (1.13) record their
  commands with different hashes in the build folder's ``.ninja_log``, so a process that
  found the other one rebuilt everything. Which one a process finds depends on whether the
  venv's ``bin`` is on its ``PATH`` (an activated shell, a service, a Ray worker).
  ``pin_ninja`` puts the interpreter's own ``bin`` first, in every swarm process.
- A build killed half-way (a worker stopped by Ray Train while compiling) leaves torch's
  lock file in the build folder, and every later load waits on it at 0% CPU, silently.
  ``ensure_ops`` builds what a local run needs in the driver, before Ray starts, with a
  message, and stops with one line when it finds a lock no running build holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from swarm.errors import UserError

# DeepSpeed's builder class and extension name of each op swarm may need.
OPS = {"cpu_adam": "CPUAdamBuilder", "async_io": "AsyncIOBuilder", "deepspeed_shm_comm": "ShareMemCommBuilder"}
BUILD_SCRIPT = (
    "import sys\n"
    "from deepspeed.accelerator import get_accelerator\n"
    "get_accelerator().create_op_builder(sys.argv[1]).load(verbose=False)\n"
)


def pin_ninja() -> None:
    """Make this process (and what it starts) use the ninja installed beside its Python."""
    here = str(Path(sys.executable).parent)
    if (Path(here) / "ninja").is_file():
        path = os.environ.get("PATH", "")
        if not path.startswith(here + os.pathsep):
            os.environ["PATH"] = here + os.pathsep + path


def ops_for(plan: dict) -> list[str]:
    """The compiled ops a plan's workers load, by extension name.

    Args:
        plan: ``Plan.to_dict()`` (a diloco plan: every PC's config).
    """
    configs = [plan["deepspeed"]] if plan.get("deepspeed") else [pc["deepspeed"] for pc in plan.get("pcs", [])]
    zeros = [config["zero_optimization"] for config in configs]
    optimizer = {z.get("offload_optimizer", {}).get("device") for z in zeros}
    params = {z.get("offload_param", {}).get("device") for z in zeros}
    needed = []
    if optimizer & {"cpu", "nvme"}:
        needed.append("cpu_adam")
    if "nvme" in optimizer | params:
        needed.append("async_io")
    if not plan["placement"]["use_gpu"]:
        needed.append("deepspeed_shm_comm")  # DeepSpeed's CPU accelerator loads it at start
    return needed


def check_build_tools(plan: dict, inventories) -> None:
    """Refuse, in one line, a plan that loads an op a training PC can neither build (no compiler
    or no Python headers there) nor load compiled in, as its inventory says: before any weight
    is read, rather than in the first worker that loads the op.

    Args:
        plan: ``Plan.to_dict()``.
        inventories: the ``NodeInventory`` of every PC that may train.
    """
    from swarm.hardware import build_tools_advice

    needed = ops_for(plan)
    for inv in inventories:
        lacking = [op for op in needed if op in inv.unbuildable_ops]
        if lacking:
            where = f"{inv.hostname} ({inv.address})" if inv.address else inv.hostname
            raise UserError(
                f"{where} cannot build DeepSpeed's {', '.join(lacking)} op{'s' * (len(lacking) > 1)}, which this "
                f"plan needs: it lacks {' and '.join(inv.missing_build_tools)}; install them there "
                f"({build_tools_advice(inv.missing_build_tools, inv.versions.get('python', '3'))})"
            )


def build_folder(name: str) -> Path:
    """Where torch builds the extension ``name`` in this environment."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def stale_lock(folder: Path, running: list[tuple[int, str]]) -> Path | None:
    """The lock in ``folder`` when no running process builds there, else None.

    Args:
        folder: an extension's build folder.
        running: (pid, working folder) of the running processes.
    """
    lock = folder / "lock"
    if not lock.exists():
        return None
    if any(cwd == str(folder) for _, cwd in running):
        return None
    return lock


def running_processes() -> list[tuple[int, str]]:
    """(pid, working folder) of the processes this user can see."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            found.append((proc.pid, proc.cwd()))
        except (psutil.Error, OSError):
            continue
    return found


def needs_build(folder: Path, name: str) -> bool:
    """Whether loading ``name`` would compile: no library yet, or ninja has work to do."""
    if not (folder / f"{name}.so").is_file() or not (folder / "build.ninja").is_file():
        return True
    ninja = shutil.which("ninja")
    if ninja is None:
        return True
    result = subprocess.run([ninja, "-C", str(folder), "-n"], capture_output=True, text=True)
    return result.returncode != 0 or "no work to do" not in result.stdout


def ensure_ops(names: list[str], note) -> None:
    """Build the ops ``names`` now, in a child process, unless they are up to date.

    Args:
        names: extension names (keys of ``OPS``).
        note: prints one line for the user.

    Raises:
        UserError: a lock left by a killed build, or a build that fails.
    """
    pin_ninja()
    running = None
    for name in names:
        folder = build_folder(name)
        running = running if running is not None else running_processes()
        lock = stale_lock(folder, running)
        if lock is not None:
            raise UserError(
                f"DeepSpeed's {name} op has a build lock that no running build holds ({lock}): a build was killed "
                f"half-way; remove the lock (rm {lock}) and run again"
            )
        if not needs_build(folder, name):
            continue
        note(f"building DeepSpeed's {name} op for this machine (once; a few minutes)")
        result = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, OPS[name]], capture_output=True, text=True,
                                env=os.environ.copy())
        if result.returncode != 0:
            tail = " ".join((result.stderr or result.stdout).split())[-400:]
            raise UserError(f"building DeepSpeed's {name} op failed: {tail}; `ds_report` shows what is missing")
