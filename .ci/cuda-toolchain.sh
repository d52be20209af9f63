#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler toolchain from PyPI into a venv (no GPU needed) and prints the
# environment to use it. Every wheel is pinned: an unpinned nvidia-nvvm pulls a newer backend whose
# PTX (.version 9.5 for 13.5) a driver 580 (CUDA 13.0) cannot load.
# usage: eval "$(bash .ci/cuda-toolchain.sh [VENV_DIR])"
# (adapted from the shared tools/cuda-toolchain.sh; python3-venv is installed when missing)
set -euo pipefail
venv="${1:-$HOME/.cache/candle-ot/cuda-13.0-venv}"
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88)
stamp="$venv/.candle-ot-pins"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "python3-venv missing: apt-get install -y python3-venv" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2 \
      || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2; }
  fi
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}" >&2
  echo "${pins[*]}" > "$stamp"
fi
cu="$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13)"
echo "export CUDA_TOOLKIT_DIR='$cu'"
echo "export CANDLE_OT_CUDA_VENV='$venv'"
echo "export PATH='$cu/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-80}"
