#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine (as root), then run it.
# Usage: bash tests/run.sh [pytest args...]    (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: libaio for DeepSpeed's NVMe offload, iproute2 for the network-namespace
# hosts, chromium + driver for the dashboard browser test, ninja/g++ for DeepSpeed's ops (and
# cmake for llama-cpp-python's build), systemd for `systemd-analyze verify` of the agent's unit
# file, nftables for `swarm firewall` (the lab applies it on its PCs).
packages=(libaio-dev iproute2 chromium chromium-driver g++ ninja-build cmake systemd nftables)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The exact versions every node installs (launcher/constraints.txt), so CI tests what users
# get. torch first: on this kind of machine torch==2.13.0 is a CPU build on local disk,
# where a plain `pip install torch` would pull a multi-GB CUDA build.
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c launcher/constraints.txt torch
# The gguf extra builds llama-cpp-python from source (minutes, once: pip keeps the wheel).
# GGML_NATIVE=OFF: a build for any x86-64 CPU with AVX2, not for this one's extensions, so
# llama.cpp computes the same on every machine the tests run on (a native build made on an
# Intel Xeon with AMX segfaulted on quantized GGUFs there: docs/export.md).
portable="-DGGML_NATIVE=OFF"  # swarm.export.llama_build.PORTABLE_CMAKE_ARGS
CMAKE_ARGS="${CMAKE_ARGS:-$portable}" python -m pip install -q -c launcher/constraints.txt -e ".[test,gguf,trackers]"
# pip keys its wheel cache on the version alone: a native wheel of the pinned version built on
# this machine before is reused whatever CMAKE_ARGS says. Check what is installed; rebuild
# without the cache when it is not the portable build (the check's line says which it is).
if ! python -m swarm.export.llama_build; then
  version=$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
  CMAKE_ARGS="${CMAKE_ARGS:-} $portable" python -m pip install -q --no-cache-dir --force-reinstall --no-deps \
    "llama-cpp-python==$version"
  python -m swarm.export.llama_build  # must say portable now; set -e stops here otherwise
fi
# llama.cpp's converters ship in llama-cpp-python's source only; fetched once into ~/.cache/swarm.
python -m swarm.export.llama_cpp

# DeepSpeed compiles its CPU ops on first use. Do it once here, with no test timeout
# running; a lock left by a build that was killed half-way would block every later build.
rm -f "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"/*/*/lock
DS_ACCELERATOR=cpu python tests/build_ops.py

# No path: pyproject's testpaths (tests/) when none is given, only the named files otherwise.
# --durations: the slowest tests in every log, to keep the suite near its 30 minutes.
exec python -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 "$@"
