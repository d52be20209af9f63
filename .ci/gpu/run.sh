#!/usr/bin/env bash
# On a GPU machine (repository root, gpu-carry/ from .ci/gpu/build.sh): runs the CUDA tests and
# the CUDA benchmarks of issue #5, writing logs and JSON to ${OUT:-gpu-out}.
set -uo pipefail
out="${OUT:-gpu-out}"; mkdir -p "$out"
# The real CUDA libraries: the driver's libcuda (ldconfig), and NVRTC / cuBLAS / cuRAND / cudart
# wherever they are (a CUDA toolkit, or the nvidia-* Python wheels' site-packages).
roots="/usr/local/cuda/lib64 /usr/local/cuda/targets /usr/lib/x86_64-linux-gnu"
roots="$roots $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
libs=$( { ldconfig -p | awk '/libcuda.so.1/ {print $NF}'
          find $roots \( -name 'libnvrtc.so.13*' -o -name 'libcublas.so.13*' -o -name 'libcublasLt.so.13*' \
            -o -name 'libcurand.so.10*' -o -name 'libcudart.so.13*' \) 2>/dev/null; } \
        | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi | tee "$out/nvidia-smi.txt"
for t in gpu-carry/test-*; do
  # multiscale and packed hold long CPU-only tests: run their CUDA variants only.
  case "$(basename "$t")" in test-multiscale|test-packed) filter=(cuda) ;; *) filter=() ;; esac
  echo "== $t ${filter[*]}"
  "$t" --test-threads=1 "${filter[@]}" 2>&1 | tee "$out/$(basename "$t").log" | tail -30
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
  echo "softmin f64 n=100000 $(bench --op softmin --n 100000 --m 100000 --d 3 --dtype f64 --reps 3)"
  echo "softmin p=1 n=100000 $(bench --op softmin --p 1 --n 100000 --m 100000 --d 3 --reps 3)"
  # The multiscale backend on the GPU (issue #10): against the online rows above.
  for n in 100000 1000000; do
    echo "multiscale loss+grad n=$n cluster 0.05 $(bench --grad --backend multiscale --cluster-scale 0.05 --n $n --m $n --d 3 --reps 1 --warmup 1)"
    echo "multiscale loss+grad n=$n default $(bench --grad --backend multiscale --n $n --m $n --d 3 --reps 1 --warmup 1)"
  done
  # ImagesLoss on the GPU (grid issue #18): a 1024² pair and a 128³ pair, f32, scaling 0.9.
  echo "grid 1024x1024 $(bench --grid 1024x1024 --repeat 3)"
  echo "grid 128x128x128 $(bench --grid 128x128x128 --repeat 3)"
} 2>&1 | tee "$out/bench.txt"
