//! Bad inputs and options give an `Err` that names the problem (never a panic, never NaN);
//! degenerate but valid inputs give finite, correct values; invariances (zero weights,
//! translation, symmetry, batching, input dtypes) hold.

#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::{Backend, Loss, SamplesLoss};
use common::*;

const N: usize = 17;
const M: usize = 29;
const D: usize = 3;
/// Exact-zero checks in f64 (x = y, identical points).
const TOL_ZERO: f64 = 1e-12;
/// Agreement of two f64 computations that should be equal up to rounding.
const TOL_SAME: f64 = 1e-12;
/// Translation invariance of f64 values (a 1e3 offset costs ~1e-13 of every coordinate).
const TOL_TRANSLATION: f64 = 1e-9;
/// f16 / bf16 inputs against the f32 computation (the inputs themselves are rounded).
const TOL_HALF: f64 = 5e-2;

fn backends(dev: &Device) -> Vec<Backend> {
    if dev.is_cpu() {
        vec![Backend::Online, Backend::Tensorized, Backend::Auto]
    } else {
        vec![Backend::Tensorized, Backend::Auto]
    }
}

fn float(dev: &Device) -> DType {
    if dev.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

fn build(loss: Loss, backend: Backend) -> Result<SamplesLoss> {
    SamplesLoss::builder(loss)
        .blur(0.1)
        .backend(backend)
        .build()
}

/// Every loss and backend rejects the inputs with an error whose message holds every needle,
/// through `solve` and `forward` / `forward_weighted`.
fn expect_input_err(
    dev: &Device,
    losses: &[Loss],
    a: Option<&Tensor>,
    x: &Tensor,
    b: Option<&Tensor>,
    y: &Tensor,
    needles: &[&str],
) -> Result<()> {
    for &loss_kind in losses {
        for backend in backends(dev) {
            let loss = build(loss_kind, backend)?;
            let res = [
                loss.solve(a, x, b, y).map(|s| s.loss),
                match (a, b) {
                    (Some(a), Some(b)) => loss.forward_weighted(a, x, b, y),
                    _ => loss.forward(x, y),
                },
            ];
            for r in res {
                match r {
                    Ok(v) => panic!(
                        "{loss_kind:?} {backend:?}: expected an error mentioning {needles:?}, got Ok({v})"
                    ),
                    Err(e) => {
                        let msg = e.to_string();
                        for n in needles {
                            assert!(
                                msg.contains(n),
                                "{loss_kind:?} {backend:?}: error {msg:?} does not mention {n:?}"
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn clouds(seed: u64, dev: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let dt = float(dev);
    let mut r = rng(seed);
    let a = weights(&mut r, None, N, &[], 1.0)?
        .to_dtype(dt)?
        .to_device(dev)?;
    let x = uniform(&mut r, &[N, D], 0.0, 1.0, dt, dev)?;
    let b = weights(&mut r, None, M, &[], 1.0)?
        .to_dtype(dt)?
        .to_device(dev)?;
    let y = uniform(&mut r, &[M, D], 0.2, 1.2, dt, dev)?;
    Ok((a, x, b, y))
}

/// A copy of `t` (on `t`'s device and dtype) with the flat element `k` set to `v`.
fn with_value(t: &Tensor, k: usize, v: f64) -> Result<Tensor> {
    let mut data = flat(t);
    data[k] = v;
    Tensor::from_vec(data, t.dims(), &Device::Cpu)?
        .to_dtype(t.dtype())?
        .to_device(t.device())
}

// ---------------------------------------------------------------------------------------
// Bad inputs.

fn non_finite_inputs(dev: &Device) -> Result<()> {
    let (a, x, b, y) = clouds(1, dev)?;
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let xb = with_value(&x, 5, bad)?;
        let yb = with_value(&y, 7, bad)?;
        let ab = with_value(&a, 3, bad)?;
        let bb = with_value(&b, 0, bad)?;
        let needle = "contains non-finite values";
        expect_input_err(
            dev,
            &ALL_LOSSES,
            Some(&a),
            &xb,
            Some(&b),
            &y,
            &["x ", needle],
        )?;
        expect_input_err(dev, &ALL_LOSSES, None, &xb, None, &y, &["x ", needle])?;
        expect_input_err(
            dev,
            &ALL_LOSSES,
            Some(&a),
            &x,
            Some(&b),
            &yb,
            &["y ", needle],
        )?;
        expect_input_err(
            dev,
            &ALL_LOSSES,
            Some(&ab),
            &x,
            Some(&b),
            &y,
            &["a ", needle],
        )?;
        expect_input_err(
            dev,
            &ALL_LOSSES,
            Some(&a),
            &x,
            Some(&bb),
            &y,
            &["b ", needle],
        )?;
    }
    Ok(())
}

fn empty_clouds(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let (_, x, _, y) = clouds(2, dev)?;
    let x0 = Tensor::zeros((0, D), dt, dev)?;
    let y0 = Tensor::zeros((0, D), dt, dev)?;
    expect_input_err(dev, &ALL_LOSSES, None, &x0, None, &y, &["x is empty"])?;
    expect_input_err(dev, &ALL_LOSSES, None, &x, None, &y0, &["y is empty"])?;
    expect_input_err(dev, &ALL_LOSSES, None, &x0, None, &y0, &["is empty"])?;
    // Empty weights that match the empty cloud: still the cloud's error.
    let a0 = Tensor::zeros(0, dt, dev)?;
    let b = Tensor::full(1.0 / M as f64, M, dev)?.to_dtype(dt)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&a0),
        &x0,
        Some(&b),
        &y,
        &["x is empty"],
    )?;
    // Batched: no batch item, or no point in each item.
    let xb = Tensor::zeros((2, 0, D), dt, dev)?;
    let yb = Tensor::zeros((2, 4, D), dt, dev)?;
    expect_input_err(dev, &ALL_LOSSES, None, &xb, None, &yb, &["x is empty"])?;
    let xe = Tensor::zeros((0, 3, D), dt, dev)?;
    let ye = Tensor::zeros((0, 4, D), dt, dev)?;
    expect_input_err(dev, &ALL_LOSSES, None, &xe, None, &ye, &["empty"])?;
    // D = 0 is its own error, not an empty cloud.
    let xd = Tensor::zeros((3, 0), dt, dev)?;
    let yd = Tensor::zeros((4, 0), dt, dev)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        None,
        &xd,
        None,
        &yd,
        &["D >= 1", "[3, 0]"],
    )?;
    Ok(())
}

/// Error texts show the shapes the caller passed: a (10, 2) input is `[10, 2]`, never with the
/// batch axis added inside (`[1, 10, 2]`).
fn error_shapes_are_the_callers(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let x = Tensor::zeros((10, 2), dt, dev)?;
    let y = Tensor::zeros((12, 3), dt, dev)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        None,
        &x,
        None,
        &y,
        &["x [10, 2]", "y [12, 3]"],
    )?;
    Ok(())
}
test_device!(
    error_shapes_are_the_callers,
    error_shapes_are_the_callers_cpu,
    error_shapes_are_the_callers_cuda,
    error_shapes_are_the_callers_metal
);

fn mismatched_shapes(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let mut r = rng(3);
    let x = uniform(&mut r, &[N, 2], 0.0, 1.0, dt, dev)?;
    let y3 = uniform(&mut r, &[M, 3], 0.0, 1.0, dt, dev)?;
    expect_input_err(dev, &ALL_LOSSES, None, &x, None, &y3, &["same dimension D"])?;
    let xb = uniform(&mut r, &[2, N, 2], 0.0, 1.0, dt, dev)?;
    let yb = uniform(&mut r, &[3, M, 2], 0.0, 1.0, dt, dev)?;
    expect_input_err(dev, &ALL_LOSSES, None, &xb, None, &yb, &["same batch size"])?;
    // Rank 1 and rank 4 inputs.
    let x1 = uniform(&mut r, &[N], 0.0, 1.0, dt, dev)?;
    let y1 = uniform(&mut r, &[M], 0.0, 1.0, dt, dev)?;
    let x4 = uniform(&mut r, &[2, 2, N, 2], 0.0, 1.0, dt, dev)?;
    let y4 = uniform(&mut r, &[2, 2, M, 2], 0.0, 1.0, dt, dev)?;
    let y2 = uniform(&mut r, &[M, 2], 0.0, 1.0, dt, dev)?;
    let x_msg = "x must be (N, D) or (B, N, D)";
    let y_msg = "y must be (M, D) or (B, M, D)";
    expect_input_err(dev, &ALL_LOSSES, None, &x1, None, &y1, &[x_msg])?;
    expect_input_err(dev, &ALL_LOSSES, None, &x1, None, &y2, &[x_msg])?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        None,
        &x4,
        None,
        &y4,
        &[x_msg, "[2, 2, 17, 2]"],
    )?;
    expect_input_err(dev, &ALL_LOSSES, None, &x, None, &y1, &[y_msg])?;
    expect_input_err(dev, &ALL_LOSSES, None, &x, None, &y4, &[y_msg])?;
    expect_input_err(dev, &ALL_LOSSES, None, &xb, None, &y2, &[y_msg])?;
    expect_input_err(dev, &ALL_LOSSES, None, &x, None, &yb, &[y_msg])?;
    Ok(())
}

fn bad_weights(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let (a, x, b, y) = clouds(4, dev)?;
    let mut r = rng(4);
    // Wrong lengths / ranks.
    let a16 = weights(&mut r, None, N - 1, &[], 1.0)?
        .to_dtype(dt)?
        .to_device(dev)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&a16),
        &x,
        Some(&b),
        &y,
        &["a must be (17,)", "[16]"],
    )?;
    let b30 = weights(&mut r, None, M + 1, &[], 1.0)?
        .to_dtype(dt)?
        .to_device(dev)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&a),
        &x,
        Some(&b30),
        &y,
        &["b must be (29,)"],
    )?;
    let a2d = a.unsqueeze(0)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&a2d),
        &x,
        Some(&b),
        &y,
        &["a must be (17,)"],
    )?;
    let (xb, yb) = (
        x.unsqueeze(0)?.repeat((2, 1, 1))?,
        y.unsqueeze(0)?.repeat((2, 1, 1))?,
    );
    let (ab, bb) = (
        a.unsqueeze(0)?.repeat((2, 1))?,
        b.unsqueeze(0)?.repeat((2, 1))?,
    );
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&a),
        &xb,
        Some(&bb),
        &yb,
        &["a must be (2, 17)"],
    )?;
    let bb3 = b.unsqueeze(0)?.repeat((3, 1))?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&ab),
        &xb,
        Some(&bb3),
        &yb,
        &["b must be (2, 29)"],
    )?;
    // Negative weights.
    let an = with_value(&a, 4, -0.01)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&an),
        &x,
        Some(&b),
        &y,
        &["a: weights must be >= 0"],
    )?;
    let bn = with_value(&b, 28, -1e-30)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&a),
        &x,
        Some(&bn),
        &y,
        &["b: weights must be >= 0"],
    )?;
    // All-zero weights (also in one batch item only).
    let az = a.zeros_like()?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&az),
        &x,
        Some(&b),
        &y,
        &["a: ", "sum to 0"],
    )?;
    let bz = Tensor::cat(&[&b.unsqueeze(0)?, &b.zeros_like()?.unsqueeze(0)?], 0)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        Some(&ab),
        &xb,
        Some(&bz),
        &yb,
        &["b: ", "batch item 1 sum to 0"],
    )?;
    Ok(())
}

fn unequal_masses(dev: &Device) -> Result<()> {
    let (a, x, b, y) = clouds(5, dev)?;
    let b2 = (&b * 2.0)?;
    // Balanced Sinkhorn needs equal masses...
    expect_input_err(
        dev,
        &[Loss::Sinkhorn],
        Some(&a),
        &x,
        Some(&b2),
        &y,
        &["equal total masses", "reach"],
    )?;
    // ... the other losses and unbalanced Sinkhorn do not.
    for loss_kind in ALL_LOSSES {
        for backend in backends(dev) {
            let mut builder = SamplesLoss::builder(loss_kind).blur(0.1).backend(backend);
            if loss_kind == Loss::Sinkhorn {
                builder = builder.reach(0.5);
            }
            let v = builder.build()?.forward_weighted(&a, &x, &b2, &y)?;
            assert!(all_finite(&v), "{loss_kind:?} {backend:?}: {v}");
        }
    }
    // f64 weights summing to 1, cast to f32: masses equal to ~1e-7, accepted.
    let mut r = rng(55);
    let a64 = weights(&mut r, None, 1001, &[], 1.0)?;
    let b64 = weights(&mut r, None, 997, &[], 1.0)?;
    let sa: f64 = flat(&a64.to_dtype(DType::F32)?).iter().sum();
    let sb: f64 = flat(&b64.to_dtype(DType::F32)?).iter().sum();
    assert!(sa != sb || sa != 1.0, "the cast should perturb the masses");
    let x = uniform(&mut r, &[1001, 2], 0.0, 1.0, DType::F32, dev)?;
    let y = uniform(&mut r, &[997, 2], 0.0, 1.0, DType::F32, dev)?;
    for backend in backends(dev) {
        let loss = SamplesLoss::builder(Loss::Sinkhorn)
            .backend(backend)
            .build()?;
        let v = loss.forward_weighted(
            &a64.to_dtype(DType::F32)?.to_device(dev)?,
            &x,
            &b64.to_dtype(DType::F32)?.to_device(dev)?,
            &y,
        )?;
        assert!(all_finite(&v));
    }
    Ok(())
}

/// Large f32 problems with unequal sizes are valid input: the default uniform weights, and
/// weights normalised by an f32 sum (whose rounding grows with N), pass the equal-mass check
/// (masses summed in f64, tolerance 1e-5 + max(N, M)·u). N·M is kept small (M = 3, no debias).
#[test]
fn large_f32_unequal_sizes_pass_the_mass_check() -> Result<()> {
    let dev = Device::Cpu;
    let mut r = rng(77);
    let (n, m) = (200_000usize, 3usize);
    let x = uniform(&mut r, &[n, 2], 0.0, 1.0, DType::F32, &dev)?;
    let y = uniform(&mut r, &[m, 2], 0.0, 1.0, DType::F32, &dev)?;
    let loss = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(0.5)
        .debias(false)
        .build()?;
    assert!(all_finite(&loss.forward(&x, &y)?));
    let w = uniform(&mut r, &[n], 0.0, 1.0, DType::F32, &dev)?;
    let a = w.broadcast_div(&w.sum_all()?)?; // normalised in f32
    let b = Tensor::full(1f32 / 3.0, m, &dev)?;
    assert!(all_finite(&loss.forward_weighted(&a, &x, &b, &y)?));
    Ok(())
}

fn bad_dtypes(dev: &Device) -> Result<()> {
    let ints = Tensor::new(&[[0u32, 1], [2, 3], [4, 5]], dev)?;
    let ints_y = Tensor::new(&[[1u32, 1], [2, 2]], dev)?;
    let floats = ints.to_dtype(DType::F32)?;
    let floats_y = ints_y.to_dtype(DType::F32)?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        None,
        &ints,
        None,
        &ints_y,
        &["floating point"],
    )?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        None,
        &ints,
        None,
        &floats_y,
        &["floating point"],
    )?;
    expect_input_err(
        dev,
        &ALL_LOSSES,
        None,
        &floats,
        None,
        &ints_y,
        &["floating point"],
    )?;
    if dtype_supported(DType::F64, dev) {
        let f64s = ints.to_dtype(DType::F64)?;
        let f64s_y = ints_y.to_dtype(DType::F64)?;
        let needle = "same precision";
        expect_input_err(dev, &ALL_LOSSES, None, &f64s, None, &floats_y, &[needle])?;
        expect_input_err(dev, &ALL_LOSSES, None, &floats, None, &f64s_y, &[needle])?;
        let f16s = ints.to_dtype(DType::F16)?;
        expect_input_err(dev, &ALL_LOSSES, None, &f16s, None, &f64s_y, &[needle])?;
    }
    Ok(())
}

fn bad_options(_dev: &Device) -> Result<()> {
    let err = |b: candle_ot::SamplesLossBuilder, needles: &[&str]| match b.build() {
        Ok(l) => panic!("expected an error mentioning {needles:?}, got {l:?}"),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{msg:?} does not mention {n:?}");
            }
        }
    };
    for loss in ALL_LOSSES {
        let b = || SamplesLoss::builder(loss);
        for v in [0.0, -0.1, f64::NAN, f64::INFINITY] {
            err(b().blur(v), &["invalid option blur"]);
            err(b().reach(v), &["invalid option reach"]);
            err(b().diameter(v), &["invalid option diameter"]);
            err(b().tol(v), &["invalid option tol"]);
        }
        for s in [0.0, 1.0, 1.5, -0.5, f64::NAN] {
            err(b().scaling(s), &["invalid option scaling", "(0, 1)"]);
        }
        for p in [0, 3, 4] {
            err(
                b().p(p),
                &["invalid option p", "1 or 2", &format!("got {p}")],
            );
        }
        // Valid extremes still build.
        b().scaling(0.999).blur(1e-3).reach(1e3).p(1).build()?;
    }
    let e = "foo".parse::<Loss>().unwrap_err().to_string();
    assert!(e.contains("loss") && e.contains("foo"), "{e}");
    let e = "fast".parse::<Backend>().unwrap_err().to_string();
    assert!(e.contains("backend") && e.contains("fast"), "{e}");
    Ok(())
}

/// The multiscale backend's limits are clear errors: D ≤ 3 (the Sinkhorn loss clusters the
/// points), and, on CUDA / Metal, the online kernels compiled in (the fine level runs on their
/// block-sparse variants).
fn multiscale_limits(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let mut r = rng(6);
    let x = uniform(&mut r, &[N, 4], 0.0, 1.0, dt, dev)?; // D = 4
    let y = uniform(&mut r, &[M, 4], 0.0, 1.0, dt, dev)?;
    let l = SamplesLoss::builder(Loss::Sinkhorn)
        .backend(Backend::Multiscale)
        .build()?;
    let msg = l.forward(&x, &y).expect_err("D = 4 is refused").to_string();
    assert!(msg.contains("multiscale"), "{msg}");
    let (_, x, _, y) = clouds(6, dev)?; // D = 3
    if candle_ot::softmin::online::supports(dev) {
        assert!(msg.contains("D = 4"), "{msg}");
        let v = l.forward(&x, &y)?; // runs (the CPU, or the kernels compiled in)
        assert!(all_finite(&v), "multiscale on {dev:?}: non-finite loss");
    } else {
        let msg = l
            .forward(&x, &y)
            .expect_err("kernels not compiled in")
            .to_string();
        assert!(
            msg.contains("multiscale") && msg.contains("feature"),
            "{msg}"
        );
    }
    Ok(())
}

/// Asking for the online backend on a device whose kernels are not compiled in is a clear
/// error naming the feature.
fn online_needs_kernels(dev: &Device) -> Result<()> {
    if candle_ot::softmin::online::supports(dev) {
        return Ok(()); // nothing to refuse in this build
    }
    let (_, x, _, y) = clouds(7, dev)?;
    let l = SamplesLoss::builder(Loss::Sinkhorn)
        .backend(Backend::Online)
        .build()?;
    let msg = l
        .forward(&x, &y)
        .expect_err("no online kernels")
        .to_string();
    assert!(
        msg.contains("online backend") && msg.contains("feature"),
        "{msg}"
    );
    Ok(())
}

fn transfer_errors(dev: &Device) -> Result<()> {
    let (a, x, b, y) = clouds(8, dev)?;
    let v = Tensor::ones((M, 2), x.dtype(), dev)?;
    for loss_kind in [Loss::Hausdorff, Loss::Energy] {
        let s = build(loss_kind, Backend::Tensorized)?.solve(Some(&a), &x, Some(&b), &y)?;
        let msg = s.transfer(&v).expect_err("no plan").to_string();
        assert!(msg.contains("sinkhorn"), "{msg}");
    }
    let s = build(Loss::Sinkhorn, Backend::Tensorized)?.solve(Some(&a), &x, Some(&b), &y)?;
    let bad = Tensor::ones((M - 1, 2), x.dtype(), dev)?;
    let msg = s.transfer(&bad).expect_err("wrong shape").to_string();
    assert!(msg.contains("v must be"), "{msg}");
    Ok(())
}

test_device!(
    non_finite_inputs,
    non_finite_inputs_cpu,
    non_finite_inputs_cuda,
    non_finite_inputs_metal
);
test_device!(
    empty_clouds,
    empty_clouds_cpu,
    empty_clouds_cuda,
    empty_clouds_metal
);
test_device!(
    mismatched_shapes,
    mismatched_shapes_cpu,
    mismatched_shapes_cuda,
    mismatched_shapes_metal
);
test_device!(
    bad_weights,
    bad_weights_cpu,
    bad_weights_cuda,
    bad_weights_metal
);
test_device!(
    unequal_masses,
    unequal_masses_cpu,
    unequal_masses_cuda,
    unequal_masses_metal
);
test_device!(
    bad_dtypes,
    bad_dtypes_cpu,
    bad_dtypes_cuda,
    bad_dtypes_metal
);
test_device!(
    bad_options,
    bad_options_cpu,
    bad_options_cuda,
    bad_options_metal
);
test_device!(
    multiscale_limits,
    multiscale_limits_cpu,
    multiscale_limits_cuda,
    multiscale_limits_metal
);
test_device!(
    online_needs_kernels,
    online_needs_kernels_cpu,
    online_needs_kernels_cuda,
    online_needs_kernels_metal
);
test_device!(
    transfer_errors,
    transfer_errors_cpu,
    transfer_errors_cuda,
    transfer_errors_metal
);

// ---------------------------------------------------------------------------------------
// Degenerate but valid inputs.

/// Loss and gradients (x, y) of every loss, checked finite.
fn finite_run(loss: &SamplesLoss, x: &Tensor, y: &Tensor) -> Result<(f64, Vec<f64>, Vec<f64>)> {
    let (vx, vy) = (Var::from_tensor(x)?, Var::from_tensor(y)?);
    let l = loss.forward(&vx, &vy)?;
    let grads = l.sum_all()?.backward()?;
    let gx = flat(grads.get(&vx).expect("grad x"));
    let gy = flat(grads.get(&vy).expect("grad y"));
    let v = flat(&l);
    assert!(
        v.iter().chain(&gx).chain(&gy).all(|v| v.is_finite()),
        "{:?}: non-finite loss {v:?} or gradients",
        loss.options()
    );
    Ok((v.iter().sum(), gx, gy))
}

fn single_points(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let mut r = rng(9);
    for (n, m) in [(1, 1), (1, M), (N, 1)] {
        let x = uniform(&mut r, &[n, D], 0.0, 1.0, dt, dev)?;
        let y = uniform(&mut r, &[m, D], 0.0, 1.0, dt, dev)?;
        for loss_kind in ALL_LOSSES {
            for p in [1, 2] {
                for backend in backends(dev) {
                    let l = SamplesLoss::builder(loss_kind)
                        .p(p)
                        .backend(backend)
                        .build()?;
                    finite_run(&l, &x, &y)?;
                }
            }
        }
    }
    Ok(())
}

/// All points of x ∪ y at one location: the estimated diameter is 0, every loss is 0.
fn identical_points(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let x = Tensor::full(0.3, (5, D), dev)?.to_dtype(dt)?;
    let y = Tensor::full(0.3, (7, D), dev)?.to_dtype(dt)?;
    let tol = if dt == DType::F64 { TOL_ZERO } else { 1e-6 };
    for loss_kind in ALL_LOSSES {
        for p in [1, 2] {
            for debias in [true, false] {
                for backend in backends(dev) {
                    let l = SamplesLoss::builder(loss_kind)
                        .p(p)
                        .debias(debias)
                        .backend(backend)
                        .build()?;
                    let (v, gx, gy) = finite_run(&l, &x, &y)?;
                    assert!(v.abs() < tol, "{loss_kind:?} p={p} {backend:?}: {v}");
                    let gmax = gx.iter().chain(&gy).fold(0f64, |m, g| m.max(g.abs()));
                    assert!(
                        gmax < tol,
                        "{loss_kind:?} p={p} {backend:?}: gradient {gmax}"
                    );
                    if loss_kind == Loss::Sinkhorn {
                        let s = l.solve(None, &x, None, &y)?;
                        let diag = s.diagnostics.unwrap();
                        assert_eq!(diag.eps_list, vec![0.05f64.powi(p as i32)]);
                    }
                }
            }
        }
    }
    Ok(())
}

/// x = y and a = b: every debiased loss is 0 and its gradient in x vanishes.
fn same_clouds_give_zero(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let tol = if dt == DType::F64 { TOL_ZERO } else { 1e-5 };
    let mut r = rng(10);
    for batched in [false, true] {
        let dims: Vec<usize> = if batched { vec![2, N, D] } else { vec![N, D] };
        let x = uniform(&mut r, &dims, 0.0, 1.0, dt, dev)?;
        let a = weights(&mut r, batched.then_some(2), N, &[3], 1.0)?
            .to_dtype(dt)?
            .to_device(dev)?;
        for loss_kind in ALL_LOSSES {
            for p in [1, 2] {
                for reach in [None, Some(0.5)] {
                    for backend in backends(dev) {
                        let l = SamplesLoss::builder(loss_kind)
                            .p(p)
                            .reach(reach)
                            .backend(backend)
                            .build()?;
                        let (vx, vy) = (Var::from_tensor(&x)?, Var::from_tensor(&x)?);
                        let v = l.forward_weighted(&a, &vx, &a, &vy)?;
                        let grads = v.sum_all()?.backward()?;
                        let name = format!("{loss_kind:?} p={p} reach={reach:?} {backend:?}");
                        for v in flat(&v) {
                            assert!(v.abs() < tol, "{name}: loss {v}");
                        }
                        let gx = flat(grads.get(&vx).expect("grad x"));
                        let gy = flat(grads.get(&vy).expect("grad y"));
                        // α = β is the minimum: both gradients vanish.
                        let gmax = gx.iter().chain(&gy).fold(0f64, |m, g| m.max(g.abs()));
                        assert!(gmax < tol, "{name}: gradient {gmax}");
                        assert!(gx.iter().all(|g| g.is_finite()), "{name}: grad x");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Zero-weight points change nothing, even far away (one at 100 in every coordinate, the
/// clouds in [0, 1.2]): the value and the potentials of the remaining points equal those of the
/// clouds without them. The ε schedule is estimated from the points of positive weight (GeomLoss
/// counts every point, so its far padding point would lengthen the schedule and change the
/// value: reliability.md, "Zero-weight points").
fn zero_weights_are_removed_points(dev: &Device) -> Result<()> {
    let dt = float(dev);
    // f64: 1e-10, not TOL_SAME: the online kernel centres the clouds (the dot-product form), and
    // the far point moves the centre by ~3, which changes the rounding (measured up to 1.0e-11,
    // unbalanced; 1e-13 without the far point).
    let tol = if dt == DType::F64 { 1e-10 } else { 1e-5 };
    let mut r = rng(11);
    let zeros_a = [0usize, 8, 16];
    let zeros_b = [5usize, 6, 20];
    let a = weights(&mut r, None, N, &zeros_a, 1.0)?;
    let b = weights(&mut r, None, M, &zeros_b, 1.0)?;
    let x = uniform(&mut r, &[N, D], 0.0, 1.0, DType::F64, &Device::Cpu)?;
    let y = uniform(&mut r, &[M, D], 0.2, 1.2, DType::F64, &Device::Cpu)?;
    // A zero-weight point far away.
    let x = x.slice_assign(
        &[8..9, 0..D],
        &Tensor::full(100.0f64, (1, D), &Device::Cpu)?,
    )?;
    let keep = |n: usize, zeros: &[usize]| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n as u32)
            .filter(|i| !zeros.contains(&(*i as usize)))
            .collect();
        Tensor::new(idx, &Device::Cpu)
    };
    let (ka, kb) = (keep(N, &zeros_a)?, keep(M, &zeros_b)?);
    let on = |t: &Tensor| -> Result<Tensor> { t.to_dtype(dt)?.to_device(dev) };
    let full = [on(&a)?, on(&x)?, on(&b)?, on(&y)?];
    let kept = [
        on(&a.index_select(&ka, 0)?)?,
        on(&x.index_select(&ka, 0)?)?,
        on(&b.index_select(&kb, 0)?)?,
        on(&y.index_select(&kb, 0)?)?,
    ];
    for loss_kind in ALL_LOSSES {
        for p in [1, 2] {
            for debias in [true, false] {
                for reach in [None, Some(0.5)] {
                    for backend in backends(dev) {
                        let l = SamplesLoss::builder(loss_kind)
                            .p(p)
                            .blur(0.1)
                            .debias(debias)
                            .reach(reach)
                            .backend(backend)
                            .build()?;
                        let s1 = l.solve(Some(&full[0]), &full[1], Some(&full[2]), &full[3])?;
                        let s2 = l.solve(Some(&kept[0]), &kept[1], Some(&kept[2]), &kept[3])?;
                        let name = format!(
                            "{loss_kind:?} p={p} debias={debias} reach={reach:?} {backend:?}"
                        );
                        let err = rel_err(&s1.loss, &s2.loss);
                        assert!(err <= tol, "{name}: loss rel err {err:.3e}");
                        let f1 = s1.f.to_device(&Device::Cpu)?.index_select(&ka, 0)?;
                        let g1 = s1.g.to_device(&Device::Cpu)?.index_select(&kb, 0)?;
                        let err_f = rel_err(&f1, &s2.f);
                        let err_g = rel_err(&g1, &s2.g);
                        assert!(
                            err_f <= tol && err_g <= tol,
                            "{name}: F {err_f:.3e} G {err_g:.3e}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// f16 and bf16 inputs are computed in f32 and the loss comes back in the input dtype.
fn half_precision_inputs(dev: &Device) -> Result<()> {
    let mut r = rng(12);
    let x = uniform(&mut r, &[N, D], 0.0, 1.0, DType::F32, dev)?;
    let y = uniform(&mut r, &[M, D], 0.2, 1.2, DType::F32, dev)?;
    for half in [DType::F16, DType::BF16] {
        let (xh, yh) = (x.to_dtype(half)?, y.to_dtype(half)?);
        for loss_kind in ALL_LOSSES {
            for backend in backends(dev) {
                let l = SamplesLoss::builder(loss_kind)
                    .blur(0.1)
                    .backend(backend)
                    .build()?;
                // The f32 reference on the rounded inputs.
                let want =
                    scalar(&l.forward(&xh.to_dtype(DType::F32)?, &yh.to_dtype(DType::F32)?)?);
                let vx = Var::from_tensor(&xh)?;
                let got = l.forward(&vx, &yh)?;
                assert_eq!(got.dtype(), half, "{loss_kind:?} {backend:?}");
                assert_eq!(got.dims(), &[] as &[usize]);
                let gv = scalar(&got);
                assert!(
                    ((gv - want) / want).abs() < TOL_HALF,
                    "{loss_kind:?} {backend:?} {half:?}: {gv} vs f32 {want}"
                );
                let grads = got.backward()?;
                let gx = grads.get(&vx).expect("grad x");
                assert_eq!(gx.dtype(), half);
                assert!(all_finite(gx));
                // Mixed half / f32 inputs are one precision class.
                let mixed = l.forward(&xh, &y)?;
                assert_eq!(mixed.dtype(), half);
                // Solutions and potentials in the compute dtype, finite.
                let s = l.solve(None, &xh, None, &yh)?;
                assert!(all_finite(&s.f) && all_finite(&s.g));
            }
        }
    }
    Ok(())
}

/// Translating both clouds by 1e3 leaves every f64 value unchanged.
fn translation_invariance(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        return Ok(());
    }
    let (a, x, b, y) = clouds(13, dev)?;
    let (xt, yt) = ((&x + 1e3)?, (&y + 1e3)?);
    for loss_kind in ALL_LOSSES {
        for p in [1, 2] {
            for reach in [None, Some(0.5)] {
                for backend in backends(dev) {
                    let l = SamplesLoss::builder(loss_kind)
                        .p(p)
                        .blur(0.1)
                        .reach(reach)
                        .backend(backend)
                        .build()?;
                    let v0 = scalar(&l.forward_weighted(&a, &x, &b, &y)?);
                    let v1 = scalar(&l.forward_weighted(&a, &xt, &b, &yt)?);
                    let err = ((v1 - v0) / v0).abs();
                    assert!(
                        err < TOL_TRANSLATION,
                        "{loss_kind:?} p={p} reach={reach:?} {backend:?}: {v0} vs translated {v1} ({err:.2e})"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Swapping (a, x) and (b, y) leaves the symmetric losses unchanged and swaps F and G.
fn symmetry(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let tol = if dt == DType::F64 { TOL_SAME } else { 1e-5 };
    let (a, x, b, y) = clouds(14, dev)?;
    for loss_kind in ALL_LOSSES {
        for p in [1, 2] {
            for backend in backends(dev) {
                let l = SamplesLoss::builder(loss_kind)
                    .p(p)
                    .blur(0.1)
                    .backend(backend)
                    .build()?;
                let s1 = l.solve(Some(&a), &x, Some(&b), &y)?;
                let s2 = l.solve(Some(&b), &y, Some(&a), &x)?;
                let name = format!("{loss_kind:?} p={p} {backend:?}");
                let e = rel_err(&s1.loss, &s2.loss);
                assert!(e <= tol, "{name}: loss {e:.3e}");
                let (ef, eg) = (rel_err(&s1.f, &s2.g), rel_err(&s1.g, &s2.f));
                assert!(ef <= tol && eg <= tol, "{name}: F/G {ef:.3e} {eg:.3e}");
            }
        }
    }
    Ok(())
}

/// A batch gives the values of its items computed one by one (fixed diameter: the estimate
/// is over the whole batch), and `forward` is `forward_weighted` with uniform weights.
fn batch_consistency(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let tol = if dt == DType::F64 { TOL_SAME } else { 1e-5 };
    let mut r = rng(15);
    let xb = uniform(&mut r, &[3, N, D], 0.0, 1.0, dt, dev)?;
    let yb = uniform(&mut r, &[3, M, D], 0.2, 1.2, dt, dev)?;
    for loss_kind in ALL_LOSSES {
        for backend in backends(dev) {
            let l = SamplesLoss::builder(loss_kind)
                .blur(0.1)
                .diameter(2.0)
                .backend(backend)
                .build()?;
            let batched = l.forward(&xb, &yb)?;
            assert_eq!(batched.dims(), &[3]);
            let (fb, gb) = l.potentials(None, &xb, None, &yb)?;
            assert_eq!(fb.dims(), &[3, N]);
            assert_eq!(gb.dims(), &[3, M]);
            let bv = flat(&batched);
            for (i, bvi) in bv.iter().enumerate() {
                let (xi, yi) = (xb.get(i)?, yb.get(i)?);
                let v = scalar(&l.forward(&xi, &yi)?);
                let e = ((v - bvi) / v).abs();
                assert!(e <= tol, "{loss_kind:?} {backend:?} item {i}: {v} vs {bvi}");
                let ua = Tensor::full(1.0 / N as f64, N, dev)?.to_dtype(dt)?;
                let ub = Tensor::full(1.0 / M as f64, M, dev)?.to_dtype(dt)?;
                let w = scalar(&l.forward_weighted(&ua, &xi, &ub, &yi)?);
                assert!(
                    ((w - v) / v).abs() <= tol,
                    "{loss_kind:?}: weighted {w} vs {v}"
                );
                let (fi, gi) = l.potentials(None, &xi, None, &yi)?;
                assert!(rel_err(&fi, &fb.get(i)?) <= tol && rel_err(&gi, &gb.get(i)?) <= tol);
            }
        }
    }
    Ok(())
}

/// `Auto` resolves to online on the CPU and tensorized elsewhere; diagnostics are reported.
fn auto_backend_and_diagnostics(dev: &Device) -> Result<()> {
    let (_, x, _, y) = clouds(16, dev)?;
    let l = SamplesLoss::new(Loss::Sinkhorn);
    let s = l.solve(None, &x, None, &y)?;
    let want = if dev.is_cpu() {
        Backend::Online
    } else {
        Backend::Tensorized
    };
    assert_eq!(s.backend, want);
    assert_eq!(l.resolve_backend(dev)?, want);
    let diag = s.diagnostics.expect("sinkhorn diagnostics");
    assert_eq!(diag.converged, None);
    assert_eq!(diag.extra_iterations, 0);
    assert_eq!(*diag.eps_list.last().unwrap(), 0.05f64 * 0.05);
    assert!(diag.update_error.is_finite());
    assert!(s.f_ba.is_some() && s.f_aa.is_some() && s.eps == Some(0.05 * 0.05));
    let s = SamplesLoss::builder(Loss::Sinkhorn)
        .debias(false)
        .build()?
        .solve(None, &x, None, &y)?;
    assert!(s.f_aa.is_none() && s.g_bb.is_none());
    let s = SamplesLoss::new(Loss::Energy).solve(None, &x, None, &y)?;
    assert!(s.diagnostics.is_none() && s.eps.is_none() && s.f_ba.is_none());
    // tol with too few iterations reports no convergence, without failing.
    let s = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(0.01)
        .tol(1e-14)
        .max_iter(2)
        .build()?
        .solve(None, &x, None, &y)?;
    let diag = s.diagnostics.unwrap();
    assert_eq!(diag.converged, Some(false));
    assert_eq!(diag.extra_iterations, 2);
    assert!(all_finite(&s.loss));
    Ok(())
}

test_device!(
    single_points,
    single_points_cpu,
    single_points_cuda,
    single_points_metal
);
test_device!(
    identical_points,
    identical_points_cpu,
    identical_points_cuda,
    identical_points_metal
);
test_device!(
    same_clouds_give_zero,
    same_clouds_give_zero_cpu,
    same_clouds_give_zero_cuda,
    same_clouds_give_zero_metal
);
test_device!(
    zero_weights_are_removed_points,
    zero_weights_are_removed_points_cpu,
    zero_weights_are_removed_points_cuda,
    zero_weights_are_removed_points_metal
);
test_device!(
    half_precision_inputs,
    half_precision_inputs_cpu,
    half_precision_inputs_cuda,
    half_precision_inputs_metal
);
test_device!(
    translation_invariance,
    translation_invariance_cpu,
    translation_invariance_cuda,
    translation_invariance_metal
);
test_device!(symmetry, symmetry_cpu, symmetry_cuda, symmetry_metal);
test_device!(
    batch_consistency,
    batch_consistency_cpu,
    batch_consistency_cuda,
    batch_consistency_metal
);
test_device!(
    auto_backend_and_diagnostics,
    auto_backend_and_diagnostics_cpu,
    auto_backend_and_diagnostics_cuda,
    auto_backend_and_diagnostics_metal
);

/// Non-contiguous (transposed, broadcast) inputs give the values of their contiguous copies.
fn strided_inputs(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let tol = if dt == DType::F64 { TOL_SAME } else { 1e-6 };
    let mut r = rng(17);
    let xt = uniform(&mut r, &[D, N], 0.0, 1.0, dt, dev)?; // x = xtᵀ, strided
    let yt = uniform(&mut r, &[D, M], 0.2, 1.2, dt, dev)?;
    let (x, y) = (xt.t()?, yt.t()?);
    assert!(!x.is_contiguous());
    let (xc, yc) = (x.contiguous()?, y.contiguous()?);
    // Weights broadcast from a scalar (stride 0) and a strided column.
    let a = Tensor::full(1.0 / N as f64, 1, dev)?
        .to_dtype(dt)?
        .broadcast_as(N)?;
    let bt = weights(&mut r, None, 2 * M, &[], 2.0)?
        .to_dtype(dt)?
        .to_device(dev)?
        .reshape((M, 2))?;
    let b = bt.narrow(1, 0, 1)?.squeeze(1)?; // stride 2
    let b = b.broadcast_div(&b.sum_all()?)?;
    let (ac, bc) = (a.contiguous()?, b.contiguous()?);
    for loss_kind in ALL_LOSSES {
        for p in [1, 2] {
            for backend in backends(dev) {
                let l = SamplesLoss::builder(loss_kind)
                    .p(p)
                    .blur(0.1)
                    .backend(backend)
                    .build()?;
                let v1 = l.solve(Some(&a), &x, Some(&b), &y)?;
                let v2 = l.solve(Some(&ac), &xc, Some(&bc), &yc)?;
                let name = format!("{loss_kind:?} p={p} {backend:?}");
                assert!(rel_err(&v1.loss, &v2.loss) <= tol, "{name}: loss");
                assert!(rel_err(&v1.f, &v2.f) <= tol, "{name}: F");
                assert!(rel_err(&v1.g, &v2.g) <= tol, "{name}: G");
                // Batched and strided.
                let xb = Tensor::stack(&[&x, &x], 0)?
                    .transpose(1, 2)?
                    .transpose(1, 2)?;
                let yb = Tensor::stack(&[&y, &y], 0)?;
                let vb = flat(&l.forward(&xb, &yb)?);
                let v = scalar(&l.forward(&xc, &yc)?);
                for vb in vb {
                    assert!(((vb - v) / v).abs() <= tol, "{name}: batched {vb} vs {v}");
                }
            }
        }
    }
    Ok(())
}

/// Points of x that coincide with points of y: p = 1 costs and the distance kernels are not
/// differentiable there; the gradient is taken as 0 there and everything stays finite.
fn coincident_points(dev: &Device) -> Result<()> {
    let dt = float(dev);
    let mut r = rng(18);
    let x = uniform(&mut r, &[N, D], 0.0, 1.0, dt, dev)?;
    let y = Tensor::cat(
        &[
            &x.narrow(0, 0, 5)?,
            &uniform(&mut r, &[M - 5, D], 0.0, 1.0, dt, dev)?,
        ],
        0,
    )?;
    // Duplicates inside x too.
    let x = Tensor::cat(&[&x, &x.narrow(0, 0, 3)?], 0)?;
    for loss_kind in ALL_LOSSES {
        for p in [1, 2] {
            for debias in [true, false] {
                let mut grads = vec![];
                for backend in backends(dev) {
                    let l = SamplesLoss::builder(loss_kind)
                        .p(p)
                        .blur(0.1)
                        .debias(debias)
                        .backend(backend)
                        .build()?;
                    let (_, gx, gy) = finite_run(&l, &x, &y)?;
                    grads.push((gx, gy));
                }
                // The backends agree there too.
                let tol = if dt == DType::F64 { 1e-10 } else { 1e-4 };
                for g in &grads[1..] {
                    let ex = rel_err_vec(&g.0, &grads[0].0);
                    let ey = rel_err_vec(&g.1, &grads[0].1);
                    assert!(
                        ex <= tol && ey <= tol,
                        "{loss_kind:?} p={p} debias={debias}: backends differ {ex:.2e} {ey:.2e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Extreme but valid options give finite values: tiny and huge blurs, a huge reach
/// (≈ balanced), a diameter below the blur, a scaling close to 1.
fn extreme_options(dev: &Device) -> Result<()> {
    let (a, x, b, y) = clouds(19, dev)?;
    let dt = x.dtype();
    for backend in backends(dev) {
        for p in [1, 2] {
            let mk = || SamplesLoss::builder(Loss::Sinkhorn).p(p).backend(backend);
            for l in [
                mk().blur(1e-4).build()?,
                mk().blur(1e3).build()?,
                mk().blur(0.5).diameter(0.1).build()?,
                mk().blur(0.1).scaling(0.99).build()?,
                mk().blur(0.1).reach(1e-3).build()?,
                mk().blur(0.1).reach(1e4).build()?,
            ] {
                let v = l.forward_weighted(&a, &x, &b, &y)?;
                assert!(all_finite(&v), "{:?}: {v}", l.options());
            }
            // A huge reach is balanced OT.
            let bal = scalar(&mk().blur(0.1).build()?.forward_weighted(&a, &x, &b, &y)?);
            let unb = scalar(
                &mk()
                    .blur(0.1)
                    .reach(1e4)
                    .build()?
                    .forward_weighted(&a, &x, &b, &y)?,
            );
            let tol = if dt == DType::F64 { 1e-3 } else { 1e-2 };
            assert!(
                ((unb - bal) / bal).abs() < tol,
                "{backend:?} p={p}: reach 1e4 gives {unb}, balanced {bal}"
            );
        }
        // Tiny blur in f32.
        let l = SamplesLoss::builder(Loss::Sinkhorn)
            .blur(1e-4)
            .backend(backend)
            .build()?;
        let v = l.forward(&x.to_dtype(DType::F32)?, &y.to_dtype(DType::F32)?)?;
        assert!(all_finite(&v), "f32 tiny blur: {v}");
    }
    Ok(())
}

/// Coordinates whose costs overflow the compute dtype give an error or a finite value, never a
/// silent NaN / ∞. `scales` multiply clouds in [0, 1.2]^3.
fn scaled_coordinates(dev: &Device, dtype: DType, scales: &[f64]) -> Result<()> {
    if !dtype_supported(dtype, dev) {
        return Ok(());
    }
    let (_, x, _, y) = clouds(20, dev)?;
    let mut failures = vec![];
    for &scale in scales {
        let (xs, ys) = (
            (&x * scale)?.to_dtype(dtype)?,
            (&y * scale)?.to_dtype(dtype)?,
        );
        assert!(all_finite(&xs) && all_finite(&ys));
        for loss_kind in ALL_LOSSES {
            for p in [1, 2] {
                for backend in backends(dev) {
                    let l = SamplesLoss::builder(loss_kind)
                        .p(p)
                        .backend(backend)
                        .build()?;
                    if let Ok(v) = l.forward(&xs, &ys) {
                        let v = flat(&v)[0];
                        if !v.is_finite() {
                            failures.push(format!(
                                "{loss_kind:?} p={p} {backend:?} {dtype:?} scale {scale:e}: Ok({v})"
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

/// Large coordinates whose squared distances stay in range: finite values.
fn large_coordinates(dev: &Device) -> Result<()> {
    scaled_coordinates(dev, DType::F32, &[1e6, 1e15])?;
    scaled_coordinates(dev, DType::F64, &[1e6, 1e100, 1e150])
}

test_device!(
    large_coordinates,
    large_coordinates_cpu,
    large_coordinates_cuda,
    large_coordinates_metal
);

/// Finite coordinates whose squared distances overflow the compute dtype (|x − y| > 1.8e19 in
/// f32, 1.3e154 in f64).
#[test]
fn overflowing_coordinates_cpu() -> Result<()> {
    scaled_coordinates(&Device::Cpu, DType::F32, &[1e25])?;
    scaled_coordinates(&Device::Cpu, DType::F64, &[1e160])
}

test_device!(
    strided_inputs,
    strided_inputs_cpu,
    strided_inputs_cuda,
    strided_inputs_metal
);
test_device!(
    coincident_points,
    coincident_points_cpu,
    coincident_points_cuda,
    coincident_points_metal
);
test_device!(
    extreme_options,
    extreme_options_cpu,
    extreme_options_cuda,
    extreme_options_metal
);

/// Errors can be matched: `OtError::from_candle` gives back the typed error (also under a
/// Candle context layer), `None` for Candle's own errors; a validation error is one line even
/// with `RUST_BACKTRACE=1` (CI sets it; the conversion adds no backtrace).
#[test]
fn errors_can_be_matched_and_are_one_line() -> Result<()> {
    use candle_ot::OtError;
    let dev = Device::Cpu;
    let x = Tensor::zeros((10, 2), DType::F32, &dev)?;
    let l = SamplesLoss::new(Loss::Sinkhorn);
    let e = l
        .forward(&x, &Tensor::full(f32::NAN, (12, 2), &dev)?)
        .unwrap_err();
    assert_eq!(
        OtError::from_candle(&e),
        Some(OtError::NonFinite { name: "y" })
    );
    assert_eq!(e.to_string().lines().count(), 1, "{e}");
    let e = l
        .forward(&x, &Tensor::zeros((12, 3), DType::F32, &dev)?)
        .unwrap_err();
    assert!(
        matches!(OtError::from_candle(&e), Some(OtError::Mismatch(_))),
        "{e:?}"
    );
    let e = l
        .forward(&x.reshape(20)?, &x)
        .unwrap_err()
        .context("in my training loop");
    assert!(
        matches!(
            OtError::from_candle(&e),
            Some(OtError::Shape { name: "x", .. })
        ),
        "{e:?}"
    );
    let e = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(-1.0)
        .build()
        .unwrap_err();
    assert!(matches!(
        OtError::from_candle(&e),
        Some(OtError::Option { name: "blur", .. })
    ));
    assert_eq!(e.to_string().lines().count(), 1, "{e}");
    // Candle's own errors are not ours.
    let e = x.matmul(&x).unwrap_err();
    assert_eq!(OtError::from_candle(&e), None);
    Ok(())
}

/// Options that do not apply to the loss are reported (they used to be ignored silently):
/// `SamplesLossOptions::ignored` lists `reach` or `p = 1` on a kernel loss and `diameter` or
/// `tol` on a loss other than sinkhorn (the builder warns about each through `tracing`);
/// `max_iter(0)` with `tol` is an error (SamplesLoss and ImagesLoss).
#[test]
fn options_that_do_not_apply_are_reported() -> Result<()> {
    let ignored = |b: candle_ot::SamplesLossBuilder| -> Vec<&'static str> {
        b.build()
            .expect("valid options")
            .options()
            .ignored()
            .into_iter()
            .map(|(o, _)| o)
            .collect()
    };
    for k in [Loss::Energy, Loss::Gaussian, Loss::Laplacian] {
        assert_eq!(ignored(SamplesLoss::builder(k).reach(0.5)), ["reach"]);
        assert_eq!(ignored(SamplesLoss::builder(k).p(1)), ["p"]);
        assert!(ignored(SamplesLoss::builder(k).blur(0.3)).is_empty());
    }
    for k in [Loss::Hausdorff, Loss::Energy] {
        assert_eq!(ignored(SamplesLoss::builder(k).diameter(1.0)), ["diameter"]);
        assert_eq!(ignored(SamplesLoss::builder(k).tol(1e-6)), ["tol"]);
    }
    assert!(ignored(SamplesLoss::builder(Loss::Hausdorff).reach(0.5).p(1)).is_empty());
    assert!(ignored(
        SamplesLoss::builder(Loss::Sinkhorn)
            .reach(0.5)
            .p(1)
            .diameter(2.0)
            .tol(1e-6)
    )
    .is_empty());
    let e = SamplesLoss::builder(Loss::Sinkhorn)
        .tol(1e-6)
        .max_iter(0)
        .build()
        .expect_err("max_iter 0 with tol")
        .to_string();
    assert!(e.contains("max_iter"), "{e}");
    assert!(SamplesLoss::builder(Loss::Sinkhorn)
        .max_iter(0)
        .build()
        .is_ok());
    let e = candle_ot::ImagesLoss::builder(2)
        .tol(1e-6)
        .max_iter(0)
        .build()
        .expect_err("max_iter 0 with tol")
        .to_string();
    assert!(e.contains("max_iter"), "{e}");
    Ok(())
}

/// The conveniences of #17, item 9: `Display` and case-insensitive parsing of `Loss` and
/// `Backend` (round trips), `SamplesLoss::default()` (GeomLoss's `SamplesLoss()`), and the free
/// functions of `candle_ot::loss`, equal to the builder's values.
#[test]
fn display_parse_default_and_free_functions() -> Result<()> {
    for l in ALL_LOSSES {
        assert_eq!(l.to_string().parse::<Loss>()?, l);
        assert_eq!(l.to_string().to_uppercase().parse::<Loss>()?, l);
    }
    for b in [
        Backend::Auto,
        Backend::Tensorized,
        Backend::Online,
        Backend::Multiscale,
    ] {
        assert_eq!(b.to_string().parse::<Backend>()?, b);
        assert_eq!(format!("{b}").to_uppercase().parse::<Backend>()?, b);
    }
    assert!("sinkhorn2".parse::<Loss>().is_err());
    assert_eq!(SamplesLoss::default(), SamplesLoss::new(Loss::Sinkhorn));
    let mut r = rng(5);
    let x = uniform(&mut r, &[40, 2], 0.0, 1.0, DType::F64, &Device::Cpu)?;
    let y = uniform(&mut r, &[30, 2], 0.2, 1.2, DType::F64, &Device::Cpu)?;
    let by = |l: Loss, blur: f64| -> Result<f64> {
        SamplesLoss::builder(l)
            .blur(blur)
            .build()?
            .forward(&x, &y)?
            .to_scalar::<f64>()
    };
    let s = |t: Tensor| t.to_scalar::<f64>();
    assert_eq!(
        s(candle_ot::loss::sinkhorn(&x, &y, 0.1)?)?,
        by(Loss::Sinkhorn, 0.1)?
    );
    assert_eq!(
        s(candle_ot::loss::hausdorff(&x, &y, 0.1)?)?,
        by(Loss::Hausdorff, 0.1)?
    );
    assert_eq!(
        s(candle_ot::loss::energy(&x, &y)?)?,
        by(Loss::Energy, 0.05)?
    );
    assert_eq!(
        s(candle_ot::loss::gaussian(&x, &y, 0.3)?)?,
        by(Loss::Gaussian, 0.3)?
    );
    assert_eq!(
        s(candle_ot::loss::laplacian(&x, &y, 0.3)?)?,
        by(Loss::Laplacian, 0.3)?
    );
    Ok(())
}

/// `SamplesLoss::with_target` is a Candle `Module` (#17, item 9): its forward equals
/// `forward_weighted` against the target, and gradients flow into x, not into the target.
#[test]
fn target_loss_is_a_module() -> Result<()> {
    use candle_core::Module;
    let mut r = rng(9);
    let x = candle_core::Var::from_tensor(&rand_tensor(&mut r, &[17, 2], 0.0, 1.0)?)?;
    let y = candle_core::Var::from_tensor(&rand_tensor(&mut r, &[29, 2], 0.2, 1.2)?)?;
    let b = rand_tensor(&mut r, &[29], 0.1, 1.0)?;
    let b = (&b / b.sum_all()?.to_scalar::<f64>()?)?;
    let loss = SamplesLoss::builder(Loss::Sinkhorn).blur(0.1).build()?;
    let fit = loss.with_target(y.as_tensor(), Some(&b));
    let v = fit.forward(x.as_tensor())?;
    let a = Tensor::full(1.0 / 17.0, 17, &Device::Cpu)?;
    let want = loss.forward_weighted(&a, x.as_tensor(), &b, y.as_tensor())?;
    assert!((scalar(&v) - scalar(&want)).abs() < 1e-15);
    let g = v.backward()?;
    assert!(g.get(x.as_tensor()).is_some());
    assert!(g.get(y.as_tensor()).is_none(), "the target is detached");
    Ok(())
}
