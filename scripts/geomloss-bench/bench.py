#!/usr/bin/env python3
"""Side-by-side timing of GeomLoss 0.3.1 and `candle-ot bench` on identical points.

For each N = M: writes uniform points in the unit cube (D = 3, values exactly representable in
float32) to a safetensors case (`x`, `y`, float64, the reference format's tensors), then times
the Sinkhorn divergence plus its gradient with respect to x (p = 2, blur 0.05, scaling 0.5,
debiased, uniform weights, float32, T threads, median of R runs after one warm-up, which also
absorbs KeOps' compilation) with

- GeomLoss `backend="tensorized"` (PyTorch CPU),
- GeomLoss `backend="online"` (KeOps CPU), when pykeops imports,
- `candle-ot bench --input CASE --grad` (the online backend),

each in its own process. Prints one JSON line per run and a Markdown table with the ratios and
the relative difference of the loss values. Run through `run.sh`, which sets up the venv.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def make_case(path, n, d, seed):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    x = rng.random((n, d)).astype(np.float32).astype(np.float64)
    y = rng.random((n, d)).astype(np.float32).astype(np.float64)
    meta = {
        "format": "candle-ot-bench-v1",
        "description": f"uniform unit cube, N = M = {n}, D = {d}, seed {seed}",
    }
    save_file({"x": x, "y": y}, path, metadata=meta)


def time_geomloss(case, backend, threads, reps, warmup):
    """Runs in a child process: prints one JSON line."""
    import torch
    from geomloss import SamplesLoss
    from safetensors.numpy import load_file

    torch.set_num_threads(threads)
    t = load_file(case)
    x0 = torch.tensor(t["x"], dtype=torch.float32)
    y = torch.tensor(t["y"], dtype=torch.float32)
    loss_fn = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True, backend=backend)
    times, value = [], None
    for rep in range(warmup + reps):
        x = x0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = loss_fn(x, y)
        (g,) = torch.autograd.grad(loss, [x])
        g.sum().item()
        dt = time.perf_counter() - t0
        value = loss.item()
        if rep >= warmup:
            times.append(dt)
    times.sort()
    print(json.dumps({"median_s": times[len(times) // 2], "times_s": times, "loss": value}))


def run_child(cmd, timeout):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {out.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,4000,16000")
    ap.add_argument("--d", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candle-ot", default="target/release/candle-ot")
    ap.add_argument("--workdir", default="/tmp/candle-ot-geomloss-bench")
    ap.add_argument("--backends", default="tensorized,online,candle-ot")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--max-tensorized", type=int, default=16000,
                    help="largest N for the tensorized backend (4 N×N matrices)")
    ap.add_argument("--max-keops", type=int, default=16000,
                    help="largest N for the KeOps backend (about 1900 s at 64k on 2 cores)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "BACKEND"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return time_geomloss(a.child[0], a.child[1], a.threads, a.reps, a.warmup)

    os.makedirs(a.workdir, exist_ok=True)
    backends = a.backends.split(",")
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        case = os.path.join(a.workdir, f"uniform_D{a.d}_{n}.safetensors")
        make_case(case, n, a.d, a.seed)
        row = {"n": n}
        for b in backends:
            if b == "candle-ot":
                cmd = [a.candle_ot, "bench", "--input", case, "--grad", "--threads",
                       str(a.threads), "--reps", str(a.reps), "--warmup", str(a.warmup), "--json"]
            elif (b == "tensorized" and n > a.max_tensorized) or (b == "online" and n > a.max_keops):
                row[b] = {"error": "skipped (size limit)"}
                continue
            else:
                cmd = [sys.executable, __file__, "--child", case, b, "--threads", str(a.threads),
                       "--reps", str(a.reps), "--warmup", str(a.warmup)]
            r = run_child(cmd, a.timeout)
            r.update({"n": n, "backend": b, "load1": os.getloadavg()[0]})
            print(json.dumps(r), flush=True)
            row[b] = r
        rows.append(row)

    def cell(r):
        return f"{r['median_s']:.3g} s" if "median_s" in r else r.get("error", "n/a")

    print()
    print("| N = M | GeomLoss tensorized | GeomLoss online (KeOps) | candle-ot online | "
          "speed-up vs fastest exact GeomLoss | loss rel. diff. |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        c = row.get("candle-ot", {})
        peers = [row[b] for b in ("tensorized", "online") if b in row and "median_s" in row[b]]
        best = min(peers, key=lambda r: r["median_s"]) if peers else None
        if best and "median_s" in c:
            ratio = f"{best['median_s'] / c['median_s']:.1f}×"
            diff = f"{abs(c['loss'] - best['loss']) / abs(best['loss']):.1e}"
        else:
            ratio, diff = "n/a", "n/a"
        print(f"| {row['n']:,} | {cell(row.get('tensorized', {}))} | {cell(row.get('online', {}))} "
              f"| {cell(c)} | {ratio} | {diff} |")


if __name__ == "__main__":
    main()
