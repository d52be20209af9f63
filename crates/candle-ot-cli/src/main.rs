//! `candle-ot`: evaluate OT losses on reference files and compute distances between clouds.

use anyhow::{bail, Result};
use candle_core::DType;
use candle_ot::{Backend, ImagesLoss, Loss, SamplesLoss, SamplesLossOptions};
use candle_ot_cli::{barycenter, bench, eval, io};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "candle-ot",
    version,
    about = "Optimal-transport losses for Candle"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F64,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F64 => DType::F64,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    Tensorized,
    Online,
    Multiscale,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Tensorized => Backend::Tensorized,
            BackendArg::Online => Backend::Online,
            BackendArg::Multiscale => Backend::Multiscale,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LossArg {
    Sinkhorn,
    Hausdorff,
    Energy,
    Gaussian,
    Laplacian,
}

impl From<LossArg> for Loss {
    fn from(l: LossArg) -> Self {
        match l {
            LossArg::Sinkhorn => Loss::Sinkhorn,
            LossArg::Hausdorff => Loss::Hausdorff,
            LossArg::Energy => Loss::Energy,
            LossArg::Gaussian => Loss::Gaussian,
            LossArg::Laplacian => Loss::Laplacian,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

#[derive(Clone, Copy, ValueEnum)]
enum OpArg {
    Loss,
    Softmin,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Geomloss,
    Converged,
}

#[derive(Subcommand)]
enum Cmd {
    /// Evaluate a case file (x, y, optional a, b, l; options in the metadata key `params`) and
    /// write loss, gradients, potentials (and labels_i) as f64 safetensors. With integer
    /// tensors x_lengths, y_lengths the case is a ragged batch: packed x (ΣN_b, D), y, a, b in,
    /// loss (B,) and packed gradients out.
    Eval {
        /// The case file.
        case: PathBuf,
        /// Where to write the outputs.
        #[arg(long)]
        out: PathBuf,
        /// Compute dtype.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
        /// Backend (`auto` never picks an approximate one).
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
    },
    /// Print the loss between two point clouds (.npy, .safetensors or .csv; uniform weights) or
    /// two densities on a grid (.png images, or .npy / .safetensors with --grid 2|3).
    Distance {
        /// The first cloud, (N, D) or (B, N, D); or the first density, (n1, n2[, n3]) with any
        /// leading batch axes.
        x: PathBuf,
        /// The second cloud, (M, D) or (B, M, D); or the second density, shaped like the first.
        y: PathBuf,
        /// Tensor name inside .safetensors files.
        #[arg(long)]
        key: Option<String>,
        /// The loss (default sinkhorn; grids: sinkhorn only).
        #[arg(long, value_enum)]
        loss: Option<LossArg>,
        #[arg(long, default_value_t = 2)]
        p: u32,
        /// The blur (default 0.05; grids: one pixel of the finest axis).
        #[arg(long)]
        blur: Option<f64>,
        #[arg(long)]
        reach: Option<f64>,
        /// Point clouds only (grids: the domain's largest extent, see --axes).
        #[arg(long)]
        diameter: Option<f64>,
        #[arg(long, default_value_t = 0.5)]
        scaling: f64,
        /// Raw OT_ε instead of the debiased divergence.
        #[arg(long)]
        no_debias: bool,
        #[arg(long)]
        tol: Option<f64>,
        /// The most extra iterations `--tol` may take (default 1000).
        #[arg(long)]
        max_iter: Option<usize>,
        /// How the `--tol` iterations run: anderson (default), overrelaxation or plain.
        #[arg(long, default_value_t = candle_ot::Acceleration::default())]
        acceleration: candle_ot::Acceleration,
        /// With `--tol`: fail (exit 1) instead of printing `warning: not converged` when
        /// `--max-iter` is reached first.
        #[arg(long)]
        require_convergence: bool,
        /// Point clouds: the weights of x, (N,) or (B, N) (.npy, .safetensors or .csv; default
        /// uniform).
        #[arg(long)]
        a: Option<PathBuf>,
        /// Point clouds: the weights of y, (M,) or (B, M) (default uniform).
        #[arg(long)]
        b: Option<PathBuf>,
        /// Point clouds only (grids run ImagesLoss's exact separable softmin).
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
        /// Number of CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// The inputs are densities on a 2-D or 3-D grid (implied, 2, by a .png input): the
        /// last 2 or 3 axes of .npy / .safetensors arrays are the grid, leading axes batch axes.
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=3))]
        grid: Option<u8>,
        /// Grids: masses from max − value (255 − v for 8-bit data, 1 − v for floats), for
        /// dark-on-light drawings.
        #[arg(long)]
        invert: bool,
        /// Grids: the domain, `lo,hi` per grid axis separated by `:` (e.g. `0,2:0,1`); default
        /// the unit square / cube.
        #[arg(long, allow_hyphen_values = true)]
        axes: Option<String>,
        /// Print one JSON line (grids: with the grid, ε, the pyramid levels, pixel pairs and
        /// iterations).
        #[arg(long)]
        json: bool,
    },
    /// The Wasserstein barycenter of densities on a grid (.png, or .npy / .safetensors with
    /// --grid 2|3) or of point clouds (.npy, .safetensors, .csv), written to --out, with a
    /// one-line JSON summary on stdout.
    Barycenter {
        /// The input measures: one density (n1, n2[, n3]) or one cloud (N, D) per file.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// One weight per input, comma-separated, summing to 1 (default uniform).
        #[arg(long, value_delimiter = ',')]
        weights: Option<Vec<f64>>,
        /// Output: .png (grids, scaled to the maximum), .csv (points), .npy or .safetensors.
        #[arg(long)]
        out: PathBuf,
        /// Tensor name inside .safetensors inputs.
        #[arg(long)]
        key: Option<String>,
        /// The inputs are densities on a 2-D or 3-D grid (implied, 2, by a .png input).
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=3))]
        grid: Option<u8>,
        /// Grids: masses from max − value, for dark-on-light drawings.
        #[arg(long)]
        invert: bool,
        /// Grids: `geomloss` (GeomLoss 0.3.1's fixed schedule) or `converged` (the debiased
        /// barycenter to --tol).
        #[arg(long, value_enum, default_value = "geomloss")]
        mode: ModeArg,
        #[arg(long, default_value_t = 2)]
        p: u32,
        /// The blur (grids: default one pixel; clouds: default 0.05).
        #[arg(long)]
        blur: Option<f64>,
        /// Grids: iterations per pyramid level (GeomLoss's scaling_N).
        #[arg(long, default_value_t = 10)]
        scaling_n: usize,
        /// Grids (converged): the marginal error tolerance (default 1e-6). Clouds: the
        /// displacement tolerance (Σ_j b_j |Δz_j|²)^½ (default 1e-3).
        #[arg(long)]
        tol: Option<f64>,
        /// The most barycenter iterations.
        #[arg(long)]
        max_iter: Option<usize>,
        /// Clouds: support points (default: the inputs' mean size).
        #[arg(long)]
        support: Option<usize>,
        /// Clouds: the initial support (M, D) (default: uniform in the inputs' bounding box).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Clouds: the classic barycenter of Σ w_k OT_ε instead of the debiased Σ w_k S_ε.
        #[arg(long)]
        no_debias: bool,
        /// Clouds: the backend of the inner Sinkhorn problems.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// Clouds: the inner problems' tol (default: GeomLoss's schedule).
        #[arg(long)]
        inner_tol: Option<f64>,
        /// Clouds: the inner problems' ε-scaling ratio.
        #[arg(long, default_value_t = 0.5)]
        scaling: f64,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
        /// Seed of the initial support.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Time the loss (and gradient) or one softmin pass on random or given points; report
    /// the median time, the pair count, pairs per second and the peak RSS. `--ragged B`: a
    /// batch of clouds of different sizes, packed against padded and against one large cloud.
    Bench {
        #[arg(long, value_enum, default_value = "sinkhorn")]
        loss: LossArg,
        /// Points in x (random inputs).
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Points in y (random inputs).
        #[arg(long, default_value_t = 1000)]
        m: usize,
        /// Dimension (random inputs).
        #[arg(long, default_value_t = 3)]
        d: usize,
        #[arg(long, default_value_t = 2)]
        p: u32,
        /// The blur (default 0.05; --grid: one pixel of the finest axis).
        #[arg(long)]
        blur: Option<f64>,
        /// The ε-scaling ratio (default 0.5; --grid: 0.9).
        #[arg(long)]
        scaling: Option<f64>,
        #[arg(long)]
        no_debias: bool,
        #[arg(long)]
        reach: Option<f64>,
        #[arg(long)]
        tol: Option<f64>,
        /// The most extra iterations `--tol` may take (default 1000).
        #[arg(long)]
        max_iter: Option<usize>,
        /// How the `--tol` iterations run: anderson (default), overrelaxation or plain.
        #[arg(long, default_value_t = candle_ot::Acceleration::default())]
        acceleration: candle_ot::Acceleration,
        /// With `--tol`: fail (exit 1) instead of printing `warning: not converged` when
        /// `--max-iter` is reached first.
        #[arg(long)]
        require_convergence: bool,
        #[arg(long, value_enum, default_value = "online")]
        backend: BackendArg,
        /// Multiscale kernel truncation, in units of ε (default 5).
        #[arg(long)]
        truncate: Option<f64>,
        /// Multiscale cluster (voxel) side (default: about 2000 cells over the bounding box).
        #[arg(long)]
        cluster_scale: Option<f64>,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceArg,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
        /// Also differentiate with respect to x.
        #[arg(long)]
        grad: bool,
        #[arg(long, value_enum, default_value = "loss")]
        op: OpArg,
        /// Timed runs (the median is reported).
        #[arg(long, visible_alias = "repeat", default_value_t = 3)]
        reps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Take x, y (and a, b) from a case file instead.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Print one JSON line only.
        #[arg(long)]
        json: bool,
        /// Time ImagesLoss (debiased loss, potentials and ∂loss/∂a) on random densities on
        /// this grid, e.g. 512x512 or 64x64x64.
        #[arg(
            long,
            value_parser = parse_grid_arg,
            conflicts_with_all = ["loss", "n", "m", "d", "backend", "truncate", "cluster_scale", "op", "input"]
        )]
        grid: Option<GridShape>,
        /// Batch items of the random --grid densities.
        #[arg(long, default_value_t = 1, conflicts_with = "load_npy")]
        batch: usize,
        /// Time ImagesLoss on these densities (.npy, (B, grid…) as grid.py saves them, or any
        /// shape with --grid), used as they are.
        #[arg(
            long,
            num_args = 2,
            value_names = ["A", "B"],
            conflicts_with_all = ["loss", "n", "m", "d", "backend", "truncate", "cluster_scale", "op", "input"]
        )]
        load_npy: Option<Vec<PathBuf>>,
        /// Grids: also time SamplesLoss (Sinkhorn, p = 2, online backend) on the pixel cloud,
        /// with the masses as weights, and report the ratio. Quadratic in the pixel count.
        #[arg(long)]
        compare_online: bool,
        /// Time a ragged batch of B pairs of random clouds (sizes log-uniform in [--min-size,
        /// --max-size], x and y drawn independently, a fixed function of --seed): the loss and
        /// ∂loss/∂x through forward_packed, the same clouds as a padded batch (zero weights on
        /// the padding), and one single cloud (--single-size) for the reference pair rate.
        #[arg(
            long,
            value_name = "B",
            conflicts_with_all = ["grid", "load_npy", "input", "n", "m", "op", "compare_online", "batch", "tol"]
        )]
        ragged: Option<usize>,
        /// --ragged: the smallest cloud size (default 100).
        #[arg(long, requires = "ragged")]
        min_size: Option<usize>,
        /// --ragged: the largest cloud size (default 10000).
        #[arg(long, requires = "ragged")]
        max_size: Option<usize>,
        /// --ragged: N = M of the single cloud that gives the reference pair rate (default
        /// --max-size).
        #[arg(long, requires = "ragged")]
        single_size: Option<usize>,
        /// --ragged: skip the padded batch (it visits B·N_max·M_max pairs and can be slow).
        #[arg(long, requires = "ragged")]
        no_padded: bool,
        /// Split the rows of x and y over MPI ranks and time SamplesLoss::solve_sharded:
        /// `mpirun -n P candle-ot bench --sharded …`. Rank 0 prints the line of `bench` plus
        /// the number of ranks (`"ranks": P` with --json); the other ranks print nothing. Needs
        /// the `mpi` feature (cargo build --release -p candle-ot-cli --features mpi).
        #[arg(
            long,
            conflicts_with_all = ["grid", "load_npy", "ragged", "compare_online", "op"]
        )]
        sharded: bool,
    },
}

/// A `--grid` shape (`512x512`).
#[derive(Clone, Debug)]
struct GridShape(Vec<usize>);

fn parse_grid_arg(s: &str) -> std::result::Result<GridShape, String> {
    bench::parse_grid_shape(s)
        .map(GridShape)
        .map_err(|e| e.to_string())
}

/// Parses `--axes lo,hi:lo,hi[:lo,hi]`.
fn parse_axes(s: &str) -> Result<Vec<(f64, f64)>> {
    s.split(':')
        .enumerate()
        .map(|(k, pair)| {
            let v: Vec<f64> = pair
                .split(',')
                .map(|x| x.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--axes {s:?}: expected lo,hi per grid axis separated by ':' (e.g. 0,2:0,1), axis {k} is {pair:?}"
                    )
                })?;
            match v[..] {
                [lo, hi] if lo.is_finite() && hi.is_finite() && hi > lo => Ok((lo, hi)),
                [_, _] => bail!("--axes {s:?}: axis {k} needs finite lo < hi, got {pair:?}"),
                _ => bail!(
                    "--axes {s:?}: expected lo,hi per grid axis separated by ':' (e.g. 0,2:0,1), axis {k} is {pair:?}"
                ),
            }
        })
        .collect()
}

/// The library's accuracy warning (not converged; the value may be more than 2 % from the
/// converged divergence), on stderr.
fn warn_accuracy(d: &candle_ot::SinkhornDiagnostics) {
    if let Some(w) = d.accuracy_warning() {
        eprintln!("warning: {w}");
    }
}

/// The arguments of `distance` on grids.
struct GridDistance<'a> {
    x: &'a std::path::Path,
    y: &'a std::path::Path,
    key: Option<&'a str>,
    grid: Option<u8>,
    invert: bool,
    axes: Option<&'a str>,
    loss: Option<LossArg>,
    p: u32,
    blur: Option<f64>,
    reach: Option<f64>,
    diameter: Option<f64>,
    scaling: f64,
    no_debias: bool,
    tol: Option<f64>,
    max_iter: Option<usize>,
    acceleration: candle_ot::Acceleration,
    require_convergence: bool,
    backend: BackendArg,
    dtype: DType,
    json: bool,
}

fn distance_grid(g: &GridDistance) -> Result<()> {
    let (x, y) = (g.x, g.y);
    if !matches!(g.loss, None | Some(LossArg::Sinkhorn)) {
        bail!("grids run the Sinkhorn divergence (ImagesLoss): --loss must be sinkhorn");
    }
    if g.diameter.is_some() {
        bail!("--diameter applies to point clouds: on a grid the ε schedule starts at the domain's largest extent (see --axes)");
    }
    if !matches!(g.backend, BackendArg::Auto) {
        bail!("--backend applies to point clouds: grids run ImagesLoss's exact separable softmin");
    }
    let dims = g.grid.map_or(2, usize::from);
    let gx = io::read_grid(x, g.key, dims, g.invert)?;
    let gy = io::read_grid(y, g.key, dims, g.invert)?;
    for (path, d) in [(x, &gx), (y, &gy)] {
        if let Some(c) = &d.converted_from {
            eprintln!(
                "note: {} is {c}: converted to grayscale (luma), alpha dropped",
                path.display()
            );
        }
    }
    if gx.grid() != gy.grid() {
        bail!(
            "{} is a {} grid but {} is {}: ImagesLoss compares densities on one grid; resize one of them to the other's size",
            x.display(),
            io::fmt_shape(gx.grid()),
            y.display(),
            io::fmt_shape(gy.grid())
        );
    }
    if gx.batch() != gy.batch() {
        bail!(
            "{} has batch axes {:?} but {} has {:?}: both densities must have the same shape",
            x.display(),
            gx.batch(),
            y.display(),
            gy.batch()
        );
    }
    let mut builder = ImagesLoss::builder(dims)
        .p(g.p)
        .blur(g.blur)
        .reach(g.reach)
        .scaling(g.scaling)
        .debias(!g.no_debias)
        .tol(g.tol)
        .acceleration(g.acceleration)
        .require_convergence(g.require_convergence);
    if let Some(m) = g.max_iter {
        builder = builder.max_iter(m);
    }
    if let Some(t) = g.tol {
        let max_iter = g
            .max_iter
            .unwrap_or(builder.clone().build()?.options().max_iter);
        builder = builder.observer(candle_ot_cli::progress_observer(t, max_iter));
    }
    if let Some(a) = g.axes {
        let axes = parse_axes(a)?;
        if axes.len() != dims {
            bail!(
                "--axes {a:?} gives {} axes but the grid has {dims}",
                axes.len()
            );
        }
        builder = builder.axes(&axes);
    }
    let loss = builder.build()?;
    let sol = loss.solve(&gx.masses.to_dtype(g.dtype)?, &gy.masses.to_dtype(g.dtype)?)?;
    warn_accuracy(&sol.diagnostics);
    let v = sol
        .loss
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    if g.json {
        let d = &sol.diagnostics;
        let out = serde_json::json!({
            "loss": v,
            "grid": gx.grid(),
            "batch": gx.batch(),
            "eps": sol.eps,
            "blur": sol.blur,
            "levels": d.levels,
            "pyramid": sol.pyramid,
            "pixel_pairs": sol.pixel_pairs,
            "iterations": d.eps_list.len() + d.extra_iterations,
            "softmin_passes": d.softmin_passes,
            "converged": d.converged,
        });
        println!("{out}");
    } else {
        let s: Vec<String> = v.iter().map(|v| format!("{v:.12e}")).collect();
        println!("{}", s.join(" "));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Eval {
            case,
            out,
            dtype,
            backend,
        } => {
            let c = eval::read_case(&case)?;
            let ev = eval::evaluate(&c, dtype.into(), backend.into())?;
            if let Some(d) = &ev.diagnostics {
                warn_accuracy(d);
            }
            eval::write_outputs(&ev.outputs, &out)?;
        }
        Cmd::Distance {
            x,
            y,
            key,
            loss,
            p,
            blur,
            reach,
            diameter,
            scaling,
            no_debias,
            tol,
            max_iter,
            acceleration,
            require_convergence,
            a,
            b,
            backend,
            dtype,
            threads,
            grid,
            invert,
            axes,
            json,
        } => {
            if let Some(t) = threads {
                candle_ot::set_num_threads(t)?;
            }
            if grid.is_some() || io::is_image(&x) || io::is_image(&y) {
                if a.is_some() || b.is_some() {
                    bail!(
                        "--a and --b apply to point clouds: a grid's pixel values are its masses"
                    );
                }
                return distance_grid(&GridDistance {
                    max_iter,
                    acceleration,
                    require_convergence,
                    x: &x,
                    y: &y,
                    key: key.as_deref(),
                    grid,
                    invert,
                    axes: axes.as_deref(),
                    loss,
                    p,
                    blur,
                    reach,
                    diameter,
                    scaling,
                    no_debias,
                    tol,
                    backend,
                    dtype: dtype.into(),
                    json,
                });
            }
            if invert || axes.is_some() {
                bail!("--invert and --axes apply to grids (.png inputs, or --grid 2|3)");
            }
            let mut opts = SamplesLossOptions {
                loss: loss.unwrap_or(LossArg::Sinkhorn).into(),
                p,
                blur: blur.unwrap_or(0.05),
                reach,
                diameter,
                scaling,
                debias: !no_debias,
                backend: backend.into(),
                tol,
                max_iter: max_iter.unwrap_or(SamplesLossOptions::default().max_iter),
                acceleration,
                require_convergence,
                ..Default::default()
            };
            opts.observer = tol.map(|t| candle_ot_cli::progress_observer(t, opts.max_iter));
            for (_, why) in opts.ignored() {
                eprintln!("warning: {why}");
            }
            let l = SamplesLoss::from_options(opts)?;
            let dt: DType = dtype.into();
            let xs = io::read_points(&x, key.as_deref())?.to_dtype(dt)?;
            let ys = io::read_points(&y, key.as_deref())?.to_dtype(dt)?;
            if xs.rank() != ys.rank() {
                bail!(
                    "{} is {:?} but {} is {:?}: both (N, D) or both (B, N, D)",
                    x.display(),
                    xs.dims(),
                    y.display(),
                    ys.dims()
                );
            }
            // Weights: (N,) / (B, N) tensors, or one-column text files.
            let weights = |p: &Option<PathBuf>| -> Result<Option<candle_core::Tensor>> {
                let Some(p) = p else { return Ok(None) };
                let w = io::read_points(p, key.as_deref())?;
                let w = if w.rank() == 2 && w.dim(1)? == 1 && xs.rank() == 2 {
                    w.squeeze(1)?
                } else {
                    w
                };
                Ok(Some(w.to_dtype(dt)?))
            };
            let (wa, wb) = (weights(&a)?, weights(&b)?);
            // The library names its arguments x and y (a, b): say which files they are.
            let sol = l
                .solve(wa.as_ref(), &xs, wb.as_ref(), &ys)
                .map_err(|e| anyhow::anyhow!("{e} (x = {}, y = {})", x.display(), y.display()))?;
            if let Some(d) = &sol.diagnostics {
                warn_accuracy(d);
            }
            let v = sol
                .loss
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            if json {
                println!("{}", serde_json::json!({ "loss": v }));
            } else {
                let s: Vec<String> = v.iter().map(|v| format!("{v:.12e}")).collect();
                println!("{}", s.join(" "));
            }
        }
        Cmd::Barycenter {
            inputs,
            weights,
            out,
            key,
            grid,
            invert,
            mode,
            p,
            blur,
            scaling_n,
            tol,
            max_iter,
            support,
            init,
            no_debias,
            backend,
            inner_tol,
            scaling,
            dtype,
            seed,
            threads,
        } => {
            if let Some(t) = threads {
                candle_ot::set_num_threads(t)?;
            }
            let summary = barycenter::run(&barycenter::BarycenterArgs {
                inputs,
                weights,
                out,
                key,
                grid: grid.map(usize::from),
                invert,
                mode: match mode {
                    ModeArg::Geomloss => barycenter::GridMode::Geomloss,
                    ModeArg::Converged => barycenter::GridMode::Converged,
                },
                p,
                blur,
                scaling_n,
                tol,
                max_iter,
                support,
                init,
                no_debias,
                backend: backend.into(),
                inner_tol,
                scaling,
                dtype: dtype.into(),
                seed,
            })?;
            println!("{summary}");
        }
        Cmd::Bench {
            loss,
            n,
            m,
            d,
            p,
            blur,
            scaling,
            no_debias,
            reach,
            tol,
            max_iter,
            acceleration,
            require_convergence,
            backend,
            truncate,
            cluster_scale,
            device,
            dtype,
            grad,
            op,
            reps,
            warmup,
            threads,
            seed,
            input,
            json,
            grid,
            batch,
            load_npy,
            compare_online,
            ragged,
            min_size,
            max_size,
            single_size,
            no_padded,
            sharded,
        } => {
            if let Some(t) = threads {
                candle_ot::set_num_threads(t)?;
            }
            let device = match device {
                DeviceArg::Cpu => candle_core::Device::Cpu,
                DeviceArg::Cuda => candle_core::Device::new_cuda(0)?,
                DeviceArg::Metal => candle_core::Device::new_metal(0)?,
            };
            if grid.is_some() || load_npy.is_some() {
                let cfg = bench::GridBenchConfig {
                    grid: grid.map(|g| g.0),
                    batch,
                    load: load_npy.map(|v| (v[0].clone(), v[1].clone())),
                    p,
                    blur,
                    reach,
                    scaling: scaling.unwrap_or(0.9),
                    debias: !no_debias,
                    tol,
                    device,
                    dtype: dtype.into(),
                    reps,
                    warmup,
                    seed,
                    compare_online,
                };
                let r = bench::run_grid(&cfg)?;
                print_grid_bench(&r, json);
                return Ok(());
            }
            let options = SamplesLossOptions {
                loss: loss.into(),
                p,
                blur: blur.unwrap_or(0.05),
                scaling: scaling.unwrap_or(0.5),
                debias: !no_debias,
                reach,
                tol,
                max_iter: max_iter.unwrap_or(SamplesLossOptions::default().max_iter),
                acceleration,
                require_convergence,
                backend: backend.into(),
                truncate: truncate.unwrap_or(5.0),
                cluster_scale,
                ..Default::default()
            };
            if let Some(items) = ragged {
                let max_size = max_size.unwrap_or(10_000);
                let cfg = bench::RaggedBenchConfig {
                    options,
                    items,
                    min_size: min_size.unwrap_or(100),
                    max_size,
                    d,
                    single_size: single_size.unwrap_or(max_size),
                    padded: !no_padded,
                    device,
                    dtype: dtype.into(),
                    reps,
                    warmup,
                    seed,
                };
                let r = bench::run_ragged(&cfg)?;
                print_ragged_bench(&cfg, &r, json);
                return Ok(());
            }
            if compare_online || batch != 1 {
                bail!(
                    "--compare-online and --batch apply to grid benchmarks (--grid or --load-npy)"
                );
            }
            let cfg = bench::BenchConfig {
                options,
                n,
                m,
                d,
                device,
                dtype: dtype.into(),
                grad,
                op: match op {
                    OpArg::Loss => bench::BenchOp::Loss,
                    OpArg::Softmin => bench::BenchOp::Softmin,
                },
                reps,
                warmup,
                seed,
                input,
            };
            let (r, ranks) = if sharded {
                match run_sharded_bench(&cfg)? {
                    Some(r) => r,
                    // Ranks other than 0 print nothing.
                    None => return Ok(()),
                }
            } else {
                (bench::run(&cfg)?, None)
            };
            if r.converged == Some(false) {
                eprintln!(
                    "warning: not converged after {} extra iterations (tol {:e}); raise --max-iter or --tol",
                    r.extra_iterations.unwrap_or(0),
                    cfg.options.tol.unwrap_or(f64::NAN)
                );
            }
            print_bench(&cfg, &r, json, ranks);
        }
    }
    Ok(())
}

/// `bench --sharded` over the ranks of `MPI_COMM_WORLD`: `Some((result, Some(ranks)))` on rank
/// 0, `None` on the others.
#[cfg(feature = "mpi")]
fn run_sharded_bench(
    cfg: &bench::BenchConfig,
) -> Result<Option<(bench::BenchResult, Option<usize>)>> {
    use candle_ot::distributed::{rsmpi, Collective, Mpi};
    let universe =
        rsmpi::initialize().ok_or_else(|| anyhow::anyhow!("MPI was already initialised"))?;
    let comm = Mpi::new(universe.world());
    let r = bench::run_sharded(cfg, &comm)?;
    Ok((comm.rank() == 0).then(|| (r, Some(comm.size()))))
}

#[cfg(not(feature = "mpi"))]
fn run_sharded_bench(
    _: &bench::BenchConfig,
) -> Result<Option<(bench::BenchResult, Option<usize>)>> {
    bail!("bench --sharded runs over MPI: build with --features mpi (cargo build --release -p candle-ot-cli --features mpi) and launch with mpirun -n P")
}

/// Prints a `bench` result: one JSON line with `json`, else text; `ranks`: the MPI ranks of a
/// `--sharded` run.
fn print_bench(cfg: &bench::BenchConfig, r: &bench::BenchResult, json: bool, ranks: Option<usize>) {
    if json {
        let kept = match (r.kept_pairs, r.kept_fraction) {
            (Some(k), Some(f)) => {
                format!(",\"kept_pairs\":{k},\"kept_fraction\":{f:e}")
            }
            _ => String::new(),
        };
        let mut kept = kept;
        if let (Some(p), Some(e)) = (r.softmin_passes, r.extra_iterations) {
            kept.push_str(&format!(",\"softmin_passes\":{p},\"extra_iterations\":{e}"));
        }
        if let Some(c) = r.converged {
            kept.push_str(&format!(",\"converged\":{c}"));
        }
        if let Some(e) = r.update_error {
            kept.push_str(&format!(",\"update_error\":{e:e}"));
        }
        if let Some(e) = r.marginal_error {
            kept.push_str(&format!(",\"marginal_error\":{e:e}"));
        }
        if let Some(p) = ranks {
            kept.push_str(&format!(",\"ranks\":{p}"));
        }
        println!(
            "{{\"median_s\":{:e},\"pairs\":{:e},\"pairs_per_s\":{:e},\"peak_rss_bytes\":{},\"loss\":{:e}{kept}}}",
            r.median_s, r.pairs, r.pairs_per_s, r.peak_rss_bytes, r.loss
        );
    } else {
        println!(
            "median {:.4} s over {} runs ({:?}), {:.3e} pairs, {:.3e} pairs/s, peak RSS {:.1} MiB, {} {:.9e}, {} threads",
            r.median_s,
            r.times_s.len(),
            r.times_s,
            r.pairs,
            r.pairs_per_s,
            r.peak_rss_bytes as f64 / (1024.0 * 1024.0),
            if matches!(cfg.op, bench::BenchOp::Softmin) { "mean softmin" } else { "loss" },
            r.loss,
            candle_ot::num_threads()
        );
        if let Some(p) = ranks {
            println!(
                "sharded over {p} MPI ranks ({} threads each)",
                candle_ot::num_threads()
            );
        }
        if let (Some(p), Some(e)) = (r.softmin_passes, r.extra_iterations) {
            println!(
                "sinkhorn: {p} softmin passes, {e} extra tol iterations (converged: {:?}, update error {:?}, marginal L1 error {:?})",
                r.converged, r.update_error, r.marginal_error
            );
        }
        if let (Some(k), Some(f)) = (r.kept_pairs, r.kept_fraction) {
            println!(
                "multiscale: kept {k} point pairs of C_xy ({:.2} % of N·M)",
                100.0 * f
            );
        }
    }
}

fn print_ragged_bench(cfg: &bench::RaggedBenchConfig, r: &bench::RaggedBenchResult, json: bool) {
    let dtype = if cfg.dtype == DType::F64 {
        "f64"
    } else {
        "f32"
    };
    let backend = format!("{:?}", cfg.options.backend).to_lowercase();
    if json {
        let out = serde_json::json!({
            "mode": "ragged",
            "items": cfg.items,
            "d": cfg.d,
            "min_size": cfg.min_size,
            "max_size": cfg.max_size,
            "seed": cfg.seed,
            "dtype": dtype,
            "backend": backend,
            "threads": candle_ot::num_threads(),
            "x_lengths": r.x_lengths,
            "y_lengths": r.y_lengths,
            "total_pairs": r.total_pairs,
            "padded_pairs": r.padded_pairs,
            "pairs": r.pairs,
            "schedule_steps": r.schedule_steps,
            "diameter": r.diameter,
            "median_s": r.ragged_s,
            "pairs_per_s": r.ragged_pairs_per_s,
            "ragged_s": r.ragged_s,
            "ragged_times_s": r.ragged_times_s,
            "ragged_pairs_per_s": r.ragged_pairs_per_s,
            "loss": r.loss,
            "padded_s": r.padded_s,
            "padded_times_s": r.padded_times_s,
            "speedup_vs_padded": r.speedup_vs_padded,
            "padded_loss_rel_diff": r.padded_loss_rel_diff,
            "single_size": cfg.single_size,
            "single_s": r.single.median_s,
            "single_pairs": r.single.pairs,
            "single_pairs_per_s": r.single.pairs_per_s,
            "vs_single_cloud_rate": r.vs_single_cloud_rate,
            "peak_rss_bytes": r.peak_rss_bytes,
        });
        println!("{out}");
        return;
    }
    println!(
        "ragged: {} items, sizes {}..{} (log-uniform), D = {}, {dtype}, {backend}, {} threads: Σ N_b·M_b = {:.3e} pairs (padded B·N_max·M_max = {:.3e}), work {:.3e} pairs",
        cfg.items,
        cfg.min_size,
        cfg.max_size,
        cfg.d,
        candle_ot::num_threads(),
        r.total_pairs,
        r.padded_pairs,
        r.pairs
    );
    println!(
        "forward_packed + ∂/∂x: median {:.4} s over {} runs ({:?}), {:.3e} pairs/s, summed loss {:.9e}",
        r.ragged_s,
        r.ragged_times_s.len(),
        r.ragged_times_s,
        r.ragged_pairs_per_s,
        r.loss
    );
    if let (Some(s), Some(t), Some(x), Some(e)) = (
        r.padded_s,
        &r.padded_times_s,
        r.speedup_vs_padded,
        r.padded_loss_rel_diff,
    ) {
        println!(
            "padded batch (forward_weighted, zero weights on the padding) + ∂/∂x: median {s:.4} s ({t:?}); ragged speedup {x:.2}× (losses agree to {e:.1e})"
        );
    }
    println!(
        "single cloud N = M = {}: median {:.4} s, {:.3e} pairs/s; ragged time over the same work at that rate: {:.3}",
        cfg.single_size, r.single.median_s, r.single.pairs_per_s, r.vs_single_cloud_rate
    );
    println!(
        "peak RSS {:.1} MiB",
        r.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    );
}

fn print_grid_bench(r: &bench::GridBenchResult, json: bool) {
    if json {
        let mut out = serde_json::json!({
            "median_s": r.median_s,
            "pairs": r.pixel_pairs as f64,
            "pairs_per_s": r.pixel_pairs_per_s,
            "pixel_pairs": r.pixel_pairs,
            "pixel_pairs_per_s": r.pixel_pairs_per_s,
            "peak_rss_bytes": r.peak_rss_bytes,
            "loss": r.loss,
            "grid": r.grid,
            "batch": r.batch,
            "eps": r.eps,
            "blur": r.blur,
            "levels": r.levels,
            "iterations": r.iterations,
            "times_s": r.times_s,
        });
        if let Some(o) = &r.online {
            out["online_median_s"] = o.median_s.into();
            out["online_pairs"] = o.pairs.into();
            out["online_loss"] = o.loss.into();
            out["online_peak_rss_bytes"] = o.peak_rss_bytes.into();
            out["online_over_grid"] = o.ratio.into();
        }
        println!("{out}");
        return;
    }
    println!(
        "median {:.4} s over {} runs ({:?}), grid {} × B = {}, {:.3e} pixel pairs, {:.3e} pixel pairs/s, peak RSS {:.1} MiB, loss {:.9e}, ε {:.3e} (blur {:.3e}), {} levels, {} iterations, {} threads",
        r.median_s,
        r.times_s.len(),
        r.times_s,
        io::fmt_shape(&r.grid),
        r.batch,
        r.pixel_pairs as f64,
        r.pixel_pairs_per_s,
        r.peak_rss_bytes as f64 / (1024.0 * 1024.0),
        r.loss,
        r.eps,
        r.blur,
        r.levels,
        r.iterations,
        candle_ot::num_threads()
    );
    if let Some(o) = &r.online {
        println!(
            "online SamplesLoss on the pixel cloud: median {:.4} s ({:?}), {:.3e} pairs, loss {:.9e}, peak RSS {:.1} MiB; {:.1}× the grid's time",
            o.median_s,
            o.times_s,
            o.pairs,
            o.loss,
            o.peak_rss_bytes as f64 / (1024.0 * 1024.0),
            o.ratio
        );
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("candle-ot: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
