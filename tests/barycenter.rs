//! `ImagesBarycenter`: GeomLoss 0.3.1's `ImagesBarycenter` reference case
//! (`tests/data/reference/grid/bary_K3_32x32.safetensors`) in f64 and f32, batches and grids
//! GeomLoss refuses (non-square, odd sizes, volumes), the K = 1 sanity check, and input
//! validation.
//!
//! Metric: max|got − ref| / max|ref| over the whole tensor.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_ot::ImagesBarycenter;
use common::rel_err;
use std::path::PathBuf;

/// The reference README's tolerances: f64 1e-6; f32 (potential-like tensors, p = 2) 1e-4.
const TOL_F64: f64 = 1e-6;
const TOL_F32: f64 = 1e-4;

struct Case {
    params: serde_json::Value,
    info: serde_json::Value,
    t: std::collections::HashMap<String, Tensor>,
}

fn bary_case() -> Case {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/reference/grid/bary_K3_32x32.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    assert_eq!(meta["kind"], "barycenter");
    let t = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    Case {
        params: serde_json::from_str(&meta["params"]).unwrap(),
        info: serde_json::from_str(&meta["info"]).unwrap(),
        t,
    }
}

fn solver_of(params: &serde_json::Value) -> ImagesBarycenter {
    ImagesBarycenter::builder(params["shape"].as_array().unwrap().len())
        .p(params["p"].as_u64().unwrap() as u32)
        .blur(params["blur"].as_f64())
        .scaling_n(params["scaling_N"].as_u64().unwrap() as usize)
        .build()
        .unwrap()
}

fn mass(t: &Tensor) -> Vec<f64> {
    let b = t.dim(0).unwrap();
    t.to_dtype(DType::F64)
        .unwrap()
        .reshape((b, ()))
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Finite and non-negative everywhere.
fn assert_finite_nonneg(t: &Tensor, what: &str) {
    let v: Vec<f64> = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(
        v.iter().all(|x| x.is_finite() && *x >= 0.0),
        "{what}: non-finite or negative values"
    );
}

/// A Gaussian blob on an `n1 × n2` grid (pixel (i, j) at (i/n1, j/n2)), normalised to 1,
/// plus a floor `floor` (relative to the peak) before normalising.
fn blob(n1: usize, n2: usize, c: (f64, f64), s: f64, floor: f64) -> Vec<f64> {
    let mut v = Vec::with_capacity(n1 * n2);
    for i in 0..n1 {
        for j in 0..n2 {
            let (x, y) = (i as f64 / n1 as f64 - c.0, j as f64 / n2 as f64 - c.1);
            v.push((-(x * x + y * y) / (2.0 * s * s)).exp() + floor);
        }
    }
    let t: f64 = v.iter().sum();
    v.iter().map(|x| x / t).collect()
}

#[test]
fn reference_case_f64_and_f32() -> Result<()> {
    let c = bary_case();
    let solver = solver_of(&c.params);
    let (m, w, want) = (&c.t["measures"], &c.t["weights"], &c.t["barycenter"]);
    let got = solver.geomloss(m, w)?;
    assert_eq!(got.dtype(), DType::F64);
    let e64 = rel_err(&got, want);
    // GeomLoss's output is a fixed-iteration approximation whose mass is not 1 (info).
    let want_mass = c.info["barycenter_mass"][0].as_f64().unwrap();
    let got_mass = mass(&got)[0];
    let e_mass = (got_mass - want_mass).abs() / want_mass;
    let got32 = solver.geomloss(&m.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?)?;
    assert_eq!(got32.dtype(), DType::F32);
    let e32 = rel_err(&got32, want);
    println!(
        "bary_K3_32x32: f64 rel err {e64:.3e}, f32 {e32:.3e}, mass {got_mass} (ref {want_mass}, rel {e_mass:.1e})"
    );
    assert!(e64 <= TOL_F64, "f64 rel err {e64:.3e}");
    assert!(e_mass <= TOL_F64, "mass rel err {e_mass:.3e}");
    assert!(e32 <= TOL_F32, "f32 rel err {e32:.3e}");
    // The defaults are the reference's: blur 1/n, scaling_N 10, p 2.
    let dflt = ImagesBarycenter::builder(2).build()?.geomloss(m, w)?;
    assert!(rel_err(&dflt, want) <= TOL_F64);
    Ok(())
}

/// A batch of two (the reference case and a shuffled copy) gives each item's own result, and
/// a non-square odd grid (17×23) and a small volume run and give finite, non-negative output.
#[test]
fn batches_odd_grids_and_volumes() -> Result<()> {
    let dev = Device::Cpu;
    let c = bary_case();
    let solver = ImagesBarycenter::builder(2).build()?;
    let (m, w) = (&c.t["measures"], &c.t["weights"]);
    // Item 2: the measures in reverse order with other weights.
    let m2 = Tensor::cat(
        &[m.narrow(1, 2, 1)?, m.narrow(1, 1, 1)?, m.narrow(1, 0, 1)?],
        1,
    )?;
    let w2 = Tensor::new(&[[0.2f64, 0.3, 0.5]], &dev)?;
    let both = solver.geomloss(&Tensor::cat(&[m, &m2], 0)?, &Tensor::cat(&[w, &w2], 0)?)?;
    assert_eq!(both.dims(), &[2, 32, 32]);
    assert_finite_nonneg(&both, "batch of 2");
    let one = solver.geomloss(m, w)?;
    let two = solver.geomloss(&m2, &w2)?;
    let (e1, e2) = (
        rel_err(&both.narrow(0, 0, 1)?, &one),
        rel_err(&both.narrow(0, 1, 1)?, &two),
    );
    assert!(e1 <= 1e-12 && e2 <= 1e-12, "batch items {e1:.1e} {e2:.1e}");
    assert!(rel_err(&one, &two) > 1e-2, "the two items should differ");

    // 17×23, three blobs, one with exact zeros (masked pixels).
    let (n1, n2) = (17, 23);
    let mut v = blob(n1, n2, (0.25, 0.3), 0.08, 0.0);
    v.extend(blob(n1, n2, (0.7, 0.25), 0.1, 1e-3));
    let mut z = blob(n1, n2, (0.5, 0.75), 0.06, 0.0);
    for (i, x) in z.iter_mut().enumerate() {
        if i % 3 == 0 {
            *x = 0.0;
        }
    }
    let s: f64 = z.iter().sum();
    v.extend(z.iter().map(|x| x / s));
    let m = Tensor::from_vec(v, (1, 3, n1, n2), &dev)?;
    let w = Tensor::new(&[[0.25f64, 0.25, 0.5]], &dev)?;
    let bar = solver.geomloss(&m, &w)?;
    assert_eq!(bar.dims(), &[1, n1, n2]);
    assert_finite_nonneg(&bar, "17×23");
    let mm = mass(&bar)[0];
    assert!(mm > 0.1 && mm < 2.0, "17×23 mass {mm}");
    // f32 agrees with f64 on it.
    let bar32 = solver.geomloss(&m.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?)?;
    let e = rel_err(&bar32, &bar);
    assert!(e <= TOL_F32, "17×23 f32 vs f64 {e:.1e}");

    // A 6×5×7 volume, K = 2, p = 1 and p = 2.
    let n = 6 * 5 * 7;
    let vol: Vec<f64> = (0..2 * n).map(|i| 1.0 + ((i * 7919) % 13) as f64).collect();
    let vol = Tensor::from_vec(vol, (1, 2, n), &dev)?;
    let vol = vol
        .broadcast_div(&vol.sum_keepdim(2)?)?
        .reshape((1, 2, 6, 5, 7))?;
    let w = Tensor::new(&[[0.5f64, 0.5]], &dev)?;
    for p in [1, 2] {
        let bar = ImagesBarycenter::builder(3)
            .p(p)
            .build()?
            .geomloss(&vol, &w)?;
        assert_eq!(bar.dims(), &[1, 6, 5, 7]);
        assert_finite_nonneg(&bar, "6×5×7 volume");
    }
    Ok(())
}

/// K = 1 with weight 1: the debiased barycenter of one measure is the measure itself (β = α is
/// the iteration's fixed point: `f_k = g_k` = α's self potential `p`, `d = α e^{p/ε}`). GeomLoss's
/// schedule stops after a fixed number of iterations, before that fixed point: the debiasing
/// update `log d ← ½(log d + log β + …)` only halves its error per iteration, so the mass falls
/// short (the reference K = 3 case has mass 0.711) and the shape is the measure's up to that
/// residual. Measured on a smooth 32×32 blob (σ = 0.1) in f64, max|Δ|/max|α| after normalising
/// the mass: 6.6e-2 (mass 0.776) with GeomLoss's 10 iterations per level, 5.4e-3 (mass 0.984)
/// with 100 (16×16 and 64×64, σ 0.05–0.2: 3.5e-2–9.1e-2 with 10, 2.4e-3–6.7e-3 with 100).
/// The tolerances below are those figures with a margin: the gap is the schedule's, not
/// rounding, and it shrinks with more iterations.
#[test]
fn one_measure_gives_itself() -> Result<()> {
    // (scaling_n, shape tolerance, mass range)
    const CASES: [(usize, f64, (f64, f64)); 2] =
        [(10, 0.08, (0.7, 0.85)), (100, 1e-2, (0.97, 1.0))];
    let dev = Device::Cpu;
    let n = 32;
    let a = Tensor::from_vec(blob(n, n, (0.45, 0.55), 0.1, 0.0), (1, 1, n, n), &dev)?;
    let w = Tensor::new(&[[1.0f64]], &dev)?;
    for (sn, tol, (lo, hi)) in CASES {
        let bar = ImagesBarycenter::builder(2)
            .scaling_n(sn)
            .build()?
            .geomloss(&a, &w)?;
        let m = mass(&bar)[0];
        let shape_err = rel_err(&(&bar / m)?, &a.reshape((1, n, n))?);
        println!("K = 1, scaling_n {sn}: mass {m:.4}, normalised rel err {shape_err:.3e}");
        assert!(m >= lo && m <= hi, "scaling_n {sn}: mass {m}");
        assert!(
            shape_err <= tol,
            "scaling_n {sn}: shape rel err {shape_err:.3e}"
        );
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors_naming_the_argument() -> Result<()> {
    let dev = Device::Cpu;
    let solver = ImagesBarycenter::builder(2).build()?;
    let m = Tensor::full(1.0f64 / 16.0, (2, 3, 4, 4), &dev)?;
    let w = Tensor::full(1.0f64 / 3.0, (2, 3), &dev)?;
    assert!(solver.geomloss(&m, &w).is_ok());
    let err = |m: &Tensor, w: &Tensor| -> String {
        solver
            .geomloss(m, w)
            .expect_err("expected an error")
            .to_string()
    };
    let has = |e: String, needles: &[&str]| {
        for n in needles {
            assert!(e.contains(n), "{e:?} does not mention {n:?}");
        }
    };
    // Shapes.
    has(
        err(&m.reshape((6, 4, 4))?, &w),
        &["measures", "(B, K, n1, n2)"],
    );
    has(err(&m.narrow(2, 0, 0)?, &w), &["measures"]);
    has(
        err(&m, &w.narrow(1, 0, 2)?),
        &["weights", "(B, K) = (2, 3)"],
    );
    has(err(&m, &w.reshape(6)?), &["weights"]);
    // Densities.
    let mut v = vec![1.0f64 / 16.0; 2 * 3 * 16];
    v[5] = -0.1;
    has(
        err(&Tensor::from_vec(v.clone(), (2, 3, 4, 4), &dev)?, &w),
        &["measures", ">= 0"],
    );
    v[5] = f64::NAN;
    has(
        err(&Tensor::from_vec(v.clone(), (2, 3, 4, 4), &dev)?, &w),
        &["measures", "non-finite"],
    );
    v[5] = f64::INFINITY;
    has(
        err(&Tensor::from_vec(v.clone(), (2, 3, 4, 4), &dev)?, &w),
        &["measures", "non-finite"],
    );
    let mut v = vec![1.0f64 / 16.0; 2 * 3 * 16];
    for x in &mut v[4 * 16..5 * 16] {
        *x = 0.0;
    }
    has(
        err(&Tensor::from_vec(v, (2, 3, 4, 4), &dev)?, &w),
        &["measures", "measure 1 of batch item 1", "mass"],
    );
    // Weights.
    let wv = |v: [f64; 6]| Tensor::from_vec(v.to_vec(), (2, 3), &dev).unwrap();
    has(
        err(&m, &wv([0.5, 0.5, 0.0, 1.2, -0.1, -0.1])),
        &["weights", ">= 0"],
    );
    has(
        err(&m, &wv([0.5, 0.5, 0.0, 0.3, 0.3, 0.3])),
        &["weights", "batch item 1", "sum to 1"],
    );
    has(
        err(&m, &wv([0.5, 0.5, f64::NAN, 0.3, 0.3, 0.4])),
        &["weights", "non-finite"],
    );
    // Weights rounded in f32 are accepted.
    let w32 = Tensor::new(
        &[[0.1f32, 0.2, 0.7], [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]],
        &dev,
    )?;
    assert!(solver.geomloss(&m, &w32).is_ok());
    // solve: unequal masses within a batch item (balanced barycenter).
    let mut v = vec![1.0f64 / 16.0; 2 * 3 * 16];
    for x in &mut v[16..32] {
        *x *= 1.01;
    }
    let e = solver
        .solve(&Tensor::from_vec(v, (2, 3, 4, 4), &dev)?, &w)
        .expect_err("unequal masses")
        .to_string();
    has(e, &["measures", "batch item 0", "equal total masses"]);
    // Masses normalised in f32 are accepted.
    let m32 = Tensor::rand(0.5f32, 1.0, (2, 3, 33, 31), &dev)?;
    let m32 = m32.broadcast_div(&m32.sum_keepdim((2, 3))?)?;
    let one = ImagesBarycenter::builder(2).max_iter(2).build()?;
    assert!(one.solve(&m32, &w32).is_ok());
    // Integer measures.
    has(err(&m.to_dtype(DType::U32)?, &w), &["dtype"]);
    // Options.
    let opt = |r: Result<ImagesBarycenter>| r.expect_err("expected an error").to_string();
    has(opt(ImagesBarycenter::builder(4).build()), &["dims"]);
    has(opt(ImagesBarycenter::builder(2).p(3).build()), &["p"]);
    has(
        opt(ImagesBarycenter::builder(2).blur(0.0).build()),
        &["blur"],
    );
    has(
        opt(ImagesBarycenter::builder(2).blur(f64::NAN).build()),
        &["blur"],
    );
    has(
        opt(ImagesBarycenter::builder(2).scaling_n(0).build()),
        &["scaling_n"],
    );
    has(opt(ImagesBarycenter::builder(2).tol(0.0).build()), &["tol"]);
    has(
        opt(ImagesBarycenter::builder(2).max_iter(0).build()),
        &["max_iter"],
    );
    // A volume solver refuses images.
    has(
        ImagesBarycenter::builder(3)
            .build()?
            .geomloss(&m, &w)
            .unwrap_err()
            .to_string(),
        &["measures", "(B, K, n1, n2, n3)"],
    );
    Ok(())
}

/// Σ_k w_k F_k over the barycenter's grid, F_k the debiased potential of S_ε(β, α_k) on β's
/// side, solved independently by `ImagesLoss` with a tight `tol`: the first-order optimality
/// condition of the debiased barycenter says it is constant on β's support. Returns its mean
/// deviation under β, `Σ_j β_j |R_j − R̄| / ε` with `R̄ = Σ_j β_j R_j` (β of mass 1), and its
/// max − min over the pixels where β is at least 1e-3 of its peak, divided by ε.
fn optimality_residual(bar: &Tensor, m: &Tensor, w: &[f64], blur: f64) -> Result<(f64, f64)> {
    let dims = bar.rank() - 1;
    let loss = candle_ot::ImagesLoss::builder(dims)
        .blur(blur)
        .tol(1e-8)
        .max_iter(100_000)
        .build()?;
    let mut sum: Option<Tensor> = None;
    for (k, wk) in w.iter().enumerate() {
        let ak = m.narrow(1, k, 1)?.squeeze(1)?;
        let s = loss.solve(bar, &ak)?;
        let t = (s.f * *wk)?;
        sum = Some(match sum {
            Some(x) => (x + t)?,
            None => t,
        });
    }
    let r = common::flat(&sum.expect("K >= 1"));
    let beta = common::flat(bar);
    let mean: f64 = r.iter().zip(&beta).map(|(r, b)| r * b).sum();
    let l1: f64 = r.iter().zip(&beta).map(|(r, b)| b * (r - mean).abs()).sum();
    let peak = beta.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = r
        .iter()
        .zip(&beta)
        .filter(|(_, b)| **b >= 1e-3 * peak)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), (&x, _)| {
            (l.min(x), h.max(x))
        });
    let eps = blur.powi(2);
    Ok((l1 / eps, (hi - lo) / eps))
}

/// The converged debiased barycenter of the reference case's three measures: mass 1 to `tol`,
/// the optimality condition Σ_k w_k F_k = constant, and K = 1 gives the measure itself.
#[test]
fn converged_barycenter_is_optimal_with_mass_one() -> Result<()> {
    let c = bary_case();
    let (m, w) = (&c.t["measures"], &c.t["weights"]);
    let m = m.broadcast_div(&m.sum_keepdim((2, 3))?)?;
    let wv = common::flat(w);
    // The default blur (one pixel). At blur 0.05 this case needs more than 10⁴ iterations for
    // 1e-6 (the barycenter keeps sharpening below the blur scale; module docs).
    #[allow(clippy::single_element_loop)] // a table of cases, kept open for more
    for (blur, tol) in [(1.0 / 32.0, 1e-6)] {
        let t0 = std::time::Instant::now();
        let sol = ImagesBarycenter::builder(2)
            .blur(blur)
            .tol(tol)
            .build()?
            .solve(&m, w)?;
        let d = &sol.diagnostics;
        let mm = mass(&sol.barycenter)[0];
        let t_solve = t0.elapsed();
        let res = optimality_residual(&sol.barycenter, &m, &wv, blur)?;
        println!(
            "blur {blur} tol {tol}: {} iterations, marginal {:.1e}, symmetric {:.1e}, mass {mm}, optimality residual {:.2e} mean, {:.2e} max ({:.2?})",
            d.iterations, d.marginal_error, d.symmetric_error, res.0, res.1, t_solve
        );
        assert!(d.converged);
        assert!(d.marginal_error <= tol && d.symmetric_error <= tol);
        assert!((mm - 1.0).abs() <= tol, "mass {mm}");
        // Measured: the mean residual equals the symmetric error (9.98e-7 at 1.0e-6).
        assert!(res.0 <= 3.0 * tol, "optimality residual {:.2e}", res.0);
        assert!(
            res.1 <= 1e3 * tol,
            "optimality residual (max) {:.2e}",
            res.1
        );
    }
    Ok(())
}

/// Two translated Gaussian blobs with weights (t, 1 − t): the debiased barycenter is the blob
/// at the interpolated centre (Janati et al. 2020: exact for Gaussians). On a 40×40 grid with
/// blurs 0.08 (widths 0.07) the grid and its border leave a small gap; measured 2.5e-4–4e-4
/// relative (max|Δ| / max), tolerance 2e-3.
#[test]
fn converged_barycenter_of_translates_is_the_interpolated_translate() -> Result<()> {
    let dev = Device::Cpu;
    let n = 40;
    let (c0, c1) = ((0.3, 0.35), (0.65, 0.6));
    let mut v = blob(n, n, c0, 0.07, 0.0);
    v.extend(blob(n, n, c1, 0.07, 0.0));
    let m = Tensor::from_vec(v, (1, 2, n, n), &dev)?;
    for t in [0.5, 0.25] {
        let w = Tensor::new(&[[t, 1.0 - t]], &dev)?;
        let sol = ImagesBarycenter::builder(2)
            .blur(0.08)
            .tol(1e-7)
            .build()?
            .solve(&m, &w)?;
        let c = (t * c0.0 + (1.0 - t) * c1.0, t * c0.1 + (1.0 - t) * c1.1);
        let want = Tensor::from_vec(blob(n, n, c, 0.07, 0.0), (1, n, n), &dev)?;
        let e = rel_err(&sol.barycenter, &want);
        println!(
            "t = {t}: {} iterations, rel err {e:.2e}",
            sol.diagnostics.iterations
        );
        assert!(sol.diagnostics.converged, "{:?}", sol.diagnostics);
        assert!(e <= 2e-3, "t = {t}: rel err {e:.2e}");
    }
    Ok(())
}

/// Gradients of the converged barycenter through `backward_iterations` unrolled iterations,
/// against central finite differences of the converged barycenter (f64, tol 1e-12), for the
/// scalar `L = Σ_j r_j β_j` with a smooth `r`: along a seeded mass-preserving direction of the
/// measures, and along `(1, −1)` in the weights (the weights must sum to 1). Measured relative
/// errors (measures, weights): 20 unrolled iterations 8.1e-4, 1.5e-2; 100: 6.6e-5, 5.6e-5;
/// 400: 3.5e-5, 9.8e-6. A random (pixel-noise) `r` converges far slower (0.62, 0.32, 0.19 for
/// the measures): directions below the blur scale are the iteration's slow modes (module docs).
#[test]
fn converged_barycenter_gradients_match_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let (n1, n2) = (7, 9);
    let mut rng = common::rng(20);
    let mut v = blob(n1, n2, (0.3, 0.4), 0.15, 0.05);
    v.extend(blob(n1, n2, (0.6, 0.5), 0.2, 0.05));
    let m0 = Tensor::from_vec(v, (1, 2, n1, n2), &dev)?;
    let w0 = [0.3f64, 0.7];
    let r: Vec<f64> = (0..n1 * n2)
        .map(|i| {
            let (x, y) = ((i / n2) as f64 / n1 as f64, (i % n2) as f64 / n2 as f64);
            (3.0 * x).sin() + y * y
        })
        .collect();
    let r = Tensor::from_vec(r, (1, n1, n2), &dev)?;
    // Mass-preserving direction per measure.
    let dm = common::rand_tensor(&mut rng, &[1, 2, n1, n2], -1.0, 1.0)?;
    let dm = dm.broadcast_sub(&dm.mean_keepdim((2, 3))?)?;
    let solver = ImagesBarycenter::builder(2)
        .blur(0.12)
        .tol(1e-12)
        .max_iter(100_000)
        .backward_iterations(100)
        .build()?;
    let objective = |m: &Tensor, w: &[f64]| -> Result<f64> {
        let w = Tensor::from_vec(w.to_vec(), (1, 2), &dev)?;
        let s = solver.solve(m, &w)?;
        assert!(s.diagnostics.converged, "{:?}", s.diagnostics);
        (s.barycenter * &r)?.sum_all()?.to_scalar::<f64>()
    };
    let mv = candle_core::Var::from_tensor(&m0)?;
    let wv = candle_core::Var::from_tensor(&Tensor::from_vec(w0.to_vec(), (1, 2), &dev)?)?;
    let s = solver.solve(mv.as_tensor(), wv.as_tensor())?;
    let l = (s.barycenter * &r)?.sum_all()?;
    let grads = l.backward()?;
    let gm = grads
        .get(mv.as_tensor())
        .expect("gradient for the measures");
    let gw = common::flat(grads.get(wv.as_tensor()).expect("gradient for the weights"));
    let h = 1e-5;
    let fd_m =
        (objective(&(&m0 + (&dm * h)?)?, &w0)? - objective(&(&m0 - (&dm * h)?)?, &w0)?) / (2.0 * h);
    let an_m = (gm * &dm)?.sum_all()?.to_scalar::<f64>()?;
    let fd_w = (objective(&m0, &[w0[0] + h, w0[1] - h])?
        - objective(&m0, &[w0[0] - h, w0[1] + h])?)
        / (2.0 * h);
    let an_w = gw[0] - gw[1];
    let (em, ew) = (
        (an_m - fd_m).abs() / fd_m.abs(),
        (an_w - fd_w).abs() / fd_w.abs(),
    );
    println!("measures: {an_m:.10e} vs fd {fd_m:.10e} ({em:.1e}); weights: {an_w:.10e} vs fd {fd_w:.10e} ({ew:.1e})");
    assert!(
        em <= 2e-4 && ew <= 2e-4,
        "measures {em:.1e}, weights {ew:.1e}"
    );
    Ok(())
}

/// The converged mode on a volume (6×5×7, K = 2, p = 2, blur one pixel) and on a batch of two
/// weightings: converged, mass 1 to `tol`, and each batch item close to its own solve.
#[test]
fn converged_barycenter_of_volumes_and_batches() -> Result<()> {
    let dev = Device::Cpu;
    // Two smooth blobs (noise converges far slower: module docs).
    let n = 6 * 5 * 7;
    let mut vol = Vec::with_capacity(2 * n);
    for c in [(0.3, 0.3, 0.4), (0.6, 0.5, 0.5)] {
        for i in 0..n {
            let (x, y, z) = (
                (i / 35) as f64 / 6.0,
                ((i / 7) % 5) as f64 / 5.0,
                (i % 7) as f64 / 7.0,
            );
            let r2 = (x - c.0).powi(2) + (y - c.1).powi(2) + (z - c.2).powi(2);
            vol.push((-r2 / (2.0 * 0.2 * 0.2)).exp() + 0.01);
        }
    }
    let vol = Tensor::from_vec(vol, (1, 2, n), &dev)?;
    let vol = vol
        .broadcast_div(&vol.sum_keepdim(2)?)?
        .reshape((1, 2, 6, 5, 7))?;
    let solver = ImagesBarycenter::builder(3).tol(1e-6).build()?;
    let w = Tensor::new(&[[0.3f64, 0.7]], &dev)?;
    let one = solver.solve(&vol, &w)?;
    assert!(one.diagnostics.converged, "{:?}", one.diagnostics);
    assert_eq!(one.barycenter.dims(), &[1, 6, 5, 7]);
    let m = mass(&one.barycenter)[0];
    assert!((m - 1.0).abs() <= 1e-6, "mass {m}");
    let w2 = Tensor::new(&[[0.3f64, 0.7], [0.8, 0.2]], &dev)?;
    let both = solver.solve(&Tensor::cat(&[&vol, &vol], 0)?, &w2)?;
    let two = solver.solve(&vol, &Tensor::new(&[[0.8f64, 0.2]], &dev)?)?;
    let (e1, e2) = (
        rel_err(&both.barycenter.narrow(0, 0, 1)?, &one.barycenter),
        rel_err(&both.barycenter.narrow(0, 1, 1)?, &two.barycenter),
    );
    // A batch runs until its slowest item meets tol, so the faster item iterates longer than
    // alone; both meet tol, and β moves along the slow sub-blur modes meanwhile (module docs):
    // measured 0 and 1.5e-4 relative.
    assert!(e1 <= 1e-3 && e2 <= 1e-3, "batch items {e1:.1e} {e2:.1e}");
    Ok(())
}
