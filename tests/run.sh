#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine (as root), then run it.
# Usage: bash tests/run.sh [pytest args...]    (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: libaio for DeepSpeed's NVMe offload, iproute2 for the network-namespace
# hosts, chromium + driver for the dashboard browser test, ninja/g++ for DeepSpeed's ops (and
# cmake for llama-cpp-python's build), systemd for `systemd-analyze verify` of the agent's unit file.
packages=(libaio-dev iproute2 chromium chromium-driver g++ ninja-build cmake systemd)
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
# llama.cpp computes the same on every machine the tests run on.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" python -m pip install -q -c launcher/constraints.txt -e ".[test,gguf,trackers]"
# llama.cpp's converters ship in llama-cpp-python's source only; fetched once into ~/.cache/swarm.
python -m swarm.export.llama_cpp

# DeepSpeed compiles its CPU ops on first use. Do it once here, with no test timeout
# running; a lock left by a build that was killed half-way would block every later build.
rm -f "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"/*/*/lock
DS_ACCELERATOR=cpu python tests/build_ops.py

exec python -m pytest -q -p no:cacheprovider --timeout=900 "$@" tests
