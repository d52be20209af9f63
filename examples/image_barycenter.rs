//! Wasserstein barycenters of four images with [`candle_ot::ImagesBarycenter`]: the square of
//! shape interpolations of Solomon et al., *Convolutional Wasserstein distances* (SIGGRAPH 2015,
//! figure 1), also POT's `plot_convolutional_barycenter.py`.
//!
//! Four shapes are drawn in code on a 64×64 grid of the unit square (pixel `(i_y, i_x)` at
//! `(x, y) = (i_x, i_y)/64`, y up): a disk, a ring, a square and a cross, each the indicator of
//! its signed distance function smoothed over two pixels (`smooth_step`), plus a floor of 1e-6
//! of the peak (no pixel is empty), normalised to mass 1. They sit at the corners of a square; the panel at
//! `(s, t) ∈ [0, 1]²` (s to the right, t down) is the barycenter with the bilinear weights
//!
//! ```text
//! w = ((1 − s)(1 − t), s(1 − t), (1 − s) t, s t)     (disk, ring, square, cross)
//! ```
//!
//! for s, t in {0, ¼, ½, ¾, 1}: 25 weightings, computed in **one batched call**, measures
//! `(B, K, 64, 64) = (25, 4, 64, 64)` and weights `(25, 4)`, of
//! `ImagesBarycenter::builder(2).p(2).tol(1e-4).max_iter(1500).build()?.solve(…)`: the
//! converged debiased barycenter (Janati et al. 2020) at one pixel of blur, GeomLoss's schedule
//! (2×2 → 64×64, 10 iterations per level) then the debiased iteration until the marginal and
//! symmetric errors (L1, mass units) are below `tol` for every batch item (the batch shares
//! the iterations: the slowest weighting sets their number). It converges in 320 iterations,
//! 11–13 s on 2 cores (25 s with the load average at 5).
//!
//! **Why `tol` 1e-4.** The symmetric (debiasing) error decreases slowly, as the library's docs
//! say: measured here, 1.0e-4 after 320 iterations, 2.3e-5 after 2000 (73 s); 1e-5 would take
//! several minutes. Between 320 and 2000 iterations the barycenters move by 1 % of their mass
//! on average (L1, at most 3 %): the fine rays and the centre spots of the mixed panels keep
//! sharpening, the shapes do not change. (With one-pixel edges instead of two, 1e-4 takes
//! twice the iterations.) GeomLoss's fixed schedule (`ImagesBarycenter::geomloss`, 60
//! iterations, 0.03 s) is the fast alternative; the second figure compares the two.
//!
//! Two figures:
//!
//! - `image_barycenter_square.png`: the 5×5 square, each panel the barycenter normalised to its
//!   own maximum, the four inputs (weight 1) framed in red. Along the edges the shapes morph
//!   pairwise (the disk opens into the ring, the square grows arms into the cross); inside,
//!   all four mix: rounded squares with bumps and a central hole that shrinks with the ring's
//!   weight.
//! - `image_barycenter_modes.png`: the disk–ring midpoint (weights ½, ½, 0, 0) by GeomLoss's
//!   schedule and by `solve`, on one colour scale, and their profiles along the centre row
//!   (density per unit area). GeomLoss's barycenter has mass 0.63, not 1; rescaled to mass 1
//!   it is within 3 % (L1) of the converged one, slightly higher in the middle of the ring.
//!
//! ```text
//! cargo run --release --example image_barycenter [-- --out DIR]
//! ```
//!
//! `--quick`: a 32×32 grid, a 3×3 square and at most 60 iterations (not converged: a smoke run).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_ot::ImagesBarycenter;
use candle_ot_examples::{hex, rgb, smooth_step, wrote, Args, Chart2d, FONT};
use plotters::coord::ReverseCoordTranslate;
use plotters::prelude::*;

/// The stopping tolerance of `solve` (mass units) and its iteration bound: the full run
/// converges in 320 iterations (module docs, "Why `tol` 1e-4"); `--quick` stops early.
const TOL: f64 = 1e-4;
const MAX_ITER: usize = 1500;
const QUICK_MAX_ITER: usize = 60;
/// The width of the shapes' edges (pixels) and the floor of every density (fraction of the
/// peak).
const EDGE: f64 = 2.0;
const FLOOR: f64 = 1e-6;

/// The four shapes, in the order of the weights.
const NAMES: [&str; 4] = ["disk", "ring", "square", "cross"];

/// The signed distance (unit-square units, negative inside) to shape `k`, centred at `c`.
fn sdf(k: usize, x: f64, y: f64, c: f64) -> f64 {
    let (dx, dy) = (x - c, y - c);
    // A box of half sides (bx, by).
    let boxed = |bx: f64, by: f64| {
        let (qx, qy) = (dx.abs() - bx, dy.abs() - by);
        let outside = (qx.max(0.0).powi(2) + qy.max(0.0).powi(2)).sqrt();
        outside + qx.max(qy).min(0.0)
    };
    let r = (dx * dx + dy * dy).sqrt();
    match k {
        0 => r - 0.30,                                 // disk
        1 => (r - 0.25).abs() - 0.08,                  // ring: radii 0.17 to 0.33
        2 => boxed(0.26, 0.26),                        // square
        _ => boxed(0.34, 0.10).min(boxed(0.10, 0.34)), // cross
    }
}

/// Shape `k` on an `n × n` grid (x fastest): the smoothed indicator plus a floor of 1e-6,
/// normalised to mass 1.
fn shape(k: usize, n: usize) -> Vec<f64> {
    let h = 1.0 / n as f64;
    let c = 0.5 * (1.0 - h); // the grid's centre
    let mut v: Vec<f64> = (0..n * n)
        .map(|i| {
            let (x, y) = ((i % n) as f64 * h, (i / n) as f64 * h);
            smooth_step(sdf(k, x, y, c), EDGE * h) + FLOOR
        })
        .collect();
    let total: f64 = v.iter().sum();
    v.iter_mut().for_each(|m| *m /= total);
    v
}

/// Bilinear sample of a grid field (x fastest) at `(x, y)` in domain units, 0 outside.
fn sample(v: &[f64], n: usize, x: f64, y: f64) -> f64 {
    let (qx, qy) = (x * n as f64, y * n as f64);
    if qx < -0.5 || qy < -0.5 || qx > n as f64 - 0.5 || qy > n as f64 - 0.5 {
        return 0.0;
    }
    let (qx, qy) = (qx.clamp(0.0, (n - 1) as f64), qy.clamp(0.0, (n - 1) as f64));
    let (i0, j0) = (qx.floor() as usize, qy.floor() as usize);
    let (i1, j1) = ((i0 + 1).min(n - 1), (j0 + 1).min(n - 1));
    let (fx, fy) = (qx - i0 as f64, qy - j0 as f64);
    (1.0 - fy) * ((1.0 - fx) * v[j0 * n + i0] + fx * v[j0 * n + i1])
        + fy * ((1.0 - fx) * v[j1 * n + i0] + fx * v[j1 * n + i1])
}

/// A sequential colour map (matplotlib's "Blues"): white at 0, dark blue at 1.
fn blues(v: f64) -> (f64, f64, f64) {
    let stops = [
        (0.0, (1.0, 1.0, 1.0)),
        (0.25, (0.78, 0.86, 0.94)),
        (0.5, (0.42, 0.68, 0.84)),
        (0.75, (0.13, 0.44, 0.71)),
        (1.0, (0.03, 0.19, 0.42)),
    ];
    let v = v.clamp(0.0, 1.0);
    for w in stops.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if v <= t1 {
            let t = (v - t0) / (t1 - t0);
            return (
                c0.0 + t * (c1.0 - c0.0),
                c0.1 + t * (c1.1 - c0.1),
                c0.2 + t * (c1.2 - c0.2),
            );
        }
    }
    stops[stops.len() - 1].1
}

/// A square panel with a caption: the chart of the grid, pixel centres at `i/n`.
fn square_panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    font: u32,
    n: usize,
) -> Result<Chart2d<'a, 'b>> {
    let half = 0.5 / n as f64;
    let chart = ChartBuilder::on(area)
        .caption(title, (FONT, font))
        .margin(6)
        .build_cartesian_2d(-half..1.0 - half, -half..1.0 - half)?;
    Ok(chart)
}

/// Fills the plotting area of `chart` with the field `v` (grid `n × n`, x fastest), bilinearly
/// interpolated, through the colour map at `v / vmax`; then a frame.
fn draw_field(
    chart: &mut Chart2d,
    v: &[f64],
    n: usize,
    vmax: f64,
    frame: ShapeStyle,
) -> Result<()> {
    {
        let area = chart.plotting_area();
        let (xr, yr) = area.get_pixel_range();
        let screen = area.use_screen_coord();
        let coord = area.as_coord_spec();
        for py in yr.clone() {
            for px in xr.clone() {
                if let Some((x, y)) = coord.reverse_translate((px, py)) {
                    let (r, g, b) = blues(sample(v, n, x, y) / vmax);
                    screen.draw_pixel((px, py), &rgb(r, g, b))?;
                }
            }
        }
    }
    let half = 0.5 / n as f64;
    chart.draw_series(std::iter::once(Rectangle::new(
        [(-half, -half), (1.0 - half, 1.0 - half)],
        frame,
    )))?;
    Ok(())
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}

fn main() -> Result<()> {
    run(&Args::parse("image_barycenter")?)
}

fn run(args: &Args) -> Result<()> {
    let dev: &Device = &args.device;
    // --quick: a smoke run, a few seconds even unoptimised (stops before converging).
    let (n, steps, max_iter) = if args.quick {
        (32, 3, QUICK_MAX_ITER)
    } else {
        (64, 5, MAX_ITER)
    };
    let shapes: Vec<Vec<f64>> = (0..4).map(|k| shape(k, n)).collect();

    // The weightings, row by row: t down, s to the right.
    let pos: Vec<f64> = (0..steps).map(|i| i as f64 / (steps - 1) as f64).collect();
    let mut weights = vec![];
    for &t in &pos {
        for &s in &pos {
            weights.push([(1.0 - s) * (1.0 - t), s * (1.0 - t), (1.0 - s) * t, s * t]);
        }
    }
    let b = weights.len();
    // measures (B, K, n, n): the four shapes, repeated for every weighting.
    let flat: Vec<f32> = shapes.iter().flatten().map(|v| *v as f32).collect();
    let measures = Tensor::from_vec(flat, (1, 4, n, n), dev)?
        .broadcast_as((b, 4, n, n))?
        .contiguous()?;
    let w_flat: Vec<f32> = weights.iter().flatten().map(|v| *v as f32).collect();
    let w = Tensor::from_vec(w_flat, (b, 4), dev)?;

    let bary = ImagesBarycenter::builder(2)
        .p(2)
        .tol(TOL)
        .max_iter(max_iter)
        .build()?;
    println!(
        "ImagesBarycenter::solve, p = 2, blur one pixel (1/{n}), tol {TOL:e}: {b} weightings of 4 shapes \
         on a {n}x{n} grid in one call, measures (B, K, n, n) = ({b}, 4, {n}, {n}), f32"
    );
    let t0 = std::time::Instant::now();
    let sol = bary.solve(&measures, &w)?;
    let t_solve = t0.elapsed().as_secs_f64();
    let d = &sol.diagnostics;
    let out = sol
        .barycenter
        .to_dtype(DType::F64)?
        .reshape((b, n * n))?
        .to_vec2::<f64>()?;
    let masses: Vec<f64> = out.iter().map(|v| v.iter().sum()).collect();
    let (mlo, mhi) = masses
        .iter()
        .fold((f64::INFINITY, 0f64), |(l, h), &m| (l.min(m), h.max(m)));
    println!(
        "  converged {} after {} iterations at eps {:.2e} (+ GeomLoss's schedule): marginal error {:.1e}, \
         symmetric error {:.1e}; masses {mlo:.6} to {mhi:.6}; {t_solve:.2} s ({:.1} ms per iteration and batch item)",
        d.converged,
        d.iterations,
        d.eps,
        d.marginal_error,
        d.symmetric_error,
        1e3 * t_solve / (d.iterations.max(1) * b) as f64
    );

    // GeomLoss's fixed schedule for the disk–ring midpoint (B = 1), to compare.
    let mid = steps / 2; // s = ½, t = 0: weights (½, ½, 0, 0)
    let t1 = std::time::Instant::now();
    let gl = bary.geomloss(&measures.narrow(0, mid, 1)?, &w.narrow(0, mid, 1)?)?;
    let t_gl = t1.elapsed().as_secs_f64();
    let gl = gl.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let gl_mass: f64 = gl.iter().sum();
    // The L1 distance between GeomLoss's barycenter rescaled to mass 1 and the converged one.
    let gl_l1: f64 = gl
        .iter()
        .zip(&out[mid])
        .map(|(g, c)| (g / gl_mass - c).abs())
        .sum();
    println!(
        "ImagesBarycenter::geomloss (GeomLoss 0.3.1's schedule, {} iterations), weights (0.5, 0.5, 0, 0): \
         mass {gl_mass:.4}, L1 distance to solve's once rescaled to mass 1: {gl_l1:.1e}; {t_gl:.2} s",
        10 * (n.trailing_zeros() as usize)
    );

    // Figure 1: the square.
    let path = args.path("image_barycenter_square.png");
    {
        let (pw, ph, top) = (190u32, 206u32, 92u32);
        let root = BitMapBackend::new(&path, (pw * steps as u32 + 8, ph * steps as u32 + top))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let (head, rest) = root.split_vertically(top);
        head.draw(&Text::new(
            format!("Wasserstein barycenters of four shapes ({n}×{n}), bilinear weights"),
            (12, 10),
            (FONT, 24).into_font(),
        ))?;
        for (k, line) in [
            format!(
                "ImagesBarycenter::solve, debiased, p = 2, blur 1/{n}, tol {TOL:e}: {b} weightings in one batched call, \
                 {} iterations, {t_solve:.1} s.",
                d.iterations
            ),
            "Weights (disk, ring, square, cross) above each panel; each panel normalised to its own maximum; \
             inputs framed in red."
                .to_string(),
        ]
        .into_iter()
        .enumerate()
        {
            head.draw(&Text::new(line, (12, 46 + 20 * k as i32), (FONT, 13).into_font()))?;
        }
        let areas = rest.margin(0, 0, 4, 4).split_evenly((steps, steps));
        for (i, area) in areas.iter().enumerate() {
            let wi = weights[i];
            let corner = wi.iter().position(|v| *v == 1.0);
            let title = match corner {
                Some(k) => NAMES[k].to_string(),
                None => format!("{:.2} {:.2} {:.2} {:.2}", wi[0], wi[1], wi[2], wi[3]),
            };
            let mut c = square_panel(area, &title, 13, n)?;
            let style = if corner.is_some() {
                hex("#c0392b").stroke_width(3)
            } else {
                BLACK.mix(0.3).stroke_width(1)
            };
            draw_field(&mut c, &out[i], n, max(&out[i]), style)?;
        }
        root.present()?;
    }
    wrote(&path);

    // Figure 2: GeomLoss's schedule against the converged barycenter, disk–ring midpoint.
    let path = args.path("image_barycenter_modes.png");
    {
        let conv = &out[mid];
        let conv_mass = masses[mid];
        let root = BitMapBackend::new(&path, (1000, 640)).into_drawing_area();
        root.fill(&WHITE)?;
        let (head, rest) = root.split_vertically(46);
        head.draw(&Text::new(
            "Disk–ring midpoint (weights ½, ½): GeomLoss's fixed schedule against the converged barycenter",
            (12, 12),
            (FONT, 20).into_font(),
        ))?;
        let (imgs, prof) = rest.split_vertically(250);
        let areas = imgs.split_evenly((1, 4));
        let panels: [(String, &[f64]); 4] = [
            ("disk".into(), &shapes[0]),
            ("ring".into(), &shapes[1]),
            (format!("geomloss: mass {gl_mass:.3}"), &gl),
            (
                format!("solve ({} it.): mass {conv_mass:.3}", d.iterations),
                conv,
            ),
        ];
        // One colour scale for the four panels: the mass GeomLoss's schedule lacks shows.
        let vmax = panels.iter().map(|p| max(p.1)).fold(0.0, f64::max);
        for ((title, v), area) in panels.iter().zip(areas.iter()) {
            let mut c = square_panel(area, title, 15, n)?;
            draw_field(&mut c, v, n, vmax, BLACK.mix(0.3).stroke_width(1))?;
        }
        // Profiles through the centre row, densities per unit area (mass · n²).
        let row = n / 2;
        let area_scale = (n * n) as f64;
        let profile = |v: &[f64], scale: f64| -> Vec<(f64, f64)> {
            (0..n)
                .map(|i| (i as f64 / n as f64, v[row * n + i] * area_scale * scale))
                .collect()
        };
        let curves = [
            (profile(&gl, 1.0), hex("#f5c08a"), "geomloss".to_string()),
            (
                profile(&gl, 1.0 / gl_mass),
                hex("#e67e22"),
                "geomloss, rescaled to mass 1".to_string(),
            ),
            (
                profile(conv, 1.0),
                hex("#2f5fb3"),
                format!("solve (tol {TOL:e})"),
            ),
            (profile(&shapes[0], 1.0), hex("#999999"), "disk".to_string()),
            (profile(&shapes[1], 1.0), hex("#cccccc"), "ring".to_string()),
        ];
        let ymax = curves
            .iter()
            .flat_map(|c| c.0.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let mut c = ChartBuilder::on(&prof.margin(4, 8, 20, 20))
            .caption(
                format!("profile along the centre row y = {row}/{n} (density per unit area)"),
                (FONT, 15),
            )
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..1.0, 0.0..ymax * 1.6)?;
        c.configure_mesh()
            .disable_mesh()
            .x_desc("x")
            .label_style((FONT, 13))
            .draw()?;
        for (pts, col, label) in curves.iter().rev() {
            c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperMiddle)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        root.present()?;
    }
    wrote(&path);
    println!(
        "total {:.2} s; figures in {}",
        t0.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quick_run_writes_the_figures() -> anyhow::Result<()> {
        candle_ot_examples::quick_run_writes(
            "image_barycenter",
            &["image_barycenter_square", "image_barycenter_modes"],
            super::run,
        )
    }

    #[test]
    fn the_shapes_have_mass_one_and_a_positive_floor() {
        for k in 0..4 {
            let v = super::shape(k, 32);
            assert!((v.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(v.iter().all(|m| *m > 0.0));
        }
    }
}
