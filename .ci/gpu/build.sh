#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything the CUDA checks need on a GPU machine, into
# gpu-carry/ (git-ignored): the `candle-ot` CLI and the cross-device / twin test binaries, all
# with the `cuda` feature, linked against stub CUDA libraries (.ci/gpu/cuda-link-stubs.sh).
# On the GPU machine, run .ci/gpu/run.sh from the repository root with gpu-carry/ beside it.
# usage: bash .ci/gpu/build.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
eval "$(bash .ci/cuda-toolchain.sh)"
export CUDA_COMPUTE_CAP=90            # candle-kernels' own PTX: the H100 (sm_90)
target="$root/target/gpu-build"
stubs="$target/stubs"
build() {
  CARGO_TARGET_DIR="$target" LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" "$@"
}
# First pass compiles the rlibs (linking may fail without stubs); then the stubs are generated
# from the undefined CUDA symbols, and the final link uses them.
build cargo build --release -p candle-ot-cli --features cuda || true
build cargo test --release -p candle-ot-tests --features cuda --no-run --test devices --test twins --test grid_twins --test multiscale --test packed || true
bash .ci/gpu/cuda-link-stubs.sh "$target/release/deps" "$stubs"
build cargo build --release -p candle-ot-cli --features cuda
json="$(build cargo test --release -p candle-ot-tests --features cuda --no-run \
  --test devices --test twins --test grid_twins --test multiscale --test packed --message-format=json)"
rm -rf gpu-carry && mkdir -p gpu-carry
cp "$target/release/candle-ot" gpu-carry/
echo "$json" | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "gpu-carry/test-" + m["target"]["name"])
        print("staged", m["target"]["name"])
'
grep -qx '/gpu-carry/' .git/info/exclude 2>/dev/null || echo '/gpu-carry/' >> .git/info/exclude
ls -la gpu-carry
