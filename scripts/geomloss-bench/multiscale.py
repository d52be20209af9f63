#!/usr/bin/env python3
"""Side-by-side GeomLoss 0.3.1 multiscale and `candle-ot bench` on identical points.

For each N = M: writes the same uniform unit-cube case as bench.py (D = 3, seed 0, float64
tensors holding float32 values), then times the Sinkhorn divergence plus its gradient with
respect to x (p = 2, blur 0.05, scaling 0.5, debiased, uniform weights, float32, T threads,
median of R runs after W warm-ups; the warm-up also absorbs KeOps' compilation) with

- GeomLoss `backend="multiscale"` (KeOps CPU) at its default cluster scale
  (diameter / (√D · 2000^(1/D)), about 2000 cells) and at each `--cluster-scales` value,
- `candle-ot bench --input CASE --grad --backend multiscale` at the default cluster scale and
  at each `--cluster-scales` value,
- `candle-ot bench --input CASE --grad --backend online` (GeomLoss's fixed ε schedule),
- optionally the "exact" value: `candle-ot bench --backend online --tol TOL` (the fixed schedule
  followed by Gauss–Seidel iterations at ε = blur² until max |Δf| / ε < TOL), or pass known
  values with `--exact N=VALUE,...` (the 64k one costs about 100 s on 16 cores, 30 minutes or
  more on 2 loaded cores); with `--tensorized-check N`, GeomLoss's own cross-check up to N
  (tensorized, scaling 0.99, float64, loss only).

each in its own process. Prints one JSON line per run (with the load average) and a Markdown
table with times and losses, relative to the exact value where known. Run through
`run.sh`'s venv:

    ~/.cache/candle-ot-geomloss/bin/python scripts/geomloss-bench/multiscale.py \
        --sizes 4000,16000 --exact-tol 1e-5
"""

import argparse
import json
import os
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import make_case, run_child  # noqa: E402  (same case files, same child runner)


def time_geomloss_multiscale(case, cluster_scale, threads, reps, warmup):
    """Runs in a child process: prints one JSON line. `cluster_scale == "tensorized"`: the
    cross-check of the exact value instead (tensorized, scaling 0.99, float64, loss only)."""
    import torch
    from geomloss import SamplesLoss
    from safetensors.numpy import load_file

    torch.set_num_threads(threads)
    t = load_file(case)
    if cluster_scale == "tensorized":
        x0 = torch.tensor(t["x"], dtype=torch.float64)
        y = torch.tensor(t["y"], dtype=torch.float64)
        loss_fn = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.99, debias=True,
                              backend="tensorized")
        warmup, reps = 0, 1
    else:
        x0 = torch.tensor(t["x"], dtype=torch.float32)
        y = torch.tensor(t["y"], dtype=torch.float32)
        loss_fn = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True,
                              backend="multiscale", cluster_scale=cluster_scale)
    times, value = [], None
    for rep in range(warmup + reps):
        x = x0.clone().requires_grad_(cluster_scale != "tensorized")
        t0 = time.perf_counter()
        loss = loss_fn(x, y)
        if cluster_scale != "tensorized":
            (g,) = torch.autograd.grad(loss, [x])
            g.sum().item()
        dt = time.perf_counter() - t0
        value = loss.item()
        if rep >= warmup:
            times.append(dt)
    times.sort()
    print(json.dumps({"median_s": times[len(times) // 2], "times_s": times, "loss": value}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4000,16000,64000")
    ap.add_argument("--d", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cluster-scales", default="0.05",
                    help="cluster scales besides the default ('' for the default only)")
    ap.add_argument("--candle-ot", default="target/release/candle-ot")
    ap.add_argument("--workdir", default="/tmp/candle-ot-geomloss-bench")
    ap.add_argument("--runs", default="geomloss,candle-ot,online",
                    help="subset of geomloss (multiscale), candle-ot (multiscale), online")
    ap.add_argument("--exact-tol", type=float, default=None,
                    help="also compute the converged value with candle-ot --tol (f32)")
    ap.add_argument("--exact-threads", type=int, default=None)
    ap.add_argument("--exact", default="",
                    help="known converged values, e.g. 64000=5.1393e-5 (skips --exact-tol there)")
    ap.add_argument("--tensorized-check", type=int, default=0,
                    help="largest N for the GeomLoss cross-check of the exact value (tensorized, "
                         "scaling 0.99, f64: 4 N×N matrices, about 400 iterations)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "SCALE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        scale = a.child[1] if a.child[1] == "tensorized" else (
            None if a.child[1] == "default" else float(a.child[1]))
        return time_geomloss_multiscale(a.child[0], scale, a.threads, a.reps, a.warmup)

    os.makedirs(a.workdir, exist_ok=True)
    scales = ["default"] + [s for s in a.cluster_scales.split(",") if s]
    runs = a.runs.split(",")
    known = {int(k): float(v) for k, v in (kv.split("=") for kv in a.exact.split(",") if kv)}
    results = []

    def record(r, **kw):
        r.update(kw)
        r["load1"] = os.getloadavg()[0]
        print(json.dumps(r), flush=True)
        results.append(r)

    def candle(case, extra, threads=None):
        return [a.candle_ot, "bench", "--input", case, "--grad", "--threads",
                str(threads or a.threads), "--reps", str(a.reps), "--warmup", str(a.warmup),
                "--json"] + extra

    for n in [int(s) for s in a.sizes.split(",")]:
        case = os.path.join(a.workdir, f"uniform_D{a.d}_{n}.safetensors")
        make_case(case, n, a.d, a.seed)
        if n in known:
            record({"loss": known[n], "median_s": None}, n=n, run="exact", scale="given")
        elif a.exact_tol is not None:
            cmd = [a.candle_ot, "bench", "--input", case, "--tol", str(a.exact_tol),
                   "--threads", str(a.exact_threads or a.threads), "--reps", "1",
                   "--warmup", "0", "--json"]
            record(run_child(cmd, a.timeout), n=n, run="exact", scale=f"tol {a.exact_tol}")
        if n <= a.tensorized_check:
            cmd = [sys.executable, __file__, "--child", case, "tensorized", "--threads",
                   str(a.threads)]
            record(run_child(cmd, a.timeout), n=n, run="exact, GeomLoss tensorized 0.99 f64",
                   scale="—")
        if "online" in runs:
            record(run_child(candle(case, ["--backend", "online"]), a.timeout),
                   n=n, run="candle-ot online", scale="—")
        for s in scales:
            if "geomloss" in runs:
                cmd = [sys.executable, __file__, "--child", case, s, "--threads", str(a.threads),
                       "--reps", str(a.reps), "--warmup", str(a.warmup)]
                record(run_child(cmd, a.timeout), n=n, run="GeomLoss multiscale", scale=s)
            if "candle-ot" in runs:
                extra = ["--backend", "multiscale"]
                if s != "default":
                    extra += ["--cluster-scale", s]
                record(run_child(candle(case, extra), a.timeout),
                       n=n, run="candle-ot multiscale", scale=s)

    print()
    print("| N = M | run | cluster scale | median | load | loss | vs exact |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        exact = next((e["loss"] for e in results
                      if e["n"] == r["n"] and e["run"] == "exact" and "loss" in e), None)
        t = f"{r['median_s']:.3g} s" if r.get("median_s") else r.get("error", "—")
        loss = f"{r['loss']:.5e}" if "loss" in r else "n/a"
        rel = (f"{(r['loss'] - exact) / exact:+.2%}"
               if exact is not None and "loss" in r and r["run"] != "exact" else "—")
        print(f"| {r['n']:,} | {r['run']} | {r['scale']} | {t} | {r['load1']:.1f} | {loss} "
              f"| {rel} |")


if __name__ == "__main__":
    main()
