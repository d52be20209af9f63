#!/usr/bin/env python3
"""Times POT 0.9.x's Wasserstein barycenters: the peer side of the barycenter side-by-side.

    PY=~/.cache/candle-ot-geomloss/bin/python          # POT: $PY -m pip install pot==0.9.7
    $PY scripts/geomloss-bench/barycenter_inputs.py /tmp/barybench
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive \
        $PY scripts/geomloss-bench/pot_barycenter.py /tmp/barybench > pot_bary.jsonl
    # options: --budget S (default 120), --per-iter-limit S (60), --cases conv1,conv4,exact,sinkhorn,
    #   --conv-method sinkhorn_log (POT's log-domain variant), --probe-iters N (30); see --help

Reads `images.npy`, `clouds.npy`, `support.npy` (see barycenter_inputs.py) from argv[1], casts
them to float64 and prints one JSON line per case on stdout (progress goes to stderr):
{"case", "seconds", "iterations", "mass", "notes", ...extra keys (reg, stopThr, numItermax,
converged, final error / displacement, the OpenMP settings, POT's version)}.
Threads are left to the environment (OMP_NUM_THREADS etc.; numpy's BLAS reads it too).
Every solver is first called once on a tiny input (warm-up, not timed); then each case is timed
once (wall clock, time.perf_counter) around the POT call alone.

Cases (the conventions are from POT 0.9.7's source, paths relative to site-packages/ot):

conv1 / conv4: `ot.bregman.convolutional_barycenter2d_debiased(A, reg, weights=[1/4]*4,
  numItermax=10000, stopThr=1e-6, log=True)` (method "sinkhorn": scalings, not log domain),
  on the 4 images (each renormalised to sum 1 in float64), blur = 1/256 (conv1) and 4/256 (conv4).
  * reg. bregman/_convolutional.py, `_get_convol_img_fn`:
        t1 = nx.linspace(0, 1, width, type_as=type_as)      # pixel i at i/(n-1)
        M1 = -((X1 - Y1) ** 2) / reg                         # kernel K1 = exp(M1)
    (same for the other axis, then `convol_imgs` applies K1 and K2: the 2-D kernel is
    exp(-|x-y|^2 / reg) on the grid {i/(n-1)}). GeomLoss's convention: pixel i at i/n, cost
    |x-y|^2/2, eps = blur^2, i.e. kernel exp(-|x-y|^2 / (2 blur^2)). For pixel offsets d:
    POT exp(-d^2 / ((n-1)^2 reg)) = GeomLoss exp(-d^2 / (2 n^2 blur^2))  <=>
        reg = 2 * blur^2 * (n / (n-1))^2   (= 2 k^2 / (n-1)^2 for blur = k/n);
    n = 256: blur 1/256 -> reg = 2/255^2 = 3.0757e-5; blur 4/256 -> reg = 32/255^2 = 4.9212e-4.
  * stopThr. `_convolutional_barycenter2d_debiased`: every 10th iteration (ii % 10 == 9)
        err = nx.sum(nx.std(V * KU, axis=0))
        if err < stopThr and ii > 20: break
    V_k * (K U_k) is the barycenter-side marginal of the plan to image k; err is the sum over
    pixels of the (population, ddof=0) standard deviation over the 4 images of that marginal,
    an L1 norm of the marginals' disagreement (images summing to 1). log["niter"] = ii, the
    0-based index of the last iteration: iterations run = niter + 1.
  * time cap: a probe of 30 iterations (stopThr=0, untimed) gives the time per iteration; if
    numItermax iterations would exceed --budget (120 s), numItermax is lowered to fit (a
    multiple of 10) and the notes say so.
  * seen with POT 0.9.7 on the inputs of barycenter_inputs.py: at blur 1/256 the scalings
    overflow (err NaN from iteration 60 on, NaN barycenter, reported as mass null);
    `--conv-method sinkhorn_log` is stable but takes about 15 s per iteration at 256^2
    (logsumexp over an n x n x n array per axis). np.einsum (the convolution, no BLAS) runs on
    one thread whatever OMP_NUM_THREADS says.

exact: `ot.lp.free_support_barycenter(clouds, [uniform(10000)]*4, X_init=support,
  b=uniform(5000), weights=[1/4]*4, numItermax=100, stopThr=1e-3, log=True)`.
  * cost: lp/_barycenter_solvers.py, `M_i = dist(X, measure_locations_i)` with `ot.dist`'s
    default metric "sqeuclidean": |x-y|^2 (no 1/2), then `T_i = emd(b, measure_weights_i, M_i)`
    with emd's default numItermax=100000 (not exposed by free_support_barycenter; for a
    5000 x 10000 problem the network simplex may stop there, non-optimal: POT then warns
    "numItermax reached before optimality", counted in the notes).
  * update and stopThr: X <- sum_i w_i diag(1/b) T_i X_i (theta = 1), and
        displacement_square_norm = nx.sum((T_sum - X) ** 2)
    the squared Frobenius norm of the support's displacement (sum over the 5000 points of the
    squared Euclidean displacement, not a mean, not a square root); loop while > stopThr.
    log["displacement_square_norms"] has one entry per outer iteration.
  * time cap: one outer iteration is timed first (numItermax=1). If it takes more than
    --per-iter-limit (60 s) that time is the result (iterations = 1); otherwise the full call is
    timed with numItermax lowered to fit --budget if needed.

sinkhorn: `ot.bregman.free_support_sinkhorn_barycenter(..., reg=2*0.05**2, numItermax=100,
  stopThr=1e-3, log=True)`, same inputs.
  * reg. bregman/_barycenter.py: `M_i = dist(X, measure_locations_i)` (|x-y|^2, no 1/2), then
    `sinkhorn(b, measure_weights_i, M_i, reg=reg, numItermax=numInnerItermax)`, and
    bregman/_sinkhorn.py `sinkhorn_knopp`: `K = nx.exp(M / (-reg))`, so the kernel is
    exp(-|x-y|^2 / reg); GeomLoss blur 0.05 (cost |x-y|^2/2, eps = 0.05^2) gives
    exp(-|x-y|^2 / (2 * 0.05^2)), hence reg = 2 * 0.05^2 = 5e-3.
  * inner solver: sinkhorn_knopp (scalings) with numInnerItermax=1000 and its own default
    stopThr=1e-9 on nx.norm(tmp2 - b), the L2 norm of the violation of the second marginal
    (the cloud's weights, 1e-4 each), checked every 10 iterations; POT warns "Sinkhorn did
    not converge" when it uses all 1000 (counted in the notes).
  * outer stopThr: same as exact (squared Frobenius norm of the displacement); same time caps.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

import numpy as np

# importing ot may import pykeops (through its optional backends), which prints a notice on
# stdout: keep stdout for the JSON lines
with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
    warnings.simplefilter("ignore")
    import ot

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def finite_or_none(x):
    """JSON has no NaN / Infinity: write null instead."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    return x


def emit(rec):
    rec = finite_or_none(rec)
    rec["pot"] = ot.__version__
    rec["omp"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    rec["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(rec), flush=True)


def warning_counts(caught):
    out = {}
    for w in caught:
        msg = str(w.message).split(".")[0]
        out[msg] = out.get(msg, 0) + 1
    return out


def conv_reg(blur, n):
    """POT kernel exp(-|x-y|^2/reg) on {i/(n-1)} == GeomLoss exp(-|x-y|^2/(2 blur^2)) on {i/n}."""
    return 2.0 * blur**2 * (n / (n - 1)) ** 2


def warm_up():
    rng = np.random.default_rng(123)
    A = rng.random((4, 32, 32)) + 0.1
    A /= A.sum(axis=(1, 2), keepdims=True)
    X = [rng.random((100, 3)) for _ in range(4)]
    a = [np.full(100, 1 / 100) for _ in range(4)]
    X0 = rng.random((50, 3))
    b = np.full(50, 1 / 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ot.bregman.convolutional_barycenter2d_debiased(A, conv_reg(1 / 8, 32), numItermax=30)
        ot.lp.free_support_barycenter(X, a, X0, b=b, numItermax=2)
        ot.bregman.free_support_sinkhorn_barycenter(X, a, X0, 0.05, b=b, numItermax=2)


def case_conv(name, A, blur, args):
    n = A.shape[1]
    assert A.shape[1] == A.shape[2]
    reg = conv_reg(blur, n)
    weights = np.full(A.shape[0], 1.0 / A.shape[0])
    notes = [
        f"method {args.conv_method}; reg = 2*blur^2*(n/(n-1))^2 = {reg:.6e} "
        f"(blur {blur * n:g} px, n {n})"
    ]

    # probe: the time per iteration, to keep the timed run under the budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ot.bregman.convolutional_barycenter2d_debiased(
            A, reg, weights=weights, method=args.conv_method, numItermax=args.probe_iters,
            stopThr=0.0, warn=False,
        )
        per_iter = (time.perf_counter() - t0) / args.probe_iters
    numItermax = args.conv_iters
    if per_iter * numItermax > args.budget:
        numItermax = max(args.probe_iters, int(args.budget / per_iter) // 10 * 10)
        notes.append(
            f"numItermax lowered from {args.conv_iters} to {numItermax}: probe "
            f"{per_iter:.4f} s/iteration would give {per_iter * args.conv_iters:.0f} s "
            f"> budget {args.budget:g} s"
        )
    log(f"{name}: reg {reg:.4e}, {per_iter:.4f} s/iter (probe), numItermax {numItermax}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        bar, lg = ot.bregman.convolutional_barycenter2d_debiased(
            A, reg, weights=weights, method=args.conv_method, numItermax=numItermax,
            stopThr=args.conv_stop, log=True,
        )
        seconds = time.perf_counter() - t0
    iters = int(lg["niter"]) + 1
    errs = [float(e) for e in lg["err"]]
    final_err = errs[-1] if errs else None
    converged = final_err is not None and final_err < args.conv_stop
    finite = bool(np.isfinite(bar).all())
    first_nan = next((10 * (j + 1) for j, e in enumerate(errs) if not np.isfinite(e)), None)
    if not finite:
        notes.append(
            f"barycenter has {int((~np.isfinite(bar)).sum())} non-finite pixels (scalings "
            f"overflow; err first non-finite at iteration {first_nan})"
        )
    if not converged:
        notes.append(f"not converged: err {final_err} >= stopThr after {iters} iterations")
    if caught:
        notes.append(f"warnings: {warning_counts(caught)}")
    emit(
        {
            "case": name,
            "seconds": seconds,
            "iterations": iters,
            "mass": float(bar.sum()),
            "notes": "; ".join(notes),
            "method": args.conv_method,
            "blur": blur,
            "reg": reg,
            "stopThr": args.conv_stop,
            "numItermax": numItermax,
            "converged": bool(converged),
            "final_err": final_err,
            # (iteration, err) pairs, POT computes err every 10 iterations; about 20 kept
            "err_trace": [
                [10 * (j + 1), errs[j]] for j in range(0, len(errs), max(1, len(errs) // 20))
            ],
            "seconds_per_iteration": seconds / iters,
            "finite": finite,
            "first_nonfinite_err_iteration": first_nan,
            "bar_min": float(bar.min()),
            "bar_max": float(bar.max()),
        }
    )


def case_free(name, solver, clouds, support, args, **kw):
    locs = [c for c in clouds]
    wts = [np.full(c.shape[0], 1.0 / c.shape[0]) for c in clouds]
    b = np.full(support.shape[0], 1.0 / support.shape[0])
    weights = np.full(len(locs), 1.0 / len(locs))
    notes = []
    if "reg" in kw:
        notes.append(f"reg = 2*0.05^2 = {kw['reg']:g} (POT cost |x-y|^2, kernel exp(-M/reg))")

    def call(numItermax):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            X, lg = solver(
                locs, wts, support, b=b, weights=weights, numItermax=numItermax,
                stopThr=args.free_stop, log=True, **kw,
            )
            seconds = time.perf_counter() - t0
        return X, lg, seconds, caught

    log(f"{name}: timing one outer iteration")
    X, lg, t1, caught = call(1)
    log(f"{name}: one outer iteration {t1:.1f} s")
    if t1 > args.per_iter_limit:
        notes.append(
            f"one outer iteration took {t1:.1f} s > {args.per_iter_limit:g} s: only 1 "
            f"iteration run (numItermax 1), seconds = the time of that iteration"
        )
        numItermax = 1
        seconds = t1
    else:
        numItermax = args.free_iters
        if t1 * numItermax > args.budget:
            numItermax = max(1, int(args.budget / t1))
            notes.append(
                f"numItermax lowered from {args.free_iters} to {numItermax} to fit the "
                f"budget {args.budget:g} s (one outer iteration {t1:.1f} s)"
            )
        X, lg, seconds, caught = call(numItermax)
    disp = [float(d) for d in lg["displacement_square_norms"]]
    iters = len(disp)
    converged = disp[-1] <= args.free_stop
    if not converged:
        notes.append(f"not converged: displacement {disp[-1]:.4e} > stopThr after {iters} it.")
    if caught:
        notes.append(f"warnings (all outer iterations): {warning_counts(caught)}")
    emit(
        {
            "case": name,
            "seconds": seconds,
            "iterations": iters,
            "mass": float(b.sum()),
            "notes": "; ".join(notes),
            "stopThr": args.free_stop,
            "numItermax": numItermax,
            "converged": bool(converged),
            "final_displacement_square_norm": disp[-1],
            "displacement_square_norms": disp,
            "seconds_per_iteration": seconds / iters,
            "first_iteration_seconds": t1,
            "support_mean": X.mean(axis=0).tolist(),
            "support_var": X.var(axis=0).tolist(),
            **({"reg": kw["reg"]} if "reg" in kw else {}),
        }
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="directory written by barycenter_inputs.py")
    p.add_argument("--cases", default="conv1,conv4,exact,sinkhorn")
    p.add_argument("--budget", type=float, default=120.0, help="cap on one timed call (s)")
    p.add_argument("--per-iter-limit", type=float, default=60.0,
                   help="free support: above this, report one outer iteration only (s)")
    p.add_argument("--conv-iters", type=int, default=10000)
    p.add_argument("--conv-stop", type=float, default=1e-6)
    p.add_argument("--conv-method", default="sinkhorn", choices=["sinkhorn", "sinkhorn_log"])
    p.add_argument("--probe-iters", type=int, default=30,
                   help="iterations of the untimed probe before each convolutional case")
    p.add_argument("--free-iters", type=int, default=100)
    p.add_argument("--free-stop", type=float, default=1e-3)
    args = p.parse_args()
    cases = args.cases.split(",")

    images = np.load(os.path.join(args.dir, "images.npy")).astype(np.float64)
    images /= images.sum(axis=(1, 2), keepdims=True)
    clouds = np.load(os.path.join(args.dir, "clouds.npy")).astype(np.float64)
    support = np.load(os.path.join(args.dir, "support.npy")).astype(np.float64)
    n = images.shape[1]

    log(f"POT {ot.__version__}; warm-up")
    warm_up()
    suffix = "" if args.conv_method == "sinkhorn" else "_log"
    if "conv1" in cases:
        case_conv("conv_debiased_blur1px" + suffix, images, 1.0 / n, args)
    if "conv4" in cases:
        case_conv("conv_debiased_blur4px" + suffix, images, 4.0 / n, args)
    if "exact" in cases:
        case_free("free_support_exact", ot.lp.free_support_barycenter, clouds, support, args)
    if "sinkhorn" in cases:
        case_free(
            "free_support_sinkhorn", ot.bregman.free_support_sinkhorn_barycenter,
            clouds, support, args, reg=2 * 0.05**2,
        )


if __name__ == "__main__":
    main()
