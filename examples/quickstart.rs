//! Quick start: every loss of candle-ot between two seeded random clouds, with gradients and
//! the Sinkhorn loop's diagnostics.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_ot::{Backend, Loss, SamplesLoss};
use rand::{Rng, SeedableRng};

fn cloud(rng: &mut rand_chacha::ChaCha8Rng, n: usize, d: usize, shift: f64) -> Result<Tensor> {
    let v: Vec<f64> = (0..n * d)
        .map(|_| rng.random::<f64>() * 0.5 + shift)
        .collect();
    Ok(Tensor::from_vec(v, (n, d), &Device::Cpu)?)
}

fn main() -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x = Var::from_tensor(&cloud(&mut rng, 500, 3, 0.0)?.to_dtype(DType::F32)?)?; // (N, D)
    let y = cloud(&mut rng, 700, 3, 0.3)?.to_dtype(DType::F32)?; // (M, D)
    println!(
        "x: {:?}, y: {:?} (f32, CPU, {} threads)",
        x.dims(),
        y.dims(),
        candle_ot::num_threads()
    );
    println!("{:<10} {:>14} {:>14}", "loss", "value", "|grad_x|");
    for loss in [
        Loss::Sinkhorn,
        Loss::Hausdorff,
        Loss::Energy,
        Loss::Gaussian,
        Loss::Laplacian,
    ] {
        let l = SamplesLoss::builder(loss).p(2).blur(0.05).build()?;
        let value = l.forward(&x, &y)?;
        let grads = value.backward()?;
        let gx = grads.get(&x).expect("x is a variable");
        let gnorm = gx.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        println!(
            "{:<10} {:>14.6e} {:>14.6e}",
            loss.name(),
            value.to_scalar::<f32>()?,
            gnorm
        );
    }

    // Loss, potentials and diagnostics in one run; online and tensorized agree.
    let l = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(0.05)
        .scaling(0.5)
        .build()?;
    let sol = l.solve(None, &x, None, &y)?;
    let d = sol.diagnostics.as_ref().expect("sinkhorn has diagnostics");
    println!(
        "\nsinkhorn via {:?}: {} eps values ({:.3e} .. {:.3e}), {} softmin passes, final update {:.2e}",
        sol.backend,
        d.eps_list.len(),
        d.eps_list[0],
        d.eps_list[d.eps_list.len() - 1],
        d.softmin_passes,
        d.update_error
    );
    let dense = SamplesLoss::builder(Loss::Sinkhorn)
        .backend(Backend::Tensorized)
        .build()?;
    println!(
        "online {:.7e} vs tensorized {:.7e}",
        sol.loss.to_scalar::<f32>()?,
        dense.forward(&x, &y)?.to_scalar::<f32>()?
    );

    // Converged, rather than GeomLoss's fixed schedule.
    let conv = SamplesLoss::builder(Loss::Sinkhorn).tol(1e-3).build()?;
    let sol = conv.solve(None, &x, None, &y)?;
    let d = sol.diagnostics.expect("sinkhorn has diagnostics");
    println!(
        "with tol 1e-3: {:.7e} after {} extra iterations (converged: {:?})",
        sol.loss.to_scalar::<f32>()?,
        d.extra_iterations,
        d.converged
    );
    Ok(())
}
