//! Optimal transport between two images with [`candle_ot::ImagesLoss`]: the Sinkhorn
//! divergence on a 128×128 grid, its ε-scaling across blurs, and the displacement
//! interpolation of the entropic plan's barycentric map.
//!
//! The two densities ship with the example as grayscale PNGs, a dark shape on a white
//! background (`assets/density_a.png`, a crescent; `assets/density_b.png`, two blobs of unequal
//! sizes; written by `assets/make_densities.py`). They are read with the `image` crate,
//! inverted (mass = 1 − gray/255) and normalised to total mass 1. Pixel `(i_y, i_x)` sits at
//! `x = i_x h`, `y = i_y h` (h = 1/128, y pointing up), so the grid axes of the densities are
//! `(y, x)`: the PNG's rows, bottom to top, and its columns.
//!
//! For each blur, `ImagesLoss::builder(2).p(2).blur(blur).scaling(0.5).tol(1e-3)` solves the
//! debiased problem `S_ε(α, β)`, ε = blur², on GeomLoss's multiscale pyramid (2×2 up to 128×128)
//! and `solution.barycentric_map()` gives, for every pixel of α, the barycentre of its mass
//! under the entropic plan of `OT_ε(α, β)`:
//!
//! ```text
//! T(x_i) = Σ_j π_ij y_j / a_i,     π_ij = a_i b_j exp((f_ba,i + g_ab,j − C(x_i, y_j))/ε)
//! ```
//!
//! Two figures:
//!
//! - `image_transport_eps.png`, GeomLoss's ε-scaling tutorial on images: one panel per blur
//!   (0.2, 0.1, 0.05, 0.02 and one pixel), with the target β (blue), the push-forward `T#α` of
//!   the source through the barycentric map (red) and arrows `x_i → T(x_i)` (green). At large
//!   blurs the plan is fuzzy and `T` shrinks α towards the barycentres of wide neighbourhoods
//!   of β; as ε decreases the plan sharpens and `T#α` fills β.
//! - `image_transport_interpolation.png`: the displacement interpolation at one pixel of blur,
//!   each pixel's mass `a_i` moved to `(1 − t) x_i + t T(x_i)` and splatted bilinearly onto the
//!   grid, t = 0, 0.25, 0.5, 0.75, 1, next to β. The crescent tears in two, one part per blob;
//!   the pixels on the tear send their mass to both blobs, so their barycentre lands in
//!   between (the dots between the blobs: a barycentric map is not a transport map there).
//!
//! Splatting cuts each pixel into sub-samples, more where the map stretches, with the map
//! interpolated between pixel centres except across a tear (neighbours whose images are more
//! than 4 blurs apart), so the pushed images have neither gaps nor smeared bridges.
//!
//! ```text
//! cargo run --release --example image_transport [-- --out DIR]
//! ```

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_ot::{ImagesLoss, ImagesSolution};
use candle_ot_examples::{
    arrow_head, chain_segments, contour_segments, hex, rgb, wrote, Args, Chart2d, FONT,
};
use plotters::coord::ReverseCoordTranslate;
use plotters::prelude::*;

/// The densities, as PNG bytes (a dark shape on white).
static DENSITY_A: &[u8] = include_bytes!("assets/density_a.png");
static DENSITY_B: &[u8] = include_bytes!("assets/density_b.png");

/// The ε-scaling ratio and the stopping tolerance (units of ε) of every solve.
const SCALING: f64 = 0.5;
const TOL: f64 = 1e-3;
/// The most iterations at the last ε: one pixel of blur needs about 2100 to reach `TOL`.
const MAX_ITER: usize = 5000;
/// Sub-samples per source pixel and axis when splatting: at least `SUB_MIN`, more where the map
/// expands (so that the splats leave no gaps), at most `SUB_MAX`.
const SUB_MIN: usize = 4;
const SUB_MAX: usize = 24;

/// A density on an `n × n` grid: masses summing to 1, flat with x fastest (`iy · n + ix`).
struct Density {
    n: usize,
    mass: Vec<f64>,
}

/// Reads a grayscale PNG (dark shape on a light background) as a density: mass = 1 − gray/255,
/// rows flipped so that y points up, `factor × factor` blocks summed (`--quick`), normalised.
fn load_density(png: &[u8], factor: usize) -> Result<Density> {
    let img = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .context("decoding a density PNG")?
        .to_luma8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    anyhow::ensure!(
        w == h && w % factor == 0,
        "expected a square image, got {w}×{h}"
    );
    let n = w / factor;
    let mut mass = vec![0.0; n * n];
    for (col, row, px) in img.enumerate_pixels() {
        let (ix, iy) = (col as usize / factor, (h - 1 - row as usize) / factor);
        mass[iy * n + ix] += 1.0 - f64::from(px.0[0]) / 255.0;
    }
    let total: f64 = mass.iter().sum();
    anyhow::ensure!(total > 0.0, "a density image is blank");
    mass.iter_mut().for_each(|m| *m /= total);
    Ok(Density { n, mass })
}

/// One solve at one blur and what the figures need from it.
struct Solved {
    blur: f64,
    loss: f64,
    /// The barycentric map, flat like the densities: `[T_x, T_y]` per pixel.
    map: Vec<[f64; 2]>,
    seconds: f64,
}

fn solve(a: &Tensor, b: &Tensor, blur: Option<f64>, n: usize) -> Result<(Solved, ImagesSolution)> {
    let loss = ImagesLoss::builder(2)
        .p(2)
        .blur(blur)
        .scaling(SCALING)
        .debias(true)
        .tol(TOL)
        .max_iter(MAX_ITER)
        .build()?;
    let t0 = std::time::Instant::now();
    let sol = loss.solve(a, b)?;
    let t = sol.barycentric_map()?; // (n_y, n_x, 2): (T_y, T_x)
    let t = t
        .to_dtype(DType::F64)?
        .reshape((n * n, 2))?
        .to_vec2::<f64>()?;
    let seconds = t0.elapsed().as_secs_f64();
    let solved = Solved {
        blur: sol.blur,
        loss: sol.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        map: t.into_iter().map(|r| [r[1], r[0]]).collect(),
        seconds,
    };
    Ok((solved, sol))
}

/// The map at `(qx, qy)` in pixel units (clamped to the grid): bilinear between the four
/// nearest pixel centres, or the nearest one's value where those four images are more than
/// `jump` pixels apart: where the map tears, interpolating would smear mass across the gap.
fn map_at(map: &[[f64; 2]], n: usize, qx: f64, qy: f64, jump: f64) -> [f64; 2] {
    let last = (n - 1) as f64;
    let (qx, qy) = (qx.clamp(0.0, last), qy.clamp(0.0, last));
    let (i0, j0) = (qx.floor() as usize, qy.floor() as usize);
    let (i1, j1) = ((i0 + 1).min(n - 1), (j0 + 1).min(n - 1));
    let (fx, fy) = (qx - i0 as f64, qy - j0 as f64);
    let w = [
        (j0 * n + i0, (1.0 - fx) * (1.0 - fy)),
        (j0 * n + i1, fx * (1.0 - fy)),
        (j1 * n + i0, (1.0 - fx) * fy),
        (j1 * n + i1, fx * fy),
    ];
    let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
    for (k, _) in w {
        for c in 0..2 {
            lo[c] = lo[c].min(map[k][c]);
            hi[c] = hi[c].max(map[k][c]);
        }
    }
    if (hi[0] - lo[0]).max(hi[1] - lo[1]) * n as f64 > jump {
        let nearest = w
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("four neighbours");
        return map[nearest.0];
    }
    let mut out = [0.0; 2];
    for (k, wk) in w {
        out[0] += wk * map[k][0];
        out[1] += wk * map[k][1];
    }
    out
}

/// The displacement interpolation at time `t`: each pixel's mass moved to
/// `(1 − t) x + t T(x)` and splatted bilinearly onto the grid (mass beyond the last pixel is
/// clamped to the border). Each pixel is cut into `s × s` sub-samples, the map interpolated
/// between pixel centres ([`map_at`]), with `s` large enough that where the map stretches the
/// pixel, its sub-samples land less than half a pixel apart: the splats then cover the image
/// of the pixel without gaps (nor moiré). Neighbours whose images are more than `jump` pixels
/// apart are across a tear of the map: neither interpolated nor counted in the stretch.
fn splat(d: &Density, map: &[[f64; 2]], t: f64, jump: f64) -> Vec<f64> {
    let n = d.n as i64;
    let nu = d.n;
    let last = (n - 1) as f64;
    let mut out = vec![0.0; nu * nu];
    for (k, &m) in d.mass.iter().enumerate() {
        if m == 0.0 {
            continue;
        }
        let (ix, iy) = ((k % nu) as i64, (k / nu) as i64);
        // The stretch: the largest distance (pixels) from T(x_k) to its neighbours' images.
        let mut stretch: f64 = 0.0;
        for (dx, dy) in [
            (-1, -1),
            (-1, 0),
            (-1, 1),
            (0, -1),
            (0, 1),
            (1, -1),
            (1, 0),
            (1, 1),
        ] {
            let (jx, jy) = (ix + dx, iy + dy);
            if jx < 0 || jy < 0 || jx >= n || jy >= n {
                continue;
            }
            let q = map[(jy * n + jx) as usize];
            let dist = (q[0] - map[k][0]).abs().max((q[1] - map[k][1]).abs()) * n as f64;
            if dist <= jump {
                stretch = stretch.max(dist);
            }
        }
        let sub = ((2.0 * t * stretch).ceil() as usize).clamp(SUB_MIN, SUB_MAX);
        let mw = m / (sub * sub) as f64;
        for su in 0..sub {
            for sv in 0..sub {
                // The sub-sample, in pixel units, and where it goes.
                let qx = ix as f64 + (su as f64 + 0.5) / sub as f64 - 0.5;
                let qy = iy as f64 + (sv as f64 + 0.5) / sub as f64 - 0.5;
                let tq = map_at(map, nu, qx, qy, jump);
                let px = ((1.0 - t) * qx + t * tq[0] * n as f64).clamp(0.0, last);
                let py = ((1.0 - t) * qy + t * tq[1] * n as f64).clamp(0.0, last);
                let (i0, j0) = (px.floor() as usize, py.floor() as usize);
                let (fx, fy) = (px - i0 as f64, py - j0 as f64);
                let (i1, j1) = ((i0 + 1).min(nu - 1), (j0 + 1).min(nu - 1));
                out[j0 * nu + i0] += mw * (1.0 - fx) * (1.0 - fy);
                out[j0 * nu + i1] += mw * fx * (1.0 - fy);
                out[j1 * nu + i0] += mw * (1.0 - fx) * fy;
                out[j1 * nu + i1] += mw * fx * fy;
            }
        }
    }
    out
}

/// The tear threshold of [`splat`], in pixels: 4 blurs, at least 8 pixels. The barycentric map
/// of a blurred plan varies on the scale of the blur; a jump of several blurs between
/// neighbouring pixels is a tear (the source split between two parts of the target).
fn tear_threshold(blur: f64, n: usize) -> f64 {
    (4.0 * blur * n as f64).max(8.0)
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

/// Linear interpolation between colours, `t` in [0, 1].
fn lerp(c0: (f64, f64, f64), c1: (f64, f64, f64), t: f64) -> (f64, f64, f64) {
    let t = t.clamp(0.0, 1.0);
    (
        c0.0 + t * (c1.0 - c0.0),
        c0.1 + t * (c1.1 - c0.1),
        c0.2 + t * (c1.2 - c0.2),
    )
}

/// A sequential colour map for densities: white → orange → dark red → near black.
fn heat(v: f64) -> (f64, f64, f64) {
    let stops = [
        (0.0, (1.0, 1.0, 1.0)),
        (0.25, (0.99, 0.80, 0.55)),
        (0.55, (0.90, 0.35, 0.16)),
        (0.8, (0.55, 0.05, 0.10)),
        (1.0, (0.18, 0.02, 0.08)),
    ];
    let v = v.clamp(0.0, 1.0);
    for w in stops.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if v <= t1 {
            return lerp(c0, c1, (v - t0) / (t1 - t0));
        }
    }
    stops[stops.len() - 1].1
}

/// Fills the plotting area of `chart` pixel by pixel with `colour(x, y)` (domain units).
fn raster(chart: &Chart2d, colour: impl Fn(f64, f64) -> (f64, f64, f64)) -> Result<()> {
    let area = chart.plotting_area();
    let (xr, yr) = area.get_pixel_range();
    let screen = area.use_screen_coord();
    let coord = area.as_coord_spec();
    for py in yr.clone() {
        for px in xr.clone() {
            if let Some((x, y)) = coord.reverse_translate((px, py)) {
                let (r, g, b) = colour(x, y);
                screen.draw_pixel((px, py), &rgb(r, g, b))?;
            }
        }
    }
    Ok(())
}

/// A square panel with a title above it: the chart of the domain, pixel centres at `i·h`.
fn square_panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    n: usize,
) -> Result<Chart2d<'a, 'b>> {
    let half = 0.5 / n as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 17))
        .margin(8)
        .build_cartesian_2d(-half..1.0 - half, -half..1.0 - half)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_axes()
        .draw()?;
    Ok(chart)
}

/// The frame of a panel, drawn last.
fn frame(chart: &mut Chart2d, n: usize) -> Result<()> {
    let half = 0.5 / n as f64;
    chart.draw_series(std::iter::once(Rectangle::new(
        [(-half, -half), (1.0 - half, 1.0 - half)],
        BLACK.mix(0.35).stroke_width(1),
    )))?;
    Ok(())
}

/// The level line `{v = level}` of a grid field, as thin polylines.
fn outline(chart: &mut Chart2d, v: &[f64], n: usize, level: f64, colour: RGBAColor) -> Result<()> {
    let hi = (n - 1) as f64 / n as f64;
    let segs = contour_segments(v, n, 0.0, hi, level);
    chart.draw_series(
        chain_segments(&segs)
            .into_iter()
            .map(|line| PathElement::new(line, colour.stroke_width(1))),
    )?;
    Ok(())
}

fn main() -> Result<()> {
    run(&Args::parse("image_transport")?)
}

fn run(args: &Args) -> Result<()> {
    let dev: &Device = &args.device;
    // --quick: 32×32 (4×4 blocks summed), three blurs.
    let factor = if args.quick { 4 } else { 1 };
    let alpha = load_density(DENSITY_A, factor)?;
    let beta = load_density(DENSITY_B, factor)?;
    let n = alpha.n;
    anyhow::ensure!(beta.n == n, "the two densities must have the same size");
    let blurs: Vec<Option<f64>> = if args.quick {
        vec![Some(0.2), Some(0.05), None]
    } else {
        vec![Some(0.2), Some(0.1), Some(0.05), Some(0.02), None]
    };
    let to_tensor = |d: &Density| -> Result<Tensor> {
        let v: Vec<f32> = d.mass.iter().map(|m| *m as f32).collect();
        Ok(Tensor::from_vec(v, (n, n), dev)?)
    };
    let (a, b) = (to_tensor(&alpha)?, to_tensor(&beta)?);
    println!(
        "ImagesLoss, p = 2, debiased, scaling {SCALING}, tol {TOL}: {n}x{n} grid on the unit square (h = 1/{n}), f32"
    );

    let t_all = std::time::Instant::now();
    let mut runs = Vec::new();
    for (k, &blur) in blurs.iter().enumerate() {
        let (s, sol) = solve(&a, &b, blur, n)?;
        let d = &sol.diagnostics;
        if k == 0 {
            let pyr: Vec<String> = sol
                .pyramid
                .iter()
                .map(|g| format!("{}x{}", g[0], g[1]))
                .collect();
            println!("pyramid: {}", pyr.join(" -> "));
        }
        println!(
            "  blur {:<7} eps {:.2e}  S = {:.6e}  {:>2} eps steps + {:>3} at the last eps (converged {:?}, update {:.1e}), levels {}, jumps {:?}, {} softmins, {:.2e} pixel pairs, {:.2} s",
            format!("{:.4}", s.blur),
            sol.eps,
            s.loss,
            d.eps_list.len(),
            d.extra_iterations,
            d.converged.unwrap_or(false),
            d.update_error,
            d.levels,
            d.jumps,
            d.softmin_passes,
            sol.pixel_pairs as f64,
            s.seconds
        );
        runs.push(s);
    }
    let t_solve = t_all.elapsed().as_secs_f64();
    println!("solves + barycentric maps: {t_solve:.2} s");

    // Densities per unit area, on one scale for every panel.
    let area_scale = (n * n) as f64;
    let dens = |m: &[f64]| -> Vec<f64> { m.iter().map(|v| v * area_scale).collect() };
    let (da, db) = (dens(&alpha.mass), dens(&beta.mass));
    let vmax = da.iter().chain(&db).cloned().fold(0.0, f64::max);
    let level_a = 0.3 * da.iter().cloned().fold(0.0, f64::max);
    let level_b = 0.15 * db.iter().cloned().fold(0.0, f64::max);
    let (red, blue, green) = (hex("#c0392b"), hex("#2f5fb3"), hex("#2e8b22"));
    let light_blue = (0.66, 0.77, 0.95);
    let dark_red = (0.70, 0.07, 0.10);
    let arrow_every = if args.quick { 2 } else { 8 };

    // Figure 1: the ε-scaling.
    let path = args.path("image_transport_eps.png");
    {
        let (pw, ph, cols) = (326u32, 348u32, 3usize);
        let rows = (runs.len() + 1).div_ceil(cols);
        let root = BitMapBackend::new(&path, (pw * cols as u32, ph * rows as u32 + 84))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(84);
        top.draw(&Text::new(
            format!(
                "ε-scaling on images ({n}×{n}): ImagesLoss, p = 2, debiased, scaling {SCALING}, tol {TOL:e}"
            ),
            (12, 10),
            (FONT, 24).into_font(),
        ))?;
        top.draw(&Text::new(
            "blue: target β;  red: T#α, the source α pushed by the barycentric map T of the entropic plan;  \
             green: x → T(x), 1 pixel in 64",
            (12, 48),
            (FONT, 14).into_font(),
        ))?;
        let areas = rest.split_evenly((rows, cols));
        // Panel 0: the data.
        {
            let mut c = square_panel(&areas[0], "data: α (red) and β (blue)", n)?;
            raster(&c, |x, y| {
                let u = sample(&db, n, x, y) / vmax;
                let v = sample(&da, n, x, y) / vmax;
                lerp(
                    lerp((1.0, 1.0, 1.0), light_blue, 1.4 * u),
                    dark_red,
                    0.9 * v.sqrt(),
                )
            })?;
            frame(&mut c, n)?;
        }
        for (s, area) in runs.iter().zip(areas.iter().skip(1)) {
            let pushed = dens(&splat(&alpha, &s.map, 1.0, tear_threshold(s.blur, n)));
            let blur_label = if (s.blur * n as f64 - 1.0).abs() < 1e-9 {
                format!("blur 1/{n}")
            } else {
                format!("blur {}", s.blur)
            };
            let mut c = square_panel(area, &format!("{blur_label},  S_ε = {:.3e}", s.loss), n)?;
            raster(&c, |x, y| {
                let u = sample(&db, n, x, y) / vmax;
                let v = sample(&pushed, n, x, y) / vmax;
                lerp(
                    lerp((1.0, 1.0, 1.0), light_blue, 1.4 * u),
                    dark_red,
                    0.9 * v.sqrt(),
                )
            })?;
            outline(&mut c, &da, n, level_a, red.mix(0.8))?;
            // Arrows x_i → T(x_i), to scale.
            let h = 1.0 / n as f64;
            for (k, t) in s.map.iter().enumerate() {
                let (ix, iy) = (k % n, k / n);
                if ix % arrow_every != arrow_every / 2
                    || iy % arrow_every != arrow_every / 2
                    || da[k] < level_a
                {
                    continue;
                }
                let from = (ix as f64 * h, iy as f64 * h);
                let to = (t[0], t[1]);
                let len = ((to.0 - from.0).powi(2) + (to.1 - from.1).powi(2)).sqrt();
                c.draw_series(std::iter::once(PathElement::new(
                    vec![from, to],
                    green.stroke_width(1),
                )))?;
                if len > 0.01 {
                    let head = arrow_head(from, to, (0.3 * len).min(0.018));
                    c.draw_series(
                        head.into_iter()
                            .map(|h| PathElement::new(h.to_vec(), green.stroke_width(1))),
                    )?;
                }
            }
            frame(&mut c, n)?;
        }
        root.present()?;
    }
    wrote(&path);

    // Figure 2: the displacement interpolation at the smallest blur.
    let last = runs.last().context("at least one blur")?;
    let path = args.path("image_transport_interpolation.png");
    {
        let times = [0.0, 0.25, 0.5, 0.75, 1.0];
        let (pw, ph, cols) = (270u32, 292u32, 3usize);
        let rows = (times.len() + 1).div_ceil(cols);
        let root = BitMapBackend::new(&path, (pw * cols as u32, ph * rows as u32 + 96))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(96);
        top.draw(&Text::new(
            "Displacement interpolation α → β through the barycentric map T",
            (12, 10),
            (FONT, 22).into_font(),
        ))?;
        for (k, line) in [
            format!(
                "blur 1/{n} (ε = {:.1e}), S_ε = {:.3e}: each pixel's mass a_i moved to (1 − t)·x_i + t·T(x_i)",
                last.blur * last.blur,
                last.loss
            ),
            format!(
                "and splatted bilinearly on the {n}×{n} grid.  Outlines: α (red), β (blue).  Last panel: β."
            ),
        ]
        .into_iter()
        .enumerate()
        {
            top.draw(&Text::new(line, (12, 46 + 21 * k as i32), (FONT, 14).into_font()))?;
        }
        let areas = rest.split_evenly((rows, cols));
        for (k, area) in areas.iter().enumerate() {
            let (title, field) = if k < times.len() {
                (
                    format!("t = {}", times[k]),
                    dens(&splat(
                        &alpha,
                        &last.map,
                        times[k],
                        tear_threshold(last.blur, n),
                    )),
                )
            } else {
                ("target β".to_string(), db.clone())
            };
            let mut c = square_panel(area, &title, n)?;
            raster(&c, |x, y| heat((sample(&field, n, x, y) / vmax).powf(0.6)))?;
            outline(&mut c, &da, n, level_a, red.mix(0.55))?;
            outline(&mut c, &db, n, level_b, blue.mix(0.55))?;
            frame(&mut c, n)?;
        }
        root.present()?;
    }
    wrote(&path);
    println!(
        "total {:.2} s (figures {:.2} s); figures in {}",
        t_all.elapsed().as_secs_f64(),
        t_all.elapsed().as_secs_f64() - t_solve,
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quick_run_writes_the_figures() -> anyhow::Result<()> {
        candle_ot_examples::quick_run_writes(
            "image_transport",
            &["image_transport_eps", "image_transport_interpolation"],
            super::run,
        )
    }

    #[test]
    fn splatting_through_the_identity_keeps_mass_and_mean() -> anyhow::Result<()> {
        let d = super::load_density(super::DENSITY_A, 4)?;
        let n = d.n;
        let h = 1.0 / n as f64;
        let identity: Vec<[f64; 2]> = (0..n * n)
            .map(|k| [(k % n) as f64 * h, (k / n) as f64 * h])
            .collect();
        let moments = |m: &[f64]| {
            m.iter().enumerate().fold([0.0; 3], |s, (k, v)| {
                [
                    s[0] + v,
                    s[1] + v * (k % n) as f64,
                    s[2] + v * (k / n) as f64,
                ]
            })
        };
        let (want, got) = (
            moments(&d.mass),
            moments(&super::splat(&d, &identity, 0.7, 8.0)),
        );
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() < 1e-9, "{want:?} {got:?}");
        }
        Ok(())
    }
}
