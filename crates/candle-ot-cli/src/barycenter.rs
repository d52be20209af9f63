//! `candle-ot barycenter`: Wasserstein barycenters of densities on a grid (PNG, .npy,
//! .safetensors; [`candle_ot::ImagesBarycenter`]) or of point clouds (.npy, .safetensors,
//! .csv; [`candle_ot::FreeSupportBarycenter`]), written to a file, with a JSON summary.

use crate::{bench, io};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_ot::{
    Backend, Cloud, FreeSupportBarycenter, ImagesBarycenter, Loss, SamplesLoss, SamplesLossOptions,
};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `barycenter` computes on grids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridMode {
    /// GeomLoss 0.3.1's fixed schedule ([`ImagesBarycenter::geomloss`]; mass below 1).
    Geomloss,
    /// The converged debiased barycenter ([`ImagesBarycenter::solve`]).
    Converged,
}

/// The arguments of `candle-ot barycenter`.
#[derive(Clone, Debug)]
pub struct BarycenterArgs {
    /// The input measures (≥ 1 files).
    pub inputs: Vec<PathBuf>,
    /// One weight per input (`None`: uniform). They must sum to 1.
    pub weights: Option<Vec<f64>>,
    /// Where to write the barycenter: `.png` (grids, scaled to its maximum), `.npy`,
    /// `.safetensors` (tensor `barycenter`), `.csv` (point clouds).
    pub out: PathBuf,
    /// Tensor name inside `.safetensors` inputs.
    pub key: Option<String>,
    /// `Some(2 | 3)`: the inputs are densities on a grid (implied, 2, by a `.png` input).
    pub grid: Option<usize>,
    /// Grids: masses from `max − value`.
    pub invert: bool,
    /// Grids: the mode.
    pub mode: GridMode,
    /// 1 or 2.
    pub p: u32,
    /// The blur (grids: default one pixel; clouds: default 0.05).
    pub blur: Option<f64>,
    /// Grids: iterations per pyramid level. Clouds: unused.
    pub scaling_n: usize,
    /// Grids (converged mode): the marginal tolerance. Clouds: the displacement tolerance.
    pub tol: Option<f64>,
    /// The most barycenter iterations.
    pub max_iter: Option<usize>,
    /// Clouds: the number of support points (default: the mean input size).
    pub support: Option<usize>,
    /// Clouds: the initial support, a file `(M, D)` (default: uniform in the inputs' bounding
    /// box, seeded).
    pub init: Option<PathBuf>,
    /// Clouds: the classic (biased) barycenter of Σ w_k OT_ε instead of the debiased one.
    pub no_debias: bool,
    /// Clouds: the backend of the inner Sinkhorn problems.
    pub backend: Backend,
    /// Clouds: the inner problems' `tol` (`None`: GeomLoss's schedule).
    pub inner_tol: Option<f64>,
    /// Clouds: the inner problems' ε-scaling ratio.
    pub scaling: f64,
    /// The compute dtype.
    pub dtype: DType,
    /// The seed of the initial support.
    pub seed: u64,
}

/// Computes the barycenter, writes it to `args.out` and returns the JSON summary.
pub fn run(args: &BarycenterArgs) -> Result<serde_json::Value> {
    if args.inputs.is_empty() {
        bail!("barycenter needs at least one input file");
    }
    let k = args.inputs.len();
    let w = match &args.weights {
        Some(w) => {
            if w.len() != k {
                bail!(
                    "--weights gives {} values for {k} input files: one weight per input",
                    w.len()
                );
            }
            w.clone()
        }
        None => vec![1.0 / k as f64; k],
    };
    let grid = args.grid.is_some() || args.inputs.iter().any(|p| io::is_image(p));
    if grid {
        run_grid(args, &w)
    } else {
        run_clouds(args, &w)
    }
}

fn run_grid(args: &BarycenterArgs, w: &[f64]) -> Result<serde_json::Value> {
    if args.init.is_some() || args.support.is_some() || args.no_debias || args.inner_tol.is_some() {
        bail!("--init, --support, --no-debias and --inner-tol apply to point clouds, not grids");
    }
    if args.backend != Backend::Auto {
        bail!("--backend applies to point clouds: grids run the exact separable grid softmin");
    }
    let dims = args.grid.unwrap_or(2);
    let mut measures = Vec::with_capacity(args.inputs.len());
    for path in &args.inputs {
        let g = io::read_grid(path, args.key.as_deref(), dims, args.invert)?;
        if !g.batch().is_empty() {
            bail!(
                "{}: a barycenter input is one density (n1, n2[, n3]), got batch axes {:?}",
                path.display(),
                g.batch()
            );
        }
        if let Some(first) = measures.first() {
            let first: &io::GridDensity = first;
            if first.grid() != g.grid() {
                bail!(
                    "{} is a {} grid but {} is {}: the inputs must share one grid",
                    args.inputs[0].display(),
                    io::fmt_shape(first.grid()),
                    path.display(),
                    io::fmt_shape(g.grid())
                );
            }
        }
        measures.push(g);
    }
    let grid_shape = measures[0].grid().to_vec();
    let stacked = Tensor::stack(
        &measures
            .iter()
            .map(|g| g.masses.clone())
            .collect::<Vec<_>>(),
        0,
    )?
    .unsqueeze(0)?
    .to_dtype(args.dtype)?; // (1, K, grid…)
    let weights = Tensor::from_vec(w.to_vec(), (1, w.len()), &Device::Cpu)?.to_dtype(args.dtype)?;
    let mut b = ImagesBarycenter::builder(dims)
        .p(args.p)
        .blur(args.blur)
        .scaling_n(args.scaling_n);
    if let Some(t) = args.tol {
        b = b.tol(t);
    }
    if let Some(m) = args.max_iter {
        b = b.max_iter(m);
    }
    let solver = b.build()?;
    let t0 = Instant::now();
    let (bar, extra) = match args.mode {
        GridMode::Geomloss => (
            solver.geomloss(&stacked, &weights)?,
            serde_json::json!({ "mode": "geomloss" }),
        ),
        GridMode::Converged => {
            let s = solver.solve(&stacked, &weights)?;
            let d = &s.diagnostics;
            if !d.converged {
                eprintln!(
                    "warning: not converged after {} iterations (marginal error {:.3e}, symmetric error {:.3e}, tol {:.1e})",
                    d.iterations, d.marginal_error, d.symmetric_error, solver.options().tol
                );
            }
            (
                s.barycenter,
                serde_json::json!({
                    "mode": "converged",
                    "iterations": d.iterations,
                    "marginal_error": d.marginal_error,
                    "symmetric_error": d.symmetric_error,
                    "converged": d.converged,
                    "eps": d.eps,
                    "blur": d.blur,
                }),
            )
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let bar = bar.squeeze(0)?.to_dtype(DType::F64)?; // (grid…)
    let mass = bar.sum_all()?.to_scalar::<f64>()?;
    write_grid(&bar, &args.out)?;
    let mut out = serde_json::json!({
        "kind": "grid",
        "grid": grid_shape,
        "measures": w.len(),
        "weights": w,
        "seconds": seconds,
        "mass": mass,
        "peak_rss_bytes": bench::peak_rss_bytes(),
        "out": args.out.display().to_string(),
    });
    merge(&mut out, extra);
    Ok(out)
}

fn run_clouds(args: &BarycenterArgs, w: &[f64]) -> Result<serde_json::Value> {
    if args.invert || args.mode != GridMode::Geomloss {
        bail!("--invert and --mode apply to grids (.png inputs, or --grid 2|3)");
    }
    if args.p != 2 {
        bail!("--p: a free-support barycenter needs p = 2, got {}", args.p);
    }
    let mut xs = Vec::with_capacity(args.inputs.len());
    for path in &args.inputs {
        let x = io::read_points(path, args.key.as_deref())?.to_dtype(args.dtype)?;
        if x.rank() != 2 {
            bail!(
                "{}: a barycenter input is one cloud (N, D), got {:?}",
                path.display(),
                x.dims()
            );
        }
        if let Some(first) = xs.first() {
            let first: &Tensor = first;
            if first.dim(1)? != x.dim(1)? {
                bail!(
                    "{} has D = {} but {} has D = {}: the clouds must share one dimension",
                    args.inputs[0].display(),
                    first.dim(1)?,
                    path.display(),
                    x.dim(1)?
                );
            }
        }
        xs.push(x);
    }
    let d = xs[0].dim(1)?;
    let z0 = match &args.init {
        Some(p) => {
            let z = io::read_points(p, args.key.as_deref())?.to_dtype(args.dtype)?;
            if z.rank() != 2 || z.dim(1)? != d {
                bail!(
                    "{}: the initial support must be (M, {d}), got {:?}",
                    p.display(),
                    z.dims()
                );
            }
            z
        }
        None => {
            let m = args.support.unwrap_or_else(|| {
                xs.iter().map(|x| x.dim(0).unwrap_or(0)).sum::<usize>() / xs.len()
            });
            if m == 0 {
                bail!("--support must be at least 1");
            }
            uniform_in_box(&xs, m, args.seed)?.to_dtype(args.dtype)?
        }
    };
    let loss = SamplesLoss::from_options(SamplesLossOptions {
        loss: Loss::Sinkhorn,
        p: 2,
        blur: args.blur.unwrap_or(0.05),
        scaling: args.scaling,
        debias: !args.no_debias,
        backend: args.backend,
        tol: args.inner_tol,
        ..Default::default()
    })?;
    let mut bary = FreeSupportBarycenter::new(loss)?;
    if let Some(t) = args.tol {
        bary = bary.tol(t)?;
    }
    if let Some(m) = args.max_iter {
        bary = bary.max_iter(m)?;
    }
    let clouds: Vec<Cloud> = xs.iter().map(|x| Cloud { x, a: None }).collect();
    let t0 = Instant::now();
    let sol = bary.solve(&clouds, w, &z0, None)?;
    let seconds = t0.elapsed().as_secs_f64();
    let dg = &sol.diagnostics;
    if !dg.converged {
        eprintln!(
            "warning: not converged after {} iterations (displacement {:.3e})",
            dg.iterations,
            dg.displacements.last().copied().unwrap_or(f64::NAN)
        );
    }
    write_points(&sol.support.to_dtype(DType::F64)?, &args.out)?;
    Ok(serde_json::json!({
        "kind": "clouds",
        "sizes": xs.iter().map(|x| x.dim(0).unwrap_or(0)).collect::<Vec<_>>(),
        "support": z0.dim(0)?,
        "d": d,
        "weights": w,
        "debiased": dg.debiased,
        "seconds": seconds,
        "iterations": dg.iterations,
        "displacements": dg.displacements,
        "max_displacements": dg.max_displacements,
        "objective": dg.objective,
        "converged": dg.converged,
        "softmin_passes": dg.softmin_passes,
        "peak_rss_bytes": bench::peak_rss_bytes(),
        "out": args.out.display().to_string(),
    }))
}

/// `m` points uniform in the bounding box of the clouds, seeded.
fn uniform_in_box(xs: &[Tensor], m: usize, seed: u64) -> Result<Tensor> {
    let d = xs[0].dim(1)?;
    let mut lo = vec![f64::INFINITY; d];
    let mut hi = vec![f64::NEG_INFINITY; d];
    for x in xs {
        let mn = x.min(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mx = x.max(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for k in 0..d {
            lo[k] = lo[k].min(mn[k]);
            hi[k] = hi[k].max(mx[k]);
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..m * d)
        .map(|i| lo[i % d] + (hi[i % d] - lo[i % d]) * rng.random::<f64>())
        .collect();
    Ok(Tensor::from_vec(v, (m, d), &Device::Cpu)?)
}

fn merge(out: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
}

fn ext(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Writes a density: `.png` (8-bit grayscale, scaled so that its maximum is 255; 2-D only),
/// `.npy`, `.safetensors` (tensor `barycenter`).
fn write_grid(t: &Tensor, path: &Path) -> Result<()> {
    match ext(path).as_str() {
        "png" => {
            let (h, w) = t
                .dims2()
                .context("a .png output holds a 2-D grid; write volumes as .npy or .safetensors")?;
            let v = t.flatten_all()?.to_vec1::<f64>()?;
            let max = v.iter().copied().fold(0.0, f64::max).max(f64::MIN_POSITIVE);
            let px: Vec<u8> = v
                .iter()
                .map(|x| (x / max * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect();
            image::GrayImage::from_raw(w as u32, h as u32, px)
                .context("image buffer")?
                .save(path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        _ => write_tensor(t, path)?,
    }
    Ok(())
}

/// Writes points: `.csv` (one point per line), `.npy`, `.safetensors` (tensor `barycenter`).
fn write_points(t: &Tensor, path: &Path) -> Result<()> {
    match ext(path).as_str() {
        "csv" => {
            let rows = t.to_vec2::<f64>()?;
            let text: String = rows
                .iter()
                .map(|r| {
                    let s: Vec<String> = r.iter().map(|v| format!("{v:.17e}")).collect();
                    s.join(",") + "\n"
                })
                .collect();
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        _ => write_tensor(t, path)?,
    }
    Ok(())
}

fn write_tensor(t: &Tensor, path: &Path) -> Result<()> {
    match ext(path).as_str() {
        "npy" => t
            .write_npy(path)
            .with_context(|| format!("writing {}", path.display()))?,
        "safetensors" => candle_core::safetensors::save(
            &std::collections::HashMap::from([("barycenter".to_string(), t.clone())]),
            path,
        )
        .with_context(|| format!("writing {}", path.display()))?,
        e => bail!(
            "{}: unknown output extension {e:?} (.png for images, .csv for points, .npy, .safetensors)",
            path.display()
        ),
    }
    Ok(())
}
