#!/usr/bin/env python3
"""Times GeomLoss 0.3.1's grid (image / volume) Sinkhorn divergence on random densities.

GeomLoss's grid code is `geomloss.sinkhorn_divergence` (the module
`geomloss/_legacy/sinkhorn_images.py`); its softmin is `softmin_grid` in `_legacy/utils.py`, a
sequence of 1-D KeOps log-sum-exps, one per axis, so pykeops is required (CPU backend here:
the first call compiles a kernel with the system C++ compiler and caches it in ~/.cache/keops*).

For each case (the images n×n of `--sizes`, the volumes n×n×n of `--vol`), with B = `--batch`:

- input generator: `rng = numpy.random.default_rng(SEED)` (a fresh generator per case), then
  `a = rng.random((B, *shape))` and `b = rng.random((B, *shape))` (float64, uniform in [0, 1)),
  each divided by its own sum per batch item, then cast to `--dtype`. GeomLoss gets them with a
  channel axis, (B, 1, n, n) or (B, 1, n, n, n) (its code reads the dimension as `I.dim() - 2`);
  `--save-inputs DIR` writes exactly the arrays that were timed, shaped (B, *shape) like the
  reference files, as DIR/<case>_a.npy, DIR/<case>_b.npy, plus DIR/<case>.safetensors (`a`, `b`
  as float64, the reference-case format);
- settings: p = `--p` (2), blur = `--blur` (default one pixel, 1/n, which is also GeomLoss's
  default), scaling = `--scaling` (0.9), debiased, balanced;
- "loss+grad": `loss = sinkhorn_divergence(a, b, ...)`, then
  `torch.autograd.grad(loss.sum(), [a])`;
- "potentials": a second call, `sinkhorn_divergence(a, b, ..., potentials=True)` (F, G);
- one warm-up of each (it includes KeOps' compilation on a first run, and is excluded), then
  `--repeat` timed runs of each; the median and all times are reported, wall time and the
  process's CPU time (all threads; on a loaded machine CPU time / threads estimates the wall
  time on idle cores), next to the load averages (/proc/loadavg) read before and after each
  timed run;
- "pixel pairs": Σ over softmin_grid calls of N·(Σ_k n_k), N the number of pixels of the level
  (times B), since a softmin on an n_1×…×n_D grid runs one 1-D log-sum-exp per axis, each over
  N·n_k pairs. Counted by wrapping `softmin_grid` during the warm-up calls, and checked against
  the count predicted from GeomLoss's ε schedule and jump rule (`predicted_calls`). The gradient
  adds no softmin: GeomLoss's last extrapolation detaches its inputs, so d loss / d a is read
  from the potentials without a backward pass through KeOps.

`--check CASE.safetensors [...]` instead recomputes a reference case of
/work/shared/reference/grid/ (its `params`) with GeomLoss in float64 and prints the relative
errors max|Δ| / max|ref| of loss, grad_a, grad_b, F and G (the last four also after removing
their mean per batch item, as the reference README compares balanced potentials).

    PY=~/.cache/candle-ot-geomloss/bin/python
    $PY scripts/geomloss-bench/grid.py --sizes 256,512 --vol 64 --repeat 2 --json grid.json \
        --save-inputs /tmp/candle-ot-grid-inputs
    $PY scripts/geomloss-bench/grid.py --check /work/shared/reference/grid/img_p2_default_s0.9_32x32.safetensors
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time


def set_threads(threads, wait_policy):
    # KeOps' CPU kernels use OpenMP: fix its thread count before anything loads them. On grids
    # KeOps runs one OpenMP parallel region per image line (its batch loop is serial), so with
    # the default (spinning) wait policy a loaded machine makes 2 threads several times slower
    # than 1; "passive" removes that artefact (an environment setting, GeomLoss is unchanged).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if wait_policy:
        os.environ.setdefault("OMP_WAIT_POLICY", wait_policy)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def make_inputs(shape, batch, seed):
    """The input generator (see the module docstring): float64 arrays (B, *shape), sums 1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        x = rng.random((batch,) + tuple(shape))
        x /= x.reshape(batch, -1).sum(axis=1).reshape((batch,) + (1,) * len(shape))
        out.append(x)
    return out


def predicted_calls(n, dim, p, blur, scaling, debias=True):
    """softmin_grid calls per level (level 0 = 2^dim pixels), from GeomLoss's own schedule.

    Mirrors `sinkhorn_images.sinkhorn_divergence` and `sinkhorn_divergence.sinkhorn_loop`:
    levels 2, 4, ..., n per axis; `jumps` = the iterations i whose ε is the first below
    (current pixel size)^p; 2 (raw) or 4 (debiased) softmins for the initialisation on the
    coarsest level, the same per iteration on the level it runs on, and the same again for the
    final extrapolation on the finest level unless the last iteration is itself a jump.
    """
    import math
    from geomloss._legacy.sinkhorn_divergence import epsilon_schedule

    depth = int(round(math.log2(n)))
    eps_list = epsilon_schedule(p, 1, blur, scaling)
    scales = [1 / 2 ** (k + 1) for k in range(depth)]
    current = scales.pop(0)
    jumps = []
    for i, eps in enumerate(eps_list[1:]):
        if current**p > eps:
            jumps.append(i + 1)
            current = scales.pop(0)
    per = 4 if debias else 2
    calls = [0] * depth
    calls[0] += per
    k = 0
    for i in range(len(eps_list)):
        calls[k] += per
        if i in jumps:
            k += 1
    if (len(eps_list) - 1) not in jumps:
        calls[k] += per
    pairs = sum(c * (2 ** (k + 1)) ** dim * dim * 2 ** (k + 1) for k, c in enumerate(calls))
    return {"eps_steps": len(eps_list), "jumps": jumps, "calls_per_level": calls,
            "pairs_per_item": pairs}


class SoftminCounter:
    """Wraps geomloss._legacy.sinkhorn_images.softmin_grid to count calls and pixel pairs."""

    def __init__(self):
        import geomloss._legacy.sinkhorn_images as si

        self.si, self.orig = si, si.softmin_grid
        self.calls, self.pairs, self.per_side = 0, 0, {}

    def __enter__(self):
        def wrapped(eps, C_xy, h_y):
            spatial = h_y.shape[2:]
            npix = 1
            for s in spatial:
                npix *= s
            self.calls += 1
            self.pairs += h_y.shape[0] * h_y.shape[1] * npix * sum(spatial)
            self.per_side[spatial[-1]] = self.per_side.get(spatial[-1], 0) + 1
            return self.orig(eps, C_xy, h_y)

        self.si.softmin_grid = wrapped
        return self

    def __exit__(self, *exc):
        self.si.softmin_grid = self.orig


def run_case(name, shape, args, torch, sinkhorn_divergence):
    import numpy as np

    dtype = getattr(torch, args.dtype)
    n, dim = shape[0], len(shape)
    blur = args.blur if args.blur is not None else 1.0 / n
    a64, b64 = make_inputs(shape, args.batch, args.seed)
    a_np, b_np = a64.astype(args.dtype), b64.astype(args.dtype)
    if args.save_inputs:
        from safetensors.numpy import save_file

        os.makedirs(args.save_inputs, exist_ok=True)
        np.save(os.path.join(args.save_inputs, f"{name}_a.npy"), a_np)
        np.save(os.path.join(args.save_inputs, f"{name}_b.npy"), b_np)
        save_file({"a": a_np.astype(np.float64), "b": b_np.astype(np.float64)},
                  os.path.join(args.save_inputs, f"{name}.safetensors"),
                  metadata={"format": "candle-ot-grid-bench-v1",
                            "description": f"grid.py inputs {name}, seed {args.seed}, "
                                           f"uniform then normalised per item, {args.dtype}",
                            "params": json.dumps({"p": args.p, "blur": blur,
                                                  "scaling": args.scaling, "debias": True,
                                                  "reach": None, "shape": list(shape),
                                                  "B": args.batch})})
    # GeomLoss's grid layout: (B, 1, *shape).
    a0 = torch.from_numpy(a_np).unsqueeze(1).contiguous()
    b = torch.from_numpy(b_np).unsqueeze(1).contiguous()
    kw = dict(p=args.p, blur=blur, scaling=args.scaling, debias=True)

    def loss_grad():
        a = a0.clone().requires_grad_(True)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = sinkhorn_divergence(a, b, **kw)
        (g,) = torch.autograd.grad(loss.sum(), [a])
        g.sum().item()
        return time.perf_counter() - t0, time.process_time() - c0, loss.detach(), g

    def potentials():
        c0, t0 = time.process_time(), time.perf_counter()
        F, G = sinkhorn_divergence(a0, b, potentials=True, **kw)
        (F.sum() + G.sum()).item()
        return time.perf_counter() - t0, time.process_time() - c0, F, G

    pred = predicted_calls(n, dim, args.p, blur, args.scaling)
    rec = {"case": name, "shape": list(shape), "B": args.batch, "dtype": args.dtype,
           "p": args.p, "blur": blur, "scaling": args.scaling, "debias": True,
           "seed": args.seed, "threads": args.threads, "repeat": args.repeat,
           "predicted": pred}
    print(f"[{name}] warm-up (includes KeOps compilation on a first run) ...", file=sys.stderr,
          flush=True)
    with SoftminCounter() as c1:
        t_w1, c_w1, loss, g = loss_grad()
    with SoftminCounter() as c2:
        t_w2, c_w2, F, G = potentials()
    rec["warmup_s"] = {"loss_grad": t_w1, "potentials": t_w2}
    rec["warmup_cpu_s"] = {"loss_grad": c_w1, "potentials": c_w2}
    rec["softmin_calls"] = {"loss_grad": c1.calls, "potentials": c2.calls,
                            "per_level_loss_grad": {str(k): v for k, v in
                                                    sorted(c1.per_side.items())}}
    rec["pixel_pairs"] = {"loss_grad": c1.pairs, "potentials": c2.pairs}
    rec["pairs_match_prediction"] = (c1.pairs == c2.pairs == pred["pairs_per_item"] * args.batch)
    print(f"[{name}] warm-up {t_w1:.2f} s + {t_w2:.2f} s, {c1.calls} softmin calls, "
          f"{c1.pairs:.3e} pixel pairs (predicted {pred['pairs_per_item'] * args.batch:.3e})",
          file=sys.stderr, flush=True)

    runs = []
    for r in range(args.repeat):
        l0 = loadavg()
        t1, u1, loss, g = loss_grad()
        l1 = loadavg()
        t2, u2, F, G = potentials()
        l2 = loadavg()
        runs.append({"loss_grad_s": t1, "potentials_s": t2, "loss_grad_cpu_s": u1,
                     "potentials_cpu_s": u2, "load_before": l0, "load_mid": l1,
                     "load_after": l2})
        print(f"[{name}] run {r + 1}/{args.repeat}: loss+grad {t1:.2f} s (CPU {u1:.2f} s), "
              f"potentials {t2:.2f} s (CPU {u2:.2f} s), load {l0[0]:.2f}/{l1[0]:.2f}/{l2[0]:.2f}",
              file=sys.stderr, flush=True)
    rec["runs"] = runs
    lg = [x["loss_grad_s"] for x in runs]
    pt = [x["potentials_s"] for x in runs]
    rec["loss_grad_s"] = {"median": statistics.median(lg), "min": min(lg), "all": lg}
    rec["potentials_s"] = {"median": statistics.median(pt), "min": min(pt), "all": pt}
    # CPU seconds of the whole process (all threads): less sensitive to a loaded machine than
    # wall time; CPU / threads approximates the wall time on idle cores if the threads scale.
    for key in ("loss_grad_cpu_s", "potentials_cpu_s"):
        v = [x[key] for x in runs]
        rec[key] = {"median": statistics.median(v), "min": min(v), "all": v}
    rec["loss"] = [float(v) for v in loss.reshape(-1)]
    rec["grad_a_absmax"] = float(g.abs().max())
    # d loss / d a equals F up to a constant in the balanced case: a cheap consistency check.
    Fc = F - F.mean(dim=tuple(range(1, F.dim())), keepdim=True)
    gc = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
    rec["grad_vs_F_centred_rel"] = float((Fc - gc).abs().max() / Fc.abs().max())
    rec["load_avg"] = [x["load_before"] for x in runs]
    rec["pairs_per_s_loss_grad"] = c1.pairs / rec["loss_grad_s"]["median"]
    return rec


def check(paths, args, torch, sinkhorn_divergence):
    from safetensors import safe_open

    worst = 0.0
    for path in paths:
        with safe_open(path, "np") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        prm = json.loads(meta["params"])
        if meta.get("kind", "grid") != "grid":
            print(f"{os.path.basename(path)}: kind {meta.get('kind')}, skipped")
            continue
        dt = torch.float64
        a = torch.tensor(t["a"], dtype=dt).unsqueeze(1).requires_grad_(True)
        b = torch.tensor(t["b"], dtype=dt).unsqueeze(1).requires_grad_(True)
        kw = dict(p=prm["p"], blur=prm["blur"], reach=prm["reach"], scaling=prm["scaling"],
                  debias=prm["debias"])
        loss = sinkhorn_divergence(a, b, **kw)
        ga, gb = torch.autograd.grad(loss.sum(), [a, b])
        with torch.no_grad():
            F, G = sinkhorn_divergence(a.detach(), b.detach(), potentials=True, **kw)
        got = {"loss": loss.detach(), "grad_a": ga.squeeze(1), "grad_b": gb.squeeze(1),
               "F": F.squeeze(1), "G": G.squeeze(1)}
        parts = []
        for k, v in got.items():
            ref = torch.tensor(t[k], dtype=dt)
            rel = float((v - ref).abs().max() / ref.abs().max())
            msg = f"{k} {rel:.1e}"
            if k != "loss":
                ax = tuple(range(1, v.dim()))
                vc, rc = v - v.mean(dim=ax, keepdim=True), ref - ref.mean(dim=ax, keepdim=True)
                relc = float((vc - rc).abs().max() / rc.abs().max())
                msg += f" (centred {relc:.1e})"
                worst = max(worst, relc if prm["reach"] is None else rel)
            else:
                worst = max(worst, rel)
            parts.append(msg)
        print(f"{os.path.basename(path)} [{json.dumps(kw)}, shape {prm['shape']}, B {prm['B']}]: "
              + ", ".join(parts), flush=True)
    print(f"worst relative error (centred for balanced cases): {worst:.1e}")
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,512", help="image sides n (n×n), comma-separated; "
                    "'' for none")
    ap.add_argument("--vol", default="64", help="volume sides n (n×n×n), comma-separated; '' for none")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--p", type=int, default=2, choices=[1, 2])
    ap.add_argument("--blur", type=float, default=None, help="default: one pixel, 1/n")
    ap.add_argument("--scaling", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs after the warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch and OpenMP (KeOps) threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omp-wait-policy", default="passive",
                    help="OMP_WAIT_POLICY for KeOps unless already set ('' = leave unset, "
                         "libgomp's default spins)")
    ap.add_argument("--json", help="write all records to this file")
    ap.add_argument("--save-inputs", metavar="DIR", help="write the timed inputs here (.npy)")
    ap.add_argument("--check", nargs="+", metavar="CASE",
                    help="recompute reference grid cases in float64 and print the errors")
    args = ap.parse_args()

    set_threads(args.threads, args.omp_wait_policy)
    import torch

    torch.set_num_threads(args.threads)
    import geomloss
    import pykeops
    from geomloss import sinkhorn_divergence

    if args.check:
        check(args.check, args, torch, sinkhorn_divergence)
        return

    cases = [(f"img{n}", (n, n)) for n in (int(s) for s in args.sizes.split(",") if s)]
    cases += [(f"vol{n}", (n, n, n)) for n in (int(s) for s in args.vol.split(",") if s)]
    env = {"torch": torch.__version__, "geomloss": geomloss.__version__,
           "pykeops": pykeops.__version__, "python": platform.python_version(),
           "nproc": os.cpu_count(), "threads": args.threads,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                        if l.startswith("model name")), platform.processor()),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    records = []
    for name, shape in cases:
        rec = run_case(name, shape, args, torch, sinkhorn_divergence)
        records.append(rec)
        print(json.dumps({k: rec[k] for k in ("case", "dtype", "loss_grad_s", "potentials_s",
                                              "loss_grad_cpu_s", "potentials_cpu_s", "loss",
                                              "pixel_pairs", "load_avg")}), flush=True)
        if args.json:  # rewritten after every case, so a long run keeps what it has
            with open(args.json, "w") as f:
                json.dump({"env": env, "records": records}, f, indent=1)

    print()
    print(f"GeomLoss {geomloss.__version__} grid sinkhorn_divergence, p = {args.p}, "
          f"scaling {args.scaling}, blur {'1/n' if args.blur is None else args.blur}, "
          f"B = {args.batch}, {args.threads} threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
          f"median of {args.repeat} after 1 warm-up")
    print("| case | dtype | loss+grad (s) | potentials (s) | CPU s (loss+grad / potentials) | "
          "loss | pixel pairs | pairs/s (loss+grad) | load avg (1/5/15 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        ld = r["load_avg"][0]
        print(f"| {'×'.join(map(str, r['shape']))} | {r['dtype']} | "
              f"{r['loss_grad_s']['median']:.3g} | {r['potentials_s']['median']:.3g} | "
              f"{r['loss_grad_cpu_s']['median']:.3g} / {r['potentials_cpu_s']['median']:.3g} | "
              f"{', '.join(f'{v:.6e}' for v in r['loss'])} | {r['pixel_pairs']['loss_grad']:.3e} | "
              f"{r['pairs_per_s_loss_grad']:.3e} | {ld[0]:.2f} {ld[1]:.2f} {ld[2]:.2f} |")


if __name__ == "__main__":
    main()
