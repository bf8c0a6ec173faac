"""The state folder and the secret: made private, refused when missing or exposed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.cli import main
from swarm.errors import UserError
from swarm.home import create_secret, ray_temp_dir, read_secret, resolve_secret, secret_path, swarm_home


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SWARM_RAY_TEMP_DIR", raising=False)
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


def test_init_refuses_to_replace_a_secret(capsys):
    create_secret()
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


def test_ray_temp_dir_is_short_and_differs_per_home(home, monkeypatch):
    first = ray_temp_dir()
    monkeypatch.setenv("SWARM_HOME", str(home) + "2")
    assert ray_temp_dir() != first
    # Ray's Unix sockets go ~70 bytes below the temp dir and must stay under 108 bytes.
    assert len(str(first)) < 36
