//! `candle-ot`: evaluate OT losses on reference files and compute distances between clouds.

use anyhow::{bail, Result};
use candle_core::DType;
use candle_ot::{Backend, Loss, SamplesLoss, SamplesLossOptions};
use candle_ot_cli::{bench, eval, io};
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

#[derive(Subcommand)]
enum Cmd {
    /// Evaluate a case file (x, y, optional a, b, l; options in the metadata key `params`) and
    /// write loss, gradients, potentials (and labels_i) as f64 safetensors.
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
    /// Print the loss between two point clouds (.npy, .safetensors or .csv), uniform weights.
    Distance {
        /// The first cloud, (N, D) or (B, N, D).
        x: PathBuf,
        /// The second cloud, (M, D) or (B, M, D).
        y: PathBuf,
        /// Tensor name inside .safetensors files.
        #[arg(long)]
        key: Option<String>,
        #[arg(long, value_enum, default_value = "sinkhorn")]
        loss: LossArg,
        #[arg(long, default_value_t = 2)]
        p: u32,
        #[arg(long, default_value_t = 0.05)]
        blur: f64,
        #[arg(long)]
        reach: Option<f64>,
        #[arg(long)]
        diameter: Option<f64>,
        #[arg(long, default_value_t = 0.5)]
        scaling: f64,
        /// Raw OT_ε instead of the debiased divergence.
        #[arg(long)]
        no_debias: bool,
        #[arg(long)]
        tol: Option<f64>,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        #[arg(long, value_enum, default_value = "f64")]
        dtype: DtypeArg,
        /// Number of CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Time the loss (and gradient) or one softmin pass on random or given points; report
    /// the median time, the pair count, pairs per second and the peak RSS.
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
        #[arg(long, default_value_t = 0.05)]
        blur: f64,
        #[arg(long, default_value_t = 0.5)]
        scaling: f64,
        #[arg(long)]
        no_debias: bool,
        #[arg(long)]
        reach: Option<f64>,
        #[arg(long)]
        tol: Option<f64>,
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
        #[arg(long, default_value_t = 3)]
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
    },
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
                if d.converged == Some(false) {
                    eprintln!(
                        "warning: not converged after {} extra iterations (update error {:.3e} ≥ tol)",
                        d.extra_iterations, d.update_error
                    );
                }
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
            backend,
            dtype,
            threads,
        } => {
            if let Some(t) = threads {
                candle_ot::set_num_threads(t)?;
            }
            let opts = SamplesLossOptions {
                loss: loss.into(),
                p,
                blur,
                reach,
                diameter,
                scaling,
                debias: !no_debias,
                backend: backend.into(),
                tol,
                ..Default::default()
            };
            let l = SamplesLoss::from_options(opts)?;
            let dt: DType = dtype.into();
            let xs = io::read_points(&x, key.as_deref())?.to_dtype(dt)?;
            let ys = io::read_points(&y, key.as_deref())?.to_dtype(dt)?;
            if xs.rank() != ys.rank() {
                bail!(
                    "x is {:?} but y is {:?}: both (N, D) or both (B, N, D)",
                    xs.dims(),
                    ys.dims()
                );
            }
            let v = l
                .forward(&xs, &ys)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let s: Vec<String> = v.iter().map(|v| format!("{v:.12e}")).collect();
            println!("{}", s.join(" "));
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
        } => {
            if let Some(t) = threads {
                candle_ot::set_num_threads(t)?;
            }
            let device = match device {
                DeviceArg::Cpu => candle_core::Device::Cpu,
                DeviceArg::Cuda => candle_core::Device::new_cuda(0)?,
                DeviceArg::Metal => candle_core::Device::new_metal(0)?,
            };
            let cfg = bench::BenchConfig {
                options: SamplesLossOptions {
                    loss: loss.into(),
                    p,
                    blur,
                    scaling,
                    debias: !no_debias,
                    reach,
                    tol,
                    backend: backend.into(),
                    truncate: truncate.unwrap_or(5.0),
                    cluster_scale,
                    ..Default::default()
                },
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
            let r = bench::run(&cfg)?;
            if json {
                let kept = match (r.kept_pairs, r.kept_fraction) {
                    (Some(k), Some(f)) => {
                        format!(",\"kept_pairs\":{k},\"kept_fraction\":{f:e}")
                    }
                    _ => String::new(),
                };
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
                if let (Some(k), Some(f)) = (r.kept_pairs, r.kept_fraction) {
                    println!(
                        "multiscale: kept {k} point pairs of C_xy ({:.2} % of N·M)",
                        100.0 * f
                    );
                }
            }
        }
    }
    Ok(())
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
