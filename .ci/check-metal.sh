#!/usr/bin/env bash
# Linux-side checks of the Metal kernels (no Metal compiler exists on Linux; see .ci/metal/README.md):
#   1. syntax / type check of every kernels/metal/*.metal (alone, and with common.metal prepended
#      as candle-ot-kernels ships them) as C++17 against the MSL shim .ci/metal/metal_stdlib,
#      with no libc / libstdc++ headers (-nostdinc -nostdinc++), warnings as errors;
#   2. CPU execution: .ci/metal/harness.cpp runs every kernel with one std::thread per Metal
#      thread and real barriers, against a float64 reference; built twice (default tiles, and
#      OT_TILE=8 / OT_TILE_ELEMS=64 so that every case streams several tiles and passes);
#   3. the same harness under ThreadSanitizer on a reduced set (missing barriers = data races).
#      Skip with CHECK_METAL_TSAN=0;
#   4. .ci/check-metal-rust.sh: clippy of the Rust Metal glue (`--features metal`) against
#      Candle's Metal backend, with objc2-metal patched for Linux. Skip with CHECK_METAL_RUST=0.
# Needs clang++ (the shim uses clang's ext_vector_type, so g++ cannot stand in); installs
# clang-19 (or Debian's default clang) with apt-get when no clang++ is found.
# usage: bash .ci/check-metal.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

cxx=""
for c in clang++-19 clang++ clang++-20 clang++-18 clang++-17 clang++-16; do
  if command -v "$c" >/dev/null 2>&1; then cxx="$c"; break; fi
done
if [ -z "$cxx" ]; then
  echo "clang++ not found: installing clang with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq clang-19 >&2 || apt-get install -y -qq clang >&2
  for c in clang++-19 clang++; do
    if command -v "$c" >/dev/null 2>&1; then cxx="$c"; break; fi
  done
fi
[ -n "$cxx" ] || { echo "check-metal: no clang++ available" >&2; exit 1; }
echo "compiler: $cxx ($("$cxx" --version | head -1))"

shopt -s nullglob
metals=(kernels/metal/*.metal)
[ ${#metals[@]} -gt 0 ] || { echo "no .metal files under kernels/metal" >&2; exit 1; }
syntax=(-std=c++17 -fsyntax-only -nostdinc -nostdinc++ -Wall -Wextra -Werror -Wno-unknown-attributes -I.ci/metal)

echo "[1/4] syntax check against the MSL shim"
for f in "${metals[@]}"; do
  "$cxx" "${syntax[@]}" -Ikernels/metal -x c++ "$f"
  if [ "$(basename "$f")" != common.metal ]; then  # the shipped form: common.metal + file
    cat kernels/metal/common.metal "$f" | "$cxx" "${syntax[@]}" -x c++ -
  fi
  echo "  ok $f"
done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
emu=(-std=c++20 -O1 -pthread -Wall -Wextra -Werror -Wno-unknown-attributes -DMETAL_SHIM_EMULATE
     -I.ci/metal -Ikernels/metal .ci/metal/harness.cpp)

echo "[2/4] CPU execution harness vs float64 reference"
"$cxx" "${emu[@]}" -o "$out/harness" & c1=$!
"$cxx" "${emu[@]}" -DOT_TILE=8u -DOT_TILE_ELEMS=64u -o "$out/harness_small" & c2=$!
wait $c1 || { echo "check-metal: harness build failed"; exit 1; }
wait $c2 || { echo "check-metal: harness build failed (small tiles)"; exit 1; }
fail=0
"$out/harness" > "$out/default.log" 2>&1 & p1=$!
"$out/harness_small" > "$out/small.log" 2>&1 & p2=$!
wait $p1 || fail=1
wait $p2 || fail=1
grep -E "FAIL" "$out/default.log" "$out/small.log" | head -20 || true
tail -1 "$out/default.log"; tail -1 "$out/small.log"

if [ "${CHECK_METAL_TSAN:-1}" != 0 ]; then
  echo "[3/4] harness under ThreadSanitizer (reduced set, small tiles)"
  "$cxx" "${emu[@]}" -g -fsanitize=thread -DOT_TILE=8u -DOT_TILE_ELEMS=64u -o "$out/harness_tsan"
  if ! HARNESS_QUICK=1 TSAN_OPTIONS="halt_on_error=1 exitcode=66" "$out/harness_tsan" > "$out/tsan.log" 2>&1; then
    fail=1; grep -E -m5 -A12 "ThreadSanitizer|FAIL" "$out/tsan.log" || tail -20 "$out/tsan.log"
  fi
  tail -1 "$out/tsan.log"
else
  echo "[3/4] ThreadSanitizer run skipped (CHECK_METAL_TSAN=0)"
fi

if [ "${CHECK_METAL_RUST:-1}" != 0 ]; then
  echo "[4/4] Rust Metal glue type-checked on Linux: cargo ${METAL_CHECK_TOOL:-clippy} --workspace --features metal (.ci/check-metal-rust.sh)"
  t0=$(date +%s)
  if ! bash .ci/check-metal-rust.sh > "$out/rust.log" 2>&1; then
    fail=1; grep -v -E '^ +(Compiling|Checking) ' "$out/rust.log" | tail -60
  else
    grep -E '^(\+ cargo|objc2-metal| +Finished|check-metal-rust)' "$out/rust.log"
  fi
  echo "  ($(( $(date +%s) - t0 ))s)"
else
  echo "[4/4] Rust Metal glue check skipped (CHECK_METAL_RUST=0)"
fi

if [ "$fail" -ne 0 ]; then echo "check-metal: FAILED"; exit 1; fi
echo "check-metal: ok"
