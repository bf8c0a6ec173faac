#!/usr/bin/env bash
# The GPU check (see tests/gpu/check.py), sized for a short lease of a GPU machine.
#
# On a machine with an NVIDIA GPU: installs the wheels carried in .whl/ (the lent machine
# reaches no registry; see tests/gpu/README.md for how to fetch them), then runs the cases in
# order of value: swarm's collectives in a one-rank NCCL group, 8B and 70B layer slices'
# peak memory against the plan, and a Qwen2.5-0.5B-shaped model trained with ZeRO-3 QLoRA and
# CPU, then NVMe, offload on a card capped to 16 GiB (tokens/s and peak beside the plan's).
# Without a GPU it prints one line and exits 0.
#
#   bash tests/gpu/run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-tests/gpu/out}}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu check: no NVIDIA GPU on this machine; nothing to check"
  exit 0
fi
python=python3
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export SWARM_GPU_MEMORY_GB="${SWARM_GPU_MEMORY_GB:-16}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec timeout 450 $python tests/gpu/check.py --out "$out" "${@:2}"
