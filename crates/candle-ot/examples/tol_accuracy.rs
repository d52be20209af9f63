//! How close the `tol` modes get to the converged Sinkhorn divergence and its gradient, and at
//! what cost, side by side in one process (#19).
//!
//! ```text
//! cargo run --release -p candle-ot --example tol_accuracy -- [N] [BLUR] [REF_MAX_ITER] [TOLS]
//! ```
//! (defaults 4000 0.05 20000 `1e-1,1e-2,1e-3,1e-4`).
//!
//! x and y are N uniform points in the unit cube (D = 3, seeded), with uniform weights; the
//! loss is the debiased Sinkhorn divergence, p = 2. The reference is an f64 solve with
//! Anderson acceleration at `tol` 1e-9 (or `REF_MAX_ITER` iterations), printed with its
//! certified [`candle_ot::ValueErrorBound`] and update error. Then every method (the annealed
//! GeomLoss schedule, and each acceleration at each `tol`) runs in f32, loss plus gradient in
//! x, and the table gives: wall time and its ratio to the annealed run's, softmin passes, extra
//! iterations, whether `tol` was met, the loss's relative error and the gradient's max-norm
//! relative error `max|∇ − ∇_ref| / max|∇_ref|` against the reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::{Acceleration, Loss, SamplesLoss};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn cube(seed: u64, n: usize) -> Result<Tensor> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..3 * n).map(|_| r.random::<f64>()).collect();
    Tensor::from_vec(v, (n, 3), &Device::Cpu)
}

struct Run {
    loss: f64,
    grad: Vec<f64>,
    secs: f64,
    passes: usize,
    extra: usize,
    converged: Option<bool>,
}

fn run(l: &SamplesLoss, x: &Tensor, y: &Tensor, dtype: DType) -> Result<Run> {
    let (x, y) = (x.to_dtype(dtype)?, y.to_dtype(dtype)?);
    let xv = Var::from_tensor(&x)?;
    let t = Instant::now();
    let sol = l.solve(None, xv.as_tensor(), None, &y)?;
    let grads = sol.loss.backward()?;
    let g = grads.get(&xv).expect("a gradient in x").clone();
    let secs = t.elapsed().as_secs_f64();
    let d = sol.diagnostics.expect("sinkhorn diagnostics");
    Ok(Run {
        loss: sol.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        grad: g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
        secs,
        passes: d.softmin_passes,
        extra: d.extra_iterations,
        converged: d.converged,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(4000, |s| s.parse().expect("N"));
    let blur: f64 = args.get(2).map_or(0.05, |s| s.parse().expect("BLUR"));
    let ref_iter: usize = args
        .get(3)
        .map_or(20_000, |s| s.parse().expect("REF_MAX_ITER"));
    let tols: Vec<f64> = args
        .get(4)
        .map_or("1e-1,1e-2,1e-3,1e-4", |s| s.as_str())
        .split(',')
        .map(|t| t.parse().expect("TOLS"))
        .collect();
    let (x, y) = (cube(0, n)?, cube(1, n)?);
    let base = SamplesLoss::builder(Loss::Sinkhorn).blur(blur);
    let reference = base
        .clone()
        .tol(1e-9)
        .max_iter(ref_iter)
        .acceleration(Acceleration::Anderson)
        .build()?;
    let t = Instant::now();
    let sol = reference.solve(None, &x, None, &y)?;
    let d = sol.diagnostics.clone().expect("diagnostics");
    let bound = sol.value_error_bound()?.expect("a balanced bound");
    let r = run(&reference, &x, &y, DType::F64)?;
    println!(
        "reference (f64, anderson, tol 1e-9, max_iter {ref_iter}): loss {:.10e}, {} iterations, converged {:?}, update error {:.2e}, certified value bound {:.2e} relative, marginal L1 error {:.2e}, {:.1} s",
        r.loss,
        d.extra_iterations,
        d.converged,
        d.update_error,
        bound.relative,
        d.marginal_error.unwrap_or(f64::NAN),
        t.elapsed().as_secs_f64()
    );
    let gmax = r.grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let mut methods: Vec<(String, SamplesLoss)> = vec![("annealed".into(), base.clone().build()?)];
    for acc in [
        Acceleration::Anderson,
        Acceleration::Overrelaxation,
        Acceleration::Plain,
    ] {
        for &tol in &tols {
            let l = base
                .clone()
                .tol(tol)
                .max_iter(100_000)
                .acceleration(acc)
                .build()?;
            methods.push((format!("{acc} tol {tol:e}"), l));
        }
    }
    println!("| method (f32, N = {n}, blur {blur}) | time | × annealed | passes | iterations | converged | loss rel. error | gradient rel. error |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut annealed = f64::NAN;
    for (name, l) in &methods {
        let m = run(l, &x, &y, DType::F32)?;
        if name == "annealed" {
            annealed = m.secs;
        }
        let gerr = m
            .grad
            .iter()
            .zip(&r.grad)
            .fold(0.0f64, |e, (a, b)| e.max((a - b).abs()))
            / gmax;
        println!(
            "| {name} | {:.3} s | {:.1} | {} | {} | {} | {:.1e} | {:.1e} |",
            m.secs,
            m.secs / annealed,
            m.passes,
            m.extra,
            m.converged.map_or("—".into(), |c| c.to_string()),
            ((m.loss - r.loss) / r.loss).abs(),
            gerr
        );
    }
    Ok(())
}
