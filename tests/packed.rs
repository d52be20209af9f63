//! #16: packed (ragged) batches. `SamplesLoss::forward_packed` gives, for clouds of different
//! sizes in one call, the same values and gradients as the padded batch with zero weights
//! (wherever the padding points sit) and as the per-item calls given the batch's diameter, for
//! every loss, p, debias and reach, on sizes 1, 2, 17 and 1000. The online backend's ragged
//! path never reads a padding pair: NaN padding leaves every result finite and unchanged.

#[allow(unused_macros)]
#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::cost::{CostKind, KernelKind};
use candle_ot::schedule::epsilon_schedule;
use candle_ot::sinkhorn::{sinkhorn_loop, sinkhorn_loop_ragged, LoopParams};
use candle_ot::softmin::{Lengths, Online, PointSoftmin};
use candle_ot::{Backend, Loss, SamplesLoss, SamplesLossBuilder};
use common::*;

/// Values and gradients of the three forms agree to f64 rounding (same iterations).
const TOL_PACKED: f64 = 1e-12;
const TOL_GRAD: f64 = 1e-10;
/// With `tol` the batch iterates until every item has converged and each single call until
/// its own has, so they stop at different iterates within `tol` (1e-9 here) of the same fixed
/// point; balanced ∂a = F, ∂b = G are then compared up to their additive constant.
const TOL_CONVERGED: f64 = 1e-8;

/// Item sizes: the online backend (ragged kernels) takes an item of 1000 points, the tensorized
/// one (padded matrices, B·N_max·M_max of them) stays smaller.
const X_LENGTHS: [usize; 5] = [1, 17, 1000, 2, 29];
const Y_LENGTHS: [usize; 5] = [2, 1, 17, 1000, 29];
const X_LENGTHS_SMALL: [usize; 5] = [1, 17, 120, 2, 29];
const Y_LENGTHS_SMALL: [usize; 5] = [2, 1, 17, 120, 29];

fn configs() -> Vec<(&'static str, SamplesLossBuilder)> {
    let s = || SamplesLoss::builder(Loss::Sinkhorn).blur(0.1);
    vec![
        ("sinkhorn p2 debiased", s()),
        ("sinkhorn p1 raw", s().p(1).debias(false)),
        ("sinkhorn reach 0.5", s().reach(0.5)),
        ("sinkhorn tol", s().tol(1e-9).max_iter(100_000)),
        ("hausdorff", SamplesLoss::builder(Loss::Hausdorff).blur(0.1)),
        (
            "hausdorff exact gradient",
            SamplesLoss::builder(Loss::Hausdorff)
                .blur(0.1)
                .exact_hausdorff_gradient(true),
        ),
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
    packed_case(dev, Backend::Online, &X_LENGTHS, &Y_LENGTHS)?;
    packed_case(dev, Backend::Tensorized, &X_LENGTHS_SMALL, &Y_LENGTHS_SMALL)
}

fn packed_case(dev: &Device, backend: Backend, xls: &[usize], yls: &[usize]) -> Result<()> {
    let mut r = rng(16);
    let (nx, ny): (usize, usize) = (xls.iter().sum(), yls.iter().sum());
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
    let wa = normalised(rand_tensor(&mut r, &[nx], 0.2, 1.)?, xls)?.to_device(dev)?;
    let wb = normalised(rand_tensor(&mut r, &[ny], 0.2, 1.)?, yls)?.to_device(dev)?;
    let d = diameter(&x, &y)?;
    {
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
                xls,
                Some(bv.as_tensor()),
                yv.as_tensor(),
                yls,
            )?; // (B,)
            assert_eq!(packed.dims(), [xls.len()]);
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
            let (a_pad, x_pad) = pad(&x, &wa, xls)?;
            let (b_pad, y_pad) = pad(&y, &wb, yls)?;
            let padded = loss.forward_weighted(&a_pad, &x_pad, &b_pad, &y_pad)?;
            let e = max_diff(&packed, &padded)?;
            assert!(e < TOL_PACKED, "{backend:?} {name}: packed vs padded {e:e}");
            // Per item, with the batch's diameter.
            let single = builder.clone().backend(backend).diameter(d).build()?;
            let (xs, ys, was, wbs) = (
                items(&x, xls)?,
                items(&y, yls)?,
                items(&wa, xls)?,
                items(&wb, yls)?,
            );
            let (gxs, gys, gas, gbs) = (
                items(&gx, xls)?,
                items(&gy, yls)?,
                items(&ga, xls)?,
                items(&gb, yls)?,
            );
            for k in 0..xls.len() {
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

/// NaN in every padding coordinate: the ragged online path never reads a padding pair, so
/// the ragged loop's potentials on each item's own rows equal the per-item loop's (to f64
/// rounding; same ε list), the gradient through the last update is finite and equal, and the
/// padding rows' potentials are 0. Likewise the ragged kernel product (CPU: on CUDA and Metal
/// it runs masked, which reads the padding). Any pass over a padding pair would give NaN.
fn ragged_never_reads_padding(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        eprintln!("skipping: no f64 on {dev:?}");
        return Ok(());
    }
    let mut r = rng(1616);
    let (xl, yl) = ([3usize, 40, 1, 17], [29usize, 2, 33, 1]);
    let (n, m, d) = (40, 33, 2);
    let nan_pad = |lens: &[usize], rows: usize, r: &mut _| -> Result<(Tensor, Tensor)> {
        let (mut ps, mut ws) = (vec![], vec![]);
        for &l in lens {
            let p = rand_tensor(r, &[l, d], 0., 1.)?;
            let w = rand_tensor(r, &[l], 0.2, 1.)?;
            let w = w.broadcast_div(&w.sum_all()?)?;
            let nan = Tensor::full(f64::NAN, (rows - l, d), &Device::Cpu)?;
            ps.push(Tensor::cat(&[&p, &nan], 0)?);
            ws.push(Tensor::cat(
                &[&w, &Tensor::zeros(rows - l, DType::F64, &Device::Cpu)?],
                0,
            )?);
        }
        Ok((
            Tensor::stack(&ws, 0)?.to_device(dev)?,
            Tensor::stack(&ps, 0)?.to_device(dev)?,
        ))
    };
    let (a, x) = nan_pad(&xl, n, &mut r)?; // (B, N), (B, N, D)
    let (b, y) = nan_pad(&yl, m, &mut r)?; // (B, M), (B, M, D)
    let (x_len, y_len) = (Lengths::new(xl), Lengths::new(yl));
    let online = Online {
        cost: CostKind::SqEuclidean,
    };
    let params = LoopParams {
        eps_list: epsilon_schedule(2, 2.0, 0.05, 0.7),
        rho: Some(0.5),
        debias: true,
        tol: None,
        max_iter: 0,
        acceleration: candle_ot::Acceleration::default(),
        observer: None,
    };
    let xv = Var::from_tensor(&x)?;
    let (pot, _) = sinkhorn_loop_ragged(
        &online,
        xv.as_tensor(),
        &x_len,
        &y,
        &y_len,
        &a.log()?,
        &b.log()?,
        &params,
    )?;
    let gx = pot.f_ba.sum_all()?.backward()?;
    let gx = gx.get(&xv).expect("a gradient");
    for k in 0..xl.len() {
        let (nk, mk) = (xl[k], yl[k]);
        let item = |t: &Tensor, l: usize| t.get(k).and_then(|t| t.narrow(0, 0, l)?.unsqueeze(0));
        let xk = Var::from_tensor(&item(&x, nk)?)?;
        let (pk, _) = sinkhorn_loop(
            &online,
            xk.as_tensor(),
            &item(&y, mk)?,
            &item(&a, nk)?.log()?,
            &item(&b, mk)?.log()?,
            &params,
        )?;
        for (label, got, want, l, full) in [
            ("f_ba", &pot.f_ba, &pk.f_ba, nk, n),
            ("g_ab", &pot.g_ab, &pk.g_ab, mk, m),
            (
                "f_aa",
                pot.f_aa.as_ref().unwrap(),
                pk.f_aa.as_ref().unwrap(),
                nk,
                n,
            ),
            (
                "g_bb",
                pot.g_bb.as_ref().unwrap(),
                pk.g_bb.as_ref().unwrap(),
                mk,
                m,
            ),
        ] {
            let e = max_diff(&item(got, l)?, want)?;
            assert!(e < TOL_PACKED, "item {k} {label}: {e:e}");
            if l < full {
                let pad = got.get(k)?.narrow(0, l, full - l)?;
                assert_eq!(
                    max_diff(&pad, &pad.zeros_like()?)?,
                    0.0,
                    "item {k} {label} padding"
                );
            }
        }
        let gk = pk.f_ba.sum_all()?.backward()?;
        let e = max_diff(&item(gx, nk)?, gk.get(&xk).expect("a gradient"))?;
        assert!(e < TOL_GRAD, "item {k} ∂x: {e:e}");
        if nk < n {
            let pad = gx.get(k)?.narrow(0, nk, n - nk)?;
            assert_eq!(
                max_diff(&pad, &pad.zeros_like()?)?,
                0.0,
                "item {k} ∂x padding"
            );
        }
    }
    if dev.is_cpu() {
        for kind in [
            KernelKind::Gaussian,
            KernelKind::Laplacian,
            KernelKind::Energy,
        ] {
            let xv = Var::from_tensor(&x)?;
            let u =
                online.kernel_product_ragged(kind, 0.3, xv.as_tensor(), &x_len, &y, &y_len, &b)?;
            let g = u.sum_all()?.backward()?;
            let g = g.get(&xv).expect("a gradient");
            for k in 0..xl.len() {
                let (nk, mk) = (xl[k], yl[k]);
                let item =
                    |t: &Tensor, l: usize| t.get(k).and_then(|t| t.narrow(0, 0, l)?.unsqueeze(0));
                let xk = Var::from_tensor(&item(&x, nk)?)?;
                let want = online.kernel_product(
                    kind,
                    0.3,
                    xk.as_tensor(),
                    &item(&y, mk)?,
                    &item(&b, mk)?,
                )?;
                let e = max_diff(&item(&u, nk)?, &want)?;
                assert!(e < TOL_PACKED, "{kind:?} item {k}: {e:e}");
                let gk = want.sum_all()?.backward()?;
                let e = max_diff(&item(g, nk)?, gk.get(&xk).expect("a gradient"))?;
                assert!(e < TOL_GRAD, "{kind:?} item {k} ∂x: {e:e}");
            }
        }
    }
    Ok(())
}
test_device!(
    ragged_never_reads_padding,
    ragged_never_reads_padding_cpu,
    ragged_never_reads_padding_cuda,
    ragged_never_reads_padding_metal
);

/// `solve_packed` gives the potentials and the plan operators packed, equal item by item to the
/// per-item solve with the batch's diameter: F, G, the raw potentials, π v, πᵀ u, the
/// marginals, the transfer and the barycentric map, on both backends; the certified bound and
/// the marginal error of a `tol` solve hold for every item.
fn solve_packed_potentials_and_plans(dev: &Device) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        eprintln!("skipping: no f64 on {dev:?}");
        return Ok(());
    }
    let mut r = rng(1617);
    let (xl, yl) = ([5usize, 1, 31], [2usize, 23, 9]);
    let (nx, ny) = (xl.iter().sum::<usize>(), yl.iter().sum::<usize>());
    let x = rand_tensor(&mut r, &[nx, 2], 0., 1.)?.to_device(dev)?;
    let y = rand_tensor(&mut r, &[ny, 2], 0.1, 1.3)?.to_device(dev)?;
    let v = rand_tensor(&mut r, &[ny, 3], -1., 1.)?.to_device(dev)?; // (ΣM_b, K)
    let u = rand_tensor(&mut r, &[nx, 2], -1., 1.)?.to_device(dev)?; // (ΣN_b, K)
    let d = diameter(&x, &y)?;
    for backend in [Backend::Online, Backend::Tensorized] {
        let builder = SamplesLoss::builder(Loss::Sinkhorn)
            .blur(0.1)
            .backend(backend)
            .tol(1e-10)
            .max_iter(10_000);
        let sol = builder
            .clone()
            .build()?
            .solve_packed(None, &x, &xl, None, &y, &yl)?;
        assert_eq!(sol.f.dims(), [nx]);
        assert_eq!(sol.g.dims(), [ny]);
        let diag = sol.padded.diagnostics.as_ref().unwrap();
        assert_eq!(diag.converged, Some(true), "{backend:?}");
        assert!(diag.marginal_error.unwrap() < 1e-8, "{diag:?}");
        let bound = diag.value_error_bound.unwrap();
        assert!(bound.absolute < 1e-8, "{backend:?} {bound:?}");
        let plan = sol.plan()?;
        let (f_ba, g_ab, _, _) = sol.raw_potentials()?;
        let outs = [
            ("F", sol.f.clone()),
            ("G", sol.g.clone()),
            ("f_ba", f_ba.unwrap()),
            ("g_ab", g_ab.unwrap()),
            ("π v", plan.apply(&v)?),
            ("πᵀ u", plan.apply_transpose(&u)?),
            ("row marginal", plan.row_marginal()?),
            ("column marginal", plan.col_marginal()?),
            ("transfer", plan.transfer(&v)?),
            ("barycentric map", plan.barycentric_map()?),
        ];
        let single = builder.clone().diameter(d).build()?;
        let (xs, ys, vs, us) = (
            items(&x, &xl)?,
            items(&y, &yl)?,
            items(&v, &yl)?,
            items(&u, &xl)?,
        );
        let mut per_item: Vec<Vec<Tensor>> = vec![vec![]; outs.len()];
        for k in 0..xl.len() {
            let s = single.solve(None, &xs[k], None, &ys[k])?;
            let p = s.plan()?;
            let got = [
                s.f.clone(),
                s.g.clone(),
                s.f_ba.clone().unwrap(),
                s.g_ab.clone().unwrap(),
                p.apply(&vs[k])?,
                p.apply_transpose(&us[k])?,
                p.row_marginal()?,
                p.col_marginal()?,
                p.transfer(&vs[k])?,
                p.barycentric_map()?,
            ];
            for (acc, t) in per_item.iter_mut().zip(got) {
                acc.push(t);
            }
        }
        for (o, ((name, got), want)) in outs.iter().zip(per_item).enumerate() {
            // Balanced potentials are defined up to an additive constant per item (the batch
            // and the single solves stop at different iterates within tol): the first four
            // outputs are compared centred item by item; the plan operators are invariant.
            let (got, want) = if o < 4 {
                let lens: &[usize] = if o % 2 == 0 { &xl } else { &yl };
                let centre = |ts: Vec<Tensor>| -> Result<Tensor> {
                    let c = ts
                        .iter()
                        .map(|t| t.broadcast_sub(&t.mean_all()?))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&c, 0)
                };
                (centre(items(got, lens)?)?, centre(want)?)
            } else {
                (got.clone(), Tensor::cat(&want, 0)?)
            };
            assert_eq!(got.dims(), want.dims(), "{backend:?} {name}");
            // Converged solves (batch and items stop at different iterates within tol).
            let e = max_diff(&got, &want)?;
            assert!(e < TOL_CONVERGED, "{backend:?} {name}: {e:e}");
        }
    }
    Ok(())
}
test_device!(
    solve_packed_potentials_and_plans,
    solve_packed_potentials_and_plans_cpu,
    solve_packed_potentials_and_plans_cuda,
    solve_packed_potentials_and_plans_metal
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
