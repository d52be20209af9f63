#!/usr/bin/env bash
# Type-check (clippy, warnings as errors) of the Rust Metal glue on Linux: candle-ot's
# `metal_fwd` paths (crates/candle-ot/src/softmin/online/metal.rs) against Candle's real Metal
# backend (candle-core / candle-nn / candle-metal-kernels with their `metal` code compiled in),
# and every workspace member and target with `--features metal` (tests, CLI, examples).
# Nothing is linked or run: no Metal exists on Linux (see .ci/metal/README.md, docs/metal.md).
#
# How: objc2 and block2 accept non-Apple targets only with a GNUstep runtime feature, and
# objc2-metal links `Metal.framework` unconditionally (`#[link(name = "Metal", kind =
# "framework")]`, rejected by rustc on Linux even in `cargo check`). So the script
#   1. copies the source tree (git-tracked and untracked-but-not-ignored files) to a scratch
#      workspace, so that the patch below never touches the real Cargo.lock;
#   2. copies the locked objc2-metal from the cargo registry and patches it: the framework link
#      becomes `#[cfg_attr(target_vendor = "apple", link(...))]` (as objc2-foundation already
#      does), and its objc2 / block2 dependencies get the `gnustep-2-1` feature;
#   3. runs `cargo clippy` there with `--config patch.crates-io.objc2-metal.path=<copy>` and a
#      separate target dir (target/metal-check, kept between runs), so the main build is not
#      disturbed.
# No system packages are needed: `cargo check` / `clippy` never link, and objc2 compiles no C
# unless its `exception` feature is on (it is not here). The script fails if the patch stops
# applying (e.g. a new objc2-metal version), rather than silently checking less.
# usage: bash .ci/check-metal-rust.sh     env: METAL_CHECK_TOOL=check to run `cargo check`
#                                              instead of clippy (if clippy is not installed)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

target_dir="${METAL_CHECK_TARGET_DIR:-$root/target/metal-check}"
work="$target_dir/work"
mkdir -p "$target_dir"
rm -rf "$work"
mkdir -p "$work/ws"

# 1. The source tree, without target/ or anything ignored.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work/ws"
else  # not a git checkout: everything but the build outputs
  tar --exclude=./target --exclude=./fuzz/target -cf - . | tar -xf - -C "$work/ws"
fi

# 2. The objc2-metal version candle-core's `metal` feature resolves to (from the lock file).
ver="$(awk '/^name = "objc2-metal"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
[ -n "$ver" ] || { echo "check-metal-rust: objc2-metal not in Cargo.lock" >&2; exit 1; }
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
find_src() { ls -d "$cargo_home"/registry/src/*/"objc2-metal-$ver" 2>/dev/null | head -1; }
src="$(find_src || true)"
if [ -z "$src" ]; then
  host="$(rustc -vV | sed -n 's/^host: //p')"
  (cd "$work/ws" && cargo fetch --quiet --target "$host")
  src="$(find_src || true)"
fi
[ -n "$src" ] || { echo "check-metal-rust: objc2-metal $ver not found in $cargo_home/registry" >&2; exit 1; }
cp -r "$src" "$work/objc2-metal"
chmod -R u+w "$work/objc2-metal"
patched="$work/objc2-metal"

# 2a. The Apple-only framework link, cfg'd like objc2-foundation's.
n=$(grep -rl --include='*.rs' '^#\[link(name = "Metal", kind = "framework")\]' "$patched/src" | wc -l)
[ "$n" -ge 1 ] || { echo "check-metal-rust: no Metal framework link found to patch in objc2-metal $ver" >&2; exit 1; }
grep -rl --include='*.rs' '^#\[link(name = "Metal", kind = "framework")\]' "$patched/src" | while read -r f; do
  sed -i 's|^#\[link(name = "Metal", kind = "framework")\]|#[cfg_attr(target_vendor = "apple", link(name = "Metal", kind = "framework"))]|' "$f"
done
if grep -rn --include='*.rs' '^#\[link(.*kind = "framework")' "$patched/src"; then
  echo "check-metal-rust: unpatched framework links left in objc2-metal $ver" >&2; exit 1
fi
# 2b. GNUstep runtime features on objc2 and block2 (their non-Apple targets need one).
patch_feature() {  # patch_feature <dependency> <expected features line>
  local dep="$1" line="$2" manifest="$patched/Cargo.toml"
  local count
  count=$(awk -v dep="[dependencies.$dep]" -v line="$line" '
    $0 == dep { inside = 1; next } /^\[/ { inside = 0 }
    inside && $0 == line { c++ } END { print c + 0 }' "$manifest")
  [ "$count" = 1 ] || { echo "check-metal-rust: objc2-metal $ver: unexpected [dependencies.$dep] (want '$line')" >&2; exit 1; }
  awk -v dep="[dependencies.$dep]" -v line="$line" '
    $0 == dep { inside = 1 } /^\[/ && $0 != dep { inside = 0 }
    inside && $0 == line { sub(/\]$/, ", \"gnustep-2-1\"]") } { print }' "$manifest" > "$manifest.new"
  mv "$manifest.new" "$manifest"
}
patch_feature objc2 'features = ["std"]'
patch_feature block2 'features = ["alloc"]'

# 3. Clippy (or check) with the patch, in the scratch workspace.
tool="${METAL_CHECK_TOOL:-clippy}"
if [ "$tool" = clippy ] && ! cargo clippy --version >/dev/null 2>&1; then
  echo "check-metal-rust: cargo clippy not installed; falling back to cargo check" >&2
  tool=check
fi
lints=()
[ "$tool" = clippy ] && lints=(-- -D warnings)
cd "$work/ws"
export CARGO_TARGET_DIR="$target_dir"
patch_cfg="patch.crates-io.objc2-metal.path=\"$patched\""
echo "objc2-metal $ver patched (framework link cfg'd to Apple, objc2/block2 gnustep-2-1); cargo $tool:"
# Nothing is executed, so build scripts and proc macros need no optimisation (the workspace
# builds dependencies at opt-level 3): a cold check takes less CPU time with opt-level 0.
fast_cfg=(--config 'profile.dev.package."*".opt-level=0' --config 'profile.dev.build-override.opt-level=0')
run() { echo "+ cargo $tool $*"; cargo "$tool" --config "$patch_cfg" "${fast_cfg[@]}" "$@" "${lints[@]}"; }
# Every workspace member with its `metal` feature (candle-ot's metal.rs and its tests/metal.rs,
# the behaviour tests' Metal variants, the CLI and the examples' Metal device paths) and all
# their targets, over candle-core's / candle-nn's / candle-metal-kernels' Metal code.
run --workspace --features metal --all-targets
# The patched crate must really be the one checked.
cargo tree --config "$patch_cfg" -p candle-ot --features metal -i objc2-metal -e normal --depth 0 2>/dev/null \
  | grep -q "$patched" || { echo "check-metal-rust: the patched objc2-metal was not used" >&2; exit 1; }
echo "check-metal-rust: ok"
