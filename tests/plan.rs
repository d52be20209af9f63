//! Transport-plan operators against the dense plan: apply, its transpose, transfer, marginals
//! and the barycentric map, on both backends, balanced and unbalanced, batched or not, with
//! zero weights; converged balanced plans have the right marginals.

#[allow(unused_macros)]
mod common;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_ot::{Backend, Loss, SamplesLoss};
use common::rand_tensor;
use rand::SeedableRng;

/// Streaming vs dense, f64.
const TOL: f64 = 1e-12;
/// Marginals of a plan converged with `tol = 1e-12`.
const TOL_MARGINAL: f64 = 1e-9;

fn rel(got: &Tensor, want: &Tensor) -> Result<f64> {
    let d = (got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let s = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(d / s.max(1e-300))
}

struct Case {
    a: Tensor,
    x: Tensor,
    b: Tensor,
    y: Tensor,
}

fn case(seed: u64, batched: bool) -> Result<Case> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (n, m, d) = (17, 29, 3);
    let lead: Vec<usize> = if batched { vec![2] } else { vec![] };
    let sh = |k: usize, extra: Option<usize>| -> Vec<usize> {
        let mut s = lead.clone();
        s.push(k);
        s.extend(extra);
        s
    };
    let x = rand_tensor(&mut rng, &sh(n, Some(d)), 0.0, 1.0)?;
    let y = rand_tensor(&mut rng, &sh(m, Some(d)), 0.2, 1.2)?;
    let mut a = rand_tensor(&mut rng, &sh(n, None), 0.5, 1.5)?;
    // Zero weights: the third point of x.
    let mask: Vec<f64> = (0..n).map(|i| if i == 2 { 0.0 } else { 1.0 }).collect();
    a = a.broadcast_mul(&Tensor::from_vec(mask, n, &Device::Cpu)?)?;
    let a = a.broadcast_div(&a.sum_keepdim(D::Minus1)?)?;
    let b = rand_tensor(&mut rng, &sh(m, None), 0.5, 1.5)?;
    let b = b.broadcast_div(&b.sum_keepdim(D::Minus1)?)?;
    Ok(Case { a, x, b, y })
}

#[test]
fn streaming_operators_match_the_dense_plan() -> Result<()> {
    for backend in [Backend::Online, Backend::Tensorized] {
        for reach in [None, Some(0.3)] {
            for batched in [false, true] {
                for p in [1, 2] {
                    let c = case(11 + p as u64, batched)?;
                    let loss = SamplesLoss::builder(Loss::Sinkhorn)
                        .p(p)
                        .blur(0.1)
                        .reach(reach)
                        .backend(backend)
                        .build()?;
                    let sol = loss.solve(Some(&c.a), &c.x, Some(&c.b), &c.y)?;
                    let plan = sol.plan()?;
                    let pi = plan.dense()?; // (.., N, M)
                    let ctx = format!("{backend:?} reach {reach:?} batched {batched} p {p}");
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
                    let vdims: Vec<usize> = [&c.y.dims()[..c.y.rank() - 1], &[4]].concat();
                    let udims: Vec<usize> = [&c.x.dims()[..c.x.rank() - 1], &[4]].concat();
                    let v = rand_tensor(&mut rng, &vdims, -1.0, 1.0)?;
                    let u = rand_tensor(&mut rng, &udims, -1.0, 1.0)?;
                    let e = rel(&plan.apply(&v)?, &pi.matmul(&v)?)?;
                    assert!(e < TOL, "{ctx}: apply {e:e}");
                    let pit = pi.transpose(D::Minus1, D::Minus2)?.contiguous()?;
                    let e = rel(&plan.apply_transpose(&u)?, &pit.matmul(&u)?)?;
                    assert!(e < TOL, "{ctx}: apply_transpose {e:e}");
                    let row = pi.sum(D::Minus1)?;
                    let e = rel(&plan.row_marginal()?, &row)?;
                    assert!(e < TOL, "{ctx}: row marginal {e:e}");
                    let e = rel(&plan.col_marginal()?, &pi.sum(D::Minus2)?)?;
                    assert!(e < TOL, "{ctx}: column marginal {e:e}");
                    // transfer = (π v)_i / a_i on points of positive weight.
                    let t = plan.transfer(&v)?;
                    let want = pi.matmul(&v)?.broadcast_div(&c.a.unsqueeze(D::Minus1)?)?;
                    let keep: Vec<u32> = (0..17u32).filter(|i| *i != 2).collect();
                    let keep = Tensor::new(keep.as_slice(), &Device::Cpu)?;
                    let ax = t.rank() - 2;
                    let e = rel(&t.index_select(&keep, ax)?, &want.index_select(&keep, ax)?)?;
                    assert!(e < TOL, "{ctx}: transfer {e:e}");
                    // Barycentric map: divided by the row mass.
                    let bary = pi.matmul(&c.y)?.broadcast_div(&row.unsqueeze(D::Minus1)?)?;
                    let got = plan.barycentric_map()?;
                    let e = rel(
                        &got.index_select(&keep, ax)?,
                        &bary.index_select(&keep, ax)?,
                    )?;
                    assert!(e < TOL, "{ctx}: barycentric map {e:e}");
                    assert!(got
                        .flatten_all()?
                        .to_vec1::<f64>()?
                        .iter()
                        .all(|v| v.is_finite()));
                    // The zero-weight row of π is exactly zero.
                    let zero_row = pi
                        .narrow(ax, 2, 1)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f64>()?;
                    assert_eq!(zero_row, 0.0, "{ctx}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn converged_balanced_plans_have_the_right_marginals() -> Result<()> {
    for backend in [Backend::Online, Backend::Tensorized] {
        let c = case(3, true)?;
        let loss = SamplesLoss::builder(Loss::Sinkhorn)
            .blur(0.2)
            .debias(false)
            .tol(1e-12)
            .max_iter(100_000)
            .backend(backend)
            .build()?;
        let sol = loss.solve(Some(&c.a), &c.x, Some(&c.b), &c.y)?;
        assert_eq!(sol.diagnostics.as_ref().unwrap().converged, Some(true));
        let plan = sol.plan()?;
        let ea = rel(&plan.row_marginal()?, &c.a)?;
        let eb = rel(&plan.col_marginal()?, &c.b)?;
        assert!(
            ea < TOL_MARGINAL && eb < TOL_MARGINAL,
            "{backend:?}: marginal errors {ea:e} {eb:e}"
        );
        // A plan with the wrong marginals is caught: the unconverged default schedule at small blur.
        let rough = SamplesLoss::builder(Loss::Sinkhorn)
            .blur(0.01)
            .debias(false)
            .backend(backend)
            .build()?;
        let sol = rough.solve(Some(&c.a), &c.x, Some(&c.b), &c.y)?;
        let e = rel(&sol.plan()?.col_marginal()?, &c.b)?;
        assert!(
            e > TOL_MARGINAL,
            "{backend:?}: an annealed plan should not be converged ({e:e})"
        );
    }
    Ok(())
}

#[test]
fn dense_plan_has_a_size_limit_and_kernel_losses_have_no_plan() -> Result<()> {
    let x = Tensor::zeros((10_001, 1), DType::F32, &Device::Cpu)?;
    let y = (Tensor::zeros((10_001, 1), DType::F32, &Device::Cpu)? + 1.0)?;
    let sol = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(1.0)
        .build()?
        .solve(None, &x, None, &y)?;
    let err = sol.plan()?.dense().unwrap_err().to_string();
    assert!(err.contains("above the limit"), "{err}");
    let sol = SamplesLoss::new(Loss::Energy).solve(
        None,
        &x.narrow(0, 0, 5)?,
        None,
        &y.narrow(0, 0, 5)?,
    )?;
    let err = sol.plan().unwrap_err().to_string();
    assert!(err.contains("sinkhorn loss only"), "{err}");
    Ok(())
}
