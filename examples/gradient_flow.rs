//! Wasserstein gradient flows: a cloud of points flowing to a target along the gradient of
//! a loss, for the Sinkhorn divergence at several blurs and for the kernel losses.
//!
//! The source α (a crescent, red) and the target β (a ring, blue) are sampled from densities
//! defined in code. Each point moves with the Wasserstein gradient of the loss,
//!
//! ```text
//! x_i ← x_i − lr · ∇_{x_i} L(α, β) / a_i        (a_i = 1/N, lr = 0.05)
//! ```
//!
//! i.e. explicit Euler steps of the flow `ẋ_i = −∇F(x_i)` for the loss's potential F, from
//! t = 0 to t = 5. One row of snapshots per loss (t = 0, 0.25, 0.5, 1, 2, 5):
//!
//! - the Sinkhorn divergence with a small blur moves every point along a nearly straight,
//!   optimal path and fills the ring by t ≈ 2; with blur 1 it sees only the coarse shape
//!   (means and overall extent) and is still far from the ring at t = 5;
//! - the energy distance gets there, after an initial inflation of the cloud (its
//!   self-interaction term `−½ Σ a_i a_j |x_i − x_j|` is repulsive), with a few stragglers;
//! - the Gaussian kernel with σ = 0.5 sees only coarse features;
//! - the Gaussian and Laplacian kernels with σ = 0.2 scatter the cloud by self-repulsion, and
//!   the points pushed out of the kernel's reach stay stranded, where the gradient vanishes.
//!
//! The example prints, for each flow, a common yardstick: the Sinkhorn divergence with blur
//! 0.01 between the final cloud and the target (≈ ½ W₂²).
//!
//! ```text
//! cargo run --release --example gradient_flow [-- --out DIR]
//! ```

use anyhow::Result;
use candle_core::{Tensor, Var};
use candle_ot::{Loss, SamplesLoss};
use candle_ot_examples::{
    hex, panel, points_tensor, rng, sample_density, smooth_step, tensor_points2, wrote, Args, FONT,
};
use plotters::prelude::*;

/// α: a crescent opening to the right.
fn crescent(x: f64, y: f64) -> f64 {
    let outer = ((x - 0.3).powi(2) + (y - 0.5).powi(2)).sqrt() - 0.22;
    let inner = ((x - 0.39).powi(2) + (y - 0.5).powi(2)).sqrt() - 0.19;
    smooth_step(outer, 0.01) * (1.0 - smooth_step(inner, 0.01))
}

/// β: a ring.
fn ring(x: f64, y: f64) -> f64 {
    let r = ((x - 0.7).powi(2) + (y - 0.55).powi(2)).sqrt();
    smooth_step((r - 0.15).abs() - 0.045, 0.01)
}

/// The losses whose flows are drawn: a label and the loss.
fn losses() -> Result<Vec<(String, SamplesLoss)>> {
    let mut out = vec![];
    for blur in [1.0, 0.1, 0.01] {
        out.push((
            format!("sinkhorn, blur {blur}"),
            SamplesLoss::builder(Loss::Sinkhorn)
                .p(2)
                .blur(blur)
                .scaling(0.5)
                .build()?,
        ));
    }
    out.push(("energy".into(), SamplesLoss::builder(Loss::Energy).build()?));
    for (loss, blur) in [
        (Loss::Gaussian, 0.5),
        (Loss::Gaussian, 0.2),
        (Loss::Laplacian, 0.2),
    ] {
        out.push((
            format!("{}, blur {blur}", loss.name()),
            SamplesLoss::builder(loss).blur(blur).build()?,
        ));
    }
    Ok(out)
}

/// Runs the flow of `loss` from `x0` to `t_end`; returns the clouds at the `times`.
fn flow(
    loss: &SamplesLoss,
    x0: &Tensor,
    y: &Tensor,
    lr: f64,
    times: &[f64],
) -> Result<Vec<Vec<[f64; 2]>>> {
    let n = x0.dim(0)? as f64;
    let steps: Vec<usize> = times.iter().map(|t| (t / lr).round() as usize).collect();
    let last = *steps.iter().max().unwrap_or(&0);
    let x = Var::from_tensor(x0)?;
    let mut snaps = vec![];
    for step in 0..=last {
        if steps.contains(&step) {
            snaps.push(tensor_points2(x.as_tensor())?);
        }
        if step == last {
            break;
        }
        let l = loss.forward(&x, y)?;
        let grads = l.backward()?;
        let g = grads.get(&x).expect("x is a variable");
        // x ← x − lr · ∇L / a_i, with a_i = 1/N.
        x.set(&(x.as_tensor() - (g * (lr * n))?)?)?;
    }
    Ok(snaps)
}

fn main() -> Result<()> {
    run(&Args::parse("gradient_flow")?)
}

fn run(args: &Args) -> Result<()> {
    let dev = args.device.clone();
    let (n, lr) = (if args.quick { 100 } else { 800 }, 0.05);
    let times: Vec<f64> = if args.quick {
        vec![0.0, 0.1]
    } else {
        vec![0.0, 0.25, 0.5, 1.0, 2.0, 5.0]
    };
    let mut r = rng(3);
    let x0 = sample_density(&mut r, n, 1.0, crescent);
    let y = sample_density(&mut r, n, 1.0, ring);
    let (xt, yt) = (points_tensor(&x0, &dev)?, points_tensor(&y, &dev)?);
    // A common yardstick for how far each flow got: S_ε with a small blur (≈ ½ W₂²).
    let yardstick = SamplesLoss::builder(Loss::Sinkhorn)
        .p(2)
        .blur(0.01)
        .scaling(0.9)
        .build()?;
    println!(
        "N = M = {n}, lr = {lr}, t = 0 .. {}; S_0.01(x_0, y) = {:.2e}",
        times.last().unwrap_or(&0.0),
        yardstick.forward(&xt, &yt)?.to_scalar::<f32>()?
    );

    let losses = losses()?;
    let mut all = vec![];
    for (name, loss) in &losses {
        let t0 = std::time::Instant::now();
        let snaps = flow(loss, &xt, &yt, lr, &times)?;
        let last = points_tensor(snaps.last().expect("snapshots"), &dev)?;
        println!(
            "{name:<22} {:>6.2} s   S_0.01(x_T, y) = {:.2e}",
            t0.elapsed().as_secs_f64(),
            yardstick.forward(&last, &yt)?.to_scalar::<f32>()?
        );
        all.push((name.clone(), snaps));
    }

    // One figure per loss, and one with all of them.
    let (pw, label_w) = (240u32, 170u32);
    let cols = times.len() as u32;
    let draw_rows = |path: &std::path::Path, rows: &[(String, Vec<Vec<[f64; 2]>>)]| -> Result<()> {
        let (w, h) = (label_w + pw * cols, 70 + pw * rows.len() as u32);
        let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(70);
        top.draw(&Text::new(
            format!("Gradient flows x ← x − lr·∇L/a (lr {lr}): source (red) → target (blue)"),
            (10, 10),
            (FONT, 24).into_font(),
        ))?;
        top.draw(&Text::new(
            "columns: time t (points that left the frame are not drawn)",
            (10, 42),
            (FONT, 15).into_font(),
        ))?;
        for (r, (name, snaps)) in rows.iter().enumerate() {
            let row = rest.margin(0, 0, 0, 0).split_evenly((rows.len(), 1))[r].clone();
            let (label, cells) = row.split_horizontally(label_w);
            label.draw(&Text::new(
                name.clone(),
                (8, pw as i32 / 2),
                (FONT, 17).into_font(),
            ))?;
            let cells = cells.split_evenly((1, times.len()));
            for (k, cell) in cells.iter().enumerate() {
                let mut c = panel(
                    cell,
                    &format!("t = {}", times[k]),
                    -0.02..1.02,
                    0.0..1.04,
                    16,
                )?;
                c.draw_series(
                    y.iter()
                        .map(|p| Circle::new((p[0], p[1]), 1, hex("#5577dd").filled())),
                )?;
                // Points that left the frame are not drawn (plotters would pin them to its edge).
                let inside =
                    |p: &&[f64; 2]| (-0.02..1.02).contains(&p[0]) && (0.0..1.04).contains(&p[1]);
                c.draw_series(
                    snaps[k]
                        .iter()
                        .filter(inside)
                        .map(|p| Circle::new((p[0], p[1]), 1, hex("#dd3333").filled())),
                )?;
            }
        }
        root.present()?;
        wrote(path);
        Ok(())
    };
    draw_rows(&args.path("gradient_flow.png"), &all)?;
    for row in &all {
        let file = format!(
            "flow_{}.png",
            row.0.replace(", blur ", "_").replace([' ', ','], "")
        );
        draw_rows(&args.path(&file), std::slice::from_ref(row))?;
    }
    println!("figures in {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quick_run_writes_the_figures() -> anyhow::Result<()> {
        candle_ot_examples::quick_run_writes(
            "gradient_flow",
            &["gradient_flow", "flow_sinkhorn_0.01", "flow_energy"],
            super::run,
        )
    }
}
