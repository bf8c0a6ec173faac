"""The state folder (``$SWARM_HOME``, default ``~/.swarm``) and the cluster secret in it.

Everything swarm keeps on a PC lives here: ``secret`` (mode 0600; every key of the swarm is
derived from it, see ``swarm.cluster.keys``), ``ca/`` (the head's certificate authority),
``tls/`` (this PC's node key and certificate), ``agent.json`` (where the local agent listens),
``cluster.json`` (the running swarm, written by ``swarm up`` / ``swarm join``), ``logs/``,
``offload/`` and ``ray/`` (Ray's session folders). The folder and every folder swarm makes in it
are mode 0700: nobody else on the PC can list, read or plant anything there.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

from swarm.errors import UserError

SECRET_BYTES = 32  # 256 bits, as Ray's own `ray get-auth-token --generate`
RAY_TEMP_DIR_MAX_CHARS = 40  # Ray's socket paths, about 64 bytes longer, must stay under 108


def swarm_home() -> Path:
    """The state folder: ``$SWARM_HOME`` if set, else ``~/.swarm``."""
    env = os.environ.get("SWARM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".swarm"


def secret_path() -> Path:
    """Where the cluster secret lives (whether or not it exists yet)."""
    return swarm_home() / "secret"


def private_dir(path: Path) -> Path:
    """``path`` as a folder that only this user can enter (mode 0700), made or tightened.

    Raises:
        UserError: ``path`` is a symbolic link or belongs to another user (someone may have
            made it first to read what swarm puts there).
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UserError(f"{path} is not a folder of this user (a link, or made by another user); remove it and run again")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def home_dir(*parts: str) -> Path:
    """A private folder inside ``$SWARM_HOME`` (``$SWARM_HOME`` itself without parts)."""
    private_dir(swarm_home())
    path = swarm_home().joinpath(*parts)
    return private_dir(path) if parts else path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by this user only (mode 0600).

    The file is made with O_EXCL and its mode at creation, so it is never readable by others,
    not even briefly, and a reader never sees half of it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def logs_dir() -> Path:
    """Folder for the logs of processes swarm starts (created on demand, private)."""
    return home_dir("logs")


def offload_dir() -> Path:
    """The default offload (NVMe) folder: ``$SWARM_OFFLOAD_DIR``, or ``$SWARM_HOME/offload``
    (made private here; a folder the user names is theirs to set up)."""
    env = os.environ.get("SWARM_OFFLOAD_DIR")
    return Path(env).expanduser() if env else home_dir("offload")


def ray_temp_dir() -> Path:
    """Ray's ``--temp-dir`` for this PC's node, inside a private folder (made here).

    Ray makes its session, logs and sockets folders mode 0777 on purpose (several users may
    share its default ``/tmp/ray``); swarm keeps all of them inside a 0700 folder of its own,
    so nobody else on the PC can reach them. That folder is ``$SWARM_HOME`` when the path is
    short enough: Ray puts Unix sockets about 64 bytes below its temp dir and the kernel refuses
    socket paths over 107 bytes. Otherwise it is ``/tmp/swarm-UID-HASH`` (the hash of
    ``$SWARM_HOME`` keeps two state folders on one PC, as the test hosts have, apart).
    """
    if len(str(swarm_home().absolute() / "ray")) <= RAY_TEMP_DIR_MAX_CHARS:
        return home_dir() / "ray"
    tag = hashlib.sha256(str(swarm_home().resolve()).encode()).hexdigest()[:8]
    return private_dir(Path("/tmp") / f"swarm-{os.getuid()}-{tag}") / "ray"


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
    home_dir()
    write_private(path, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
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
