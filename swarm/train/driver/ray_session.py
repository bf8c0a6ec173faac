"""The Ray a run uses: a swarm's (``ray.address``, with this PC's token and TLS settings)
or a local one started for the run, with a watchdog that ends the run in one line when
that local Ray dies.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import psutil

from swarm.config.models import JobConfig
from swarm.errors import RunFailure
from swarm.train.driver.run_folder import kept_checkpoint


class ray_session:
    """Connect to the configured Ray, or start a local one with a capped object store.

    A Ray started here is stopped on exit; one that was already running is left alone.
    """

    def __init__(self, job: JobConfig):
        self.job = job

    def __enter__(self) -> str | None:
        import ray

        from swarm.train.driver.trainer import LOCAL_RAY_SYSTEM_CONFIG, route_ray_errors

        settings = self.job.ray
        # Cluster errors (a PC marked dead) as one note line each, never over the progress output.
        route_ray_errors(lambda line: print(line, file=sys.stderr, flush=True))
        self.job_id = None
        if settings.address:
            context = ray.init(address=settings.address, log_to_driver=False, logging_level="ERROR")
            # `swarm status` shows this job's step and loss under its Ray job id.
            self.job_id = ray.get_runtime_context().get_job_id() if "RAY_AUTH_MODE" in os.environ else None
        else:
            # Ray's log monitor forwards worker output to drivers; with log_to_driver off
            # nobody reads it, yet it globs Ray's log folder ten times a second (about 1%
            # of a core). Let it look for new files every 5 s instead.
            os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
            os.environ.setdefault("LOG_NAME_UPDATE_INTERVAL_S", "5")
            context = ray.init(
                address="local",
                object_store_memory=settings.object_store_mb * 1024**2,
                include_dashboard=settings.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=free_dashboard_port(settings.dashboard_port) if settings.dashboard else None,
                # Worker output goes to Ray's log files; the terminal shows swarm's progress.
                log_to_driver=False,
                logging_level="ERROR",
                _system_config=LOCAL_RAY_SYSTEM_CONFIG,
            )
        url = context.dashboard_url
        # The processes of a Ray started here: if one dies the run cannot go on, and Ray's
        # own core would end this process a minute later with a C++ log line.
        self.head_processes = [] if settings.address else [
            p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
        return f"http://{url}" if url and not url.startswith("http") else url

    def lost(self) -> list[str]:
        """Names of this run's own Ray processes that are no longer running."""
        return [p.name() for p in self.head_processes if not _running(p)]

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_local_ray(session: ray_session, run_dir: Path, done: threading.Event) -> threading.Thread:
    """End the run with one line when the Ray started for it dies (nothing could go on)."""

    def watch() -> None:
        while not done.wait(2.0):
            lost = session.lost()
            if lost:
                print(f"error: training failed: the Ray this run started stopped ({', '.join(lost)} exited)"
                      f"{kept_checkpoint(run_dir)}; continue with `swarm train JOB --resume {run_dir}`",
                      file=sys.stderr, flush=True)
                os._exit(RunFailure.exit_status)

    thread = threading.Thread(target=watch, daemon=True, name="swarm-ray-watch")
    thread.start()
    return thread


def free_dashboard_port(wanted: int) -> int:
    """``wanted`` if nothing listens there, else a free port (another run's dashboard has it)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    print(f"note: port {wanted} is taken (another run's dashboard?); this run's dashboard uses {port}", file=sys.stderr)
    return port


def swarm_client_env() -> dict[str, str]:
    """Ray's token and TLS variables from this PC's swarm secret and node certificate.

    A swarm this PC brought up with ``--insecure`` gets ``RAY_AUTH_MODE=disabled`` and no TLS;
    a PC without secret, nothing (a Ray cluster that is not a swarm). Ray reads them when its
    core starts, so they must be set before ``ray.init``.

    Raises:
        UserError: the secret is unusable, or this PC has no node certificate of the swarm.
    """
    from swarm.cluster.client import ray_client_env
    from swarm.cluster.state import load_cluster_state
    from swarm.home import read_secret, secret_path

    state = load_cluster_state()
    if state is not None and state.get("auth") == "disabled":
        return ray_client_env(None)
    if not secret_path().exists():
        return {}
    return ray_client_env(read_secret())
