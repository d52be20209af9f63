//! Cross-device tests: the online backend's CUDA / Metal kernels against its CPU kernels, on the
//! same data (and the multiscale backend, whose fine level runs the block-sparse kernels). Every loss, p = 1 and 2, balanced and unbalanced, debiased or not; values,
//! potentials, transferred values (the plan operator) and the gradients with respect to x, y,
//! a and b; odd sizes (17 × 29, 1000 × 999), batches and masked (zero-weight) points.
//!
//! These tests need a GPU *and* the kernels compiled in: run them with
//! `cargo test -p candle-ot-tests --features cuda --test devices` (or `--features metal`).
//! Elsewhere each test prints why it is skipped and passes: there is nothing to compare.

#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::softmin::online;
use candle_ot::{Backend, Loss, SamplesLoss};
use common::*;

/// Relative agreement between devices, f64: both sides compute the same sums in a different
/// order (tiles, lanes), so only rounding differs.
const TOL_F64: f64 = 1e-9;
/// Relative agreement between devices, f32 (GPU f32 uses a hardware exp for shifted terms).
const TOL_F32: f64 = 2e-4;
const BLUR: f64 = 0.1;
const REACH: f64 = 0.3;

/// Expands `fn name(dev: &Device) -> Result<()>` into CUDA and Metal tests only (comparing the
/// CPU with itself would prove nothing).
macro_rules! gpu_test {
    ($fn_name:ident, $cuda:ident, $metal:ident) => {
        #[test]
        fn $cuda() -> candle_core::Result<()> {
            if !candle_core::utils::cuda_is_available() {
                eprintln!("skipping {}: no CUDA device", stringify!($cuda));
                return Ok(());
            }
            $fn_name(&candle_core::Device::new_cuda(0)?)
        }

        #[test]
        fn $metal() -> candle_core::Result<()> {
            if !candle_core::utils::metal_is_available() {
                eprintln!("skipping {}: no Metal device", stringify!($metal));
                return Ok(());
            }
            $fn_name(&candle_core::Device::new_metal(0)?)
        }
    };
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        TOL_F64
    } else {
        TOL_F32
    }
}

/// f64 CPU inputs: weights a (.., N), points x (.., N, D), b, y, values v (.., M, 3).
struct Case {
    a: Tensor,
    x: Tensor,
    b: Tensor,
    y: Tensor,
    v: Tensor,
}

fn case(
    seed: u64,
    batch: Option<usize>,
    n: usize,
    m: usize,
    d: usize,
    mass_b: f64,
) -> Result<Case> {
    let mut r = rng(seed);
    let lead = |k: usize| -> Vec<usize> {
        match batch {
            Some(b) => vec![b, k],
            None => vec![k],
        }
    };
    let with = |mut v: Vec<usize>, last: usize| {
        v.push(last);
        v
    };
    let x = rand_tensor(&mut r, &with(lead(n), d), 0.0, 1.0)?;
    let y = rand_tensor(&mut r, &with(lead(m), d), 0.2, 1.1)?;
    let v = rand_tensor(&mut r, &with(lead(m), 3), -1.0, 1.0)?;
    let a = weights(&mut r, batch, n, &[1, n / 2], 1.0)?;
    let b = weights(&mut r, batch, m, &[0, m - 1], mass_b)?;
    Ok(Case { a, x, b, y, v })
}

/// Loss, potentials, transfer and the four gradients of `loss` on `dev`.
fn outputs(
    loss: &SamplesLoss,
    c: &Case,
    dtype: DType,
    dev: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let var = |t: &Tensor| -> Result<Var> { Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?) };
    let (va, vx, vb, vy) = (var(&c.a)?, var(&c.x)?, var(&c.b)?, var(&c.y)?);
    let sol = loss.solve(Some(&va), &vx, Some(&vb), &vy)?;
    assert_eq!(sol.backend, Backend::Online);
    let grads = sol.loss.sum_all()?.backward()?;
    let grad = |v: &Var| -> Result<Tensor> {
        match grads.get(v) {
            Some(g) => Ok(g.clone()),
            None => v.zeros_like(),
        }
    };
    let mut out = vec![
        ("loss".to_string(), sol.loss.clone()),
        ("F".to_string(), sol.f.clone()),
        ("G".to_string(), sol.g.clone()),
        ("grad_x".to_string(), grad(&vx)?),
        ("grad_y".to_string(), grad(&vy)?),
        ("grad_a".to_string(), grad(&va)?),
        ("grad_b".to_string(), grad(&vb)?),
    ];
    if loss.options().loss == Loss::Sinkhorn {
        let t = sol.transfer(&c.v.to_dtype(dtype)?.to_device(dev)?)?;
        out.push(("transfer".to_string(), t));
    }
    Ok(out)
}

fn compare(
    dev: &Device,
    loss_kind: Loss,
    sizes: &[(Option<usize>, usize, usize, usize)],
) -> Result<()> {
    if !online::supports(dev) {
        eprintln!("skipping: the online kernels for {dev:?} are not compiled in (enable the test package's `cuda` / `metal` feature)");
        return Ok(());
    }
    let mut failures = vec![];
    let mut checked = 0;
    let mut seed = 7000;
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, dev) {
            continue;
        }
        for &(batch, n, m, d) in sizes {
            for p in [1u32, 2] {
                for reach in [None, Some(REACH)] {
                    for debias in [true, false] {
                        // Hausdorff ignores debias; the kernel losses ignore p, reach, debias.
                        let keep = match loss_kind {
                            Loss::Sinkhorn => true,
                            Loss::Hausdorff => debias,
                            _ => debias && p == 2 && reach.is_none(),
                        };
                        if !keep {
                            continue;
                        }
                        seed += 1;
                        let balanced = loss_kind == Loss::Sinkhorn && reach.is_none();
                        let c = case(seed, batch, n, m, d, if balanced { 1.0 } else { 1.3 })?;
                        let loss = SamplesLoss::builder(loss_kind)
                            .p(p)
                            .blur(BLUR)
                            .reach(reach)
                            .debias(debias)
                            .backend(Backend::Online)
                            .build()?;
                        let want = outputs(&loss, &c, dtype, &Device::Cpu)?;
                        let got = outputs(&loss, &c, dtype, dev)?;
                        let name = format!(
                            "{loss_kind:?} {dtype:?} batch={batch:?} {n}x{m} D={d} p={p} reach={reach:?} debias={debias}"
                        );
                        for ((key, g), (_, w)) in got.iter().zip(&want) {
                            assert_eq!(g.dims(), w.dims(), "{name} {key}: shape");
                            let err = rel_err(g, w);
                            if !all_finite(g) || err.is_nan() || err > tol(dtype) {
                                failures.push(format!("{name} {key}: rel err {err:.3e}"));
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    println!("{checked} configurations checked on {dev:?}");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Small odd sizes, one batched: every D path (1, 2, 3 specialised, 5 generic).
const SMALL: [(Option<usize>, usize, usize, usize); 4] = [
    (None, 17, 29, 1),
    (Some(2), 17, 29, 3),
    (None, 29, 17, 2),
    (Some(3), 17, 29, 5),
];
/// Larger odd sizes: many tiles and blocks.
const LARGE: [(Option<usize>, usize, usize, usize); 1] = [(None, 1000, 999, 3)];

fn devices_sinkhorn(dev: &Device) -> Result<()> {
    compare(dev, Loss::Sinkhorn, &SMALL)?;
    compare(dev, Loss::Sinkhorn, &LARGE)
}
fn devices_hausdorff(dev: &Device) -> Result<()> {
    compare(dev, Loss::Hausdorff, &SMALL)?;
    compare(dev, Loss::Hausdorff, &LARGE)
}
fn devices_kernels(dev: &Device) -> Result<()> {
    for loss in [Loss::Energy, Loss::Gaussian, Loss::Laplacian] {
        compare(dev, loss, &SMALL)?;
        compare(dev, loss, &LARGE)?;
    }
    Ok(())
}

/// The raw ops on a large D (generic path with several 8-column passes) and fully masked rows.
fn devices_raw_ops(dev: &Device) -> Result<()> {
    if !online::supports(dev) {
        eprintln!("skipping: the online kernels for {dev:?} are not compiled in");
        return Ok(());
    }
    let mut r = rng(99);
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, dev) {
            continue;
        }
        let (b, n, m, d) = (2, 33, 41, 19);
        let x = rand_tensor(&mut r, &[b, n, d], 0.0, 1.0)?.to_dtype(dtype)?;
        let y = rand_tensor(&mut r, &[b, m, d], 0.0, 1.0)?.to_dtype(dtype)?;
        let mut hv = uniform_vec(&mut r, b * m, -1.0, 1.0);
        for v in hv.iter_mut().skip(m).take(m) {
            *v = f64::NEG_INFINITY; // batch item 1: every column masked
        }
        let h = Tensor::from_vec(hv, (b, m), &Device::Cpu)?.to_dtype(dtype)?;
        let w = rand_tensor(&mut r, &[b, n], -1.0, 1.0)?.to_dtype(dtype)?;
        for cost in [
            candle_ot::CostKind::SqEuclidean,
            candle_ot::CostKind::Euclidean,
        ] {
            let run = |dev: &Device| -> Result<Vec<Tensor>> {
                let (x, y, h) = (
                    Var::from_tensor(&x.to_device(dev)?)?,
                    Var::from_tensor(&y.to_device(dev)?)?,
                    Var::from_tensor(&h.to_device(dev)?)?,
                );
                let f = online::softmin(cost, 0.5, &x, &y, &h)?;
                let loss = f
                    .narrow(0, 0, 1)?
                    .broadcast_mul(&w.narrow(0, 0, 1)?.to_device(dev)?)?
                    .sum_all()?;
                let g = loss.backward()?;
                Ok(vec![
                    f,
                    g.get(&x).unwrap().clone(),
                    g.get(&y).unwrap().clone(),
                    g.get(&h).unwrap().clone(),
                ])
            };
            let (want, got) = (run(&Device::Cpu)?, run(dev)?);
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let (g, w) = (flat(g), flat(w));
                // Masked rows: +inf values, zero gradients, on both devices.
                assert_eq!(
                    g.iter().map(|v| v.is_infinite()).collect::<Vec<_>>(),
                    w.iter().map(|v| v.is_infinite()).collect::<Vec<_>>(),
                    "{cost:?} {dtype:?} output {k}: infinities differ"
                );
                let gf: Vec<f64> = g
                    .iter()
                    .map(|v| if v.is_finite() { *v } else { 0.0 })
                    .collect();
                let wf: Vec<f64> = w
                    .iter()
                    .map(|v| if v.is_finite() { *v } else { 0.0 })
                    .collect();
                let err = rel_err_vec(&gf, &wf);
                assert!(
                    err <= tol(dtype),
                    "{cost:?} {dtype:?} output {k}: rel err {err:.3e}"
                );
            }
        }
    }
    Ok(())
}

/// The multiscale backend on the device (coarse loop on the online kernels, fine loop on the
/// block-sparse kernels) against the multiscale backend on the CPU, same data: 2 × 1500 × 3
/// points, p = 1 and 2, balanced and unbalanced, GeomLoss's fixed schedule, a cluster scale at
/// which the truncation drops blocks. Loss within 1e-4, gradients and potentials within 1e-3
/// (f32; both sides build their block patterns from their own coarse potentials).
fn devices_multiscale(dev: &Device) -> Result<()> {
    if !online::supports(dev) {
        eprintln!("skipping: the online kernels for {dev:?} are not compiled in");
        return Ok(());
    }
    let mut r = rng(4242);
    let x = rand_tensor(&mut r, &[2, 1500, 3], 0.0, 1.0)?.to_dtype(DType::F32)?;
    let y = rand_tensor(&mut r, &[2, 1500, 3], 0.15, 0.95)?.to_dtype(DType::F32)?;
    let mut failures = vec![];
    for p in [2u32, 1] {
        for reach in [None, Some(REACH)] {
            let loss = SamplesLoss::builder(Loss::Sinkhorn)
                .p(p)
                .blur(0.05)
                .reach(reach)
                .cluster_scale(Some(0.05))
                .backend(Backend::Multiscale)
                .build()?;
            let run = |dev: &Device| -> Result<(Vec<Tensor>, f64)> {
                let (vx, vy) = (
                    Var::from_tensor(&x.to_device(dev)?)?,
                    Var::from_tensor(&y.to_device(dev)?)?,
                );
                let sol = loss.solve(None, &vx, None, &vy)?;
                assert_eq!(sol.backend, Backend::Multiscale);
                let kept = sol
                    .multiscale
                    .as_ref()
                    .expect("multiscale diagnostics")
                    .kept_fraction;
                let g = sol.loss.sum_all()?.backward()?;
                let out = vec![
                    sol.loss.clone(),
                    g.get(&vx).expect("grad x").clone(),
                    g.get(&vy).expect("grad y").clone(),
                    sol.f.clone(),
                    sol.g.clone(),
                ];
                Ok((out, kept))
            };
            let (want, kept_cpu) = run(&Device::Cpu)?;
            let (got, kept) = run(dev)?;
            let name = format!("multiscale p={p} reach={reach:?}");
            assert!(
                kept < 1.0 && kept_cpu < 1.0,
                "{name}: kept fraction {kept} (CPU {kept_cpu}): nothing truncated"
            );
            for (k, (g, w)) in ["loss", "grad_x", "grad_y", "F", "G"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                let err = rel_err(g, w);
                let tol = if *k == "loss" { 1e-4 } else { 1e-3 };
                if !all_finite(g) || err.is_nan() || err > tol {
                    failures.push(format!("{name} {k}: rel err {err:.3e}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

gpu_test!(
    devices_sinkhorn,
    devices_sinkhorn_cuda,
    devices_sinkhorn_metal
);
gpu_test!(
    devices_hausdorff,
    devices_hausdorff_cuda,
    devices_hausdorff_metal
);
gpu_test!(devices_kernels, devices_kernels_cuda, devices_kernels_metal);
gpu_test!(devices_raw_ops, devices_raw_ops_cuda, devices_raw_ops_metal);
gpu_test!(
    devices_multiscale,
    devices_multiscale_cuda,
    devices_multiscale_metal
);

/// The grid softmin (`softmin::grid`: one `grid_lse_axis` launch per grid axis) on the device
/// against the CPU op, same data: values and the gradient in `h` of `(f · w).sum()`, p = 1 and
/// 2, ε = 0.01, masked (−∞) pixels, 2-D `(2, 17, 29)` and 3-D `(1, 5, 6, 7)` grids, f32 (and
/// f64 where the device has it). A fully masked image gives +∞ on both (values only: its
/// gradient is not compared).
fn devices_grid_softmin(dev: &Device) -> Result<()> {
    use candle_ot::softmin::grid::{self, GridCost};
    if !online::supports(dev) {
        eprintln!("skipping: the grid kernels for {dev:?} are not compiled in");
        return Ok(());
    }
    let eps = 0.01;
    let mut r = rng(1717);
    let mut failures = vec![];
    let mut checked = 0;
    // (dims, spacing, fully masked batch item)
    let cases: [(&[usize], Vec<f64>, Option<usize>); 3] = [
        (&[2, 17, 29], vec![1.0 / 17.0, 1.0 / 29.0], None),
        (&[2, 17, 29], vec![1.0 / 17.0, 1.0 / 29.0], Some(1)),
        (&[1, 5, 6, 7], vec![1.0 / 5.0, 1.0 / 6.0, 1.0 / 7.0], None),
    ];
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, dev) {
            continue;
        }
        for (dims, spacing, masked_item) in &cases {
            let len: usize = dims.iter().product();
            let per_item = len / dims[0];
            for p in [1u32, 2] {
                let cost = GridCost {
                    p,
                    spacing: spacing.clone(),
                };
                let mut hv = uniform_vec(&mut r, len, -3.0, 3.0);
                for (k, v) in hv.iter_mut().enumerate() {
                    if k % 7 == 3 || Some(k / per_item) == *masked_item {
                        *v = f64::NEG_INFINITY;
                    }
                }
                let h = Tensor::from_vec(hv, *dims, &Device::Cpu)?.to_dtype(dtype)?;
                let w = rand_tensor(&mut r, dims, -1.0, 1.0)?.to_dtype(dtype)?;
                let run = |dev: &Device| -> Result<(Tensor, Option<Tensor>)> {
                    let h = Var::from_tensor(&h.to_device(dev)?)?;
                    let f = grid::softmin(eps, &cost, &h)?;
                    if masked_item.is_some() {
                        return Ok((f, None));
                    }
                    let g = (&f * w.to_device(dev)?)?.sum_all()?.backward()?;
                    Ok((f, Some(g.get(&h).expect("grad h").clone())))
                };
                let (want_f, want_g) = run(&Device::Cpu)?;
                let (got_f, got_g) = run(dev)?;
                let name = format!("grid {dims:?} {dtype:?} p={p} masked item {masked_item:?}");
                let (g, w) = (flat(&got_f), flat(&want_f));
                // Masked images: +∞ on both devices; the finite values agree.
                if g.iter().map(|v| v.is_infinite()).collect::<Vec<_>>()
                    != w.iter().map(|v| v.is_infinite()).collect::<Vec<_>>()
                    || g.iter().any(|v| v.is_nan() || *v == f64::NEG_INFINITY)
                {
                    failures.push(format!("{name} f: infinities differ (or NaN)"));
                }
                let finite = |v: &[f64]| -> Vec<f64> {
                    v.iter()
                        .map(|x| if x.is_finite() { *x } else { 0.0 })
                        .collect()
                };
                let err = rel_err_vec(&finite(&g), &finite(&w));
                if err.is_nan() || err > tol(dtype) {
                    failures.push(format!("{name} f: rel err {err:.3e}"));
                }
                if masked_item.is_none() {
                    if let Some(infinite) = w.iter().find(|v| !v.is_finite()) {
                        failures.push(format!("{name}: CPU value {infinite} without a mask"));
                    }
                }
                if let (Some(gg), Some(wg)) = (got_g, want_g) {
                    let err = rel_err(&gg, &wg);
                    // (the backward exponentiates h + L, L = −softmin/ε: f32 rounding of L is
                    // amplified by |L|, hence a looser f32 tolerance than for the values)
                    let t = if dtype == DType::F64 { TOL_F64 } else { 1e-3 };
                    if !all_finite(&gg) || err.is_nan() || err > t {
                        failures.push(format!("{name} grad h: rel err {err:.3e}"));
                    }
                }
                checked += 1;
            }
        }
    }
    println!("{checked} grid configurations checked on {dev:?}");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

gpu_test!(
    devices_grid_softmin,
    devices_grid_softmin_cuda,
    devices_grid_softmin_metal
);
