#!/usr/bin/env python3
"""Markdown summary of tol_side_by_side.sh's results.jsonl (one table per blur).

    python tol_report.py RESULTS.jsonl [--target 1e-5] [--versions versions.txt]

Ratio = the row's time / candle-ot f32's time (loss only, no gradient) at the loosest tol that
met the target; rows with a gradient are compared with candle-ot's loss + gradient time.
"""

import argparse
import json
import re


def load1(uptime):
    m = re.search(r"load average:\s*([\d.]+),\s*([\d.]+),\s*([\d.]+)", uptime or "")
    return m.group(1) if m else "?"


def fmt_t(t):
    return "—" if t is None else (f"{t:.3g} s" if t < 100 else f"{t:.0f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--target", type=float, default=1e-5)
    ap.add_argument("--versions")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    if args.versions:
        print("```")
        print(open(args.versions).read().strip())
        print("```\n")
    for blur in sorted({r["blur"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["blur"] == blur]
        # the reference: candle-ot f64 at its tol; else a given one (REF_S_<blur>); else the
        # looser f64 run (REF_CHECK_TOL) when the reference did not finish
        ref, ref_from = None, None
        for pick in ("candle_ref_f64", "given_ref", "candle_f64_tol"):
            row = next((r for r in rs if r["name"].startswith(pick) and r.get("result")), None)
            if row is not None:
                ref, ref_from = row["result"]["loss"], row["name"]
                break
        # candle-ot f32 at the loosest tol meeting the target
        base, base_grad = None, None
        for r in rs:
            res = r["result"]
            if r["name"].startswith("candle_f32_tol") and res and ref is not None:
                ok = abs(res["loss"] - ref) <= args.target * abs(ref)
                if ok and r["name"].endswith("_grad") and base_grad is None:
                    base_grad = res["median_s"]
                elif ok and not r["name"].endswith("_grad") and base is None:
                    base = res["median_s"]
        print(f"### blur {blur} (ε = {blur * blur:g}), reference S = {ref!r} ({ref_from})\n")
        print("| peer | dtype | setting | iterations | time | value | rel. err vs ref | "
              "ratio to candle-ot | load before → after |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            name, res = r["name"], r.get("result")
            if name == "given_ref":
                continue
            load = f"{load1(r['uptime_before'])} → {load1(r['uptime_after'])}"
            if res is None:
                print(f"| {name} | | failed or timed out (rc {r['rc']}, {r['wall_s']:.0f} s, hard "
                      f"cap) | | | | | | {load} |")
                continue
            if name.startswith("candle"):
                if "loss" not in res:
                    continue
                v = res["loss"] if not isinstance(res["loss"], list) else res["loss"][0]
                dtype = "f64" if "f64" in name else "f32"
                if name.startswith("candle_ref_f64_ot_"):
                    print(f"| candle-ot distance --no-debias ({name[-2:]}) | f64 | raw OT_ε term, "
                          f"same tol | — | {r['wall_s']:.3g} s (process) | {v:.12e} | — | — | "
                          f"{load} |")
                    continue
                setting = name.replace("candle_", "").replace("f64_", "").replace("f32_", "")
                grad = name.endswith("_grad")
                setting = setting.replace("_grad", "") + (" + grad" if grad else "")
                its = (f"{res.get('softmin_passes', '?')} passes "
                       f"({res.get('extra_iterations', 0)} extra)")
                t = res["median_s"]
                b = base_grad if grad else base
                ratio = f"{t / b:.2f}" if b else "—"
                rel = abs(v - ref) / abs(ref) if ref else float("nan")
                conv = res.get("converged")
                conv = "" if conv is None else f", converged {conv}"
                tag = " (ref)" if name == ref_from else ""
                print(f"| candle-ot{tag} | {dtype} | "
                      f"{setting}{conv} | {its} | {fmt_t(t)} | {v:.10e} | {rel:.2e} | {ratio} | "
                      f"{load} |")
            elif name.startswith("pot"):
                peer = res["peer"]
                if res.get("reached") and "f64_check" not in name:
                    its = "/".join(str(res["iterations"][k]) for k in ("ab", "aa", "bb"))
                    setting = f"stopThr {res['stopThr']:.2e}"
                    t, v, rel = res["time_s"], res["value"], res["rel_err"]
                else:
                    last = res["last"]
                    its = "/".join(str(last["iterations"][k]) for k in ("ab", "aa", "bb"))
                    me = "/".join(f"{last['marginal_err'][k]:.1e}" for k in ("ab", "aa", "bb"))
                    stops = "/".join(res["stops"][k] for k in ("ab", "aa", "bb"))
                    setting = f"run to: {stops}; marginal err {me}"
                    if "f64_check" not in name:
                        caps = res.get("cap_s", {})
                        setting = (f"NOT reached within caps ab {caps.get('ab')} s, aa/bb "
                                   f"{caps.get('aa')} s; " + setting)
                    t, v, rel = last["time_s"], last["value"], last["rel_err"]
                ratio = f"{t / base:.1f}" if base else "—"
                print(f"| {peer} | {res['dtype']} | {setting} | {its} (ab/aa/bb) | {fmt_t(t)} | "
                      f"{v:.10e} | {rel:.2e} | {ratio} | {load} |")
            elif name.startswith("ott"):
                peer = res["peer"]
                am = res["anderson_memory"]
                acc = f"Anderson(memory={am})" if am else "no Anderson"
                if res.get("reached"):
                    row = {k: res[k] for k in ("threshold", "time_s", "value", "rel_err",
                                               "n_iters")}
                    setting = f"{acc}, threshold {row['threshold']:g}"
                else:
                    row = res["tries"][-1] if res["tries"] else None
                    if row is None:
                        continue
                    setting = (f"{acc}, NOT reached (cap {res['cap_s']} s over all thresholds); "
                               f"last threshold {row['threshold']:g}")
                its = "/".join(str(i) for i in row["n_iters"])
                t = row["time_s"]
                ratio = f"{t / base:.1f}" if base else "—"
                print(f"| {peer} | {res['dtype']} | {setting} | {its} (xy/xx/yy) | {fmt_t(t)} | "
                      f"{row['value']:.10e} | {row['rel_err']:.2e} | {ratio} | {load} |")
        print()


if __name__ == "__main__":
    main()
