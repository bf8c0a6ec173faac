"""launcher/bootstrap.sh on a fresh HOME: a real venv, a real unit file, a real second run.

The install is real (pip, the pinned versions, swarm from a copy of this source tree); only
where the wheels come from is arranged for speed: a wheelhouse made once the way
docs/setup-cluster.md tells for offline PCs, then `--pip-args "--no-index
--find-links WHEELHOUSE"`, so no test run waits on the network after the first. The wheelhouse
lives in $SWARM_TEST_WHEELHOUSE or ~/.cache/swarm-tests/wheelhouse and refills itself when the
pins change.

The prerequisite checks fail before anything is installed, so those tests take a second each.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "launcher" / "bootstrap.sh"
CONSTRAINTS = REPO / "launcher" / "constraints.txt"
UNIT_NAME = "swarm-agent.service"

# The first run on a new machine fills the wheelhouse from the network (about 5 minutes on 2
# cores) before installing (under 2); more than the suite's default per-test limit.
pytestmark = pytest.mark.timeout(1800)


def copy_source(dest: Path) -> Path:
    """The files bootstrap.sh installs from, copied, so that edits made in the working tree
    while the tests run (other work in progress) cannot make the second run differ."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "swarm", dest / "swarm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "launcher", dest / "launcher")
    return dest


def clean_env(home: Path, path: str | None = None) -> dict[str, str]:
    """This process's environment with a fresh HOME and none of the settings bootstrap.sh reads."""
    # No XDG_RUNTIME_DIR or session bus either: the script must not reach (and change) the
    # real user's systemd manager from a test.
    drop = ("SWARM_", "XDG_", "DBUS_", "VIRTUAL_ENV", "PYTHONPATH", "PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    venv_bin = str(Path(sys.executable).parent)
    # Not the test venv's bin/ (its python3 and swarm would stand in for the system's).
    env["PATH"] = path or os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    env["HOME"] = str(home)
    return env


def bootstrap(home: Path, *args: str, path: str | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", str(BOOTSTRAP), *args],
        env=clean_env(home, path), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        cwd=REPO,  # where users start it; the script must not pick up anything from there
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_fails_cleanly(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit status 2, one `error:` line naming the problem, no traceback or shell noise."""
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = error_lines(result)
    for phrase in phrases:
        assert phrase in line, line
    other = [ln for ln in result.stderr.splitlines() if ln != line and not ln.startswith("warning: ")]
    assert not other, result.stderr


# ---- prerequisites: clear failures, nothing installed -------------------------------------


def fake_python(bin_dir: Path, version: str) -> Path:
    """A `python3` that answers every question with a version string, like an old interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "python3"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(0o755)
    return exe


def path_without(tmp_path: Path, *names: str) -> str:
    """A PATH with every command of /usr/local/bin, /usr/bin and /bin except those matching
    names (shell globs): links in one folder."""
    farm = tmp_path / "farm"
    farm.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for entry in sorted(Path(folder).iterdir()):
            if any(Path(entry.name).match(n) for n in names) or (farm / entry.name).exists():
                continue
            (farm / entry.name).symlink_to(entry)
    return str(farm)


@pytest.mark.parametrize("version", ["3.9.18", "3.13.0"])
def test_python_outside_the_supported_range_is_refused(tmp_path, version):
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    fake_python(bin_dir, version)
    result = bootstrap(home, "--no-service", path=f"{bin_dir}:{clean_env(home)['PATH']}")
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert_fails_cleanly(result, f"Python {version}", spec)
    assert not (home / ".swarm").exists()


def test_missing_python_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = bootstrap(home, path=path_without(tmp_path, "python*"))
    assert_fails_cleanly(result, "python3 not found", "--python")
    assert not (home / ".swarm").exists()


def test_missing_gpu_driver_is_refused_when_required(tmp_path):
    if Path("/usr/lib/wsl/lib/nvidia-smi").exists():
        pytest.skip("WSL2 with a GPU driver: nvidia-smi is found outside PATH")
    home = tmp_path / "home"
    home.mkdir()
    result = bootstrap(home, "--require-gpu", "--python", sys.executable, path=path_without(tmp_path, "nvidia-smi"))
    assert_fails_cleanly(result, "no working NVIDIA driver", "--require-gpu")
    assert not (home / ".swarm").exists()


# Every name a C++ compiler goes by on Debian, Fedora and with clang.
COMPILERS = ("c++", "*g++*", "clang++*")


def test_a_missing_compiler_is_refused_where_it_cannot_be_installed(tmp_path, monkeypatch):
    """No compiler, no apt-get, dnf or sudo: one line saying what is missing and why."""
    monkeypatch.delenv("CXX", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    path = path_without(tmp_path, *COMPILERS, "apt-get", "dnf", "sudo")
    # --min-disk-gb would stop it right after the checks, before anything is installed.
    result = bootstrap(home, "--python", sys.executable, "--min-disk-gb", "100000000", path=path)
    assert_fails_cleanly(result, "missing: a C++ compiler", "DeepSpeed compiles its CPU Adam and AIO ops on every PC")
    assert not (home / ".swarm").exists()


def fake_package_manager(bin_dir: Path, log: Path) -> None:
    """An apt-get whose install puts a c++ on PATH (and logs its arguments), and a sudo that runs
    what it is given, as a password-less sudo would."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$0 $*" >> {log}\n'
        f'[ "$1" = install ] && printf "#!/bin/sh\\n" > {bin_dir}/c++ && chmod 755 {bin_dir}/c++\nexit 0\n'
    )
    (bin_dir / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    for name in ("apt-get", "sudo"):
        (bin_dir / name).chmod(0o755)


def test_a_missing_compiler_is_installed_with_the_package_manager(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "apt.log"
    fake_package_manager(tmp_path / "bin", log)
    path = f"{tmp_path / 'bin'}:{path_without(tmp_path, *COMPILERS, 'apt-get', 'dnf', 'sudo')}"
    result = bootstrap(home, "--python", sys.executable, "--min-disk-gb", "100000000", path=path)
    # Only what is missing (this Python has its headers), then the checks go on.
    assert log.read_text() == f"{tmp_path / 'bin' / 'apt-get'} install -y g++\n"
    assert "changed: installed g++ (apt-get), for DeepSpeed's ops" in result.stdout
    assert_fails_cleanly(result, "GB free")
    again = bootstrap(home, "--python", sys.executable, "--min-disk-gb", "100000000", path=path)
    assert f"ok: C++ compiler ({tmp_path / 'bin' / 'c++'}) and Python" in again.stdout
    assert log.read_text().count("install") == 1


def fake_nvidia_smi(bin_dir: Path, working: bool = True) -> None:
    """An nvidia-smi that answers like a driver 580 with two GPUs, or fails like one whose
    kernel module is not loaded."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    if working:
        exe.write_text(
            "#!/bin/sh\n"
            'case "$1" in --query-gpu=*) printf "NVIDIA GeForce RTX 4090, 580.65.06\\nNVIDIA GeForce RTX 3090, 580.65.06\\n";;\n'
            '*) echo "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0 |";; esac\n'
        )
    else:
        exe.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n")
    exe.chmod(0o755)


def test_gpus_and_driver_are_reported(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    fake_nvidia_smi(tmp_path / "bin")
    # --min-disk-gb stops it right after the checks, before anything is installed.
    result = bootstrap(home, "--require-gpu", "--python", sys.executable, "--min-disk-gb", "100000000",
                       path=f"{tmp_path / 'bin'}:{clean_env(home)['PATH']}")
    assert "ok: NVIDIA driver: NVIDIA GeForce RTX 4090, 580.65.06; NVIDIA GeForce RTX 3090, 580.65.06 (CUDA 13.0)" in result.stdout
    assert_fails_cleanly(result, "GB free")


def test_a_driver_that_does_not_answer_is_refused_when_required(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    fake_nvidia_smi(tmp_path / "bin", working=False)
    result = bootstrap(home, "--require-gpu", "--python", sys.executable, path=f"{tmp_path / 'bin'}:{clean_env(home)['PATH']}")
    assert_fails_cleanly(result, "no working NVIDIA driver (nvidia-smi failed)")


def test_too_little_disk_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = bootstrap(home, "--python", sys.executable, "--min-disk-gb", "100000000", "--no-service")
    assert_fails_cleanly(result, "GB free", "100000000 GB")
    assert not (home / ".swarm").exists()


def test_a_folder_that_is_not_swarm_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = bootstrap(home, "--source", str(tmp_path), "--python", sys.executable)
    assert_fails_cleanly(result, "not a swarm source tree", "--source")


def test_a_folder_that_is_not_a_venv_is_not_used(tmp_path):
    home = tmp_path / "home"
    (home / "stuff").mkdir(parents=True)
    (home / "stuff" / "notes.txt").write_text("mine\n")
    result = bootstrap(home, "--venv", str(home / "stuff"), "--python", sys.executable, "--min-disk-gb", "0")
    assert_fails_cleanly(result, "is not a virtual environment", "--venv")
    assert [p.name for p in (home / "stuff").iterdir()] == ["notes.txt"]
    assert not (home / ".swarm").exists()


# ---- a real install ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return copy_source(tmp_path_factory.mktemp("src") / "swarm-src")


@pytest.fixture(scope="module")
def wheelhouse(source) -> Path:
    """Wheels of torch and every pinned dependency (docs/setup-cluster.md, offline PCs)."""
    folder = Path(os.environ.get("SWARM_TEST_WHEELHOUSE") or Path.home() / ".cache" / "swarm-tests" / "wheelhouse")
    folder.mkdir(parents=True, exist_ok=True)
    build = tomllib.loads((source / "pyproject.toml").read_text())["build-system"]["requires"]
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder),
           "--constraint", str(source / "launcher" / "constraints.txt"), "torch", *build, str(source)]
    start = time.monotonic()
    offline = subprocess.run([*cmd, "--no-index", "--find-links", str(folder)], capture_output=True, text=True)
    if offline.returncode != 0:  # first run, or the pins changed: fetch what is missing
        subprocess.run(cmd, check=True, timeout=1800)
    print(f"\nwheelhouse {folder}: ready in {time.monotonic() - start:.0f} s")
    for stale in folder.glob("swarm_train-*.whl"):  # the copy under test is installed from source
        stale.unlink()
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory, source, wheelhouse):
    """One bootstrap run on a fresh HOME; the tests below read what it left."""
    home = tmp_path_factory.mktemp("home")
    # --no-compile: byte-compiling torch and friends is most of an install's time on 2 cores;
    # Python compiles what it imports on first use instead.
    args = ("--source", str(source), "--python", sys.executable,
            "--pip-args", f"--no-index --find-links {wheelhouse} --quiet --no-compile")
    start = time.monotonic()
    result = bootstrap(home, *args)
    seconds = time.monotonic() - start
    print(f"\nfirst bootstrap run: {seconds:.0f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    return {"home": home, "args": args, "result": result, "venv": home / ".swarm" / "venv",
            "unit": home / ".config" / "systemd" / "user" / UNIT_NAME}


@pytest.mark.integration
def test_first_run_installs_a_working_swarm(installed, source):
    venv, out = installed["venv"], installed["result"].stdout
    want = re.search(r'__version__ = "([^"]+)"', (source / "swarm" / "__init__.py").read_text()).group(1)
    version = subprocess.run([venv / "bin" / "swarm", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"swarm {want}"
    assert f"changed: installed swarm {want} into {venv}" in out
    assert "changed: created virtual environment" in out
    link = installed["home"] / ".local" / "bin" / "swarm"
    assert link.is_symlink() and link.resolve() == (venv / "bin" / "swarm").resolve()
    assert "next: on the head PC run 'swarm init'" in out  # no secret yet
    assert stat.S_IMODE((installed["home"] / ".swarm").stat().st_mode) == 0o700  # the secret goes there


@pytest.mark.integration
def test_the_venv_has_exactly_the_pinned_versions(installed):
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    script = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: m.version(n).split('+')[0] for n in sys.argv[1:]}))"
    )
    result = subprocess.run([installed["venv"] / "bin" / "python", "-c", script, *pins],
                            capture_output=True, text=True, check=True, cwd=installed["home"])
    assert json.loads(result.stdout) == pins


def unit_file(installed) -> configparser.ConfigParser:
    # strict=False: systemd allows a key to repeat (Environment=), configparser keeps the last.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(installed["unit"])
    return parser


@pytest.mark.integration
def test_unit_file_runs_the_venv_agent(installed):
    unit = unit_file(installed)
    argv = shlex.split(unit["Service"]["ExecStart"])
    exe = Path(argv[0])
    assert exe == installed["venv"] / "bin" / "swarm" and os.access(exe, os.X_OK)
    assert argv[1] == "agent"
    assert unit["Service"]["Environment"] == f"SWARM_HOME={installed['home'] / '.swarm'}"
    assert unit["Install"]["WantedBy"] == "default.target"
    # The agent's own flags survive the rewrite of the command.
    template = configparser.ConfigParser(strict=False, interpolation=None)
    template.read(REPO / "launcher" / UNIT_NAME)
    assert argv[1:] == shlex.split(template["Service"]["ExecStart"])[1:]
    # Without a user manager (none is reachable from the tests) it says how to start it by hand.
    out = installed["result"].stdout
    assert f"systemd --user is not available here; start the agent yourself with: {exe} agent" in out


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_file_passes_systemd_analyze(installed, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**clean_env(installed["home"]), "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run(["systemd-analyze", "--user", "verify", str(installed["unit"])],
                            env=env, capture_output=True, text=True)
    # verify exits 0 on mere warnings (unknown keys, bad values), so its output must be empty.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            st = path.lstat()
            out[str(path)] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.mark.integration
def test_second_run_changes_nothing(installed):
    home = installed["home"]
    watched = (installed["venv"], installed["unit"], home / ".local" / "bin" / "swarm")
    before = snapshot(*watched)
    start = time.monotonic()
    result = bootstrap(home, *installed["args"], timeout=300)
    print(f"\nsecond bootstrap run: {time.monotonic() - start:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing to do" in result.stdout
    assert not [ln for ln in result.stdout.splitlines() if ln.startswith("changed: ")], result.stdout
    assert snapshot(*watched) == before


@pytest.mark.integration
def test_a_changed_source_or_unit_is_redone(installed, source):
    # Runs after the test above (file order): the run that follows an edit redoes exactly it.
    home = installed["home"]
    marker = "# edited by test_bootstrap"
    (source / "swarm" / "errors.py").write_text((source / "swarm" / "errors.py").read_text() + f"\n{marker}\n")
    installed["unit"].write_text(installed["unit"].read_text().replace("Restart=", "#Restart="))
    result = bootstrap(home, *installed["args"], timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    changed = [ln for ln in result.stdout.splitlines() if ln.startswith("changed: ")]
    assert any(ln.startswith("changed: installed swarm") for ln in changed), changed
    assert f"changed: wrote {installed['unit']}" in changed
    site = subprocess.run([installed["venv"] / "bin" / "python", "-c", "import swarm.errors as e; print(e.__file__)"],
                          capture_output=True, text=True, check=True, cwd=installed["home"]).stdout.strip()
    assert site.startswith(str(installed["venv"]))
    assert marker in Path(site).read_text()
    assert "#Restart=" not in installed["unit"].read_text()
