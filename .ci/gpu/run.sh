#!/usr/bin/env bash
# On a GPU machine (repository root, gpu-carry/ from .ci/gpu/build.sh): runs the CUDA tests and
# the CUDA benchmarks of issue #5, writing logs and JSON to ${OUT:-gpu-out}.
set -uo pipefail
out="${OUT:-gpu-out}"; mkdir -p "$out"
# The real CUDA libraries: the driver's libcuda, and NVRTC / cuBLAS / cuRAND wherever they are.
libs=$(dirname $(ldconfig -p | awk '/libcuda.so.1|libnvrtc.so|libcublas.so|libcurand.so/ {print $NF}') 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
nvidia-smi | tee "$out/nvidia-smi.txt"
for t in gpu-carry/test-*; do
  echo "== $t"; "$t" --test-threads=1 2>&1 | tee "$out/$(basename "$t").log" | tail -30
done
bench() { gpu-carry/candle-ot bench --device cuda --json "$@"; }
{
  for n in 10000 100000 1000000; do
    echo "softmin n=$n $(bench --op softmin --n $n --m $n --d 3 --reps 5)"
  done
  for n in 10000 100000; do
    echo "loss+grad n=$n $(bench --grad --n $n --m $n --d 3 --reps 3)"
  done
  echo "loss+grad n=1000000 $(bench --grad --n 1000000 --m 1000000 --d 3 --reps 1 --warmup 0)"
} 2>&1 | tee "$out/bench.txt"
