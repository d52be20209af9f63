//! Gradients against finite differences (f64, central differences), values against dense f64
//! formulas written here, and closed forms.
//!
//! - Kernel losses: full gradients in x, y, a and b, coordinate by coordinate.
//! - Balanced Sinkhorn run to convergence: directional derivatives along random directions in
//!   x and y, and along zero-sum directions in a and b (the masses must stay equal).
//! - Hausdorff: its gradient is deliberately partial (GeomLoss's convention), so its *value*
//!   is checked against a dense evaluation instead.
//! - Two single Diracs: OT_ε and S_ε are exactly the cost.

#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::{Backend, KernelKind, Loss, SamplesLoss};
use common::*;

/// Step of the central differences.
const FD_STEP: f64 = 1e-6;
/// Relative agreement of autograd and finite differences (kernel losses, full gradients).
const TOL_FD_KERNEL: f64 = 1e-6;
/// Relative agreement of directional derivatives for converged Sinkhorn.
const TOL_FD_SINKHORN: f64 = 1e-6;
/// Relative agreement with dense f64 evaluations / closed forms.
const TOL_DENSE: f64 = 1e-12;
/// Convergence tolerance of the Sinkhorn loop (units of ε) and its iteration cap.
const SINKHORN_TOL: f64 = 1e-12;
const SINKHORN_MAX_ITER: usize = 100_000;
const N: usize = 17;
const M: usize = 29;
const D: usize = 3;
const BACKENDS: [Backend; 2] = [Backend::Online, Backend::Tensorized];

fn backend_ok(backend: Backend, dev: &Device) -> bool {
    backend != Backend::Online || dev.is_cpu()
}

/// Inputs as f64 vectors: a (N), x (N·D), b (M), y (M·D).
#[derive(Clone)]
struct Data {
    a: Vec<f64>,
    x: Vec<f64>,
    b: Vec<f64>,
    y: Vec<f64>,
}

fn data(seed: u64, mass_a: f64, mass_b: f64) -> Result<Data> {
    let mut r = rng(seed);
    Ok(Data {
        a: flat(&weights(&mut r, None, N, &[], mass_a)?),
        x: uniform_vec(&mut r, N * D, 0.0, 1.0),
        b: flat(&weights(&mut r, None, M, &[], mass_b)?),
        y: uniform_vec(&mut r, M * D, 0.2, 1.2),
    })
}

fn tensors(d: &Data, dev: &Device) -> Result<[Tensor; 4]> {
    Ok([
        Tensor::from_vec(d.a.clone(), N, dev)?,
        Tensor::from_vec(d.x.clone(), (N, D), dev)?,
        Tensor::from_vec(d.b.clone(), M, dev)?,
        Tensor::from_vec(d.y.clone(), (M, D), dev)?,
    ])
}

fn value(loss: &SamplesLoss, d: &Data, dev: &Device) -> Result<f64> {
    let [a, x, b, y] = tensors(d, dev)?;
    Ok(scalar(&loss.forward_weighted(&a, &x, &b, &y)?))
}

/// Value and autograd gradients (a, x, b, y), as f64 vectors.
fn value_and_grads(loss: &SamplesLoss, d: &Data, dev: &Device) -> Result<(f64, Data)> {
    let [a, x, b, y] = tensors(d, dev)?;
    let (va, vx, vb, vy) = (
        Var::from_tensor(&a)?,
        Var::from_tensor(&x)?,
        Var::from_tensor(&b)?,
        Var::from_tensor(&y)?,
    );
    let l = loss.forward_weighted(&va, &vx, &vb, &vy)?;
    let grads = l.backward()?;
    let g = |v: &Var| flat(grads.get(v).expect("a gradient"));
    Ok((
        scalar(&l),
        Data {
            a: g(&va),
            x: g(&vx),
            b: g(&vb),
            y: g(&vy),
        },
    ))
}

fn field(d: &mut Data, k: usize) -> &mut Vec<f64> {
    match k {
        0 => &mut d.a,
        1 => &mut d.x,
        2 => &mut d.b,
        _ => &mut d.y,
    }
}

const FIELDS: [&str; 4] = ["a", "x", "b", "y"];

/// Kernel losses: every partial derivative against central differences.
fn kernel_losses_full_fd(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        return Ok(());
    }
    let mut failures = vec![];
    for loss_kind in [Loss::Energy, Loss::Gaussian, Loss::Laplacian] {
        for backend in BACKENDS {
            if !backend_ok(backend, dev) {
                continue;
            }
            let loss = SamplesLoss::builder(loss_kind)
                .blur(0.5)
                .backend(backend)
                .build()?;
            // Unequal masses: kernel norms have no mass constraint.
            let d0 = data(11, 1.0, 1.4)?;
            let (_, mut ad) = value_and_grads(&loss, &d0, dev)?;
            for (k, fname) in FIELDS.iter().enumerate() {
                let len = field(&mut d0.clone(), k).len();
                let mut fd = vec![0.0; len];
                for (i, out) in fd.iter_mut().enumerate() {
                    let mut dp = d0.clone();
                    field(&mut dp, k)[i] += FD_STEP;
                    let mut dm = d0.clone();
                    field(&mut dm, k)[i] -= FD_STEP;
                    *out = (value(&loss, &dp, dev)? - value(&loss, &dm, dev)?) / (2.0 * FD_STEP);
                }
                let err = rel_err_vec(field(&mut ad, k), &fd);
                if err.is_nan() || err > TOL_FD_KERNEL {
                    failures.push(format!(
                        "{loss_kind:?} {backend:?} grad_{}: rel err {err:.3e} > {TOL_FD_KERNEL:.0e}",
                        fname
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

test_device!(
    kernel_losses_full_fd,
    kernel_losses_full_fd_cpu,
    kernel_losses_full_fd_cuda,
    kernel_losses_full_fd_metal
);

/// Converged balanced Sinkhorn: directional derivatives along random directions (x, y) and
/// zero-sum directions (a, b), against autograd.
fn sinkhorn_converged_directional_fd(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        return Ok(());
    }
    let mut failures = vec![];
    let mut seed = 40;
    for p in [1u32, 2] {
        for debias in [true, false] {
            for backend in BACKENDS {
                if !backend_ok(backend, dev) {
                    continue;
                }
                seed += 1;
                let loss = SamplesLoss::builder(Loss::Sinkhorn)
                    .p(p)
                    .blur(0.3)
                    .debias(debias)
                    .tol(SINKHORN_TOL)
                    .max_iter(SINKHORN_MAX_ITER)
                    .backend(backend)
                    .build()?;
                let d0 = data(seed, 1.0, 1.0)?;
                // The loop must actually converge for the envelope theorem to apply.
                let [a, x, b, y] = tensors(&d0, dev)?;
                let sol = loss.solve(Some(&a), &x, Some(&b), &y)?;
                let diag = sol.diagnostics.expect("sinkhorn diagnostics");
                assert_eq!(
                    diag.converged,
                    Some(true),
                    "p={p} debias={debias}: {diag:?}"
                );
                let (_, ad) = value_and_grads(&loss, &d0, dev)?;
                let mut r = rng(seed + 1000);
                for (k, fname) in FIELDS.iter().enumerate() {
                    let len = field(&mut d0.clone(), k).len();
                    for trial in 0..2 {
                        let mut dir = uniform_vec(&mut r, len, -1.0, 1.0);
                        if k == 0 || k == 2 {
                            // Keep the masses equal (balanced OT): a zero-sum direction,
                            // small enough to keep the weights positive.
                            let mean = dir.iter().sum::<f64>() / len as f64;
                            dir.iter_mut().for_each(|v| *v = (*v - mean) * 0.01);
                        }
                        let mut dp = d0.clone();
                        let mut dm = d0.clone();
                        for (i, v) in dir.iter().enumerate() {
                            field(&mut dp, k)[i] += FD_STEP * v;
                            field(&mut dm, k)[i] -= FD_STEP * v;
                        }
                        let fd =
                            (value(&loss, &dp, dev)? - value(&loss, &dm, dev)?) / (2.0 * FD_STEP);
                        let g = match k {
                            0 => &ad.a,
                            1 => &ad.x,
                            2 => &ad.b,
                            _ => &ad.y,
                        };
                        let dot: f64 = g.iter().zip(&dir).map(|(g, v)| g * v).sum();
                        let scale: f64 = g.iter().zip(&dir).map(|(g, v)| (g * v).abs()).sum();
                        let err = (fd - dot).abs() / scale;
                        println!(
                            "p={p} debias={debias} {backend:?} d/d{}: rel err {err:.1e} ({} extra iterations)",
                            fname, diag.extra_iterations
                        );
                        if err.is_nan() || err > TOL_FD_SINKHORN {
                            failures.push(format!(
                                "p={p} debias={debias} {backend:?} d/d{} (trial {trial}): autograd {dot:.12e} vs fd {fd:.12e}, rel err {err:.3e}",
                                fname
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

test_device!(
    sinkhorn_converged_directional_fd,
    sinkhorn_converged_directional_fd_cpu,
    sinkhorn_converged_directional_fd_cuda,
    sinkhorn_converged_directional_fd_metal
);

/// Relative agreement of the exact Hausdorff gradient and finite differences (one-sided at a
/// zero weight, hence looser than the kernel losses' central differences).
const TOL_FD_HAUSDORFF: f64 = 1e-5;

/// Hausdorff with `exact_hausdorff_gradient`: every partial derivative (a, x, b, y) against
/// finite differences of the value, for p ∈ {1, 2}, balanced and with a reach, with a zero
/// weight in a (forward differences there: weights must stay ≥ 0). GeomLoss's gradient (the
/// default) is far from them: issue #17, item 4.
fn hausdorff_exact_gradient_fd(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        return Ok(());
    }
    let mut failures = vec![];
    let mut d0 = data(5, 1.0, 1.0)?;
    d0.a[3] = 0.0; // a point of zero weight
    for backend in BACKENDS {
        if !backend_ok(backend, dev) {
            continue;
        }
        for (p, blur, reach) in [(2, 0.3, None), (2, 0.1, Some(0.5)), (1, 0.2, None)] {
            let builder = SamplesLoss::builder(Loss::Hausdorff)
                .p(p)
                .blur(blur)
                .reach(reach)
                .backend(backend);
            let loss = builder.clone().exact_hausdorff_gradient(true).build()?;
            let geomloss = builder.build()?;
            let (v, mut ad) = value_and_grads(&loss, &d0, dev)?;
            let (v_geomloss, mut gd) = value_and_grads(&geomloss, &d0, dev)?;
            assert_eq!(v, v_geomloss, "the option changes the gradient only");
            for (k, fname) in FIELDS.iter().enumerate() {
                let base = field(&mut d0.clone(), k).clone();
                let mut fd = vec![0.0; base.len()];
                for (i, out) in fd.iter_mut().enumerate() {
                    let mut dp = d0.clone();
                    field(&mut dp, k)[i] += FD_STEP;
                    let mut dm = d0.clone();
                    let one_sided = (k == 0 || k == 2) && base[i] < FD_STEP;
                    if !one_sided {
                        field(&mut dm, k)[i] -= FD_STEP;
                    }
                    let h = if one_sided { FD_STEP } else { 2.0 * FD_STEP };
                    *out = (value(&loss, &dp, dev)? - value(&loss, &dm, dev)?) / h;
                }
                let err = rel_err_vec(field(&mut ad, k), &fd);
                if err.is_nan() || err > TOL_FD_HAUSDORFF {
                    failures.push(format!(
                        "p={p} reach={reach:?} {backend:?} grad_{fname}: rel err {err:.3e} > {TOL_FD_HAUSDORFF:.0e}"
                    ));
                }
                // GeomLoss's gradient is not the derivative of the value.
                let err_geomloss = rel_err_vec(field(&mut gd, k), &fd);
                if err_geomloss < 0.05 {
                    failures.push(format!(
                        "p={p} reach={reach:?} {backend:?} grad_{fname}: GeomLoss's gradient agrees ({err_geomloss:.3e}): the test cannot tell them apart"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

test_device!(
    hausdorff_exact_gradient_fd,
    hausdorff_exact_gradient_fd_cpu,
    hausdorff_exact_gradient_fd_cuda,
    hausdorff_exact_gradient_fd_metal
);

/// Dense f64 Hausdorff divergence (see the module docs of `kernel_loss`).
fn dense_hausdorff(p: u32, blur: f64, reach: Option<f64>, d: &Data) -> f64 {
    let eps = blur.powi(p as i32);
    let lam = match reach {
        Some(r) => 1.0 / (1.0 + eps / r.powi(p as i32)),
        None => 1.0,
    };
    let log_a: Vec<f64> = d.a.iter().map(|v| v.ln()).collect();
    let log_b: Vec<f64> = d.b.iter().map(|v| v.ln()).collect();
    let sm = |p_: &[f64], q: &[f64], h: &[f64]| dense_softmin(p, eps, p_, q, h, D);
    let f_xy = sm(&d.x, &d.y, &log_b);
    let f_xx = sm(&d.x, &d.x, &log_a);
    let g_yx = sm(&d.y, &d.x, &log_a);
    let g_yy = sm(&d.y, &d.y, &log_b);
    let fa: f64 = (0..N).map(|i| d.a[i] * lam * (f_xy[i] - f_xx[i])).sum();
    let gb: f64 = (0..M).map(|j| d.b[j] * lam * (g_yx[j] - g_yy[j])).sum();
    0.5 * fa + 0.5 * gb
}

fn hausdorff_value_dense(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        return Ok(());
    }
    let mut failures = vec![];
    let d0 = data(77, 1.0, 1.3)?;
    for p in [1u32, 2] {
        for reach in [None, Some(0.3)] {
            for blur in [0.05, 0.5] {
                let want = dense_hausdorff(p, blur, reach, &d0);
                for backend in BACKENDS {
                    if !backend_ok(backend, dev) {
                        continue;
                    }
                    let loss = SamplesLoss::builder(Loss::Hausdorff)
                        .p(p)
                        .blur(blur)
                        .reach(reach)
                        .backend(backend)
                        .build()?;
                    let got = value(&loss, &d0, dev)?;
                    let err = ((got - want) / want).abs();
                    if err.is_nan() || err > TOL_DENSE {
                        failures.push(format!(
                            "hausdorff p={p} reach={reach:?} blur={blur} {backend:?}: {got:.15e} vs dense {want:.15e}"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

test_device!(
    hausdorff_value_dense,
    hausdorff_value_dense_cpu,
    hausdorff_value_dense_cuda,
    hausdorff_value_dense_metal
);

/// Dense f64 kernel norm ½ aᵀK_xx a + ½ bᵀK_yy b − aᵀK_xy b.
fn dense_kernel_norm(kind: KernelKind, sigma: f64, d: &Data) -> f64 {
    let pt = |v: &[f64], i: usize| v[i * D..(i + 1) * D].to_vec();
    let mut s = 0.0;
    for i in 0..N {
        for j in 0..N {
            s += 0.5 * d.a[i] * d.a[j] * kernel(kind, sigma, &pt(&d.x, i), &pt(&d.x, j));
        }
        for j in 0..M {
            s -= d.a[i] * d.b[j] * kernel(kind, sigma, &pt(&d.x, i), &pt(&d.y, j));
        }
    }
    for i in 0..M {
        for j in 0..M {
            s += 0.5 * d.b[i] * d.b[j] * kernel(kind, sigma, &pt(&d.y, i), &pt(&d.y, j));
        }
    }
    s
}

fn kernel_values_dense(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        return Ok(());
    }
    let d0 = data(78, 1.0, 1.3)?;
    for (loss_kind, kind) in [
        (Loss::Energy, KernelKind::Energy),
        (Loss::Gaussian, KernelKind::Gaussian),
        (Loss::Laplacian, KernelKind::Laplacian),
    ] {
        let want = dense_kernel_norm(kind, 0.5, &d0);
        for backend in BACKENDS {
            if !backend_ok(backend, dev) {
                continue;
            }
            let loss = SamplesLoss::builder(loss_kind)
                .blur(0.5)
                .backend(backend)
                .build()?;
            let got = value(&loss, &d0, dev)?;
            let err = ((got - want) / want).abs();
            assert!(
                err <= 1e-10,
                "{loss_kind:?} {backend:?}: {got:.15e} vs dense {want:.15e}"
            );
        }
    }
    Ok(())
}

test_device!(
    kernel_values_dense,
    kernel_values_dense_cpu,
    kernel_values_dense_cuda,
    kernel_values_dense_metal
);

/// Two single Diracs x = [[0, 0]], y = [[t, 0]]: the only plan is the product, so
/// OT_ε = C(x, y) exactly (½t² for p = 2, |t| for p = 1), and S_ε too (OT_ε(α, α) = 0).
fn single_diracs_closed_form(dev: &Device) -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, dev) {
            continue;
        }
        let tol = if dtype == DType::F64 { TOL_DENSE } else { 1e-6 };
        for t in [0.7f64, -1.3, 3.0] {
            let x = Tensor::new(&[[0.0f64, 0.0]], dev)?.to_dtype(dtype)?;
            let y = Tensor::new(&[[t, 0.0]], dev)?.to_dtype(dtype)?;
            for p in [1u32, 2] {
                let want = if p == 2 { 0.5 * t * t } else { t.abs() };
                for debias in [false, true] {
                    for backend in BACKENDS {
                        if !backend_ok(backend, dev) {
                            continue;
                        }
                        for blur in [0.05, 1.0] {
                            let loss = SamplesLoss::builder(Loss::Sinkhorn)
                                .p(p)
                                .blur(blur)
                                .debias(debias)
                                .backend(backend)
                                .build()?;
                            let got = scalar(&loss.forward(&x, &y)?);
                            let err = ((got - want) / want).abs();
                            assert!(
                                err <= tol,
                                "{dtype:?} t={t} p={p} debias={debias} blur={blur} {backend:?}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

test_device!(
    single_diracs_closed_form,
    single_diracs_closed_form_cpu,
    single_diracs_closed_form_cuda,
    single_diracs_closed_form_metal
);
