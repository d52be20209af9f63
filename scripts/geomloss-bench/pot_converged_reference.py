#!/usr/bin/env python3
"""Converged POT reference values for tests/pot_reference.rs (tests/data/pot/*.safetensors).

    ~/.cache/candle-ot-geomloss/bin/python scripts/geomloss-bench/pot_converged_reference.py \
        [--out tests/data/pot] [--stop-thr 1e-14]

Small balanced float64 cases, p = 2 (cost C(x, y) = ½|x − y|², POT's `ot.dist(x, y) / 2`),
ε = blur², solved with POT's `ot.bregman.sinkhorn_log` (numpy backend) to `stopThr` (POT's
stopping rule: ‖π^T 1 − b‖₂, checked every 10 iterations). For each case:

    OT_ε(a, b) = ⟨π, C⟩ + ε KL(π | a ⊗ b) at the optimum
               = ε (⟨a, log_u − log a⟩ + ⟨b, log_v − log b⟩)      (dual value, POT's log potentials)
    S_ε(a, b)  = OT_ε(a, b) − ½ OT_ε(a, a) − ½ OT_ε(b, b)

The script checks, per OT problem, that the row and column marginal errors (max |·|) are below
1e-13 and that the primal value ⟨π, C⟩ + ε KL(π | a ⊗ b) equals the dual one to 1e-12 relative,
and fails otherwise.

File format: the reference-case layout of tests/data/reference (read by
`candle_ot_cli::eval::read_case`): tensors x (N, D), y (M, D), a (N,), b (M,), all float64
(points rounded to float32 values, weights normalised in float64), plus
`pot_s` (1,) = S_ε, `pot_ot` (1,) = OT_ε(a, b), `pot_ot_aa`, `pot_ot_bb` (1,), and `pot_loss`
(1,) = the value SamplesLoss returns with the case's `debias` (S_ε or OT_ε(a, b)). Metadata:
`format` = `pot-converged-v1`, `name`, `kind` = `sinkhorn`, `params` (JSON: loss, p, blur,
reach = null, debias, N, M, D, seed, weights, eps), `peer` (versions), `info` (JSON: iterations,
marginal errors and primal − dual gap of each problem).
"""

import argparse
import json
import os
import sys

import numpy as np
import ot
from safetensors.numpy import save_file

# name, N, M, D, weights of x, weights of y, blur, debias, seed
CASES = [
    ("n17_m50_d2_wab_b0.1_deb", 17, 50, 2, "random", "random", 0.1, True, 1),
    ("n50_m17_d3_b0.3_nodeb", 50, 17, 3, "uniform", "uniform", 0.3, False, 2),
    ("n1_m17_d1_wb_b0.1_deb", 1, 17, 1, "uniform", "random", 0.1, True, 3),
    ("n200_m50_d2_wab_b1.0_deb", 200, 50, 2, "random", "random", 1.0, True, 4),
    ("n200_m200_d3_b0.1_nodeb", 200, 200, 3, "uniform", "uniform", 0.1, False, 5),
    ("n50_m200_d1_wa_b0.3_deb", 50, 200, 1, "random", "uniform", 0.3, True, 6),
    ("n1_m1_d2_b0.3_nodeb", 1, 1, 2, "uniform", "uniform", 0.3, False, 7),
]

MARGINAL_TOL = 1e-13
GAP_TOL = 1e-12


def weights(rng, n, kind):
    if kind == "uniform":
        return np.full(n, 1.0 / n)
    w = rng.uniform(0.5, 1.5, n)
    return w / w.sum()


def solve(x, y, a, b, eps, stop_thr, max_iter):
    """OT_ε(a, b) from POT's sinkhorn_log, with its diagnostics."""
    C = ot.dist(x, y) / 2.0
    pi, log = ot.bregman.sinkhorn_log(a, b, C, eps, numItermax=max_iter, stopThr=stop_thr,
                                      log=True, warn=False)
    lu, lv = log["log_u"], log["log_v"]
    dual = eps * (a @ (lu - np.log(a)) + b @ (lv - np.log(b)))
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(pi > 0, pi * np.log(pi / np.outer(a, b)), 0.0).sum()
    primal = (pi * C).sum() + eps * kl
    info = {
        "iterations": int(log["niter"]) + 1,
        "err_rows": float(np.abs(pi.sum(1) - a).max()),
        "err_cols": float(np.abs(pi.sum(0) - b).max()),
        "primal": float(primal),
        "dual": float(dual),
        "primal_minus_dual": float(primal - dual),
    }
    ok = (info["err_rows"] < MARGINAL_TOL and info["err_cols"] < MARGINAL_TOL
          and abs(primal - dual) <= GAP_TOL * max(abs(dual), 1e-300))
    return float(dual), info, ok


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "data", "pot"))
    ap.add_argument("--stop-thr", type=float, default=1e-14)
    ap.add_argument("--max-iter", type=int, default=2_000_000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    peer = f"POT {ot.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}"
    failed = []
    for name, n, m, d, wa, wb, blur, debias, seed in CASES:
        rng = np.random.default_rng(seed)
        x = rng.random((n, d)).astype(np.float32).astype(np.float64)
        # y shifted by 0.2 on every axis: S_ε is not small against its terms.
        y = (rng.random((m, d)) + 0.2).astype(np.float32).astype(np.float64)
        a = weights(rng, n, wa)
        b = weights(rng, m, wb)
        eps = blur ** 2
        ot_ab, i_ab, ok_ab = solve(x, y, a, b, eps, args.stop_thr, args.max_iter)
        ot_aa, i_aa, ok_aa = solve(x, x, a, a, eps, args.stop_thr, args.max_iter)
        ot_bb, i_bb, ok_bb = solve(y, y, b, b, eps, args.stop_thr, args.max_iter)
        s = ot_ab - 0.5 * ot_aa - 0.5 * ot_bb
        info = {"ab": i_ab, "aa": i_aa, "bb": i_bb, "stopThr": args.stop_thr}
        params = {"loss": "sinkhorn", "p": 2, "blur": blur, "reach": None, "debias": debias,
                  "N": n, "M": m, "D": d, "seed": seed, "weights": f"x {wa}, y {wb}",
                  "eps": eps,
                  "gen": "numpy default_rng(seed): x = random((N, D)), y = random((M, D)) + 0.2, "
                         "both rounded to float32; then a, b (uniform(0.5, 1.5), normalised)"}
        tensors = {
            "x": x, "y": y, "a": a, "b": b,
            "pot_s": np.array([s]), "pot_ot": np.array([ot_ab]),
            "pot_ot_aa": np.array([ot_aa]), "pot_ot_bb": np.array([ot_bb]),
            "pot_loss": np.array([s if debias else ot_ab]),
        }
        meta = {"format": "pot-converged-v1", "name": name, "kind": "sinkhorn",
                "params": json.dumps(params), "peer": peer, "info": json.dumps(info),
                "tensors": json.dumps(sorted(tensors))}
        save_file(tensors, os.path.join(args.out, f"{name}.safetensors"), metadata=meta)
        ok = ok_ab and ok_aa and ok_bb
        if not ok:
            failed.append(name)
        print(f"{name}: S = {s:.17g}, OT_ab = {ot_ab:.17g}, iterations "
              f"{i_ab['iterations']}/{i_aa['iterations']}/{i_bb['iterations']}, marginal errors "
              f"{max(i['err_rows'] for i in (i_ab, i_aa, i_bb)):.1e} / "
              f"{max(i['err_cols'] for i in (i_ab, i_aa, i_bb)):.1e}, primal − dual "
              f"{max(abs(i['primal_minus_dual']) for i in (i_ab, i_aa, i_bb)):.1e}"
              f"{'' if ok else '  NOT CONVERGED'}")
    if failed:
        sys.exit(f"not converged to the checks' tolerances: {failed}")


if __name__ == "__main__":
    main()
