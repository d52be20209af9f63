#!/usr/bin/env bash
# Barycenters side by side in one run, on the inputs of barycenter_inputs.py (4 images of 256²;
# 4 clouds of 10k uniform points in D = 3 and an initial support of 5k): candle-ot's
# `barycenter` command (f32, 2 threads), GeomLoss 0.3.1's ImagesBarycenter (f32) and POT 0.9.7
# (pot_barycenter.py: f64 numpy; capped runs, see its docstring). Prints every JSON line with
# the load average before each run.
#
#   VENV=~/.cache/candle-ot-geomloss OUT=/tmp/bary-sbs bash scripts/geomloss-bench/barycenter_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-$HOME/.cache/candle-ot-geomloss}"
OUT="${OUT:-/tmp/bary-sbs}"
PY="$VENV/bin/python"
BIN=target/release/candle-ot
mkdir -p "$OUT"
cargo build --release -p candle-ot-cli >/dev/null
"$PY" scripts/geomloss-bench/barycenter_inputs.py "$OUT"
"$PY" - "$OUT" <<'PYEOF'
import sys, numpy as np
d = sys.argv[1]
i = np.load(f"{d}/images.npy"); c = np.load(f"{d}/clouds.npy")
for k in range(4):
    np.save(f"{d}/img{k}.npy", i[k]); np.save(f"{d}/cloud{k}.npy", c[k])
PYEOF
IMGS=("$OUT"/img0.npy "$OUT"/img1.npy "$OUT"/img2.npy "$OUT"/img3.npy)
CLOUDS=("$OUT"/cloud0.npy "$OUT"/cloud1.npy "$OUT"/cloud2.npy "$OUT"/cloud3.npy)
run() { echo "load: $(cat /proc/loadavg)" >&2; "$@"; }
# Images: GeomLoss's defaults (blur one pixel, scaling_N 10). GeomLoss takes ~5 min: SKIP_GEOMLOSS=1
# skips it.
run $BIN barycenter "${IMGS[@]}" --grid 2 --out "$OUT/cot_geomloss.npy" --threads 2
[ -n "${SKIP_GEOMLOSS:-}" ] || run "$PY" scripts/geomloss-bench/geomloss_barycenter.py "$OUT"
# Images, converged debiased, blur 4 px (POT's case conv4; one pixel: POT's scalings overflow),
# 1000 iterations at most (the errors reached are in the JSON; a "not converged" warning is
# expected: the iteration is sublinear, see the guide).
run $BIN barycenter "${IMGS[@]}" --grid 2 --mode converged --blur 0.015625 --tol 1e-6 \
  --max-iter 1000 --out "$OUT/cot_conv4.npy" --threads 2
run $BIN barycenter "${IMGS[@]}" --grid 2 --mode converged --tol 1e-6 --max-iter 1000 \
  --out "$OUT/cot_conv1.npy" --threads 2
# Free support, debiased, blur 0.05, displacement 1e-3 (RMS).
run $BIN barycenter "${CLOUDS[@]}" --init "$OUT/support.npy" --blur 0.05 --tol 1e-3 \
  --out "$OUT/cot_free.npy" --threads 2
run $BIN barycenter "${CLOUDS[@]}" --init "$OUT/support.npy" --blur 0.05 --tol 1e-3 --no-debias \
  --out "$OUT/cot_free_biased.npy" --threads 2
# POT.
OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive run "$PY" scripts/geomloss-bench/pot_barycenter.py "$OUT"
echo "load after: $(cat /proc/loadavg)" >&2
