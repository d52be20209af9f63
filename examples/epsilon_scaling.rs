//! The ε-scaling walkthrough: what the Sinkhorn loop computes after each annealing step.
//!
//! Two densities on the unit square, defined in code and sampled on a regular grid (a filled
//! ellipse α in red, an elliptic ring β in blue), weights proportional to the density. With
//! `diameter = 1` and `blur = scalingⁱ`, the loop runs exactly `i` ε-scaling steps, so panel
//! `i` shows the state of the annealing after `i` steps: the contour lines of both potentials
//! (F on the x side in red, G on the y side in blue) and, in green, the displacement field
//! `−∇F(x_i) = −(∂loss/∂x_i) / a_i` at the points of α, drawn to scale: where one step of a
//! Wasserstein gradient flow with unit step would move each point.
//!
//! The potentials are evaluated on a fine grid of the whole square, not only at the samples,
//! by the extrapolation formula of the dual (the softmin of the grid points against the
//! other cloud, with the public streaming op `candle_ot::softmin::online::softmin`):
//!
//! ```text
//! F(z) = −ε log Σ_j b_j exp((g_ab,j − C(z, y_j))/ε)  [ + ε log Σ_i a_i exp((f_aa,i − C(z, x_i))/ε) ]
//! ```
//!
//! the bracket for the debiased divergence `S_ε`. Four figures: scaling 0.5 and 0.7, debias
//! off (`OT_ε`) and on (`S_ε`).
//!
//! ```text
//! cargo run --release --example epsilon_scaling [-- --out DIR]
//! ```

use anyhow::Result;
use candle_core::{Tensor, Var};
use candle_ot::softmin::online::softmin;
use candle_ot::{CostKind, Loss, SamplesLoss};
use candle_ot_examples::{
    arrow_head, chain_segments, contour_segments, grid_points, hex, levels, panel, points_tensor,
    smooth_step, tensor_points2, tensor_vec, wrote, Args, FONT,
};
use plotters::prelude::*;

/// α: a filled ellipse, tilted.
fn density_a(x: f64, y: f64) -> f64 {
    let (cx, cy, rx, ry, t) = (0.32, 0.36, 0.22, 0.12, 0.5f64);
    let (dx, dy) = (x - cx, y - cy);
    let (u, v) = (dx * t.cos() + dy * t.sin(), -dx * t.sin() + dy * t.cos());
    let r = ((u / rx).powi(2) + (v / ry).powi(2)).sqrt();
    smooth_step(r - 1.0, 0.08)
}

/// β: an elliptic ring, tilted the other way.
fn density_b(x: f64, y: f64) -> f64 {
    let (cx, cy, rx, ry, t) = (0.64, 0.62, 0.25, 0.17, -0.35f64);
    let (dx, dy) = (x - cx, y - cy);
    let (u, v) = (dx * t.cos() + dy * t.sin(), -dx * t.sin() + dy * t.cos());
    let r = ((u / rx).powi(2) + (v / ry).powi(2)).sqrt();
    smooth_step((r - 1.0).abs() - 0.2, 0.06)
}

/// A density sampled at the centres of an `s × s` grid: the cells with some mass, their
/// (normalised) weights, and their grid indices.
struct Measure {
    points: Vec<[f64; 2]>,
    weights: Vec<f64>,
    cells: Vec<(usize, usize)>,
}

fn grid_measure(s: usize, rho: impl Fn(f64, f64) -> f64) -> Measure {
    let mut m = Measure {
        points: vec![],
        weights: vec![],
        cells: vec![],
    };
    for j in 0..s {
        for i in 0..s {
            let (x, y) = ((i as f64 + 0.5) / s as f64, (j as f64 + 0.5) / s as f64);
            let w = rho(x, y);
            if w > 1e-3 {
                m.points.push([x, y]);
                m.weights.push(w);
                m.cells.push((i, j));
            }
        }
    }
    let total: f64 = m.weights.iter().sum();
    m.weights.iter_mut().for_each(|w| *w /= total);
    m
}

/// `−ε log Σ_j exp(log w_j + pot_j/ε − C(z, q_j)/ε)` at the points z (P, 2): a potential of
/// the dual, extended from the support q (M, 2) to any point, by one streaming softmin.
fn extend(eps: f64, z: &Tensor, q: &Tensor, log_w: &Tensor, pot: &Tensor) -> Result<Tensor> {
    let h = (log_w + (pot / eps)?)?.unsqueeze(0)?; // (1, M)
    let f = softmin(
        CostKind::SqEuclidean,
        eps,
        &z.unsqueeze(0)?,
        &q.unsqueeze(0)?,
        &h,
    )?;
    Ok(f.squeeze(0)?)
}

fn main() -> Result<()> {
    run(&Args::parse("epsilon_scaling")?)
}

fn run(args: &Args) -> Result<()> {
    let dev = args.device.clone();
    let (s, plot_n, arrow_every) = if args.quick {
        (16, 24, 2)
    } else {
        (80, 100, 5)
    };
    let alpha = grid_measure(s, density_a);
    let beta = grid_measure(s, density_b);
    println!(
        "alpha: {} points, beta: {} points ({s}x{s} grid)",
        alpha.points.len(),
        beta.points.len()
    );
    let x = points_tensor(&alpha.points, &dev)?;
    let y = points_tensor(&beta.points, &dev)?;
    let a = Tensor::from_vec(
        alpha.weights.iter().map(|w| *w as f32).collect(),
        alpha.weights.len(),
        &dev,
    )?;
    let b = Tensor::from_vec(
        beta.weights.iter().map(|w| *w as f32).collect(),
        beta.weights.len(),
        &dev,
    )?;
    let (log_a, log_b) = (a.log()?, b.log()?);
    let grid = grid_points(plot_n, 0.0, 1.0);
    let z = points_tensor(&grid, &dev)?;

    for (scaling, nits) in [(0.5, 9usize), (0.7, 15)] {
        for debias in [false, true] {
            let nits = if args.quick { 2 } else { nits };
            let cols = 3;
            let rows = nits.div_ceil(cols);
            let name = format!(
                "eps_scaling_{scaling}_debias_{}.png",
                if debias { "on" } else { "off" }
            );
            let path = args.path(&name);
            let (pw, ph) = (330u32, 350u32);
            let root = BitMapBackend::new(&path, (pw * cols as u32, ph * rows as u32 + 90))
                .into_drawing_area();
            root.fill(&WHITE)?;
            let (top, rest) = root.split_vertically(90);
            top.draw(&Text::new(
                format!(
                    "ε-scaling, scaling {scaling}, {}",
                    if debias {
                        "debiased S_ε"
                    } else {
                        "raw OT_ε (debias off)"
                    }
                ),
                (12, 10),
                (FONT, 28).into_font(),
            ))?;
            top.draw(&Text::new(
                "panel i: blur = scaling^i (diameter 1), i ε-steps.  Red: α and the contours of F;  \
                 blue: β and the contours of G;  green: −∇F = −(∂loss/∂x)/a",
                (12, 52),
                (FONT, 15).into_font(),
            ))?;
            let areas = rest.split_evenly((rows, cols));
            let mut t_total = 0.0;
            for (i, area) in areas.iter().enumerate().take(nits) {
                let blur = f64::powi(scaling, i as i32);
                let loss = SamplesLoss::builder(Loss::Sinkhorn)
                    .p(2)
                    .blur(blur)
                    .diameter(1.0)
                    .scaling(scaling)
                    .debias(debias)
                    .build()?;
                let xv = Var::from_tensor(&x)?;
                let t0 = std::time::Instant::now();
                let sol = loss.solve(Some(&a), &xv, Some(&b), &y)?;
                let grads = sol.loss.backward()?;
                t_total += t0.elapsed().as_secs_f64();
                let gx = grads.get(&xv).expect("x is a variable");
                let v = tensor_points2(&gx.broadcast_div(&a.unsqueeze(1)?)?.neg()?)?;
                let eps = sol.eps.expect("sinkhorn");
                let (f_ba, g_ab) = (sol.f_ba.as_ref().unwrap(), sol.g_ab.as_ref().unwrap());

                // F and G on the plotting grid (extrapolation of the dual).
                let mut f = extend(eps, &z, &y, &log_b, g_ab)?;
                let mut g = extend(eps, &z, &x, &log_a, f_ba)?;
                if debias {
                    let (f_aa, g_bb) = (sol.f_aa.as_ref().unwrap(), sol.g_bb.as_ref().unwrap());
                    f = (f - extend(eps, &z, &x, &log_a, f_aa)?)?;
                    g = (g - extend(eps, &z, &y, &log_b, g_bb)?)?;
                }
                if i + 1 == nits {
                    // The extension agrees with the solver's F on the support, up to the
                    // one half-iteration between the returned f_ba and g_ab.
                    let fx = extend(eps, &x, &y, &log_b, g_ab)?;
                    let fx = if debias {
                        (fx - extend(eps, &x, &x, &log_a, sol.f_aa.as_ref().unwrap())?)?
                    } else {
                        fx
                    };
                    let diff = (fx - &sol.f)?.abs()?.max(0)?.to_scalar::<f32>()?;
                    println!(
                        "  scaling {scaling}, debias {debias}: {} steps in {t_total:.2} s; last loss {:.5}, |F_extended - F| <= {diff:.1e} on the support",
                        nits,
                        sol.loss.to_scalar::<f32>()?
                    );
                }
                let (f, g) = (tensor_vec(&f)?, tensor_vec(&g)?);

                let title = format!("i = {i}, blur = {blur:.3}");
                let mut c = panel(area, &title, 0.0..1.0, 0.0..1.0, 18)?;
                for (pot, colour) in [(&g, hex("#6f93d8")), (&f, hex("#e07a7a"))] {
                    for level in levels(pot, 0.05, 30) {
                        let segs = contour_segments(pot, plot_n, 0.0, 1.0, level);
                        c.draw_series(
                            chain_segments(&segs)
                                .into_iter()
                                .map(|line| PathElement::new(line, colour.stroke_width(1))),
                        )?;
                    }
                }
                // The two measures as their grid cells, shaded by weight.
                let cell = 1.0 / s as f64;
                for (m, base) in [(&beta, (48u8, 80u8, 208u8)), (&alpha, (208, 48, 48))] {
                    let wmax = m.weights.iter().cloned().fold(0.0, f64::max);
                    c.draw_series(m.points.iter().zip(&m.weights).map(|(p, w)| {
                        let colour = RGBColor(base.0, base.1, base.2).mix(0.15 + 0.35 * w / wmax);
                        Rectangle::new(
                            [
                                (p[0] - cell / 2.0, p[1] - cell / 2.0),
                                (p[0] + cell / 2.0, p[1] + cell / 2.0),
                            ],
                            colour.filled(),
                        )
                    }))?;
                }
                // Arrows on one grid cell of α in `arrow_every` (in each direction).
                let green = hex("#1f7a12");
                for (k, p) in alpha.points.iter().enumerate() {
                    let (ci, cj) = alpha.cells[k];
                    if ci % arrow_every != 0 || cj % arrow_every != 0 {
                        continue;
                    }
                    let from = (p[0], p[1]);
                    let to = (p[0] + v[k][0], p[1] + v[k][1]);
                    let len = (v[k][0].powi(2) + v[k][1].powi(2)).sqrt();
                    c.draw_series(std::iter::once(PathElement::new(
                        vec![from, to],
                        green.stroke_width(2),
                    )))?;
                    if len > 0.01 {
                        let head = arrow_head(from, to, (0.3 * len).min(0.02));
                        c.draw_series(
                            head.into_iter()
                                .map(|h| PathElement::new(h.to_vec(), green.stroke_width(2))),
                        )?;
                    }
                }
            }
            root.present()?;
            wrote(&path);
        }
    }
    println!("figures in {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quick_run_writes_the_figures() -> anyhow::Result<()> {
        candle_ot_examples::quick_run_writes(
            "epsilon_scaling",
            &[
                "eps_scaling_0.5_debias_off",
                "eps_scaling_0.5_debias_on",
                "eps_scaling_0.7_debias_off",
                "eps_scaling_0.7_debias_on",
            ],
            super::run,
        )
    }
}
