#!/usr/bin/env bash
# GeomLoss 0.3.1's grid code and candle-ot's ImagesLoss on the same densities, in one run:
# f32, p = 2, blur one pixel, scaling 0.9, debiased loss + gradient w.r.t. a, and the potentials.
# GeomLoss: scripts/geomloss-bench/grid.py (KeOps CPU, 2 threads); candle-ot: `candle-ot bench
# --grid … --load-npy` on the inputs grid.py saved. Prints both JSON reports with the load.
#
#   VENV=~/.cache/candle-ot-geomloss OUT=/tmp/grid-sbs bash scripts/geomloss-bench/grid_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-$HOME/.cache/candle-ot-geomloss}"
OUT="${OUT:-/tmp/grid-sbs}"
SIZES="${SIZES:-256,512}"
VOL="${VOL:-64}"
REPEAT="${REPEAT:-1}"
mkdir -p "$OUT/inputs"
cargo build --release -p candle-ot-cli >/dev/null
echo "load before: $(cat /proc/loadavg)"
"$VENV/bin/python" scripts/geomloss-bench/grid.py --sizes "$SIZES" --vol "$VOL" --repeat "$REPEAT" \
  --json "$OUT/geomloss.json" --save-inputs "$OUT/inputs"
for f in "$OUT"/inputs/*_a.npy; do
  case_name="$(basename "$f" _a.npy)"
  shape="$("$VENV/bin/python" -c "import numpy as n; print('x'.join(map(str, n.load('$f').shape[1:])))")"
  echo "load before candle-ot $case_name: $(cat /proc/loadavg)"
  target/release/candle-ot bench --grid "$shape" --load-npy "$f" "$OUT/inputs/${case_name}_b.npy" \
    --repeat 3 --json | tee "$OUT/candle-ot_${case_name}.json"
done
echo "load after: $(cat /proc/loadavg)"
