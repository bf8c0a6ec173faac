"""One PC's Ray node as a process tree: started from a builder's argv/env, stopped as a whole.

``ray start --block`` runs as the leader of a new process group; every Ray process of the node
(GCS, raylet, dashboard, workers) descends from it. Stopping the node stops that tree only, so
several nodes on one machine (test hosts in namespaces) never stop each other, unlike
``ray stop``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from swarm.cluster.builders import RayNodeSettings, child_env, ray_start_argv
from swarm.cluster.procs import stop_group

READY_LINE = "Ray runtime started."  # printed by `ray start` once the node has registered


class RayStartError(Exception):
    """``ray start`` exited or timed out; the message holds the end of its log."""


def _transient(message: str) -> bool:
    """Failures that a second start on a less busy moment fixes."""
    return "Timed out waiting for file" in message or "timed out during startup" in message


class RayNode:
    """A Ray node this process started.

    Args:
        settings: how to start it (see ``swarm.cluster.builders``).
        env: variables to set on top of this process's environment (``ray_node_env``).
        log_path: file that receives ``ray start``'s output (appended).
    """

    def __init__(self, settings: RayNodeSettings, env: dict[str, str], log_path: Path):
        self.settings = settings
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._started_at = 0.0

    def start(self, timeout_s: float = 120.0, attempts: int = 3) -> None:
        """Start the node and return once Ray reports it running.

        A raylet gives up after a fixed 15 s if its dashboard agent has not written its port
        file yet (ray-project/ray#65983), which happens on a busy PC; such starts are retried,
        up to ``attempts`` in all. Other failures are not.

        Raises:
            RayStartError: ``ray start`` failed, or did not get there in ``timeout_s``; the
                node's processes are stopped before raising.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RayStartError as exc:
                self.stop()
                if attempt == attempts or not _transient(str(exc)):
                    raise
                with open(self.log_path, "ab") as log:
                    log.write(f"=== transient failure, retrying ({attempt}/{attempts - 1})\n".encode())

    def _start_once(self, timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        Path(self.settings.temp_dir).mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} swarm starts a Ray {self.settings.role}\n".encode())
            offset = log.tell()
            self._started_at = time.time()
            self.proc = subprocess.Popen(
                ray_start_argv(self.settings),
                env=child_env(os.environ, self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() takes exactly this tree
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if READY_LINE in self._log_since(offset):
                return
            if self.proc.poll() is not None:
                raise RayStartError(f"ray start exited with status {self.proc.returncode}: {self._why(offset)}")
            time.sleep(0.2)
        raise RayStartError(f"ray start did not finish within {timeout_s:.0f}s: {self._why(offset)}")

    def _why(self, offset: int) -> str:
        """The raylet's fatal line if there is one (``ray start`` itself only says "timed out")."""
        raylet_out = Path(self.settings.temp_dir) / "session_latest" / "logs" / "raylet.out"
        try:
            fresh = raylet_out.stat().st_mtime >= self._started_at  # not a previous session's
            text = raylet_out.read_text(errors="replace") if fresh else ""
            fatal = [ln for ln in text.splitlines() if "Check failed" in ln]
        except OSError:
            fatal = []
        if fatal:
            return "raylet: " + fatal[-1].split("Check failed:", 1)[-1].strip()[:300]
        return self.log_tail(offset)

    def running(self) -> bool:
        """True while the ``ray start --block`` process lives."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def stop(self) -> int:
        """Stop every process of the node; returns how many were stopped."""
        if self.proc is None:
            return 0
        stopped = stop_group(self.proc.pid)
        self.proc.wait()
        return stopped

    def wait(self) -> int:
        """Block until the node's leader exits; its exit status."""
        return self.proc.wait() if self.proc else 0

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, offset: int = 0, lines: int = 3) -> str:
        """The last non-empty lines of the log since ``offset``, joined on one line."""
        text = [ln.strip() for ln in self._log_since(offset).splitlines() if ln.strip()]
        return " | ".join(text[-lines:]) or f"(no output; see {self.log_path})"
