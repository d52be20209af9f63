#!/usr/bin/env bash
# Installs the Python peers of the GeomLoss comparison into a virtual environment (outside CI):
# torch (CPU), geomloss 0.3.1, pykeops (KeOps CPU backend; compiles its kernels with the system
# C++ compiler at first use), safetensors, numpy.
#
#   VENV=~/.cache/candle-ot-geomloss ./scripts/geomloss-bench/setup.sh
set -euo pipefail
VENV="${VENV:-$HOME/.cache/candle-ot-geomloss}"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --upgrade pip
# The CPU-only torch wheel is much smaller; fall back to the PyPI wheel (runs on the CPU too).
python -m pip install torch --index-url https://download.pytorch.org/whl/cpu \
  || python -m pip install torch
python -m pip install "geomloss==0.3.1" numpy safetensors
python -m pip install pykeops || echo "pykeops did not install: the KeOps column will be skipped"
python -c "import torch, geomloss; print('torch', torch.__version__, 'geomloss', geomloss.__version__)"
