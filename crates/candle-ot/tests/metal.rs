//! Metal-specific tests of the online ops (`metal_fwd`): every kernel against the CPU on odd sizes
//! with masked points, both sides of each backward, start offsets, f16 / bf16 inputs, and the
//! errors for f64 and too large a `D`.
//!
//! They need Apple hardware and the `metal` feature:
//! `cargo test -p candle-ot --features metal --test metal`. Elsewhere every test prints why it
//! is skipped and passes. (The project's CI is Linux only: it type-checks this file with the
//! `metal` feature, it does not run it; see docs/metal.md.)
//! The cross-device suites of the `candle-ot-tests` package (`tests/devices.rs`,
//! `tests/twins.rs`, ...) also run on Metal, in f32, with that package's `metal` feature.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::softmin::online;
use candle_ot::{Backend, CostKind, KernelKind, Loss, SamplesLoss};

/// The Metal device, or `None` (with a message) where there is none.
fn metal(test: &str) -> Result<Option<Device>> {
    if !candle_core::utils::metal_is_available() {
        eprintln!("skipping {test}: candle-core was built without Metal (enable the `metal` feature on a Mac)");
        return Ok(None);
    }
    if !cfg!(feature = "metal") {
        // (candle-core's Metal can be on through another crate's feature.)
        eprintln!("skipping {test}: candle-ot was built without its `metal` feature");
        return Ok(None);
    }
    Ok(Some(Device::new_metal(0)?))
}

/// Seeded uniform values in [lo, hi) (a small LCG: no extra dependency).
fn uniform(seed: u64, len: usize, lo: f64, hi: f64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

fn tensor(seed: u64, dims: &[usize], lo: f64, hi: f64) -> Result<Tensor> {
    let len = dims.iter().product();
    Tensor::from_vec(uniform(seed, len, lo, hi), dims, &Device::Cpu)
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()
}

/// Same infinities and NaNs, and finite values within `tol` relative to the largest finite
/// magnitude.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (g, w) = (flat(got)?, flat(want)?);
    let scale = w
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |a, v| a.max(v.abs()))
        .max(1e-30);
    for (k, (a, b)) in g.iter().zip(&w).enumerate() {
        if b.is_nan() {
            assert!(a.is_nan(), "{what}[{k}]: metal {a} cpu NaN");
        } else if b.is_finite() {
            assert!(
                a.is_finite() && (a - b).abs() <= tol * scale,
                "{what}[{k}]: metal {a} cpu {b} (scale {scale:.3e})"
            );
        } else {
            assert_eq!(a, b, "{what}[{k}]: metal {a} cpu {b}");
        }
    }
    Ok(())
}

const TOL: f64 = 2e-4;
const SIZES: [(usize, usize, usize, usize); 5] = [
    (2, 17, 29, 1),
    (2, 17, 29, 3),
    (1, 29, 17, 5),
    (3, 13, 40, 9),
    (1, 300, 257, 2),
];

/// h (B, M) with masked points, and with `all_of_item_1` every point of batch item 1 masked.
fn log_weights(seed: u64, b: usize, m: usize, all_of_item_1: bool) -> Result<Tensor> {
    let mut h = uniform(seed, b * m, -1.0, 1.0);
    for (k, v) in h.iter_mut().enumerate() {
        if k % 7 == 3 || (all_of_item_1 && b > 1 && k / m == 1) {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(h, (b, m), &Device::Cpu)
}

/// softmin and its backward (lse_grad, both sides) on Metal against the CPU.
#[test]
fn metal_softmin_and_gradients() -> Result<()> {
    let Some(dev) = metal("metal_softmin_and_gradients")? else {
        return Ok(());
    };
    for (s, &(b, n, m, d)) in SIZES.iter().enumerate() {
        let s = s as u64 * 10;
        let x = tensor(s + 1, &[b, n, d], 0.0, 1.0)?;
        let y = tensor(s + 2, &[b, m, d], 0.1, 1.1)?;
        let h = log_weights(s + 3, b, m, false)?;
        let w = tensor(s + 4, &[b, n], -1.0, 1.0)?;
        // A fully masked batch item: f = +inf there (forward only: its gradients are 0/0).
        let h_all = log_weights(s + 3, b, m, true)?;
        for cost in [CostKind::SqEuclidean, CostKind::Euclidean] {
            for eps in [0.05, 0.5] {
                let f_all = |dev: &Device| -> Result<Tensor> {
                    let on = |t: &Tensor| t.to_device(dev);
                    online::softmin(cost, eps, &on(&x)?, &on(&y)?, &on(&h_all)?)
                };
                let what = format!("f (masked item) {cost:?} eps={eps} B={b} N={n} M={m} D={d}");
                assert_close(&what, &f_all(&dev)?, &f_all(&Device::Cpu)?, TOL)?;
                let run = |dev: &Device| -> Result<Vec<Tensor>> {
                    let (vx, vy, vh) = (
                        Var::from_tensor(&x.to_device(dev)?)?,
                        Var::from_tensor(&y.to_device(dev)?)?,
                        Var::from_tensor(&h.to_device(dev)?)?,
                    );
                    let f = online::softmin(cost, eps, &vx, &vy, &vh)?;
                    let g = (&f * w.to_device(dev)?)?.sum_all()?.backward()?;
                    Ok(vec![
                        f,
                        g.get(&vx).unwrap().clone(),
                        g.get(&vy).unwrap().clone(),
                        g.get(&vh).unwrap().clone(),
                    ])
                };
                let (got, want) = (run(&dev)?, run(&Device::Cpu)?);
                for (name, (g, w)) in ["f", "grad_x", "grad_y", "grad_h"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    let what = format!("{name} {cost:?} eps={eps} B={b} N={n} M={m} D={d}");
                    assert_close(&what, g, w, TOL)?;
                }
            }
        }
    }
    Ok(())
}

/// kernel_product and its backward (kernel_sums_grad, both sides) on Metal against the CPU.
#[test]
fn metal_kernel_product_and_gradients() -> Result<()> {
    let Some(dev) = metal("metal_kernel_product_and_gradients")? else {
        return Ok(());
    };
    for (s, &(b, n, m, d)) in SIZES.iter().enumerate() {
        let s = 100 + s as u64 * 10;
        let x = tensor(s + 1, &[b, n, d], 0.0, 1.0)?;
        let mut yv = uniform(s + 2, b * m * d, 0.1, 1.1);
        // A coincident pair (the gradient of |x - y| at 0 is 0).
        let x0 = x.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        yv[..d].copy_from_slice(&x0[..d]);
        let y = Tensor::from_vec(yv, (b, m, d), &Device::Cpu)?;
        let bw = tensor(s + 3, &[b, m], -1.0, 1.0)?;
        let w = tensor(s + 4, &[b, n], -1.0, 1.0)?;
        for kind in [
            KernelKind::Gaussian,
            KernelKind::Laplacian,
            KernelKind::Energy,
        ] {
            let run = |dev: &Device| -> Result<Vec<Tensor>> {
                let (vx, vy, vb) = (
                    Var::from_tensor(&x.to_device(dev)?)?,
                    Var::from_tensor(&y.to_device(dev)?)?,
                    Var::from_tensor(&bw.to_device(dev)?)?,
                );
                let u = online::kernel_product(kind, 0.3, &vx, &vy, &vb)?;
                let g = (&u * w.to_device(dev)?)?.sum_all()?.backward()?;
                Ok(vec![
                    u,
                    g.get(&vx).unwrap().clone(),
                    g.get(&vy).unwrap().clone(),
                    g.get(&vb).unwrap().clone(),
                ])
            };
            let (got, want) = (run(&dev)?, run(&Device::Cpu)?);
            for (name, (g, w)) in ["u", "grad_x", "grad_y", "grad_b"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                let what = format!("{name} {kind:?} B={b} N={n} M={m} D={d}");
                assert_close(&what, g, w, TOL)?;
            }
        }
    }
    Ok(())
}

/// The plan operators (lse_values) through a Sinkhorn solve, K = 3 and K = 11 (two passes).
#[test]
fn metal_transport_plan() -> Result<()> {
    let Some(dev) = metal("metal_transport_plan")? else {
        return Ok(());
    };
    let (n, m, d) = (17, 29, 2);
    let x = tensor(201, &[n, d], 0.0, 1.0)?;
    let y = tensor(202, &[m, d], 0.2, 1.2)?;
    for p in [1, 2] {
        let loss = SamplesLoss::builder(Loss::Sinkhorn)
            .p(p)
            .blur(0.05)
            .backend(Backend::Online)
            .build()?;
        for k in [3, 11] {
            let v = tensor(203 + k as u64, &[m, k], -1.0, 1.0)?;
            let u = tensor(303 + k as u64, &[n, k], -1.0, 1.0)?;
            let run = |dev: &Device| -> Result<Vec<Tensor>> {
                let sol = loss.solve(None, &x.to_device(dev)?, None, &y.to_device(dev)?)?;
                let plan = sol.plan()?;
                Ok(vec![
                    plan.apply(&v.to_device(dev)?)?,
                    plan.apply_transpose(&u.to_device(dev)?)?,
                ])
            };
            let (got, want) = (run(&dev)?, run(&Device::Cpu)?);
            assert_close(&format!("plan apply p={p} K={k}"), &got[0], &want[0], TOL)?;
            assert_close(&format!("plan apply_t p={p} K={k}"), &got[1], &want[1], TOL)?;
        }
    }
    Ok(())
}

/// Inputs that start inside their buffer (a batch slice): the start offset is honoured.
#[test]
fn metal_inputs_with_a_start_offset() -> Result<()> {
    let Some(dev) = metal("metal_inputs_with_a_start_offset")? else {
        return Ok(());
    };
    let (b, n, m, d) = (3, 17, 29, 3);
    let x = tensor(401, &[b, n, d], 0.0, 1.0)?.to_device(&dev)?;
    let y = tensor(402, &[b, m, d], 0.0, 1.0)?.to_device(&dev)?;
    let h = log_weights(403, b, m, true)?.to_device(&dev)?;
    let (xs, ys, hs) = (x.narrow(0, 2, 1)?, y.narrow(0, 2, 1)?, h.narrow(0, 2, 1)?);
    assert!(xs.is_contiguous());
    let got = online::softmin(CostKind::SqEuclidean, 0.1, &xs, &ys, &hs)?;
    let want = online::softmin(
        CostKind::SqEuclidean,
        0.1,
        &xs.to_device(&Device::Cpu)?,
        &ys.to_device(&Device::Cpu)?,
        &hs.to_device(&Device::Cpu)?,
    )?;
    assert_close("softmin of a batch slice", &got, &want, TOL)?;
    // Same inputs twice: the cached pipeline gives the same bits.
    let again = online::softmin(CostKind::SqEuclidean, 0.1, &xs, &ys, &hs)?;
    assert_eq!(flat(&got)?, flat(&again)?);
    Ok(())
}

/// f16 / bf16 inputs are computed in f32 and returned in their own dtype; f64 is refused.
#[test]
fn metal_dtypes() -> Result<()> {
    let Some(dev) = metal("metal_dtypes")? else {
        return Ok(());
    };
    let (b, n, m, d) = (2, 17, 29, 3);
    let x = tensor(501, &[b, n, d], 0.0, 1.0)?;
    let y = tensor(502, &[b, m, d], 0.0, 1.0)?;
    let h = log_weights(503, b, m, true)?;
    for dtype in [DType::F16, DType::BF16] {
        let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(&dev);
        let got = online::softmin(CostKind::Euclidean, 0.2, &on(&x)?, &on(&y)?, &on(&h)?)?;
        assert_eq!(got.dtype(), dtype);
        // Reference: the same rounded inputs, in f32 on the CPU.
        let cpu = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
        let want = online::softmin(CostKind::Euclidean, 0.2, &cpu(&x)?, &cpu(&y)?, &cpu(&h)?)?;
        let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 }; // output rounding
        assert_close(&format!("softmin {dtype:?}"), &got, &want, tol)?;
    }
    // f64 on Metal: a clear error (if Candle lets an f64 tensor onto the device at all).
    match x.to_dtype(DType::F64)?.to_device(&dev) {
        Ok(x64) => {
            let y64 = y.to_dtype(DType::F64)?.to_device(&dev)?;
            let h64 = h.to_dtype(DType::F64)?.to_device(&dev)?;
            let err = online::softmin(CostKind::SqEuclidean, 0.1, &x64, &y64, &h64)
                .expect_err("f64 must be refused on Metal")
                .to_string();
            assert!(err.contains("f64 is not supported on Metal"), "{err}");
        }
        Err(e) => eprintln!("(f64 tensors cannot be put on Metal: {e})"),
    }
    Ok(())
}

/// D above the kernels' limit is an error, not NaN.
#[test]
fn metal_too_many_dimensions() -> Result<()> {
    let Some(dev) = metal("metal_too_many_dimensions")? else {
        return Ok(());
    };
    let d = candle_ot_kernels::MAX_D as usize + 1;
    let x = Tensor::zeros((1, 2, d), DType::F32, &dev)?;
    let y = Tensor::zeros((1, 3, d), DType::F32, &dev)?;
    let h = Tensor::zeros((1, 3), DType::F32, &dev)?;
    let err = online::softmin(CostKind::SqEuclidean, 0.1, &x, &y, &h)
        .expect_err("D > MAX_D must be refused")
        .to_string();
    assert!(err.contains("D <="), "{err}");
    Ok(())
}
