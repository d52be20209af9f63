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

# The launcher: `mpirun -n 2 candle-ot bench --sharded --json` prints one line (rank 0's), with
# "ranks": 2 and the loss of the one-process `bench` (f64, 1e-12).
cli="$(cargo build -p candle-ot-cli --features mpi --profile test --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*\/candle-ot\)".*/\1/p' | tail -1)"
[ -x "$cli" ] || { echo "check-mpi: no candle-ot executable"; exit 1; }
args=(bench --n 300 --m 200 --dtype f64 --grad --reps 1 --warmup 0 --json --threads 1)
one="$("$cli" "${args[@]}")"
two="$(timeout 300 mpirun -n 2 --oversubscribe "$cli" "${args[@]}" --sharded)"
python3 - "$one" "$two" <<'PY' || { echo "check-mpi: bench --sharded FAILED"; exit 1; }
import json, sys
one, out = json.loads(sys.argv[1]), sys.argv[2].strip().splitlines()
assert len(out) == 1, f"one line from rank 0 only, got {out}"
two = json.loads(out[0])
assert two["ranks"] == 2 and "ranks" not in one, (one, two)
assert abs(two["loss"] - one["loss"]) <= 1e-12 * abs(one["loss"]), (one["loss"], two["loss"])
assert two["pairs"] == one["pairs"] and two["softmin_passes"] == one["softmin_passes"]
print(f"  bench --sharded on 2 ranks: loss {two['loss']:.15e} = bench's {one['loss']:.15e}")
PY
echo "check-mpi: ok ($(( $(date +%s) - t0 )) s)"
