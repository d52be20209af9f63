//! #16 (first step): packed (ragged) batches. `SamplesLoss::forward_packed` gives, for clouds
//! of different sizes in one call, the same values and gradients as the padded batch with zero
//! weights (wherever the padding points sit) and as the per-item calls given the batch's
//! diameter, for every loss, p, debias and reach, on sizes 1, 2, 17 and 120.

#[allow(unused_macros)]
#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::{Backend, Loss, SamplesLoss, SamplesLossBuilder};
use common::*;

/// Values and gradients of the three forms agree to f64 rounding (same iterations).
const TOL_PACKED: f64 = 1e-12;
const TOL_GRAD: f64 = 1e-10;
/// With `tol` the batch iterates until every item has converged and each single call until
/// its own has, so they stop at different iterates within `tol` (1e-9 here) of the same fixed
/// point; balanced ∂a = F, ∂b = G are then compared up to their additive constant.
const TOL_CONVERGED: f64 = 1e-8;

const X_LENGTHS: [usize; 4] = [1, 17, 120, 2];
const Y_LENGTHS: [usize; 4] = [2, 1, 17, 120];

fn configs() -> Vec<(&'static str, SamplesLossBuilder)> {
    let s = || SamplesLoss::builder(Loss::Sinkhorn).blur(0.1);
    vec![
        ("sinkhorn p2 debiased", s()),
        ("sinkhorn p1 raw", s().p(1).debias(false)),
        ("sinkhorn reach 0.5", s().reach(0.5)),
        ("sinkhorn tol", s().tol(1e-9).max_iter(100_000)),
        ("hausdorff", SamplesLoss::builder(Loss::Hausdorff).blur(0.1)),
        ("energy", SamplesLoss::builder(Loss::Energy)),
        ("gaussian", SamplesLoss::builder(Loss::Gaussian).blur(0.3)),
        ("laplacian", SamplesLoss::builder(Loss::Laplacian).blur(0.3)),
    ]
}

/// The bounding-box diagonal of every point (all weights here are positive): the batch's
/// diameter, GeomLoss's batched rule.
fn diameter(x: &Tensor, y: &Tensor) -> Result<f64> {
    let all = Tensor::cat(&[x, y], 0)?;
    let span = (all.max(0)? - all.min(0)?)?;
    span.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()
}

fn items(t: &Tensor, lengths: &[usize]) -> Result<Vec<Tensor>> {
    let mut off = 0;
    lengths
        .iter()
        .map(|&n| {
            let s = t.narrow(0, off, n);
            off += n;
            s
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

fn packed_equals_padded_and_per_item(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        eprintln!("skipping: no f64 on {dev:?}");
        return Ok(());
    }
    let mut r = rng(16);
    let (nx, ny): (usize, usize) = (X_LENGTHS.iter().sum(), Y_LENGTHS.iter().sum());
    let x = rand_tensor(&mut r, &[nx, 3], 0., 1.)?.to_device(dev)?;
    let y = rand_tensor(&mut r, &[ny, 3], 0.2, 1.1)?.to_device(dev)?;
    // Positive weights, each item's summing to 1 (balanced problems need equal masses).
    let normalised = |w: Tensor, lengths: &[usize]| -> Result<Tensor> {
        let parts = items(&w, lengths)?
            .into_iter()
            .map(|p| p.broadcast_div(&p.sum_all()?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    };
    let wa = normalised(rand_tensor(&mut r, &[nx], 0.2, 1.)?, &X_LENGTHS)?.to_device(dev)?;
    let wb = normalised(rand_tensor(&mut r, &[ny], 0.2, 1.)?, &Y_LENGTHS)?.to_device(dev)?;
    let d = diameter(&x, &y)?;
    for backend in [Backend::Tensorized, Backend::Online] {
        for (name, builder) in configs() {
            let loss = builder.clone().backend(backend).build()?;
            let (xv, yv, av, bv) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&y)?,
                Var::from_tensor(&wa)?,
                Var::from_tensor(&wb)?,
            );
            let packed = loss.forward_packed(
                Some(av.as_tensor()),
                xv.as_tensor(),
                &X_LENGTHS,
                Some(bv.as_tensor()),
                yv.as_tensor(),
                &Y_LENGTHS,
            )?; // (B,)
            assert_eq!(packed.dims(), [X_LENGTHS.len()]);
            let grads = packed.sum_all()?.backward()?;
            let g = |v: &Var| grads.get(v).expect("a gradient").clone();
            let (gx, gy, ga, gb) = (g(&xv), g(&yv), g(&av), g(&bv));
            // Padded by hand, the padding far outside the clouds (zero weight).
            let pad = |t: &Tensor, w: &Tensor, lengths: &[usize]| -> Result<(Tensor, Tensor)> {
                let n_max = *lengths.iter().max().unwrap();
                let (mut ps, mut ws) = (vec![], vec![]);
                for (p, w) in items(t, lengths)?.into_iter().zip(items(w, lengths)?) {
                    let k = n_max - p.dim(0)?;
                    let far = (Tensor::ones((k, 3), DType::F64, dev)? * 7.5)?;
                    ps.push(Tensor::cat(&[&p, &far], 0)?);
                    ws.push(Tensor::cat(&[&w, &Tensor::zeros(k, DType::F64, dev)?], 0)?);
                }
                Ok((Tensor::stack(&ws, 0)?, Tensor::stack(&ps, 0)?))
            };
            let (a_pad, x_pad) = pad(&x, &wa, &X_LENGTHS)?;
            let (b_pad, y_pad) = pad(&y, &wb, &Y_LENGTHS)?;
            let padded = loss.forward_weighted(&a_pad, &x_pad, &b_pad, &y_pad)?;
            let e = max_diff(&packed, &padded)?;
            assert!(e < TOL_PACKED, "{backend:?} {name}: packed vs padded {e:e}");
            // Per item, with the batch's diameter.
            let single = builder.clone().backend(backend).diameter(d).build()?;
            let (xs, ys, was, wbs) = (
                items(&x, &X_LENGTHS)?,
                items(&y, &Y_LENGTHS)?,
                items(&wa, &X_LENGTHS)?,
                items(&wb, &Y_LENGTHS)?,
            );
            let (gxs, gys, gas, gbs) = (
                items(&gx, &X_LENGTHS)?,
                items(&gy, &Y_LENGTHS)?,
                items(&ga, &X_LENGTHS)?,
                items(&gb, &Y_LENGTHS)?,
            );
            for k in 0..X_LENGTHS.len() {
                let (xk, yk, ak, bk) = (
                    Var::from_tensor(&xs[k])?,
                    Var::from_tensor(&ys[k])?,
                    Var::from_tensor(&was[k])?,
                    Var::from_tensor(&wbs[k])?,
                );
                let v = single.forward_weighted(
                    ak.as_tensor(),
                    xk.as_tensor(),
                    bk.as_tensor(),
                    yk.as_tensor(),
                )?;
                let converged = name.contains("tol");
                let (tol_value, tol_grad) = if converged {
                    (TOL_CONVERGED, TOL_CONVERGED)
                } else {
                    (TOL_PACKED, TOL_GRAD)
                };
                let want = v.to_scalar::<f64>()?;
                let got = packed.get(k)?.to_scalar::<f64>()?;
                assert!(
                    (got - want).abs() <= tol_value * want.abs().max(1e-3),
                    "{backend:?} {name} item {k}: packed {got} vs single {want}"
                );
                let gk = v.backward()?;
                for (label, var, got) in [
                    ("x", &xk, &gxs[k]),
                    ("y", &yk, &gys[k]),
                    ("a", &ak, &gas[k]),
                    ("b", &bk, &gbs[k]),
                ] {
                    let want = gk.get(var).expect("a gradient");
                    let centred = |t: &Tensor| t.broadcast_sub(&t.mean_all()?);
                    let e = if converged && (label == "a" || label == "b") {
                        max_diff(&centred(got)?, &centred(want)?)?
                    } else {
                        max_diff(got, want)?
                    };
                    assert!(
                        e < tol_grad,
                        "{backend:?} {name} item {k}: ∂{label} differs by {e:e}"
                    );
                }
            }
        }
    }
    Ok(())
}
test_device!(
    packed_equals_padded_and_per_item,
    packed_equals_padded_and_per_item_cpu,
    packed_equals_padded_and_per_item_cuda,
    packed_equals_padded_and_per_item_metal
);

/// Uniform weights by default (1/N_b within each item), and clear errors for bad lengths.
#[test]
fn packed_defaults_and_errors() -> Result<()> {
    let mut r = rng(2);
    let x = rand_tensor(&mut r, &[5, 2], 0., 1.)?;
    let y = rand_tensor(&mut r, &[4, 2], 0., 1.)?;
    let l = SamplesLoss::builder(Loss::Sinkhorn).diameter(2.0).build()?;
    let packed = l.forward_packed(None, &x, &[2, 3], None, &y, &[1, 3])?;
    let first = l.forward(&x.narrow(0, 0, 2)?, &y.narrow(0, 0, 1)?)?;
    let second = l.forward(&x.narrow(0, 2, 3)?, &y.narrow(0, 1, 3)?)?;
    assert!((packed.get(0)?.to_scalar::<f64>()? - first.to_scalar::<f64>()?).abs() < TOL_PACKED);
    assert!((packed.get(1)?.to_scalar::<f64>()? - second.to_scalar::<f64>()?).abs() < TOL_PACKED);
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(l.forward_packed(None, &x, &[2, 2], None, &y, &[1, 3]));
    assert!(e.contains("x_lengths") && e.contains("sum 4"), "{e}");
    let e = err(l.forward_packed(None, &x, &[5, 0], None, &y, &[1, 3]));
    assert!(e.contains("x_lengths"), "{e}");
    let e = err(l.forward_packed(None, &x, &[2, 3], None, &y, &[4]));
    assert!(e.contains("but y_lengths has 1"), "{e}");
    let e = err(l.forward_packed(None, &x.unsqueeze(0)?, &[5], None, &y, &[4]));
    assert!(e.contains("x must be (ΣN_b, D)"), "{e}");
    let a = Tensor::ones(4, DType::F64, &Device::Cpu)?;
    let e = err(l.forward_packed(Some(&a), &x, &[2, 3], None, &y, &[1, 3]));
    assert!(e.contains("a must be (5,)"), "{e}");
    Ok(())
}
