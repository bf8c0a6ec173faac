"""The state folder (``$SWARM_HOME``, default ``~/.swarm``) and the cluster secret in it.

Everything swarm keeps on a PC lives here: ``secret`` (mode 0600; Ray's auth token and the key
of the agent's signed calls), ``agent.json`` (where the local agent listens), ``cluster.json``
(the running swarm, written by ``swarm up`` / ``swarm join``), ``logs/`` and ``offload/``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

from swarm.errors import UserError

SECRET_BYTES = 32  # 256 bits, as Ray's own `ray get-auth-token --generate`


def swarm_home() -> Path:
    """The state folder: ``$SWARM_HOME`` if set, else ``~/.swarm``."""
    env = os.environ.get("SWARM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".swarm"


def secret_path() -> Path:
    """Where the cluster secret lives (whether or not it exists yet)."""
    return swarm_home() / "secret"


def logs_dir() -> Path:
    """Folder for the logs of processes swarm starts (created on demand)."""
    path = swarm_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def offload_dir() -> Path:
    """The default offload (NVMe) folder: ``$SWARM_OFFLOAD_DIR`` or ``$SWARM_HOME/offload``."""
    env = os.environ.get("SWARM_OFFLOAD_DIR")
    return Path(env).expanduser() if env else swarm_home() / "offload"


def ray_temp_dir() -> Path:
    """Ray's ``--temp-dir`` for this PC's node.

    Not inside ``$SWARM_HOME``: Ray puts Unix sockets under it and refuses paths longer than
    107 bytes, so it must stay short. The hash keeps two state folders on one filesystem (test
    hosts in network namespaces) from sharing a Ray session folder.
    """
    env = os.environ.get("SWARM_RAY_TEMP_DIR")
    if env:
        return Path(env)
    tag = hashlib.sha256(str(swarm_home().resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"swarm-ray-{os.getuid()}-{tag}"


def create_secret(overwrite: bool = False) -> Path:
    """Make a new random cluster secret, readable by this user only.

    Args:
        overwrite: replace an existing secret (every PC then needs the new one).

    Returns:
        The path of the secret file.
    """
    path = secret_path()
    if path.exists() and not overwrite:
        raise UserError(
            f"a cluster secret already exists at {path}; keep it (copy it to the other PCs), "
            "or run `swarm init --force` to replace it everywhere"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".secret.{os.getpid()}.tmp")
    # O_EXCL + mode at creation: the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_secret() -> str:
    """The cluster secret of this PC.

    Raises:
        UserError: the file is missing, readable by other users, or too short.
    """
    path = secret_path()
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except FileNotFoundError:
        raise UserError(
            f"no cluster secret at {path}; run `swarm init` on the head PC and copy its secret "
            "file here with mode 0600 (or pass --insecure to run without authentication)"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"cluster secret {path} is readable by other users; run `chmod 600 {path}`")
    if len(text) < 2 * SECRET_BYTES or any(c.isspace() for c in text):
        raise UserError(
            f"cluster secret {path} is not a swarm secret (expected {2 * SECRET_BYTES} hex "
            "characters); copy it again from the head PC or run `swarm init --force` there"
        )
    return text


def resolve_secret(insecure: bool) -> str | None:
    """The secret for a command, or ``None`` when the user passed ``--insecure``."""
    return None if insecure else read_secret()
