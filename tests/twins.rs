//! The online backend and its plain twin, the tensorized backend, agree: values, potentials,
//! transferred values and gradients with respect to x, y, a and b, for every loss and option
//! combination, in f64 (tightly) and f32, batched or not, with masked (zero-weight) points.
//! Also the raw custom ops (`online::softmin`, `online::kernel_product`) against dense f64
//! formulas and against the tensorized twin's gradients with respect to all three inputs.
//!
//! On CUDA / Metal both sides run on that device when the online kernels are compiled in (the
//! `cuda` / `metal` features of this test package), else the online side runs on the CPU, on
//! the same data. `tests/devices.rs` compares each device's online kernels with the CPU's.

#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::softmin::{online, PointSoftmin, Softmin, Tensorized};
use candle_ot::{Backend, CostKind, KernelKind, Loss, SamplesLoss, Solution};
use common::*;

/// Relative agreement (max|Δ| / max|ref| per tensor) required in f64.
const TOL_F64: f64 = 1e-10;
/// Relative agreement required in f32.
const TOL_F32: f64 = 1e-4;
/// Blur of every loss here (ε = blur^p, or the kernel width).
const BLUR: f64 = 0.1;
/// Odd sizes, so that no block or tile size divides them.
const N: usize = 17;
const M: usize = 29;
const BATCH: usize = 2;
const DIMS: [usize; 3] = [1, 3, 5];
/// Masked points (zero weights), used when D > 1.
const ZEROS_A: [usize; 2] = [2, 11];
const ZEROS_B: [usize; 3] = [0, 13, 28];
/// Total mass of b when the problem does not need balanced masses.
const UNBALANCED_MASS_B: f64 = 1.3;
/// Reach of the unbalanced cases.
const REACH: f64 = 0.3;

/// Where the online side runs: `dev` when its kernels are compiled in, else the CPU.
fn online_device(dev: &Device) -> &Device {
    if online::supports(dev) {
        dev
    } else {
        &Device::Cpu
    }
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        TOL_F64
    } else {
        TOL_F32
    }
}

/// f64 inputs on the CPU.
struct Inputs {
    a: Tensor,
    x: Tensor,
    b: Tensor,
    y: Tensor,
    v: Tensor, // values for `transfer`, like y with K = 3 columns
}

fn inputs(seed: u64, d: usize, batched: bool, masked: bool, mass_b: f64) -> Result<Inputs> {
    let mut r = rng(seed);
    let lead = |k: usize| -> Vec<usize> {
        if batched {
            vec![BATCH, k]
        } else {
            vec![k]
        }
    };
    let with = |k: usize, last: usize| -> Vec<usize> {
        let mut v = lead(k);
        v.push(last);
        v
    };
    let bo = batched.then_some(BATCH);
    let (za, zb): (&[usize], &[usize]) = if masked {
        (&ZEROS_A, &ZEROS_B)
    } else {
        (&[], &[])
    };
    let cpu = &Device::Cpu;
    Ok(Inputs {
        a: weights(&mut r, bo, N, za, 1.0)?,
        x: uniform(&mut r, &with(N, d), 0.0, 1.0, DType::F64, cpu)?,
        b: weights(&mut r, bo, M, zb, mass_b)?,
        y: uniform(&mut r, &with(M, d), 0.2, 1.2, DType::F64, cpu)?,
        v: uniform(&mut r, &with(M, 3), -1.0, 1.0, DType::F64, cpu)?,
    })
}

struct Outputs {
    loss: Tensor,
    f: Tensor,
    g: Tensor,
    grad_x: Tensor,
    grad_y: Tensor,
    grad_a: Tensor,
    grad_b: Tensor,
    transfer: Option<Tensor>,
    sol: Solution,
}

fn run(loss: &SamplesLoss, inp: &Inputs, dtype: DType, dev: &Device) -> Result<Outputs> {
    let var = |t: &Tensor| -> Result<Var> { Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?) };
    let (va, vx, vb, vy) = (var(&inp.a)?, var(&inp.x)?, var(&inp.b)?, var(&inp.y)?);
    let sol = loss.solve(Some(&va), &vx, Some(&vb), &vy)?;
    let grads = sol.loss.sum_all()?.backward()?;
    let grad = |v: &Var| -> Result<Tensor> {
        match grads.get(v) {
            Some(g) => Ok(g.clone()),
            None => v.zeros_like(),
        }
    };
    let transfer = if loss.options().loss == Loss::Sinkhorn {
        Some(sol.transfer(&inp.v.to_dtype(dtype)?.to_device(dev)?)?)
    } else {
        None
    };
    Ok(Outputs {
        loss: sol.loss.clone(),
        f: sol.f.clone(),
        g: sol.g.clone(),
        grad_x: grad(&vx)?,
        grad_y: grad(&vy)?,
        grad_a: grad(&va)?,
        grad_b: grad(&vb)?,
        transfer,
        sol,
    })
}

#[derive(Clone, Copy, Debug)]
struct Combo {
    p: u32,
    debias: bool,
    reach: Option<f64>,
}

fn combos(loss: Loss) -> Vec<Combo> {
    let mut v = vec![];
    for p in [1, 2] {
        for debias in [true, false] {
            for reach in [None, Some(REACH)] {
                v.push(Combo { p, debias, reach });
            }
        }
    }
    match loss {
        Loss::Sinkhorn => v,
        // Hausdorff ignores debias; the kernel losses ignore p, debias and reach.
        Loss::Hausdorff => v.into_iter().filter(|c| c.debias).collect(),
        _ => vec![v[0]],
    }
}

fn twins(dev: &Device, loss_kind: Loss, dtype: DType) -> Result<()> {
    if !dtype_supported(dtype, dev) {
        eprintln!("skipping: {dtype:?} is not supported on {dev:?}");
        return Ok(());
    }
    let tol = tol(dtype);
    let mut failures = vec![];
    let mut checked = 0;
    let mut seed = 1000;
    for c in combos(loss_kind) {
        for d in DIMS {
            for batched in [false, true] {
                seed += 1;
                let masked = d > 1;
                let balanced = loss_kind == Loss::Sinkhorn && c.reach.is_none();
                let mass_b = if balanced { 1.0 } else { UNBALANCED_MASS_B };
                let inp = inputs(seed, d, batched, masked, mass_b)?;
                let build = |backend| {
                    SamplesLoss::builder(loss_kind)
                        .p(c.p)
                        .blur(BLUR)
                        .reach(c.reach)
                        .debias(c.debias)
                        .backend(backend)
                        .build()
                };
                let on = run(&build(Backend::Online)?, &inp, dtype, online_device(dev))?;
                let te = run(&build(Backend::Tensorized)?, &inp, dtype, dev)?;
                let name = format!("{loss_kind:?} {dtype:?} {c:?} D={d} batched={batched}");
                assert_eq!(on.sol.backend, Backend::Online, "{name}");
                assert_eq!(te.sol.backend, Backend::Tensorized, "{name}");
                let want_loss_dims: &[usize] = if batched { &[BATCH] } else { &[] };
                assert_eq!(on.loss.dims(), want_loss_dims, "{name}: loss shape");
                assert_eq!(te.loss.dims(), want_loss_dims, "{name}: loss shape");
                assert_eq!(on.loss.dtype(), dtype, "{name}: loss dtype");
                assert_eq!(on.f.dims(), inp.a.dims(), "{name}: F shape");
                assert_eq!(on.g.dims(), inp.b.dims(), "{name}: G shape");
                let mut pairs = vec![
                    ("loss", &on.loss, &te.loss),
                    ("F", &on.f, &te.f),
                    ("G", &on.g, &te.g),
                    ("grad_x", &on.grad_x, &te.grad_x),
                    ("grad_y", &on.grad_y, &te.grad_y),
                    ("grad_a", &on.grad_a, &te.grad_a),
                    ("grad_b", &on.grad_b, &te.grad_b),
                ];
                if let (Some(t1), Some(t2)) = (&on.transfer, &te.transfer) {
                    pairs.push(("transfer", t1, t2));
                }
                for (key, got, want) in pairs {
                    if !all_finite(got) || !all_finite(want) {
                        failures.push(format!("{name} {key}: non-finite values"));
                        continue;
                    }
                    let err = rel_err(got, want);
                    if err.is_nan() || err > tol {
                        failures.push(format!("{name} {key}: rel err {err:.3e} > {tol:.0e}"));
                    }
                }
                // Masked points of x receive exactly no gradient: every term that depends
                // on x_i is multiplied by a_i = 0.
                if masked {
                    let gx = flat(&on.grad_x);
                    for bi in 0..(if batched { BATCH } else { 1 }) {
                        for &i in &ZEROS_A {
                            let s = (bi * N + i) * d;
                            let row = &gx[s..s + d];
                            if row.iter().any(|g| *g != 0.0) {
                                failures.push(format!("{name}: masked x_{i} has gradient {row:?}"));
                            }
                        }
                    }
                }
                checked += 1;
            }
        }
    }
    println!("{checked} configurations checked");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

fn twins_sinkhorn_f64(dev: &Device) -> Result<()> {
    twins(dev, Loss::Sinkhorn, DType::F64)
}
fn twins_sinkhorn_f32(dev: &Device) -> Result<()> {
    twins(dev, Loss::Sinkhorn, DType::F32)
}
fn twins_hausdorff_f64(dev: &Device) -> Result<()> {
    twins(dev, Loss::Hausdorff, DType::F64)
}
fn twins_hausdorff_f32(dev: &Device) -> Result<()> {
    twins(dev, Loss::Hausdorff, DType::F32)
}
fn twins_energy_f64(dev: &Device) -> Result<()> {
    twins(dev, Loss::Energy, DType::F64)
}
fn twins_energy_f32(dev: &Device) -> Result<()> {
    twins(dev, Loss::Energy, DType::F32)
}
fn twins_gaussian_f64(dev: &Device) -> Result<()> {
    twins(dev, Loss::Gaussian, DType::F64)
}
fn twins_gaussian_f32(dev: &Device) -> Result<()> {
    twins(dev, Loss::Gaussian, DType::F32)
}
fn twins_laplacian_f64(dev: &Device) -> Result<()> {
    twins(dev, Loss::Laplacian, DType::F64)
}
fn twins_laplacian_f32(dev: &Device) -> Result<()> {
    twins(dev, Loss::Laplacian, DType::F32)
}

test_device!(
    twins_sinkhorn_f64,
    twins_sinkhorn_f64_cpu,
    twins_sinkhorn_f64_cuda,
    twins_sinkhorn_f64_metal
);
test_device!(
    twins_sinkhorn_f32,
    twins_sinkhorn_f32_cpu,
    twins_sinkhorn_f32_cuda,
    twins_sinkhorn_f32_metal
);
test_device!(
    twins_hausdorff_f64,
    twins_hausdorff_f64_cpu,
    twins_hausdorff_f64_cuda,
    twins_hausdorff_f64_metal
);
test_device!(
    twins_hausdorff_f32,
    twins_hausdorff_f32_cpu,
    twins_hausdorff_f32_cuda,
    twins_hausdorff_f32_metal
);
test_device!(
    twins_energy_f64,
    twins_energy_f64_cpu,
    twins_energy_f64_cuda,
    twins_energy_f64_metal
);
test_device!(
    twins_energy_f32,
    twins_energy_f32_cpu,
    twins_energy_f32_cuda,
    twins_energy_f32_metal
);
test_device!(
    twins_gaussian_f64,
    twins_gaussian_f64_cpu,
    twins_gaussian_f64_cuda,
    twins_gaussian_f64_metal
);
test_device!(
    twins_gaussian_f32,
    twins_gaussian_f32_cpu,
    twins_gaussian_f32_cuda,
    twins_gaussian_f32_metal
);
test_device!(
    twins_laplacian_f64,
    twins_laplacian_f64_cpu,
    twins_laplacian_f64_cuda,
    twins_laplacian_f64_metal
);
test_device!(
    twins_laplacian_f32,
    twins_laplacian_f32_cpu,
    twins_laplacian_f32_cuda,
    twins_laplacian_f32_metal
);

// ---------------------------------------------------------------------------------------
// Raw custom ops.

/// Batched raw-op inputs (B, N, D), (B, M, D), (B, M) and an output weighting (B, N), as f64
/// vectors, with masked entries (−∞ in `h`, 0 in `b`) when `masked`.
struct RawInputs {
    x: Vec<f64>,
    y: Vec<f64>,
    h: Vec<f64>,
    w: Vec<f64>,
}

/// Masked columns per batch item for the raw ops.
const RAW_MASK: [(usize, usize); 3] = [(0, 3), (0, 17), (1, 0)];

fn raw_inputs(seed: u64, d: usize, masked: bool, mask_value: f64) -> RawInputs {
    let mut r = rng(seed);
    let x = uniform_vec(&mut r, BATCH * N * d, 0.0, 1.0);
    let y = uniform_vec(&mut r, BATCH * M * d, 0.2, 1.2);
    let mut h = uniform_vec(&mut r, BATCH * M, -1.0, 0.5);
    if masked {
        for (bi, j) in RAW_MASK {
            h[bi * M + j] = mask_value;
        }
    }
    let w = uniform_vec(&mut r, BATCH * N, -1.0, 1.0);
    RawInputs { x, y, h, w }
}

fn var(v: &[f64], dims: &[usize], dtype: DType, dev: &Device) -> Result<Var> {
    Var::from_tensor(
        &Tensor::from_vec(v.to_vec(), dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?,
    )
}

fn cost_kind(p: u32) -> CostKind {
    CostKind::from_p(p).unwrap()
}

/// `online::softmin` equals the dense f64 formula (including masked columns).
fn raw_softmin_values(dev: &Device) -> Result<()> {
    let cpu = online_device(dev); // where the online op runs
    let mut failures = vec![];
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, cpu) {
            continue;
        }
        for p in [1, 2] {
            for d in DIMS {
                let eps = BLUR.powi(p as i32);
                let inp = raw_inputs(7 + d as u64 + 10 * p as u64, d, true, f64::NEG_INFINITY);
                let x = var(&inp.x, &[BATCH, N, d], dtype, cpu)?;
                let y = var(&inp.y, &[BATCH, M, d], dtype, cpu)?;
                let h = var(&inp.h, &[BATCH, M], dtype, cpu)?;
                let got = online::softmin(cost_kind(p), eps, &x, &y, &h)?;
                assert_eq!(got.dims(), &[BATCH, N]);
                let mut want = vec![];
                for bi in 0..BATCH {
                    want.extend(dense_softmin(
                        p,
                        eps,
                        &inp.x[bi * N * d..(bi + 1) * N * d],
                        &inp.y[bi * M * d..(bi + 1) * M * d],
                        &inp.h[bi * M..(bi + 1) * M],
                        d,
                    ));
                }
                let err = rel_err_vec(&flat(&got), &want);
                if err.is_nan() || err > tol(dtype) {
                    failures.push(format!("softmin {dtype:?} p={p} D={d}: rel err {err:.3e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// A row whose every column is masked gives +∞ (documented), not NaN.
fn raw_softmin_all_masked_row(dev: &Device) -> Result<()> {
    let cpu = online_device(dev); // where the online op runs
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, cpu) {
            continue;
        }
        let x = Tensor::zeros((1, 3, 2), dtype, cpu)?;
        let y = Tensor::ones((1, 4, 2), dtype, cpu)?;
        let h = Tensor::full(f64::NEG_INFINITY, (1, 4), cpu)?.to_dtype(dtype)?;
        let f = flat(&online::softmin(cost_kind(2), 0.01, &x, &y, &h)?);
        assert!(f.iter().all(|v| *v == f64::INFINITY), "{dtype:?}: {f:?}");
    }
    Ok(())
}

/// Gradients of `Σ w_i softmin_i` with respect to x, y and h: online vs tensorized.
fn raw_softmin_grads(dev: &Device) -> Result<()> {
    let mut failures = vec![];
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, dev) {
            continue;
        }
        for p in [1, 2] {
            for d in DIMS {
                for masked in [false, true] {
                    let eps = BLUR.powi(p as i32);
                    let inp =
                        raw_inputs(100 + d as u64 + 10 * p as u64, d, masked, f64::NEG_INFINITY);
                    let run = |online_op: bool| -> Result<Vec<Tensor>> {
                        let dev = if online_op { online_device(dev) } else { dev };
                        let x = var(&inp.x, &[BATCH, N, d], dtype, dev)?;
                        let y = var(&inp.y, &[BATCH, M, d], dtype, dev)?;
                        let h = var(&inp.h, &[BATCH, M], dtype, dev)?;
                        let w = var(&inp.w, &[BATCH, N], dtype, dev)?;
                        let f = if online_op {
                            online::softmin(cost_kind(p), eps, &x, &y, &h)?
                        } else {
                            let t = Tensorized { cost: cost_kind(p) };
                            t.softmin(eps, &t.cost(&x, &y)?, &h)?
                        };
                        let grads = (&f * w.as_tensor())?.sum_all()?.backward()?;
                        let g = |v: &Var| grads.get(v).cloned().expect("a gradient");
                        Ok(vec![f.clone(), g(&x), g(&y), g(&h)])
                    };
                    let (on, te) = (run(true)?, run(false)?);
                    for (k, key) in ["value", "grad_x", "grad_y", "grad_h"].iter().enumerate() {
                        let err = rel_err(&on[k], &te[k]);
                        if !all_finite(&on[k]) || err.is_nan() || err > tol(dtype) {
                            failures.push(format!(
                                "softmin {dtype:?} p={p} D={d} masked={masked} {key}: rel err {err:.3e}"
                            ));
                        }
                    }
                    if masked {
                        // Masked columns get exactly no gradient, in h and in y.
                        let gh = flat(&on[3]);
                        let gy = flat(&on[2]);
                        for (bi, j) in RAW_MASK {
                            assert_eq!(gh[bi * M + j], 0.0, "grad_h at a masked column");
                            let s = (bi * M + j) * d;
                            assert!(gy[s..s + d].iter().all(|v| *v == 0.0));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn kernel_kinds() -> [KernelKind; 3] {
    [
        KernelKind::Energy,
        KernelKind::Gaussian,
        KernelKind::Laplacian,
    ]
}

/// `online::kernel_product` equals the dense f64 formula.
fn raw_kernel_product_values(dev: &Device) -> Result<()> {
    let cpu = online_device(dev); // where the online op runs
    let mut failures = vec![];
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, cpu) {
            continue;
        }
        for kind in kernel_kinds() {
            for d in DIMS {
                let inp = raw_inputs(200 + d as u64, d, true, 0.0);
                let bw: Vec<f64> = inp.h.iter().map(|v| v + 1.0).collect(); // some exact zeros
                let x = var(&inp.x, &[BATCH, N, d], dtype, cpu)?;
                let y = var(&inp.y, &[BATCH, M, d], dtype, cpu)?;
                let b = var(&bw, &[BATCH, M], dtype, cpu)?;
                let got = online::kernel_product(kind, BLUR, &x, &y, &b)?;
                let mut want = vec![];
                for bi in 0..BATCH {
                    for i in 0..N {
                        let xi = &inp.x[(bi * N + i) * d..(bi * N + i + 1) * d];
                        let mut s = 0.0;
                        for j in 0..M {
                            let yj = &inp.y[(bi * M + j) * d..(bi * M + j + 1) * d];
                            s += kernel(kind, BLUR, xi, yj) * bw[bi * M + j];
                        }
                        want.push(s);
                    }
                }
                let err = rel_err_vec(&flat(&got), &want);
                if err.is_nan() || err > tol(dtype) {
                    failures.push(format!(
                        "kernel_product {kind:?} {dtype:?} D={d}: rel err {err:.3e}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Gradients of `Σ w_i (K b)_i` with respect to x, y and b: online vs tensorized.
fn raw_kernel_product_grads(dev: &Device) -> Result<()> {
    let mut failures = vec![];
    for dtype in [DType::F64, DType::F32] {
        if !dtype_supported(dtype, dev) {
            continue;
        }
        for kind in kernel_kinds() {
            for d in DIMS {
                let inp = raw_inputs(300 + d as u64, d, true, 0.0);
                let bw: Vec<f64> = inp.h.iter().map(|v| v + 1.0).collect();
                let run = |online_op: bool| -> Result<Vec<Tensor>> {
                    let dev = if online_op { online_device(dev) } else { dev };
                    let x = var(&inp.x, &[BATCH, N, d], dtype, dev)?;
                    let y = var(&inp.y, &[BATCH, M, d], dtype, dev)?;
                    let b = var(&bw, &[BATCH, M], dtype, dev)?;
                    let w = var(&inp.w, &[BATCH, N], dtype, dev)?;
                    let u = if online_op {
                        online::kernel_product(kind, BLUR, &x, &y, &b)?
                    } else {
                        Tensorized {
                            cost: CostKind::SqEuclidean,
                        }
                        .kernel_product(kind, BLUR, &x, &y, &b)?
                    };
                    let grads = (&u * w.as_tensor())?.sum_all()?.backward()?;
                    let g = |v: &Var| grads.get(v).cloned().expect("a gradient");
                    Ok(vec![u.clone(), g(&x), g(&y), g(&b)])
                };
                let (on, te) = (run(true)?, run(false)?);
                for (k, key) in ["value", "grad_x", "grad_y", "grad_b"].iter().enumerate() {
                    let err = rel_err(&on[k], &te[k]);
                    if !all_finite(&on[k]) || err.is_nan() || err > tol(dtype) {
                        failures.push(format!(
                            "kernel_product {kind:?} {dtype:?} D={d} {key}: rel err {err:.3e}"
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
    raw_softmin_values,
    raw_softmin_values_cpu,
    raw_softmin_values_cuda,
    raw_softmin_values_metal
);
test_device!(
    raw_softmin_all_masked_row,
    raw_softmin_all_masked_row_cpu,
    raw_softmin_all_masked_row_cuda,
    raw_softmin_all_masked_row_metal
);
test_device!(
    raw_softmin_grads,
    raw_softmin_grads_cpu,
    raw_softmin_grads_cuda,
    raw_softmin_grads_metal
);
test_device!(
    raw_kernel_product_values,
    raw_kernel_product_values_cpu,
    raw_kernel_product_values_cuda,
    raw_kernel_product_values_metal
);
test_device!(
    raw_kernel_product_grads,
    raw_kernel_product_grads_cpu,
    raw_kernel_product_grads_cuda,
    raw_kernel_product_grads_metal
);
