//! What the backward of the Sinkhorn divergence costs, in softmin passes, side by side in one
//! process (#16): is there anything left for a backward that reads the converged potentials
//! directly with fused streaming passes?
//!
//! ```text
//! cargo run --release -p candle-ot --example backward_cost -- [N] [REPS] [THREADS]
//! ```
//! (defaults 8000 5 1).
//!
//! x and y are N uniform points in the unit cube (D = 3, seeded), uniform weights, the debiased
//! Sinkhorn divergence at blur 0.05, f32, online backend. Timed (median of REPS, interleaved):
//! the loss alone; the loss and ∂x; the loss and ∂x, ∂y, ∂a, ∂b; one softmin pass (x against
//! y). The backward's extra time is then given in units of one softmin pass. Today's backward
//! runs one gradient reduction per differentiated potential (∂x: f_ba and f_aa over x's rows;
//! ∂y: g_ab and g_bb over y's rows), each over the same pairs as a softmin pass: 2 passes for
//! ∂x, 4 for all four. A fused backward (one pass for ∂x over the columns [y; x] with two
//! normalisations, one for ∂y) visits the same N·M + N² pairs, so it can only save what the
//! measured time exceeds those pair counts by.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::cost::CostKind;
use candle_ot::softmin::online;
use candle_ot::{Backend, Loss, SamplesLoss};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn cube(seed: u64, n: usize) -> Result<Tensor> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..3 * n).map(|_| r.random::<f32>()).collect();
    Tensor::from_vec(v, (n, 3), &Device::Cpu)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(8000, |s| s.parse().expect("N"));
    let reps: usize = args.get(2).map_or(5, |s| s.parse().expect("REPS"));
    let threads: usize = args.get(3).map_or(1, |s| s.parse().expect("THREADS"));
    candle_ot::set_num_threads(threads)?;
    let (x, y) = (cube(1, n)?, cube(2, n)?);
    let loss = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(0.05)
        .backend(Backend::Online)
        .build()?;
    let passes = loss
        .solve(None, &x, None, &y)?
        .diagnostics
        .expect("sinkhorn diagnostics")
        .softmin_passes;
    let (mut t_loss, mut t_x, mut t_all, mut t_pass) = (vec![], vec![], vec![], vec![]);
    let h = Tensor::zeros((1, n), DType::F32, &Device::Cpu)?; // (B, M)
    let (xb, yb) = (x.unsqueeze(0)?, y.unsqueeze(0)?); // (B, N, D)
    for _ in 0..reps {
        let t = Instant::now();
        loss.forward(&x, &y)?.to_scalar::<f32>()?;
        t_loss.push(t.elapsed().as_secs_f64());

        let xv = Var::from_tensor(&x)?;
        let t = Instant::now();
        let g = loss.forward(xv.as_tensor(), &y)?.backward()?;
        g.get(&xv).expect("∂x").sum_all()?.to_scalar::<f32>()?;
        t_x.push(t.elapsed().as_secs_f64());

        let (xv, yv) = (Var::from_tensor(&x)?, Var::from_tensor(&y)?);
        let a = Var::from_tensor(&Tensor::full(1.0 / n as f32, n, &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::full(1.0 / n as f32, n, &Device::Cpu)?)?;
        let t = Instant::now();
        let g = loss
            .forward_weighted(a.as_tensor(), xv.as_tensor(), b.as_tensor(), yv.as_tensor())?
            .backward()?;
        for v in [&xv, &yv, &a, &b] {
            g.get(v)
                .expect("a gradient")
                .sum_all()?
                .to_scalar::<f32>()?;
        }
        t_all.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        online::softmin(CostKind::SqEuclidean, 1e-2, &xb, &yb, &h)?
            .sum_all()?
            .to_scalar::<f32>()?;
        t_pass.push(t.elapsed().as_secs_f64());
    }
    let (l, gx, ga, p) = (
        median(&mut t_loss),
        median(&mut t_x),
        median(&mut t_all),
        median(&mut t_pass),
    );
    println!("N = M = {n}, D = 3, f32, blur 0.05, debiased, {threads} thread(s), median of {reps}");
    println!("forward: {passes} softmin passes");
    println!("| run | seconds | − loss alone, in softmin passes |");
    println!("|---|---|---|");
    println!("| one softmin pass | {p:.4} | |");
    println!("| loss alone | {l:.4} | ({:.1} passes in all) |", l / p);
    println!(
        "| loss + ∂x | {gx:.4} | {:.2} (2 reductions) |",
        (gx - l) / p
    );
    println!(
        "| loss + ∂x, ∂y, ∂a, ∂b | {ga:.4} | {:.2} (4 reductions) |",
        (ga - l) / p
    );
    Ok(())
}
