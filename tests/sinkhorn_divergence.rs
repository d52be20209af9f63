//! #16: the named `SinkhornDivergence` op. It is `SamplesLoss(Loss::Sinkhorn)` by name: the
//! same values and gradients to the bit; its gradients are those of the value (central
//! finite differences, balanced and unbalanced); it composes inside a Candle graph (the
//! gradient reaches a parameter upstream of the points); a non-Sinkhorn loss is refused.

#[allow(unused_macros)]
#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::{Backend, Loss, SamplesLoss, SinkhornDivergence};
use common::*;

/// Central differences with step `FD_STEP` on smooth f64 functions: O(step²) ≈ 1e-8 plus
/// rounding.
const FD_STEP: f64 = 1e-5;
const TOL_FD: f64 = 1e-6;

fn same_as_samples_loss_and_finite_differences(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        eprintln!("skipping: no f64 on {dev:?}");
        return Ok(());
    }
    let mut r = rng(1607);
    let x = rand_tensor(&mut r, &[17, 2], 0., 1.)?.to_device(dev)?;
    let y = rand_tensor(&mut r, &[29, 2], 0.3, 1.2)?.to_device(dev)?;
    let unit = |t: Tensor| t.broadcast_div(&t.sum_all()?);
    let a = unit(rand_tensor(&mut r, &[17], 0.2, 1.)?)?.to_device(dev)?;
    let b = unit(rand_tensor(&mut r, &[29], 0.2, 1.)?)?.to_device(dev)?;
    for backend in [Backend::Tensorized, Backend::Online] {
        for (name, reach) in [("balanced", None), ("unbalanced", Some(0.5))] {
            // A fixed diameter (the ε schedule must not move with x) and a converged solve
            // (the envelope theorem holds at the fixed point): the finite differences then
            // see the same function as the gradient.
            let mut builder = SinkhornDivergence::builder()
                .blur(0.1)
                .diameter(2.0)
                .tol(1e-13)
                .max_iter(10_000)
                .backend(backend);
            let mut reference = SamplesLoss::builder(Loss::Sinkhorn)
                .blur(0.1)
                .diameter(2.0)
                .tol(1e-13)
                .max_iter(10_000)
                .backend(backend);
            if let Some(reach) = reach {
                builder = builder.reach(reach);
                reference = reference.reach(reach);
            }
            let s = builder.build_divergence()?;
            let reference = reference.build()?;
            let (xv, av) = (Var::from_tensor(&x)?, Var::from_tensor(&a)?);
            let v = s.forward(av.as_tensor(), xv.as_tensor(), &b, &y)?;
            let w = reference.forward_weighted(av.as_tensor(), xv.as_tensor(), &b, &y)?;
            assert_eq!(scalar(&v), scalar(&w), "{backend:?} {name}: value");
            let (gv, gw) = (v.backward()?, w.backward()?);
            for var in [&xv, &av] {
                let (p, q) = (gv.get(var).unwrap(), gw.get(var).unwrap());
                assert_eq!(flat(p), flat(q), "{backend:?} {name}: gradient");
            }
            // Finite differences of the value, a few coordinates of x and of a.
            let value =
                |x: &Tensor, a: &Tensor| -> Result<f64> { Ok(scalar(&s.forward(a, x, &b, &y)?)) };
            let gx = flat(gv.get(&xv).unwrap());
            let ga = flat(gv.get(&av).unwrap());
            let bump = |t: &Tensor, k: usize, h: f64| -> Result<Tensor> {
                let mut v = flat(t);
                v[k] += h;
                Tensor::from_vec(v, t.dims(), dev)
            };
            for k in [0, 5, 33] {
                let fd = (value(&bump(&x, k, FD_STEP)?, &a)? - value(&bump(&x, k, -FD_STEP)?, &a)?)
                    / (2.0 * FD_STEP);
                assert!(
                    (fd - gx[k]).abs() < TOL_FD,
                    "{backend:?} {name} ∂x[{k}]: {} vs fd {fd}",
                    gx[k]
                );
            }
            // Balanced: the value is defined for weights of equal mass, so ∂a is compared along
            // a direction that keeps the mass (e_k − e_l).
            for (k, l) in [(0, 3), (9, 16)] {
                let h = FD_STEP;
                let plus = bump(&bump(&a, k, h)?, l, -h)?;
                let minus = bump(&bump(&a, k, -h)?, l, h)?;
                let fd = (value(&x, &plus)? - value(&x, &minus)?) / (2.0 * h);
                let want = ga[k] - ga[l];
                assert!(
                    (fd - want).abs() < TOL_FD,
                    "{backend:?} {name} ∂a[{k}]−∂a[{l}]: {want} vs fd {fd}"
                );
            }
        }
    }
    Ok(())
}
test_device!(
    same_as_samples_loss_and_finite_differences,
    same_as_samples_loss_and_finite_differences_cpu,
    same_as_samples_loss_and_finite_differences_cuda,
    same_as_samples_loss_and_finite_differences_metal
);

/// Inside a graph: the gradient of S_ε(x·W, z) with respect to W is the chain rule through the
/// op (checked against finite differences on W, converged, fixed diameter), on a batch
/// (B, N, D).
fn composes_in_a_graph(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        eprintln!("skipping: no f64 on {dev:?}");
        return Ok(());
    }
    let mut r = rng(1608);
    let x = rand_tensor(&mut r, &[3, 20, 2], 0., 1.)?.to_device(dev)?; // (B, N, D)
    let z = rand_tensor(&mut r, &[3, 25, 2], 0., 1.)?.to_device(dev)?; // (B, M, D)
    let w0 = Tensor::new(&[[1.1f64, 0.2], [-0.1, 0.9]], dev)?; // (D, D)
    let s = SinkhornDivergence::builder()
        .blur(0.1)
        .diameter(3.0)
        .tol(1e-13)
        .max_iter(10_000)
        .build_divergence()?;
    let f = |w: &Tensor| -> Result<Tensor> {
        let xw = x.broadcast_matmul(w)?; // (B, N, D)
        s.forward_uniform(&xw, &z)?.sum_all() // the batch's total
    };
    let wv = Var::from_tensor(&w0)?;
    let total = f(wv.as_tensor())?;
    let g = flat(total.backward()?.get(&wv).unwrap());
    for k in 0..4 {
        let bump = |h: f64| -> Result<Tensor> {
            let mut v = flat(&w0);
            v[k] += h;
            Tensor::from_vec(v, (2, 2), dev)
        };
        let fd = (scalar(&f(&bump(FD_STEP)?)?) - scalar(&f(&bump(-FD_STEP)?)?)) / (2.0 * FD_STEP);
        assert!((fd - g[k]).abs() < TOL_FD, "∂W[{k}]: {} vs fd {fd}", g[k]);
    }
    Ok(())
}
test_device!(
    composes_in_a_graph,
    composes_in_a_graph_cpu,
    composes_in_a_graph_cuda,
    composes_in_a_graph_metal
);

#[test]
fn refuses_other_losses() {
    let opts = SamplesLoss::new(Loss::Energy).options().clone();
    let msg = SinkhornDivergence::from_options(opts)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("loss") && msg.contains("Energy") && msg.contains("SamplesLoss"),
        "{msg}"
    );
    assert!(SinkhornDivergence::new(-1.0).is_err());
    assert!(SinkhornDivergence::new(0.05).is_ok());
}
