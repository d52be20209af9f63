//! The grid softmin against its dense twin (values and gradients, every device), the exact
//! truncation on hard inputs, `ImagesLoss` gradients by finite differences, the barycentric
//! map on a translation, and input validation.

#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::softmin::grid::{self, GridCost};
use candle_ot::ImagesLoss;
use common::{normalised, rel_err};

/// Grid softmin vs dense twin (f64; values and gradients).
const TOL_TWIN_F64: f64 = 1e-12;
/// Same in f32 (the dense twin also computes in f32).
const TOL_TWIN_F32: f64 = 2e-5;
/// Central finite differences in f64 against the autograd gradient.
const TOL_FD: f64 = 1e-6;
/// Barycentric map of a translation, in pixels.
const TOL_MAP_PIXELS: f64 = 1e-3;

/// `h` (B, grid…) uniform in [−s, s] with every 7th entry −∞ (masked pixels).
fn h_of(
    rng: &mut rand_chacha::ChaCha8Rng,
    shape: &[usize],
    s: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = common::uniform_vec(rng, n, -s, s)
        .into_iter()
        .enumerate()
        .map(|(i, x)| if i % 7 == 3 { f64::NEG_INFINITY } else { x })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

fn softmin_matches_dense_twin(dev: &Device) -> Result<()> {
    let mut rng = common::rng(3);
    let shapes: [&[usize]; 5] = [
        &[1, 1, 1],
        &[2, 17, 29],
        &[1, 1, 13],
        &[3, 5, 4],
        &[1, 5, 6, 7],
    ];
    for dtype in [DType::F64, DType::F32] {
        if dtype == DType::F64 && dev.is_metal() {
            continue;
        }
        for shape in shapes {
            let d = shape.len() - 1;
            for p in [1u32, 2] {
                for eps in [0.3, 0.01, 1e-4] {
                    let spacing: Vec<f64> = shape[1..].iter().map(|n| 1.0 / *n as f64).collect();
                    let cost = GridCost { p, spacing };
                    // Large |h| and tiny ε: |C|/ε up to 10⁴, strongly varying offsets.
                    let h = h_of(&mut rng, shape, 50.0, dtype, dev)?;
                    let hv = Var::from_tensor(&h)?;
                    let w = common::uniform(&mut rng, shape, -1.0, 1.0, dtype, dev)?;
                    let f = grid::softmin(eps, &cost, hv.as_tensor())?;
                    let fd = grid::softmin_dense(eps, &cost, &h)?;
                    let tol = if dtype == DType::F64 {
                        TOL_TWIN_F64
                    } else {
                        TOL_TWIN_F32
                    };
                    let e = rel_err(&f, &fd);
                    assert!(e < tol, "{shape:?} p {p} eps {eps} {dtype:?}: value {e:e}");
                    let g = (&f * &w)?.sum_all()?.backward()?;
                    let gh = g.get(&hv).expect("gradient of h").clone();
                    let hv2 = Var::from_tensor(&h)?;
                    let g2 = (grid::softmin_dense(eps, &cost, hv2.as_tensor())? * &w)?
                        .sum_all()?
                        .backward()?;
                    let e = rel_err(&gh, g2.get(&hv2).expect("dense gradient"));
                    assert!(
                        e < tol * 10.0,
                        "{shape:?} p {p} eps {eps} {dtype:?}: gradient {e:e}"
                    );
                    let _ = d;
                }
            }
        }
    }
    Ok(())
}
test_device!(
    softmin_matches_dense_twin,
    softmin_matches_dense_twin_cpu,
    softmin_matches_dense_twin_cuda,
    softmin_matches_dense_twin_metal
);

fn all_masked_h_gives_plus_infinity(dev: &Device) -> Result<()> {
    let h = Tensor::full(f32::NEG_INFINITY, (2, 3, 4), dev)?;
    let cost = GridCost {
        p: 2,
        spacing: vec![0.25, 0.25],
    };
    let f = grid::softmin(0.1, &cost, &h)?;
    assert!(common::flat(&f).iter().all(|v| *v == f64::INFINITY));
    Ok(())
}
test_device!(
    all_masked_h_gives_plus_infinity,
    all_masked_h_gives_plus_infinity_cpu,
    all_masked_h_gives_plus_infinity_cuda,
    all_masked_h_gives_plus_infinity_metal
);

/// The truncation is exact where the mass sits far from the row: h = a narrow spike at one
/// end of a 300-pixel line, −∞ (or −400) elsewhere, tiny ε.
#[test]
fn truncation_is_exact_far_from_the_mass() -> Result<()> {
    for fill in [f64::NEG_INFINITY, -400.0] {
        let n = 300;
        let mut v = vec![fill; n];
        v[n - 3] = 0.0;
        v[n - 1] = 2.0;
        let h = Tensor::from_vec(v, (1, 1, n), &Device::Cpu)?;
        let cost = GridCost {
            p: 2,
            spacing: vec![1.0, 1.0 / n as f64],
        };
        for eps in [1e-3, 1e-5] {
            let f = grid::softmin(eps, &cost, &h)?;
            let fd = grid::softmin_dense(eps, &cost, &h)?;
            let e = rel_err(&f, &fd);
            assert!(e < TOL_TWIN_F64, "fill {fill} eps {eps}: {e:e}");
        }
    }
    Ok(())
}

/// ∂S/∂a by central finite differences along mass-preserving directions (f64, converged
/// solves), balanced and unbalanced, debiased and raw, p = 1 and 2.
#[test]
fn images_loss_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = common::rng(5);
    let shape = [1usize, 6, 9];
    let a = normalised(&common::uniform(
        &mut rng,
        &shape,
        0.2,
        1.0,
        DType::F64,
        &Device::Cpu,
    )?)?;
    let b = normalised(&common::uniform(
        &mut rng,
        &shape,
        0.2,
        1.0,
        DType::F64,
        &Device::Cpu,
    )?)?;
    // A relative perturbation a ⊙ u with zero total mass (balanced problems stay balanced).
    let u = common::uniform(&mut rng, &shape, -1.0, 1.0, DType::F64, &Device::Cpu)?;
    let u = (&u - (&u * &a)?.sum_all()?.to_scalar::<f64>()?)?;
    let dir = (&a * u)?;
    for (p, reach, debias) in [
        (2, None, true),
        (1, None, true),
        (2, Some(0.4), true),
        (2, Some(0.4), false),
        (2, None, false),
    ] {
        let loss = ImagesLoss::builder(2)
            .p(p)
            .blur(0.15)
            .reach(reach)
            .debias(debias)
            .scaling(0.6)
            .tol(1e-14)
            .build()?;
        let av = Var::from_tensor(&a)?;
        let s = loss.forward(av.as_tensor(), &b)?;
        let g = s.sum_all()?.backward()?;
        let analytic = (g.get(&av).expect("grad a") * &dir)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let fd_step = 1e-5;
        let at = |t: f64| -> Result<f64> {
            loss.forward(&(&a + (&dir * t)?)?, &b)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let numeric = (at(fd_step)? - at(-fd_step)?) / (2.0 * fd_step);
        let e = (analytic - numeric).abs() / numeric.abs().max(1e-12);
        eprintln!("p {p} reach {reach:?} debias {debias}: analytic {analytic:.10e} numeric {numeric:.10e} rel {e:.1e}");
        assert!(
            e < TOL_FD,
            "p {p} reach {reach:?} debias {debias}: {analytic} vs {numeric}"
        );
    }
    Ok(())
}

/// Translating a density by whole pixels (zero padding): the barycentric map of the converged
/// plan is the translation where the mass is (to `TOL_MAP_PIXELS`), since the optimal plan of
/// a translation is the translation and a small blur blurs it symmetrically.
#[test]
fn barycentric_map_of_a_translation_is_the_translation() -> Result<()> {
    let (n1, n2, s1, s2) = (24usize, 20usize, 3usize, 5usize);
    let mut av = vec![0f64; n1 * n2];
    let mut bv = vec![0f64; n1 * n2];
    for i in 4..12 {
        for j in 3..10 {
            let m = 1.0 + ((i * 7 + j * 3) % 5) as f64;
            av[i * n2 + j] = m;
            bv[(i + s1) * n2 + j + s2] = m;
        }
    }
    let a = normalised(&Tensor::from_vec(av.clone(), (1, n1, n2), &Device::Cpu)?)?;
    let b = normalised(&Tensor::from_vec(bv, (1, n1, n2), &Device::Cpu)?)?;
    let sol = ImagesLoss::builder(2)
        .blur(0.2 / n1 as f64)
        .scaling(0.8)
        .tol(1e-12)
        .build()?
        .solve(&a, &b)?;
    let t = common::flat(&sol.barycentric_map()?); // (1, n1, n2, 2)
    let (h1, h2) = (1.0 / n1 as f64, 1.0 / n2 as f64);
    let mut worst = 0f64;
    for i in 0..n1 {
        for j in 0..n2 {
            if av[i * n2 + j] > 0.0 {
                let k = (i * n2 + j) * 2;
                worst = worst
                    .max(((t[k] - (i + s1) as f64 * h1) / h1).abs())
                    .max(((t[k + 1] - (j + s2) as f64 * h2) / h2).abs());
            }
        }
    }
    assert!(
        worst < TOL_MAP_PIXELS,
        "worst displacement error {worst} pixels"
    );
    Ok(())
}

#[test]
fn images_loss_names_bad_inputs() -> Result<()> {
    let dev = Device::Cpu;
    let ok = normalised(&Tensor::ones((1, 4, 5), DType::F32, &dev)?)?;
    let loss = ImagesLoss::builder(2).build()?;
    let msg = |r: Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let e = msg(loss.forward(&Tensor::ones(4, DType::F32, &dev)?, &ok));
    assert!(e.contains("a must be (…, n1, n2)"), "{e}");
    let e = msg(loss.forward(
        &ok,
        &normalised(&Tensor::ones((1, 4, 6), DType::F32, &dev)?)?,
    ));
    assert!(e.contains("same shape"), "{e}");
    let neg = (&ok * -1.0)?;
    let e = msg(loss.forward(&neg, &ok));
    assert!(e.contains(">= 0"), "{e}");
    let e = msg(loss.forward(&(&ok * 2.0)?, &ok));
    assert!(e.contains("equal total masses"), "{e}");
    let nan = (&ok * f64::NAN)?;
    let e = msg(loss.forward(&ok, &nan));
    assert!(e.contains("b contains non-finite"), "{e}");
    let e = msg(loss.forward(&Tensor::zeros((1, 4, 5), DType::F32, &dev)?, &ok));
    assert!(e.contains("sums to 0"), "{e}");
    for (r, name) in [
        (ImagesLoss::builder(4).build(), "dims"),
        (ImagesLoss::builder(2).p(3).build(), "p"),
        (ImagesLoss::builder(2).blur(-1.0).build(), "blur"),
        (ImagesLoss::builder(2).scaling(1.0).build(), "scaling"),
        (ImagesLoss::builder(2).axes(&[(0.0, 1.0)]).build(), "axes"),
        (
            ImagesLoss::builder(2)
                .axes(&[(0.0, 1.0), (1.0, 1.0)])
                .build(),
            "axes",
        ),
    ] {
        let e = r.expect_err("refused").to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    // Large f32 densities normalised in f32 (their f64 sums are off by the f32 rounding of
    // the normalising sum) are accepted.
    let mut rng = common::rng(21);
    let big = |rng: &mut rand_chacha::ChaCha8Rng| -> Result<Tensor> {
        let t = common::uniform(rng, &[400, 500], 0.0, 1.0, DType::F32, &dev)?;
        t.broadcast_div(&t.sum_all()?)
    };
    let (x, y) = (big(&mut rng)?, big(&mut rng)?);
    let quick = ImagesLoss::builder(2).blur(0.2).debias(false).build()?;
    assert!(quick.forward(&x, &y)?.to_scalar::<f32>()?.is_finite());
    // Unequal masses are fine when unbalanced; f16 inputs are computed in f32.
    let l = ImagesLoss::builder(2)
        .reach(0.5)
        .build()?
        .forward(&(&ok * 2.0)?, &ok)?;
    assert!(common::flat(&l).iter().all(|v| v.is_finite()));
    let h = ok.to_dtype(DType::F16)?;
    assert_eq!(loss.forward(&h, &h)?.dtype(), DType::F16);
    Ok(())
}

/// One pixel, batches of any rank, a 1-pixel axis: shapes come back as given.
#[test]
fn images_loss_keeps_batch_shapes_and_tiny_grids() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = common::rng(9);
    let a = common::uniform(&mut rng, &[2, 3, 1, 7], 0.1, 1.0, DType::F64, &dev)?;
    let b = common::uniform(&mut rng, &[2, 3, 1, 7], 0.1, 1.0, DType::F64, &dev)?;
    let norm = |t: &Tensor| -> Result<Tensor> { t.broadcast_div(&t.sum_keepdim((2, 3))?) };
    let (a, b) = (norm(&a)?, norm(&b)?);
    let sol = ImagesLoss::builder(2).build()?.solve(&a, &b)?;
    assert_eq!(sol.loss.dims(), &[2, 3]);
    assert_eq!(sol.f.dims(), &[2, 3, 1, 7]);
    assert!(common::flat(&sol.loss).iter().all(|v| v.is_finite()));
    let one = Tensor::ones((1, 1), DType::F64, &dev)?;
    let s = ImagesLoss::builder(2).build()?.forward(&one, &one)?;
    assert_eq!(s.dims(), &[] as &[usize]);
    assert!(s.to_scalar::<f64>()?.abs() < 1e-12);
    Ok(())
}
