#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU needed):
#   1. nvcc -ptx for sm_80 and sm_90, all front-end warnings as errors; PTX .version <= 9.0
#      (what the CUDA 13.0 driver, 580, loads);
#   2. ptxas on that PTX (-v, warnings as errors, register spills fail), register use printed;
#   3. NVRTC on common.cuh + <file>.cu concatenated (as candle-ot-kernels ships the sources);
#   4. cargo clippy --features cuda --all-targets on the Rust crates, with the `nccl` features
#      (src/distributed/nccl.rs, the sharded example; cudarc's NCCL bindings: no NCCL needed)
#      (CHECK_CUDA_RUST=0 skips).
# The pinned CUDA 13.0 toolchain comes from PyPI into a venv under $HOME/.cache (reused).
# usage: bash .ci/check-cuda.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(bash .ci/cuda-toolchain.sh)"
echo "nvcc: $(nvcc --version | grep -o 'release [0-9.]*, V[0-9.]*')"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
fail=0
shopt -s nullglob
cus=(kernels/cuda/*.cu)
[ ${#cus[@]} -gt 0 ] || { echo "no .cu files under kernels/cuda" >&2; exit 1; }
for f in "${cus[@]}"; do
  n="$(basename "$f" .cu)"
  for arch in 80 90; do
    ptx="$out/$n.sm_$arch.ptx"
    if ! nvcc -ptx -arch="sm_$arch" -std=c++17 -Werror all-warnings -Ikernels/cuda "$f" -o "$ptx"; then
      echo "FAIL nvcc $f sm_$arch"; fail=1; continue
    fi
    ver="$(sed -n 's/^\.version \([0-9]*\.[0-9]*\).*/\1/p' "$ptx" | head -1)"
    if ! awk -v v="$ver" 'BEGIN { split(v, a, "."); exit !(a[1] < 9 || (a[1] == 9 && a[2] <= 0)) }'; then
      echo "FAIL $f sm_$arch: PTX .version $ver > 9.0 (driver 580 rejects it)"; fail=1
    fi
    log="$out/$n.sm_$arch.ptxas.log"
    if ! ptxas -arch="sm_$arch" -v -Werror --warn-on-spills "$ptx" -o "$out/$n.sm_$arch.cubin" 2>"$log"; then
      echo "FAIL ptxas $f sm_$arch:"; grep -Ev '^ptxas info' "$log" || true; fail=1
    fi
    # "Compiling entry function 'X'" / "N bytes stack frame, S bytes spill stores" / "Used R registers"
    summary="$(awk '
      /Compiling entry function/ { match($0, /function .[A-Za-z0-9_]+./); fn = substr($0, RSTART + 10, RLENGTH - 11) }
      /spill stores/ { match($0, /[0-9]+ bytes spill stores/); sp = substr($0, RSTART, RLENGTH) + 0 }
      /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15) + 0
        match($0, /[0-9]+ bytes smem/); sm = substr($0, RSTART, RLENGTH) + 0
        n++; if (r > rmax) { rmax = r; fmax = fn }; if (sp > 0) spills++
        printf "      %-36s regs %3d  smem %6d  spill %d\n", fn, r, sm, sp }
      END { printf "    %d kernels, max %d registers (%s), %d with spills\n", n, rmax, fmax, spills + 0 }' "$log")"
    echo "  $f sm_$arch: PTX .version $ver"
    if [ -n "${VERBOSE:-}" ]; then echo "$summary"; else echo "$summary" | tail -1; fi
  done
done
for arch in 80 90; do
  specs=()
  for f in "${cus[@]}"; do specs+=("$(basename "$f" .cu)=kernels/cuda/common.cuh+$f"); done
  LD_LIBRARY_PATH="$CUDA_TOOLKIT_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$CANDLE_OT_CUDA_VENV/bin/python" .ci/nvrtc_check.py "$CUDA_TOOLKIT_DIR/lib/libnvrtc.so.13" "$arch" "${specs[@]}" || fail=1
done
if [ "$fail" -ne 0 ]; then echo "check-cuda: FAILED"; exit 1; fi

# 4. The Rust `cuda_fwd` paths: clippy (a type check plus lints) of every crate and target with
#    the `cuda` feature. candle-kernels compiles its own kernels with this nvcc (CUDA_COMPUTE_CAP
#    from cuda-toolchain.sh); a separate target dir keeps the default build's artefacts intact.
if [ "${CHECK_CUDA_RUST:-1}" != 0 ]; then
  t0=$(date +%s)
  CARGO_TARGET_DIR="${CUDA_CHECK_TARGET_DIR:-$root/target/cuda-check}" \
    cargo clippy -p candle-ot -p candle-ot-cli -p candle-ot-tests -p candle-ot-examples \
      --features cuda,candle-ot/nccl,candle-ot-examples/nccl --all-targets -- -D warnings \
    || { echo "check-cuda: cargo clippy --features cuda,nccl FAILED"; exit 1; }
  echo "  cargo clippy --features cuda,nccl --all-targets: ok ($(( $(date +%s) - t0 )) s)"
fi
echo "check-cuda: ok"
