//! Shared helpers of the candle-ot examples: command-line arguments, seeded sampling of
//! densities defined in code, tensor ↔ vector conversions, and drawing helpers for
//! [`plotters`] (font registration, contour lines, arrows).
//!
//! None of this is part of the library: each example's file holds the part worth reading.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The font family the examples draw text with (DejaVu Sans, shipped in `assets/`).
pub const FONT: &str = "sans-serif";

/// The environment variable that moves every example's figures to `$VAR/NAME/`.
pub const OUT_ENV: &str = "CANDLE_OT_EXAMPLES_OUT";

/// What every example accepts: `--out DIR` (where the figures go), `--quick` (tiny sizes,
/// for the smoke tests) and `--device cpu|cuda|metal` (GPUs need the examples' `cuda` /
/// `metal` feature: `cargo run --release --features cuda --example NAME -- --device cuda`).
#[derive(Clone, Debug)]
pub struct Args {
    /// The folder the figures are written to (created).
    pub out: PathBuf,
    /// Tiny problem sizes: a smoke run, not a figure worth looking at.
    pub quick: bool,
    /// Where the computations run.
    pub device: Device,
}

impl Args {
    /// Parses `--out DIR`, `--out=DIR` and `--quick` from the command line. Without `--out`,
    /// the figures go to `$CANDLE_OT_EXAMPLES_OUT/NAME/` when that variable is set, else to
    /// `target/examples/NAME/` in the workspace. The folder is created.
    pub fn parse(name: &str) -> Result<Self> {
        let mut out = None;
        let mut quick = false;
        let mut device = Device::Cpu;
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if a == "--quick" {
                quick = true;
            } else if a == "--out" {
                out = Some(PathBuf::from(it.next().context("--out needs a folder")?));
            } else if let Some(dir) = a.strip_prefix("--out=") {
                out = Some(PathBuf::from(dir));
            } else if a == "--device" {
                device =
                    Self::parse_device(&it.next().context("--device needs cpu, cuda or metal")?)?;
            } else if let Some(d) = a.strip_prefix("--device=") {
                device = Self::parse_device(d)?;
            } else if a == "--help" || a == "-h" {
                println!("usage: cargo run --release --example {name} -- [--out DIR] [--quick] [--device cpu|cuda|metal]");
                println!("  --out DIR   where the PNG figures go (default: target/examples/{name}/, or ${OUT_ENV}/{name}/)");
                println!("  --quick     tiny sizes (a smoke test)");
                println!("  --device D  cpu (default), cuda or metal (build with --features cuda / metal)");
                std::process::exit(0);
            } else {
                bail!("unknown argument {a:?} (try --help)");
            }
        }
        let out = match out {
            Some(o) => o,
            None => default_out(name),
        };
        Ok(Self {
            device,
            ..Self::with(out, quick)?
        })
    }

    /// Arguments for a test: quick sizes, figures in `dir`.
    pub fn with(out: PathBuf, quick: bool) -> Result<Self> {
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create the output folder {}", out.display()))?;
        register_font()?;
        Ok(Self {
            out,
            quick,
            device: Device::Cpu,
        })
    }

    /// `cpu`, `cuda` (device 0) or `metal` (device 0).
    pub fn parse_device(name: &str) -> Result<Device> {
        Ok(match name {
            "cpu" => Device::Cpu,
            "cuda" => Device::new_cuda(0).context("no CUDA device (build with --features cuda)")?,
            "metal" => {
                Device::new_metal(0).context("no Metal device (build with --features metal)")?
            }
            other => bail!("unknown device {other:?}: cpu, cuda or metal"),
        })
    }

    /// `out/file`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.out.join(file)
    }
}

fn default_out(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(OUT_ENV) {
        return PathBuf::from(dir).join(name);
    }
    // examples/ is one level below the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    root.join("target").join("examples").join(name)
}

/// A fresh folder for a test's figures, under the system's temporary folder.
pub fn test_out(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("candle-ot-examples-{name}-{}", std::process::id()))
}

/// The examples' smoke test: runs `run` with `--quick` into a scratch folder, checks that each
/// of `figures` (file stems, `.png` added) was written with more than 1000 bytes, then removes
/// the folder.
pub fn quick_run_writes(
    name: &str,
    figures: &[&str],
    run: impl FnOnce(&Args) -> Result<()>,
) -> Result<()> {
    let dir = test_out(name);
    run(&Args::with(dir.clone(), true)?)?;
    for f in figures {
        let path = dir.join(format!("{f}.png"));
        assert!(path.metadata()?.len() > 1000, "{}", path.display());
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Registers DejaVu Sans (shipped in `assets/`, see `assets/DejaVuSans-LICENSE.txt`) as
/// plotters' `sans-serif` family, so that text renders without fontconfig or system fonts.
pub fn register_font() -> Result<()> {
    static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
    for style in [FontStyle::Normal, FontStyle::Bold] {
        plotters::style::register_font(FONT, style, FONT_BYTES)
            .map_err(|_| anyhow::anyhow!("the shipped font could not be parsed"))?;
    }
    Ok(())
}

/// A seeded random generator (the examples are deterministic).
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// One standard normal draw (Box–Muller).
pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = rng.random::<f64>().max(1e-300);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// `n` points of an isotropic Gaussian blob centred at `c` with standard deviation `s`.
pub fn gaussian_blob(rng: &mut ChaCha8Rng, n: usize, c: [f64; 2], s: f64) -> Vec<[f64; 2]> {
    (0..n)
        .map(|_| [c[0] + s * normal(rng), c[1] + s * normal(rng)])
        .collect()
}

/// `n` points drawn by rejection from the density `rho` (any scale, at most `max`) on the unit
/// square.
pub fn sample_density(
    rng: &mut ChaCha8Rng,
    n: usize,
    max: f64,
    rho: impl Fn(f64, f64) -> f64,
) -> Vec<[f64; 2]> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (x, y): (f64, f64) = (rng.random(), rng.random());
        if rng.random::<f64>() * max < rho(x, y) {
            out.push([x, y]);
        }
    }
    out
}

/// A smooth indicator: 1 inside (`d < 0`), 0 outside, with a transition of width `w`.
pub fn smooth_step(d: f64, w: f64) -> f64 {
    0.5 * (1.0 - (d / w).tanh())
}

/// Points (N, D) as an f32 tensor on `dev`.
pub fn points_tensor<const D: usize>(p: &[[f64; D]], dev: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = p.iter().flatten().map(|v| *v as f32).collect();
    Ok(Tensor::from_vec(flat, (p.len(), D), dev)?)
}

/// A (N, 2) tensor back to points.
pub fn tensor_points2(t: &Tensor) -> Result<Vec<[f64; 2]>> {
    let v = t.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
    Ok(v.into_iter().map(|r| [r[0], r[1]]).collect())
}

/// A (N, 3) tensor back to points.
pub fn tensor_points3(t: &Tensor) -> Result<Vec<[f64; 3]>> {
    let v = t.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
    Ok(v.into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

/// A (N,) tensor to a vector.
pub fn tensor_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
}

/// A regular grid of `n × n` points covering `[lo, hi]²`, row by row (x fastest).
pub fn grid_points(n: usize, lo: f64, hi: f64) -> Vec<[f64; 2]> {
    let step = (hi - lo) / (n - 1) as f64;
    (0..n * n)
        .map(|k| [lo + (k % n) as f64 * step, lo + (k / n) as f64 * step])
        .collect()
}

/// Marching squares: the segments of the level line `{v = level}` of values sampled on the
/// grid of [`grid_points`] (`n × n`, x fastest, covering `[lo, hi]²`). Saddle cells are
/// resolved with the cell's mean.
pub fn contour_segments(v: &[f64], n: usize, lo: f64, hi: f64, level: f64) -> Vec<[(f64, f64); 2]> {
    let step = (hi - lo) / (n - 1) as f64;
    let at = |i: usize, j: usize| v[j * n + i];
    let mut segs = Vec::new();
    for j in 0..n - 1 {
        for i in 0..n - 1 {
            // Corners counter-clockwise from the bottom left.
            let c = [at(i, j), at(i + 1, j), at(i + 1, j + 1), at(i, j + 1)];
            if c.iter().any(|x| !x.is_finite()) {
                continue;
            }
            let pos = [(i, j), (i + 1, j), (i + 1, j + 1), (i, j + 1)];
            let mut case = 0;
            for (k, ck) in c.iter().enumerate() {
                if *ck >= level {
                    case |= 1 << k;
                }
            }
            if case == 0 || case == 15 {
                continue;
            }
            // The crossing on edge k (from corner k to corner k+1).
            let cross = |k: usize| -> (f64, f64) {
                // From the lower corner to the upper one, so that the cells on both sides of
                // an edge compute bit-identical points (which `chain_segments` joins).
                let (a, b) = if (pos[k].1, pos[k].0) < (pos[(k + 1) % 4].1, pos[(k + 1) % 4].0) {
                    (k, (k + 1) % 4)
                } else {
                    ((k + 1) % 4, k)
                };
                let t = (level - c[a]) / (c[b] - c[a]);
                let (ia, ja) = pos[a];
                let (ib, jb) = pos[b];
                (
                    lo + step * (ia as f64 + t * (ib as f64 - ia as f64)),
                    lo + step * (ja as f64 + t * (jb as f64 - ja as f64)),
                )
            };
            // Edges whose corners differ, paired up.
            let edges: Vec<usize> = (0..4)
                .filter(|&k| ((case >> k) & 1) != ((case >> ((k + 1) % 4)) & 1))
                .collect();
            if edges.len() == 2 {
                segs.push([cross(edges[0]), cross(edges[1])]);
            } else {
                // Saddle: corners 0 and 2 agree, 1 and 3 agree. If the centre is on corner 0's
                // side, corner 0's region connects through the centre.
                let mean = c.iter().sum::<f64>() / 4.0;
                let centre_high = mean >= level;
                let c0_high = c[0] >= level;
                if centre_high == c0_high {
                    segs.push([cross(0), cross(1)]);
                    segs.push([cross(2), cross(3)]);
                } else {
                    segs.push([cross(3), cross(0)]);
                    segs.push([cross(1), cross(2)]);
                }
            }
        }
    }
    segs
}

/// The segments of [`contour_segments`] chained into polylines (joined where they share an
/// end point), so that a level line is drawn as one stroke.
pub fn chain_segments(segs: &[[(f64, f64); 2]]) -> Vec<Vec<(f64, f64)>> {
    use std::collections::HashMap;
    let key = |p: (f64, f64)| (p.0.to_bits(), p.1.to_bits());
    let mut at: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (k, s) in segs.iter().enumerate() {
        at.entry(key(s[0])).or_default().push(k);
        at.entry(key(s[1])).or_default().push(k);
    }
    let mut used = vec![false; segs.len()];
    let mut lines = vec![];
    for start in 0..segs.len() {
        if used[start] {
            continue;
        }
        used[start] = true;
        let mut line = std::collections::VecDeque::from(vec![segs[start][0], segs[start][1]]);
        // Grow at the back, then at the front.
        for front in [false, true] {
            loop {
                let end = if front { line[0] } else { line[line.len() - 1] };
                let next = at
                    .get(&key(end))
                    .and_then(|ks| ks.iter().copied().find(|k| !used[*k]));
                let Some(k) = next else { break };
                used[k] = true;
                let s = segs[k];
                let other = if key(s[0]) == key(end) { s[1] } else { s[0] };
                if front {
                    line.push_front(other);
                } else {
                    line.push_back(other);
                }
            }
        }
        lines.push(line.into_iter().collect());
    }
    lines
}

/// Levels `k · step` for the integers k with `min ≤ k·step ≤ max`, at most `max_lines` of
/// them (thinned evenly), for contour plots comparable across panels.
pub fn levels(v: &[f64], step: f64, max_lines: usize) -> Vec<f64> {
    let finite = v.iter().copied().filter(|x| x.is_finite());
    let (min, max) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    if !min.is_finite() || !max.is_finite() {
        return vec![];
    }
    let (k0, k1) = ((min / step).ceil() as i64, (max / step).floor() as i64);
    let all: Vec<f64> = (k0..=k1).map(|k| k as f64 * step).collect();
    if all.len() <= max_lines {
        return all;
    }
    let thin = all.len().div_ceil(max_lines);
    all.into_iter().step_by(thin).collect()
}

/// The two strokes of an arrowhead at `to`, for an arrow from `from` (data coordinates);
/// `head` is the length of each stroke.
pub fn arrow_head(from: (f64, f64), to: (f64, f64), head: f64) -> [[(f64, f64); 2]; 2] {
    let (dx, dy) = (to.0 - from.0, to.1 - from.1);
    let len = (dx * dx + dy * dy).sqrt().max(1e-12);
    let (ux, uy) = (dx / len, dy / len);
    let (c, s) = (0.866, 0.5); // ±30°
    let back = |sgn: f64| {
        let rx = -(ux * c - sgn * uy * s);
        let ry = -(uy * c + sgn * ux * s);
        [to, (to.0 + head * rx, to.1 + head * ry)]
    };
    [back(1.0), back(-1.0)]
}

/// An RGB colour from components in [0, 1] (clamped).
pub fn rgb(r: f64, g: f64, b: f64) -> RGBColor {
    let c = |v: f64| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    RGBColor(c(r), c(g), c(b))
}

/// A colour from a hex string `#rrggbb`.
pub fn hex(s: &str) -> RGBColor {
    let v = u32::from_str_radix(s.trim_start_matches('#'), 16).unwrap_or(0);
    RGBColor((v >> 16) as u8, (v >> 8) as u8, v as u8)
}

/// A 2-D chart on a bitmap.
pub type Chart2d<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A framed panel with a caption and no axes, showing `x × y`.
pub fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    font_size: u32,
) -> Result<Chart2d<'a, 'b>> {
    let (x0, x1, y0, y1) = (x.start, x.end, y.start, y.end);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, font_size))
        .margin(6)
        .build_cartesian_2d(x, y)?;
    chart.draw_series(std::iter::once(Rectangle::new(
        [(x0, y0), (x1, y1)],
        BLACK.mix(0.35).stroke_width(1),
    )))?;
    Ok(chart)
}

/// Prints where a figure went.
pub fn wrote(path: &Path) {
    println!("  wrote {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contour_of_a_plane_is_a_straight_line() {
        let n = 11;
        let g = grid_points(n, 0.0, 1.0);
        let v: Vec<f64> = g.iter().map(|p| p[0]).collect();
        let segs = contour_segments(&v, n, 0.0, 1.0, 0.35);
        assert_eq!(segs.len(), n - 1);
        for s in segs {
            assert!((s[0].0 - 0.35).abs() < 1e-12 && (s[1].0 - 0.35).abs() < 1e-12);
        }
    }

    #[test]
    fn contour_of_a_cone_is_a_circle() {
        let n = 41;
        let g = grid_points(n, -1.0, 1.0);
        let v: Vec<f64> = g
            .iter()
            .map(|p| (p[0] * p[0] + p[1] * p[1]).sqrt())
            .collect();
        let segs = contour_segments(&v, n, -1.0, 1.0, 0.5);
        assert!(segs.len() > 20);
        for s in segs {
            for (x, y) in s {
                assert!(((x * x + y * y).sqrt() - 0.5).abs() < 0.01);
            }
        }
    }

    #[test]
    fn a_circle_chains_into_one_closed_line() {
        let n = 41;
        let g = grid_points(n, -1.0, 1.0);
        let v: Vec<f64> = g
            .iter()
            .map(|p| (p[0] * p[0] + p[1] * p[1]).sqrt())
            .collect();
        let segs = contour_segments(&v, n, -1.0, 1.0, 0.51);
        let lines = chain_segments(&segs);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), segs.len() + 1);
        assert_eq!(lines[0][0], lines[0][lines[0].len() - 1]);
    }

    #[test]
    fn levels_are_multiples_of_the_step() {
        assert_eq!(levels(&[-0.12, 0.31], 0.1, 100).len(), 5); // −0.1, 0, 0.1, 0.2, 0.3
        assert!(levels(&[-10.0, 10.0], 0.1, 21).len() <= 21);
    }
}
