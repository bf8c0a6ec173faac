"""Which CPUs the installed llama-cpp-python's native code was built for, and whether that is every x86-64 CPU.

pip builds llama-cpp-python from source with ``-march=native``: the library then uses every
instruction set of the CPU that built it (AVX-512, AMX, ...). Such a build crashes on a CPU
without them, and one built natively on an Intel Xeon with AMX segfaulted at the first
evaluation of a quantized GGUF of a real model there too (docs/export.md). The portable build,
``CMAKE_ARGS="-DGGML_NATIVE=OFF"``, uses llama.cpp's x86-64 baseline (AVX2, FMA, F16C, BMI2).
pip keys its wheel cache on the version alone, so asking for the portable build is not enough
where a native wheel of the same version was built before: this module checks what is
installed, and ``tests/run.sh``, the Docker image and a user can act on the answer.

Two signals, both recorded at build time:

- ``ggml-config.cmake``, which the wheel installs (``lib/cmake/ggml``), records the CMake
  options: ``GGML_NATIVE`` and each instruction-set switch.
- ``llama_print_system_info()`` lists the instruction sets compiled in (``#if defined(__AVX512F__)``
  and so on, not what the running CPU has). It runs llama.cpp's CPU initialisation, which a
  build for another CPU may not survive, so it is asked in a child process.

llama.cpp's other portable route, one library per CPU variant chosen at run time
(``GGML_BACKEND_DL`` with ``GGML_CPU_ALL_VARIANTS``), does not work with llama-cpp-python
0.3.36: its CMake file installs only the ``ggml-cpu`` target, not the ``ggml-cpu-*`` variants,
and ggml looks for them beside the Python executable and in the current folder, not in
``llama_cpp/lib``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llama-cpp-python"
# The portable build: llama.cpp's own x86-64 baseline instead of the building CPU's extensions.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"
# What the portable build compiles in on x86-64 (ggml's CMakeLists: on when GGML_NATIVE is off).
BASELINE = frozenset({"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"})
# Instruction sets llama_print_system_info reports that many x86-64 CPUs lack (desktop CPUs
# without AVX-512, everything but recent Xeons without AMX).
BEYOND_BASELINE = frozenset({"AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8"})
# The CMake switches of those (GGML_AMX_* have no system_info name of their own but AMX_INT8).
BEYOND_OPTIONS = ("GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
                  "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

_SYSTEM_INFO = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"


@dataclass(frozen=True)
class Verdict:
    """Whether a build runs on every x86-64 CPU with AVX2, and the evidence, in one line."""

    portable: bool
    reason: str


def install_command(spec: str = "'swarm-train[gguf]'", *, force: bool = False) -> str:
    """The pip line that installs ``spec`` with the portable build, bypassing pip's wheel cache."""
    extra = " --force-reinstall --no-deps" if force else ""
    return f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --no-cache-dir{extra} {spec}'


def parse_system_info(text: str) -> set[str]:
    """The features ``llama_print_system_info()`` reports as compiled in (``NAME = 1``) for the CPU backend."""
    features: set[str] = set()
    for section in re.split(r"(?:^|\s)(?=[A-Za-z][\w-]* : )", text):
        name, _, rest = section.partition(" : ")
        if name.strip() != "CPU":
            continue
        for item in rest.split("|"):
            key, _, value = item.partition("=")
            if value.strip() == "1":
                features.add(key.strip())
    return features


def parse_cmake_config(text: str) -> dict[str, str]:
    """The ``set(GGML_... "VALUE")`` options recorded in ``ggml-config.cmake``."""
    return dict(re.findall(r'^\s*set\((GGML_\w+)\s+"([^"]*)"\)', text, re.M))


def judge(features: set[str] | None, options: dict[str, str] | None) -> Verdict:
    """Whether a build with these compiled-in ``features`` and CMake ``options`` runs on every AVX2 CPU.

    Either may be None (not found). ``GGML_NATIVE=ON`` decides alone: ``-march=native`` also
    uses instructions ggml does not report, so a native build on an AVX2-only CPU is no more
    portable than one on a Xeon. Otherwise any instruction set beyond the baseline, in either
    signal, makes the build CPU-specific (AVX-512 switched on by hand, for instance).
    """
    if features is None and options is None:
        return Verdict(False, "neither ggml-config.cmake nor llama_print_system_info() says what it was built for")
    options = options or {}

    def on(name: str) -> bool:
        return options.get(name, "").upper() in ("ON", "1", "TRUE", "YES")  # CMake's spellings of true

    extra = sorted((features or set()) & BEYOND_BASELINE)
    switched = [name for name in BEYOND_OPTIONS if on(name)]
    shown = " ".join(sorted(f for f in (features or set()) if f in BASELINE | BEYOND_BASELINE)) or "none reported"
    evidence = f"GGML_NATIVE={options.get('GGML_NATIVE', '?')}, x86 features compiled in: {shown}"
    if on("GGML_NATIVE"):
        return Verdict(False, f"built for the CPU that built it (-march=native; {evidence})")
    if extra or switched:
        return Verdict(False, f"built with {', '.join(extra or switched)}, which many CPUs lack ({evidence})")
    if "GGML_NATIVE" not in options:  # a native build on an AVX2-only CPU reports the baseline too
        return Verdict(False, f"of unknown target: no GGML_NATIVE record in ggml-config.cmake ({evidence})")
    return Verdict(True, f"portable ({evidence})")


def installed_version() -> str | None:
    """The installed llama-cpp-python version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def installed_options() -> dict[str, str] | None:
    """The CMake options of the installed build, from the ``ggml-config.cmake`` its wheel installed."""
    from importlib.metadata import distribution

    for file in distribution(PACKAGE).files or []:
        if file.as_posix().endswith("cmake/ggml/ggml-config.cmake"):
            path = Path(file.locate())
            if path.is_file():
                return parse_cmake_config(path.read_text(errors="replace"))
    return None


def installed_features(timeout: float = 120) -> tuple[set[str] | None, str]:
    """The compiled-in features of the installed build, asked in a child process; and how that went."""
    try:
        result = subprocess.run([sys.executable, "-c", _SYSTEM_INFO], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"llama_print_system_info() did not answer in {timeout:g} s"
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        return None, f"loading llama.cpp died with {name}: built for another CPU"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        return None, f"importing llama_cpp failed: {lines[-1]}"
    return parse_system_info(result.stdout), "ok"


def check() -> Verdict:
    """The verdict on the installed build (a child process asks llama.cpp).

    Raises:
        ModuleNotFoundError: llama-cpp-python is not installed.
    """
    if installed_version() is None:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed")
    features, how = installed_features()
    if features is None and how.startswith("loading"):
        return Verdict(False, how)  # it cannot even start here: no need to read more
    verdict = judge(features, installed_options())
    return verdict if features is not None else Verdict(False, f"{verdict.reason}; {how}")


def main() -> int:
    """``python -m swarm.export.llama_build``: one line; exit 0 portable, 1 not, 2 not installed."""
    version = installed_version()
    if version is None:
        print(f"error: {PACKAGE} is not installed; install the portable build with: {install_command()}", file=sys.stderr)
        return 2
    verdict = check()
    if verdict.portable:
        print(f"llama.cpp build: {PACKAGE} {version} is {verdict.reason}")
        return 0
    print(f"llama.cpp build: {PACKAGE} {version} is not portable: {verdict.reason}; "
          f"rebuild with: {install_command(f'{PACKAGE}=={version}', force=True)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
