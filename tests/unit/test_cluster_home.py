"""The state folder and the secret: made private, refused when missing or exposed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.cli import main
from swarm.errors import UserError
from swarm.home import create_secret, private_dir, ray_temp_dir, read_secret, resolve_secret, secret_path, swarm_home


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_swarm_home_follows_the_variable(home, monkeypatch):
    assert swarm_home() == home
    monkeypatch.delenv("SWARM_HOME")
    assert swarm_home() == Path.home() / ".swarm"


def test_init_makes_a_private_random_secret(home, capsys):
    assert main(["init"]) == 0
    path = home / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    secret = read_secret()
    assert len(secret) == 64 and int(secret, 16)
    assert "scp" in capsys.readouterr().out
    create_secret(overwrite=True)
    assert read_secret() != secret


def test_init_adds_a_missing_ca_then_refuses_to_replace_the_secret(home, capsys):
    create_secret()
    secret = read_secret()
    assert main(["init"]) == 0  # a swarm made before the CA existed gets one; its secret stays
    assert "ca: " in capsys.readouterr().out and read_secret() == secret
    assert stat.S_IMODE((home / "ca" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "ca").stat().st_mode) == 0o700
    assert main(["init"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_secret_is_one_clear_line():
    with pytest.raises(UserError, match="no cluster secret at .*swarm init"):
        read_secret()
    assert resolve_secret(insecure=True) is None


def test_secret_readable_by_others_is_refused():
    create_secret()
    os.chmod(secret_path(), 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        read_secret()


def test_truncated_secret_is_refused():
    create_secret()
    secret_path().write_text("abc\n")
    with pytest.raises(UserError, match="not a swarm secret"):
        read_secret()


@pytest.mark.parametrize("argv", [["up"], ["down"], ["status"], ["join", "198.18.0.1"], ["agent"]])
def test_commands_refuse_to_run_without_the_secret(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no cluster secret") and err.count("\n") == 1 and "Traceback" not in err


def test_health_without_secret_exits_1():
    proc = subprocess.run([sys.executable, "-m", "swarm", "agent", "--health"], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 1
    assert "unhealthy: no cluster secret" in proc.stderr


def test_health_of_an_absent_agent_exits_1(capsys):
    create_secret()
    assert main(["agent", "--health", "--address", "127.0.0.1:1"]) == 1
    assert "no swarm agent answers at 127.0.0.1:1" in capsys.readouterr().err


def test_ray_temp_dir_is_inside_the_private_home_when_the_path_is_short(home, monkeypatch, tmp_path):
    short = Path("/tmp") / f"sw{os.getpid()}"
    monkeypatch.setenv("SWARM_HOME", str(short))
    try:
        assert ray_temp_dir() == short / "ray"
        assert stat.S_IMODE(short.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_ray_temp_dir_of_a_long_home_is_in_a_private_tmp_folder_per_home(home, monkeypatch):
    first = ray_temp_dir()  # pytest's tmp_path is too long for Ray's socket paths
    made = [first.parent]
    try:
        assert first.parent.parent == Path("/tmp") and first.name == "ray"
        assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700 and first.parent.stat().st_uid == os.getuid()
        # Ray's Unix sockets go ~64 bytes below the temp dir and must stay under 108 bytes.
        assert len(str(first)) <= 40
        monkeypatch.setenv("SWARM_HOME", str(home) + "2")
        made.append(ray_temp_dir().parent)
        assert made[1] != made[0]
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def test_private_dir_tightens_our_folder_and_refuses_a_planted_one(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    assert private_dir(mine) == mine and stat.S_IMODE(mine.stat().st_mode) == 0o700
    planted = tmp_path / "planted"
    planted.symlink_to(mine)
    with pytest.raises(UserError, match="not a folder of this user"):
        private_dir(planted)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a folder to another user needs root")
def test_private_dir_refuses_a_folder_another_user_made(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody
    with pytest.raises(UserError, match="made by another user"):
        private_dir(theirs)


def test_every_folder_swarm_makes_in_its_home_is_private(home):
    create_secret()
    from swarm.cluster import tls
    from swarm.home import logs_dir, offload_dir

    tls.create_ca()
    tls.node_key()
    logs_dir()
    offload_dir()
    folders = [home] + [p for p in home.rglob("*") if p.is_dir()]
    assert {p.name for p in folders} >= {"home", "ca", "tls", "logs", "offload"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in folders), {p.name: oct(p.stat().st_mode) for p in folders}
    files = [p for p in home.rglob("*") if p.is_file()]
    keys = [p for p in files if p.suffix == ".key" or p.name == "secret"]
    assert len(keys) == 3 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys)
