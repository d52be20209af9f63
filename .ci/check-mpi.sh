#!/usr/bin/env bash
# The sharded solve over MPI processes (#21, src/distributed/): installs Debian's OpenMPI and
# libclang (rsmpi generates its bindings with bindgen) when missing, lints candle-ot's `mpi`
# feature, and runs tests/mpi_sharded.rs under `mpirun -n 1, 2, 3` (--oversubscribe: 3 ranks on
# 2 cores). Every rank compares its rows of every case (each loss, p, debias, reach, f32 / f64,
# odd shards: a rank with one point, ranks with none) with the single-process solve and the
# run fails when any rank finds a mismatch. CHECK_MPI=0 skips.
# usage: bash .ci/check-mpi.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CHECK_MPI:-1}" = 0 ]; then echo "check-mpi: skipped (CHECK_MPI=0)"; exit 0; fi
t0=$(date +%s)
pkgs=(libopenmpi-dev openmpi-bin libclang-dev)
if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1 || ! command -v mpirun >/dev/null; then
  echo "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null; }
fi
echo "  $(mpirun --version | head -1)"

feats=(--features candle-ot/mpi,candle-ot-tests/mpi)
cargo clippy -p candle-ot -p candle-ot-tests "${feats[@]}" --all-targets -- -D warnings \
  || { echo "check-mpi: cargo clippy --features mpi FAILED"; exit 1; }
exe="$(cargo test -p candle-ot-tests "${feats[@]}" --test mpi_sharded --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"name":"mpi_sharded".*"executable":"\([^"]*\)".*/\1/p' | tail -1)"
[ -x "$exe" ] || { echo "check-mpi: no mpi_sharded executable"; exit 1; }
echo "  built $(basename "$exe") ($(( $(date +%s) - t0 )) s)"

# Open MPI refuses root unless told; CI containers run as root.
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
for n in 1 2 3; do
  timeout 600 mpirun -n "$n" --oversubscribe "$exe" \
    || { echo "check-mpi: mpirun -n $n FAILED"; exit 1; }
done
echo "check-mpi: ok ($(( $(date +%s) - t0 )) s)"
