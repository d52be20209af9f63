#!/usr/bin/env bash
# Side-by-side CPU timing of GeomLoss 0.3.1 (tensorized, KeOps online) and candle-ot on the same
# points (see bench.py). Not part of CI: it installs PyTorch, GeomLoss and KeOps into a venv.
#
#   ./scripts/geomloss-bench/run.sh                      # N = M = 1k, 4k, 16k, 2 threads
#   ./scripts/geomloss-bench/run.sh --sizes 1000,4000    # any bench.py option
#
# VENV (default ~/.cache/candle-ot-geomloss) is created by setup.sh on first use. Time only on a
# quiet machine: the script prints the load average next to each run.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-$HOME/.cache/candle-ot-geomloss}"
[ -x "$VENV/bin/python" ] || VENV="$VENV" ./scripts/geomloss-bench/setup.sh
cargo build --release -p candle-ot-cli
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
"$VENV/bin/python" scripts/geomloss-bench/bench.py --candle-ot target/release/candle-ot "$@"
