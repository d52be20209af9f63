#!/usr/bin/env bash
# Issue #19: candle-ot's `tol` (converged) Sinkhorn divergence next to POT's log-domain Sinkhorn
# and OTT-JAX (with and without Anderson acceleration), at the same accuracy of the value, in one
# run. See README.md ("tol_side_by_side.sh").
#
#   scripts/geomloss-bench/tol_side_by_side.sh [OUTDIR]        # default /tmp/tol_side_by_side
#
# Environment (defaults in brackets):
#   CANDLE      candle-ot binary [target/release/candle-ot]
#   PY          Python with numpy, POT, torch, safetensors [~/.cache/candle-ot-geomloss/bin/python]
#   OTT_PY      Python with ott-jax (CPU jax) [~/.cache/candle-ot-ott/bin/python]; skipped if absent
#   BLURS       ["0.05 0.01"]   N, M, D, SEED [4000, 4000, 3, 0]   TARGET [1e-5]
#   REF_TOL_<blur with _>  candle-ot f64 reference tol [1e-9; REF_TOL_0_01=1e-5]
#   CANDLE_TOLS ["1e-2 1e-3 1e-4"]: f32 tols tried, loosest first, until one meets TARGET
#   POT_CAP_AB_<blur>, POT_CAP_SYM_<blur>: POT time caps per term [400/100 s; 0.01: 240/60 s]
#   OTT_CAP [300 s per variant]   OTT_ANDERSON [5]   POT_TORCH [1]   POT_F64_CHECK_<blur> [0.05: 1]
#   REF_S_<blur>  use this reference S (skips the f64 reference; REF_TERMS_VALUES_<blur> =
#               "ab,aa,bb" likewise for the raw terms)   PEERS_ONLY=1: skip candle-ot's f32 runs
#   HARD_CAP    hard `timeout` of one measurement [720 s]; REF_HARD_CAP for the references [1800 s]
#   REF_CHECK_TOL_<blur>  also run the f64 reference at this looser tol (0.01: 1e-4), to show how
#               far the reference's value still moves
#
# Every measurement appends one JSON line (command, exit status, wall time, `uptime` before and
# after, the tool's JSON) to OUTDIR/results.jsonl; OUTDIR/table.md is the summary.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-/tmp/tol_side_by_side}"
CANDLE="${CANDLE:-$ROOT/target/release/candle-ot}"
PY="${PY:-$HOME/.cache/candle-ot-geomloss/bin/python}"
OTT_PY="${OTT_PY:-$HOME/.cache/candle-ot-ott/bin/python}"
BLURS="${BLURS:-0.05 0.01}"
N="${N:-4000}"; M="${M:-4000}"; D="${D:-3}"; SEED="${SEED:-0}"
TARGET="${TARGET:-1e-5}"
CANDLE_TOLS="${CANDLE_TOLS:-1e-2 1e-3 1e-4}"
OTT_CAP="${OTT_CAP:-300}"; OTT_ANDERSON="${OTT_ANDERSON:-5}"; POT_TORCH="${POT_TORCH:-1}"
HARD_CAP="${HARD_CAP:-720}"; REF_HARD_CAP="${REF_HARD_CAP:-1800}"
TOOL="$HERE/tol_peers.py"
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
: > "$RES"
export PYTHONWARNINGS=ignore

var() { # var NAME BLUR DEFAULT: $NAME_<blur with _> or DEFAULT
  local v="${1}_${2//./_}"
  echo "${!v:-$3}"
}

# meas NAME BLUR CMD...: run CMD under the hard cap, record it.
meas() {
  local name="$1" blur="$2"; shift 2
  local lb la t0 t1 rc
  lb="$(uptime)"
  t0=$(date +%s.%N)
  timeout "${CAP:-$HARD_CAP}" "$@" > "$OUT/last.out" 2> "$OUT/last.err"
  rc=$?
  t1=$(date +%s.%N)
  la="$(uptime)"
  grep -v KeOps "$OUT/last.err" | tail -n 5 >&2
  "$PY" "$TOOL" record --out "$RES" --name "$name" --blur "$blur" --cmd "$*" --rc "$rc" \
    --wall-s "$(echo "$t1 - $t0" | bc)" --load-before "$lb" --load-after "$la" \
    --result-file "$OUT/last.out"
  echo "[$name blur=$blur rc=$rc] $(tail -n 1 "$OUT/last.out" | cut -c1-300)" >&2
}

# the value of the last candle-ot JSON line in $OUT/last.out
last_loss() { "$PY" -c 'import json,sys
l=[x for x in open(sys.argv[1]) if x.startswith("{")][-1]; v=json.loads(l)["loss"]
print(repr(v[0] if isinstance(v, list) else v))' "$OUT/last.out"; }

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "candle-ot: $("$CANDLE" --version) ($CANDLE), repo HEAD $(git -C "$ROOT" rev-parse --short HEAD)"
  "$PY" -c 'import ot, numpy, torch; print("POT", ot.__version__, "numpy", numpy.__version__, "torch", torch.__version__)' 2>/dev/null
  [ -x "$OTT_PY" ] && "$OTT_PY" -c 'import jax, jaxlib, ott; print("ott-jax", ott.__version__, "jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())' 2>/dev/null
} | tee "$OUT/versions.txt"

PTS="$OUT/points"
"$PY" "$TOOL" gen --n "$N" --m "$M" --d "$D" --seed "$SEED" --out "$PTS" 2>/dev/null
CASE="$PTS/case.safetensors"

for BLUR in $BLURS; do
  echo "=== blur $BLUR ===" >&2
  REF_TOL="$(var REF_TOL "$BLUR" "$([ "$BLUR" = 0.01 ] && echo 1e-5 || echo 1e-9)")"
  if [ "$BLUR" = 0.05 ]; then REPS=(--reps 3 --warmup 1); else REPS=(--reps 1 --warmup 0); fi
  # (a) the reference: candle-ot f64, converged to REF_TOL.
  REF="$(var REF_S "$BLUR" "")"
  if [ -n "$REF" ]; then
    echo "reference S = $REF (given: REF_S_${BLUR//./_})" >&2
    echo "{\"name\": \"given_ref\", \"blur\": $BLUR, \"result\": {\"loss\": $REF}}" >> "$RES"
  else
    CHECK_TOL="$(var REF_CHECK_TOL "$BLUR" "$([ "$BLUR" = 0.01 ] && echo 1e-4 || echo)")"
    CHECK=""
    if [ -n "$CHECK_TOL" ]; then
      CAP="$REF_HARD_CAP" meas "candle_f64_tol$CHECK_TOL" "$BLUR" "$CANDLE" bench --input "$CASE" \
        --blur "$BLUR" --dtype f64 --tol "$CHECK_TOL" --max-iter 200000 --reps 1 --warmup 0 --json
      CHECK="$(last_loss 2>/dev/null)"
    fi
    CAP="$REF_HARD_CAP" meas candle_ref_f64 "$BLUR" "$CANDLE" bench --input "$CASE" \
      --blur "$BLUR" --dtype f64 --tol "$REF_TOL" --max-iter 200000 --reps 1 --warmup 0 --json
    REF="$(last_loss 2>/dev/null)"
    if [ -z "$REF" ]; then
      [ -z "$CHECK" ] && { echo "no reference for blur $BLUR: skipped" >&2; continue; }
      echo "the tol $REF_TOL reference did not finish: using the tol $CHECK_TOL one" >&2
      REF="$CHECK"
    fi
    echo "reference S = $REF" >&2
  fi
  # the three raw terms (only used to stop POT's runs early)
  TERMS="$(var REF_TERMS_VALUES "$BLUR" "")"
  if [ -z "$TERMS" ] && [ "$(var REF_TERMS "$BLUR" "$([ "$BLUR" = 0.05 ] && echo 1 || echo 0)")" = 1 ]; then
    for pair in "x y" "x x" "y y"; do
      set -- $pair
      CAP="$REF_HARD_CAP" meas "candle_ref_f64_ot_$1$2" "$BLUR" "$CANDLE" distance "$PTS/$1.npy" "$PTS/$2.npy" \
        --no-debias --blur "$BLUR" --dtype f64 --tol "$REF_TOL" --max-iter 200000 --json
      TERMS="$TERMS${TERMS:+,}$(last_loss)"
    done
  fi
  # (b) candle-ot f32: annealed, then tol from the loosest until the value is within TARGET.
  if [ "${PEERS_ONLY:-0}" != 1 ]; then
  meas candle_f32_annealed_grad "$BLUR" "$CANDLE" bench --input "$CASE" --blur "$BLUR" \
    --grad "${REPS[@]}" --json
  for T in $CANDLE_TOLS; do
    meas "candle_f32_tol${T}_grad" "$BLUR" "$CANDLE" bench --input "$CASE" --blur "$BLUR" \
      --tol "$T" --max-iter 200000 --grad "${REPS[@]}" --json
    V="$(last_loss)"
    meas "candle_f32_tol${T}" "$BLUR" "$CANDLE" bench --input "$CASE" --blur "$BLUR" \
      --tol "$T" --max-iter 200000 "${REPS[@]}" --json
    if [ -n "$V" ] && "$PY" -c "import sys; sys.exit(0 if abs($V - $REF) <= $TARGET * abs($REF) else 1)"; then
      break
    fi
  done
  fi
  # (c) POT sinkhorn_log, f32, numpy (and torch).
  CAP_AB="$(var POT_CAP_AB "$BLUR" "$([ "$BLUR" = 0.01 ] && echo 240 || echo 400)")"
  CAP_SYM="$(var POT_CAP_SYM "$BLUR" "$([ "$BLUR" = 0.01 ] && echo 60 || echo 100)")"
  TERMS_ARG=(); [ -n "$TERMS" ] && TERMS_ARG=(--terms "$TERMS")
  BACKENDS="numpy"; [ "$POT_TORCH" = 1 ] && BACKENDS="numpy torch"
  for BK in $BACKENDS; do
    meas "pot_${BK}_f32" "$BLUR" "$PY" "$TOOL" pot --dir "$PTS" --blur "$BLUR" --dtype float32 \
      --backend "$BK" --ref "$REF" "${TERMS_ARG[@]}" --target "$TARGET" \
      --cap-s "$CAP_AB" --cap-sym-s "$CAP_SYM"
  done
  # POT f64 at a tight marginal error: checks the reference.
  if [ "$(var POT_F64_CHECK "$BLUR" "$([ "$BLUR" = 0.05 ] && echo 1 || echo 0)")" = 1 ]; then
    meas pot_torch_f64_check "$BLUR" "$PY" "$TOOL" pot --dir "$PTS" --blur "$BLUR" \
      --dtype float64 --backend torch --ref "$REF" --stop-err 1e-9 --target "$TARGET" \
      --cap-s 400 --cap-sym-s 100
  fi
  # (d) OTT-JAX, f32, with and without Anderson acceleration.
  if [ -x "$OTT_PY" ]; then
    for AND in "$OTT_ANDERSON" 0; do
      meas "ott_anderson${AND}" "$BLUR" "$OTT_PY" "$TOOL" ott --dir "$PTS" --blur "$BLUR" \
        --ref "$REF" --anderson "$AND" --target "$TARGET" --cap-s "$OTT_CAP"
    done
  fi
done

"$PY" "$HERE/tol_report.py" "$RES" --target "$TARGET" --versions "$OUT/versions.txt" \
  > "$OUT/table.md"
cat "$OUT/table.md"
