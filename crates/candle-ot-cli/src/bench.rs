//! `candle-ot bench`: time the loss (and gradient) or one softmin pass, report pairs/second.
//!
//! Inputs are uniform random points in the unit cube, a fixed function of (seed, n, m, d)
//! generated on the host in f64 and then cast, so that every backend, device, dtype and thread
//! count sees the same points; or the `x`, `y` (and `a`, `b`) of a case file.
//!
//! The pair count is the work of the algorithm, not of the implementation:
//! `(K + 2)·(2NM + [debias](N² + M²))` for the Sinkhorn loss, with K the length of the ε list
//! plus the extra `tol` iterations; plus `NM (+ N²` when debiased) with `--grad`; `NM` for
//! `--op softmin`. The multiscale backend does less work than that count (its coarse level and
//! its kept blocks): its pairs/s is the equivalent rate, and `kept_pairs` reports the kept
//! point pairs of C_xy.
//!
//! Ragged batches ([`run_ragged`], `--ragged 64 --min-size 100 --max-size 10000`): B pairs of
//! clouds with log-uniform sizes (x and y drawn independently, [`random_ragged_clouds`]); one
//! timed run is the loss plus ∂loss/∂x through [`SamplesLoss::forward_packed`], next to the
//! same clouds as a padded batch (B, N_max, D) with zero weights on the padding
//! (`forward_weighted`), and to one single cloud of `--single-size` points for the reference
//! pair rate. The work is the pair count above summed over the items.
//!
//! Grids ([`run_grid`], `--grid 512x512`): [`candle_ot::ImagesLoss`] on random densities
//! (uniform(0, 1) per pixel, then divided by their sum per batch item: the distribution of
//! `scripts/geomloss-bench/grid.py`'s inputs, from a different generator) or on two `.npy`
//! files (`--load-npy`, e.g. the inputs `grid.py --save-inputs` wrote). One timed run is one
//! `solve` (the debiased loss and the potentials F, G) plus the backward pass for ∂loss/∂a.
//! The work is [`candle_ot::ImagesSolution::pixel_pairs`]: `Σ N_l · Σ_k n_{l,k}` over the
//! softmins, the count `grid.py` reports for GeomLoss.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_ot::{Backend, CostKind, ImagesLoss, Loss, SamplesLoss, SamplesLossOptions};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

/// What to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    /// The loss (and its gradient with `grad`).
    Loss,
    /// One softmin pass of x against y.
    Softmin,
}

/// A benchmark run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Loss options (backend included).
    pub options: SamplesLossOptions,
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub device: Device,
    pub dtype: DType,
    pub grad: bool,
    pub op: BenchOp,
    pub reps: usize,
    pub warmup: usize,
    pub seed: u64,
    /// Points (and weights) from a case file instead of random ones.
    pub input: Option<std::path::PathBuf>,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub median_s: f64,
    pub pairs: f64,
    pub pairs_per_s: f64,
    pub peak_rss_bytes: u64,
    pub loss: f64,
    pub times_s: Vec<f64>,
    /// Multiscale only: kept point pairs of C_xy (block-sparse), and their fraction of N·M.
    pub kept_pairs: Option<u64>,
    pub kept_fraction: Option<f64>,
    /// Sinkhorn only: the softmin passes of one solve (`SinkhornDiagnostics::softmin_passes`),
    /// its extra `tol` iterations, and whether `tol` was met.
    pub softmin_passes: Option<usize>,
    pub extra_iterations: Option<usize>,
    pub converged: Option<bool>,
    /// Sinkhorn with `tol`: the update error (units of ε) and the L1 marginal error of the
    /// returned plan (`SinkhornDiagnostics::update_error`, `marginal_error`).
    pub update_error: Option<f64>,
    pub marginal_error: Option<f64>,
    /// Sinkhorn only: K, the length of the ε list plus the extra `tol` iterations (the K of
    /// the pair count, see [`loss_pairs`]).
    pub schedule_steps: Option<usize>,
}

/// The work of one loss evaluation on an (N, M) problem, in point pairs (the module docs'
/// convention): `(K + 2)·(2NM + [debias](N² + M²))` for the Sinkhorn loss (K: `schedule_steps`,
/// the ε list plus the extra `tol` iterations), `2NM + …` once for the other losses, plus
/// `NM (+ N²` when debiased) with the gradient with respect to x (`grad`).
pub fn loss_pairs(
    o: &SamplesLossOptions,
    n: usize,
    m: usize,
    schedule_steps: usize,
    grad: bool,
) -> f64 {
    let (nf, mf) = (n as f64, m as f64);
    let debias = o.debias && o.loss == Loss::Sinkhorn;
    let per_pass = 2.0 * nf * mf + if debias { nf * nf + mf * mf } else { 0.0 };
    let passes = if o.loss == Loss::Sinkhorn {
        (schedule_steps + 2) as f64
    } else {
        1.0
    };
    let grad = if grad {
        nf * mf + if debias { nf * nf } else { 0.0 }
    } else {
        0.0
    };
    passes * per_pass + grad
}

/// Uniform points in the unit cube, a fixed function of (seed, n, m, d): (x (N, D), y (M, D)) in f64.
pub fn random_clouds(seed: u64, n: usize, m: usize, d: usize) -> Result<(Tensor, Tensor)> {
    let key = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (n as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (m as u64).wrapping_mul(0x1656_67B1_9E37_79F9)
        ^ (d as u64).wrapping_mul(0x27D4_EB2F_1656_67C5);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    let x: Vec<f64> = (0..n * d).map(|_| rng.random::<f64>()).collect();
    let y: Vec<f64> = (0..m * d).map(|_| rng.random::<f64>()).collect();
    Ok((
        Tensor::from_vec(x, (n, d), &Device::Cpu)?,
        Tensor::from_vec(y, (m, d), &Device::Cpu)?,
    ))
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let k = s.len();
    if k % 2 == 1 {
        s[k / 2]
    } else {
        0.5 * (s[k / 2 - 1] + s[k / 2])
    }
}

/// Runs the benchmark.
pub fn run(cfg: &BenchConfig) -> Result<BenchResult> {
    let (x, y, a, b) = match &cfg.input {
        Some(path) => {
            let case = crate::eval::read_case(path)?;
            let t = |k: &str| case.tensors.get(k).cloned();
            (
                t("x").ok_or_else(|| anyhow!("{} has no x", path.display()))?,
                t("y").ok_or_else(|| anyhow!("{} has no y", path.display()))?,
                t("a"),
                t("b"),
            )
        }
        None => {
            let (x, y) = random_clouds(cfg.seed, cfg.n, cfg.m, cfg.d)?;
            (x, y, None, None)
        }
    };
    let dims = |t: &Tensor| -> (usize, usize) {
        let r = t.rank();
        (t.dims()[..r - 1].iter().product(), t.dims()[r - 2])
    };
    let (_, n) = dims(&x);
    let (_, m) = dims(&y);
    let batch = if x.rank() == 3 { x.dim(0)? } else { 1 };
    let to_dev =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(cfg.dtype)?.to_device(&cfg.device)?) };
    let (x, y) = (to_dev(&x)?, to_dev(&y)?);
    let a = a.map(|t| to_dev(&t)).transpose()?;
    let b = b.map(|t| to_dev(&t)).transpose()?;
    let loss = SamplesLoss::from_options(cfg.options.clone())?;
    let o = loss.options();
    let (nf, mf) = (n as f64, m as f64);

    let mut times = Vec::with_capacity(cfg.reps);
    let mut value = 0.0;
    let mut k_passes = 0usize;
    let mut kept = None;
    let mut diag = None;
    for rep in 0..cfg.warmup + cfg.reps {
        cfg.device.synchronize()?;
        let t0 = Instant::now();
        match cfg.op {
            BenchOp::Softmin => {
                let cost = CostKind::from_p(o.p).ok_or_else(|| anyhow!("p must be 1 or 2"))?;
                let eps = o.blur.powf(o.p as f64);
                let x3 = if x.rank() == 2 {
                    x.unsqueeze(0)?
                } else {
                    x.clone()
                };
                let y3 = if y.rank() == 2 {
                    y.unsqueeze(0)?
                } else {
                    y.clone()
                };
                let h = Tensor::full(-(mf.ln()), (batch, m), &cfg.device)?.to_dtype(cfg.dtype)?;
                let f = candle_ot::softmin::online::softmin(cost, eps, &x3, &y3, &h)?;
                cfg.device.synchronize()?;
                times.push(t0.elapsed().as_secs_f64());
                value = f.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            BenchOp::Loss => {
                let xv = Var::from_tensor(&x)?;
                let xt = if cfg.grad {
                    xv.as_tensor().clone()
                } else {
                    x.clone()
                };
                let sol = loss.solve(a.as_ref(), &xt, b.as_ref(), &y)?;
                let total = sol.loss.sum_all()?;
                if cfg.grad {
                    let g = total.backward()?;
                    let gx = g
                        .get(xv.as_tensor())
                        .ok_or_else(|| anyhow!("no gradient for x"))?;
                    gx.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                }
                cfg.device.synchronize()?;
                times.push(t0.elapsed().as_secs_f64());
                value = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if let Some(d) = &sol.diagnostics {
                    k_passes = d.eps_list.len() + d.extra_iterations;
                    diag = Some((
                        d.softmin_passes,
                        d.extra_iterations,
                        d.converged,
                        d.update_error,
                        d.marginal_error,
                    ));
                }
                kept = sol
                    .multiscale
                    .as_ref()
                    .map(|ms| (ms.kept_pairs, ms.kept_fraction));
            }
        }
        if rep < cfg.warmup {
            times.pop();
        }
    }
    if times.is_empty() {
        bail!("--reps must be at least 1");
    }
    let bf = batch as f64;
    let pairs = match cfg.op {
        BenchOp::Softmin => bf * nf * mf,
        BenchOp::Loss => bf * loss_pairs(o, n, m, k_passes, cfg.grad),
    };
    let median_s = median(&times);
    Ok(BenchResult {
        median_s,
        pairs,
        pairs_per_s: pairs / median_s,
        peak_rss_bytes: peak_rss_bytes(),
        loss: value,
        times_s: times,
        kept_pairs: kept.map(|k| k.0),
        kept_fraction: kept.map(|k| k.1),
        softmin_passes: diag.map(|d| d.0),
        extra_iterations: diag.map(|d| d.1),
        converged: diag.and_then(|d| d.2),
        update_error: diag.and_then(|d| d.2.map(|_| d.3)),
        marginal_error: diag.and_then(|d| d.4),
        schedule_steps: diag.map(|_| k_passes),
    })
}

/// `bench --sharded`: the loss (and its gradient with `grad`) of [`run`]'s problem, with the
/// rows of x and y split evenly over the ranks of `comm`
/// ([`candle_ot::distributed::shard_range`]) and solved by
/// [`SamplesLoss::solve_sharded`]. Every rank builds the same inputs and keeps its rows. A run
/// is timed by its slowest rank (the times are all-reduced with max); the pair count is the
/// whole problem's, so `pairs_per_s` is the rate of all ranks together; `peak_rss_bytes` is the
/// largest over the ranks. Every rank returns the same result.
pub fn run_sharded(
    cfg: &BenchConfig,
    comm: &dyn candle_ot::distributed::Collective,
) -> Result<BenchResult> {
    use candle_ot::distributed::{shard_range, ReduceOp};
    if cfg.op != BenchOp::Loss {
        bail!("bench --sharded times the loss (--op loss), not one softmin pass");
    }
    let (x, y, a, b) = match &cfg.input {
        Some(path) => {
            let case = crate::eval::read_case(path)?;
            let t = |k: &str| case.tensors.get(k).cloned();
            (
                t("x").ok_or_else(|| anyhow!("{} has no x", path.display()))?,
                t("y").ok_or_else(|| anyhow!("{} has no y", path.display()))?,
                t("a"),
                t("b"),
            )
        }
        None => {
            let (x, y) = random_clouds(cfg.seed, cfg.n, cfg.m, cfg.d)?;
            (x, y, None, None)
        }
    };
    // The points axis: 0 for (N, D), 1 for (B, N, D); weights (N,) or (B, N) alike.
    let axis = x.rank() - 2;
    let (n, m) = (x.dim(axis)?, y.dim(axis)?);
    let batch = if x.rank() == 3 { x.dim(0)? } else { 1 };
    let (rank, size) = (comm.rank(), comm.size());
    let (xr, yr) = (shard_range(n, rank, size), shard_range(m, rank, size));
    let shard = |t: &Tensor, r: &std::ops::Range<usize>| -> Result<Tensor> {
        Ok(t.narrow(axis, r.start, r.len())?
            .to_dtype(cfg.dtype)?
            .to_device(&cfg.device)?)
    };
    let (x, y) = (shard(&x, &xr)?, shard(&y, &yr)?);
    let a = a.map(|t| shard(&t, &xr)).transpose()?;
    let b = b.map(|t| shard(&t, &yr)).transpose()?;
    let loss = SamplesLoss::from_options(cfg.options.clone())?;
    let o = loss.options();
    let (mut times, mut value, mut k_passes, mut diag) = (Vec::new(), 0.0, 0usize, None);
    for rep in 0..cfg.warmup + cfg.reps {
        cfg.device.synchronize()?;
        let t0 = Instant::now();
        let xv = Var::from_tensor(&x)?;
        let xt = if cfg.grad {
            xv.as_tensor().clone()
        } else {
            x.clone()
        };
        let sol = loss.solve_sharded(comm, a.as_ref(), &xt, b.as_ref(), &y)?;
        let total = sol.loss.sum_all()?;
        if cfg.grad {
            let g = total.backward()?;
            // A rank without points of x has no gradient to read.
            if let Some(gx) = g.get(xv.as_tensor()) {
                gx.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
        }
        cfg.device.synchronize()?;
        let t = comm.all_reduce(&[t0.elapsed().as_secs_f64()], ReduceOp::Max)?[0];
        if rep >= cfg.warmup {
            times.push(t);
        }
        value = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if let Some(d) = &sol.diagnostics {
            k_passes = d.eps_list.len() + d.extra_iterations;
            diag = Some((d.softmin_passes, d.extra_iterations, d.converged));
        }
    }
    if times.is_empty() {
        bail!("--reps must be at least 1");
    }
    let pairs = batch as f64 * loss_pairs(o, n, m, k_passes, cfg.grad);
    let median_s = median(&times);
    let rss = comm.all_reduce(&[peak_rss_bytes() as f64], ReduceOp::Max)?[0] as u64;
    Ok(BenchResult {
        median_s,
        pairs,
        pairs_per_s: pairs / median_s,
        peak_rss_bytes: rss,
        loss: value,
        times_s: times,
        kept_pairs: None,
        kept_fraction: None,
        softmin_passes: diag.map(|d| d.0),
        extra_iterations: diag.map(|d| d.1),
        converged: diag.and_then(|d| d.2),
        update_error: None,
        marginal_error: None,
        schedule_steps: diag.map(|_| k_passes),
    })
}

// ---------------------------------------------------------------------------------------
// Grids.

/// A grid benchmark: [`ImagesLoss`] on random or given densities (module docs).
#[derive(Clone, Debug)]
pub struct GridBenchConfig {
    /// The grid of the random densities (2 or 3 axes); with `load`, the grid the files must
    /// have (`None`: the files are `(B, grid…)`, `grid.py`'s layout).
    pub grid: Option<Vec<usize>>,
    /// Batch items of the random densities.
    pub batch: usize,
    /// Densities `a`, `b` from two `.npy` files instead, used as they are (not renormalised).
    pub load: Option<(PathBuf, PathBuf)>,
    /// 1 or 2.
    pub p: u32,
    /// `None`: one pixel.
    pub blur: Option<f64>,
    pub reach: Option<f64>,
    pub scaling: f64,
    pub debias: bool,
    pub tol: Option<f64>,
    pub device: Device,
    pub dtype: DType,
    pub reps: usize,
    pub warmup: usize,
    pub seed: u64,
    /// Also time [`SamplesLoss`] (Sinkhorn, p = 2, online backend) on the pixel cloud.
    pub compare_online: bool,
}

/// [`SamplesLoss`] with the online backend on the pixel cloud, next to the grid solver.
#[derive(Clone, Debug)]
pub struct OnlineComparison {
    pub median_s: f64,
    pub times_s: Vec<f64>,
    /// Point pairs its softmin passes reduced: passes · N² · B.
    pub pairs: f64,
    /// The summed loss (single-scale ε-scaling on the cloud: close to, not equal to, the grid's).
    pub loss: f64,
    /// Peak RSS after the online runs (the process's, grid runs included).
    pub peak_rss_bytes: u64,
    /// Online time over grid time.
    pub ratio: f64,
}

/// What a grid run measured.
#[derive(Clone, Debug)]
pub struct GridBenchResult {
    /// The grid and the batch size.
    pub grid: Vec<usize>,
    pub batch: usize,
    pub median_s: f64,
    pub times_s: Vec<f64>,
    /// [`candle_ot::ImagesSolution::pixel_pairs`] of one run.
    pub pixel_pairs: u64,
    pub pixel_pairs_per_s: f64,
    /// Peak RSS after the grid runs.
    pub peak_rss_bytes: u64,
    /// The summed loss.
    pub loss: f64,
    pub eps: f64,
    pub blur: f64,
    /// Pyramid levels the loop ran on, and its ε steps (schedule + extra `tol` iterations).
    pub levels: usize,
    pub iterations: usize,
    pub online: Option<OnlineComparison>,
}

/// Parses a grid shape `512x512` or `64x64x64` (`x`, `X` or `×` between the sizes).
pub fn parse_grid_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Vec<usize> = s
        .split(['x', 'X', '×'])
        .map(|n| n.trim().parse::<usize>().ok().filter(|n| *n > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow!("bad grid {s:?}: expected sizes like 512x512 or 64x64x64"))?;
    if !(dims.len() == 2 || dims.len() == 3) {
        bail!("bad grid {s:?}: 2 (image) or 3 (volume) sizes, like 512x512 or 64x64x64");
    }
    Ok(dims)
}

/// Random densities `(a, b)`, `(batch, grid…)` in f64: uniform(0, 1) per pixel, divided by the
/// sum of each batch item; a fixed function of (seed, batch, grid).
pub fn random_densities(seed: u64, batch: usize, grid: &[usize]) -> Result<(Tensor, Tensor)> {
    let mut key = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (batch as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    for (k, &n) in grid.iter().enumerate() {
        key ^= (n as u64)
            .wrapping_mul(0x1656_67B1_9E37_79F9)
            .rotate_left(7 * (k as u32 + 1));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    let n: usize = grid.iter().product();
    let mut shape = vec![batch];
    shape.extend_from_slice(grid);
    let mut one = || -> Result<Tensor> {
        let mut v: Vec<f64> = (0..batch * n).map(|_| rng.random::<f64>()).collect();
        for item in v.chunks_mut(n) {
            let s: f64 = item.iter().sum();
            item.iter_mut().for_each(|x| *x /= s);
        }
        Ok(Tensor::from_vec(v, shape.clone(), &Device::Cpu)?)
    };
    let a = one()?;
    let b = one()?;
    Ok((a, b))
}

/// The scalar sum of `t` in f64 (reading it also waits for the device).
fn total(t: &Tensor) -> Result<f64> {
    Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Runs the grid benchmark.
pub fn run_grid(cfg: &GridBenchConfig) -> Result<GridBenchResult> {
    if cfg.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if cfg.compare_online && cfg.p != 2 {
        bail!("--compare-online needs --p 2: the grid's p = 1 cost is the L1 distance, the point clouds' the Euclidean one");
    }
    let (a, b, dims) = match &cfg.load {
        Some((pa, pb)) => {
            let read = |p: &PathBuf| -> Result<Tensor> {
                let t = crate::io::read_npy(p)?;
                if !t.dtype().is_float() {
                    bail!(
                        "{}: densities must be floating point, got {:?}",
                        p.display(),
                        t.dtype()
                    );
                }
                Ok(t)
            };
            let (a, b) = (read(pa)?, read(pb)?);
            let dims = match &cfg.grid {
                Some(g) => g.len(),
                None => match a.rank().checked_sub(1) {
                    Some(d @ (2 | 3)) => d,
                    _ => bail!(
                        "{} is {:?}: without --grid the files must be (B, n1, n2) or (B, n1, n2, n3) (grid.py's layout); name the grid with --grid",
                        pa.display(),
                        a.dims()
                    ),
                },
            };
            for (p, t) in [(pa, &a), (pb, &b)] {
                let r = t.rank();
                if r < dims
                    || cfg
                        .grid
                        .as_ref()
                        .is_some_and(|g| t.dims()[r - dims..] != g[..])
                {
                    bail!(
                        "{} is {:?}, not a density on the grid {}",
                        p.display(),
                        t.dims(),
                        cfg.grid
                            .as_ref()
                            .map(|g| crate::io::fmt_shape(g))
                            .unwrap_or_else(|| format!("of {dims} axes"))
                    );
                }
            }
            if a.dims() != b.dims() {
                bail!(
                    "{} is {:?} but {} is {:?}: ImagesLoss compares densities on one grid (and the same batch axes)",
                    pa.display(),
                    a.dims(),
                    pb.display(),
                    b.dims()
                );
            }
            (a, b, dims)
        }
        None => {
            let grid = cfg
                .grid
                .as_ref()
                .ok_or_else(|| anyhow!("a grid benchmark needs --grid (or --load-npy)"))?;
            if cfg.batch == 0 {
                bail!("--batch must be at least 1");
            }
            let (a, b) = random_densities(cfg.seed, cfg.batch, grid)?;
            (a, b, grid.len())
        }
    };
    let rank = a.rank();
    let grid = a.dims()[rank - dims..].to_vec();
    let batch: usize = a.dims()[..rank - dims].iter().product();
    let to_dev =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(cfg.dtype)?.to_device(&cfg.device)?) };
    let (a, b) = (to_dev(&a)?, to_dev(&b)?);
    let loss = ImagesLoss::builder(dims)
        .p(cfg.p)
        .blur(cfg.blur)
        .reach(cfg.reach)
        .scaling(cfg.scaling)
        .debias(cfg.debias)
        .tol(cfg.tol)
        .build()?;

    let mut times = Vec::with_capacity(cfg.reps);
    let mut last = None;
    for rep in 0..cfg.warmup + cfg.reps {
        cfg.device.synchronize()?;
        let av = Var::from_tensor(&a)?;
        let t0 = Instant::now();
        let sol = loss.solve(av.as_tensor(), &b)?;
        let sum = sol.loss.sum_all()?;
        let g = sum.backward()?;
        let ga = g
            .get(av.as_tensor())
            .ok_or_else(|| anyhow!("no gradient for a"))?;
        total(ga)?;
        total(&sol.f)?;
        total(&sol.g)?;
        cfg.device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if rep >= cfg.warmup {
            times.push(dt);
        }
        last = Some((total(&sum)?, sol));
    }
    let (value, sol) = last.expect("at least one run");
    let median_s = median(&times);
    let peak_grid = peak_rss_bytes();
    let d = &sol.diagnostics;

    let online = if cfg.compare_online {
        Some(compare_online(
            cfg, &a, &b, &grid, batch, sol.blur, median_s,
        )?)
    } else {
        None
    };
    Ok(GridBenchResult {
        grid,
        batch,
        median_s,
        pixel_pairs: sol.pixel_pairs,
        pixel_pairs_per_s: sol.pixel_pairs as f64 / median_s,
        peak_rss_bytes: peak_grid,
        loss: value,
        eps: sol.eps,
        blur: sol.blur,
        levels: d.levels,
        iterations: d.eps_list.len() + d.extra_iterations,
        times_s: times,
        online,
    })
}

/// [`SamplesLoss`] (Sinkhorn, p = 2, online) on the pixel cloud of the unit square / cube,
/// with the masses as weights and the grid's blur, scaling and ε schedule (diameter 1, the
/// grid's domain): one `solve` plus the backward pass for ∂loss/∂a per run.
fn compare_online(
    cfg: &GridBenchConfig,
    a: &Tensor,
    b: &Tensor,
    grid: &[usize],
    batch: usize,
    blur: f64,
    grid_median_s: f64,
) -> Result<OnlineComparison> {
    let n: usize = grid.iter().product();
    let d = grid.len();
    let spacing: Vec<f64> = grid.iter().map(|k| 1.0 / *k as f64).collect();
    let x = candle_ot::softmin::grid::pixel_coordinates(grid, &spacing, &Device::Cpu)?
        .to_dtype(cfg.dtype)?
        .to_device(&cfg.device)?
        .unsqueeze(0)?
        .broadcast_as((batch, n, d))?
        .contiguous()?;
    let (a, b) = (a.reshape((batch, n))?, b.reshape((batch, n))?);
    let loss = SamplesLoss::from_options(SamplesLossOptions {
        loss: Loss::Sinkhorn,
        p: 2,
        blur,
        diameter: Some(1.0),
        scaling: cfg.scaling,
        debias: cfg.debias,
        reach: cfg.reach,
        tol: cfg.tol,
        backend: Backend::Online,
        ..Default::default()
    })
    .context("--compare-online")?;
    let mut times = Vec::with_capacity(cfg.reps);
    let (mut value, mut passes) = (0.0, 0usize);
    for rep in 0..cfg.warmup + cfg.reps {
        cfg.device.synchronize()?;
        let av = Var::from_tensor(&a)?;
        let t0 = Instant::now();
        let sol = loss.solve(Some(av.as_tensor()), &x, Some(&b), &x)?;
        let sum = sol.loss.sum_all()?;
        let g = sum.backward()?;
        let ga = g
            .get(av.as_tensor())
            .ok_or_else(|| anyhow!("no gradient for a"))?;
        total(ga)?;
        cfg.device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if rep >= cfg.warmup {
            times.push(dt);
        }
        value = total(&sum)?;
        passes = sol.diagnostics.as_ref().map_or(0, |d| d.softmin_passes);
    }
    let median_s = median(&times);
    let nf = n as f64;
    Ok(OnlineComparison {
        median_s,
        times_s: times,
        pairs: passes as f64 * nf * nf * batch as f64,
        loss: value,
        peak_rss_bytes: peak_rss_bytes(),
        ratio: median_s / grid_median_s,
    })
}

// ---------------------------------------------------------------------------------------
// Ragged batches.

/// A ragged benchmark (`bench --ragged B`): the Sinkhorn loss (or another loss) plus its
/// gradient with respect to x on `items` pairs of clouds of different sizes, through
/// [`SamplesLoss::forward_packed`], next to the same clouds as a padded batch and to one
/// single cloud (the reference pair rate).
#[derive(Clone, Debug)]
pub struct RaggedBenchConfig {
    /// Loss options (backend included). `diameter: None` is set to √D, the diagonal of the
    /// unit cube, so that the three runs share one ε schedule; `tol` must be `None` (the
    /// extra iterations of a batch depend on its worst item, so the pair count is undefined).
    pub options: SamplesLossOptions,
    /// Number of items B.
    pub items: usize,
    /// Cloud sizes, log-uniform in `[min_size, max_size]`, drawn for x and y independently.
    pub min_size: usize,
    pub max_size: usize,
    pub d: usize,
    /// N = M of the single cloud that gives the reference pair rate.
    pub single_size: usize,
    /// Also time the padded batch (B, N_max, D) with zero weights on the padding.
    pub padded: bool,
    pub device: Device,
    pub dtype: DType,
    pub reps: usize,
    pub warmup: usize,
    pub seed: u64,
}

/// What a ragged run measured.
#[derive(Clone, Debug)]
pub struct RaggedBenchResult {
    pub x_lengths: Vec<usize>,
    pub y_lengths: Vec<usize>,
    /// Σ_b N_b·M_b.
    pub total_pairs: f64,
    /// B·N_max·M_max: the pairs of C_xy in the padded batch.
    pub padded_pairs: f64,
    /// The work of the ragged problem in the module docs' convention, [`loss_pairs`] summed
    /// over the items (gradient with respect to x included).
    pub pairs: f64,
    /// The ε schedule's length K (Sinkhorn), shared by the three runs.
    pub schedule_steps: Option<usize>,
    pub diameter: Option<f64>,
    pub ragged_s: f64,
    pub ragged_times_s: Vec<f64>,
    /// `pairs / ragged_s`.
    pub ragged_pairs_per_s: f64,
    /// The summed loss of the ragged call.
    pub loss: f64,
    pub padded_s: Option<f64>,
    pub padded_times_s: Option<Vec<f64>>,
    /// `padded_s / ragged_s`.
    pub speedup_vs_padded: Option<f64>,
    /// max_b |ragged_b − padded_b| / max_b |padded_b|: the two calls compute the same losses.
    pub padded_loss_rel_diff: Option<f64>,
    /// The single cloud N = M = `single_size`: [`run`] with the same options and `--grad`.
    pub single: BenchResult,
    /// `ragged_s / (pairs / single.pairs_per_s)`: the ragged call's time over the time the
    /// same work takes at the single cloud's pair rate.
    pub vs_single_cloud_rate: f64,
    /// Peak RSS after every run.
    pub peak_rss_bytes: u64,
}

/// A ragged batch drawn by [`random_ragged_clouds`]: packed points (host, f64, row-major) and
/// the sizes.
#[derive(Clone, Debug)]
pub struct RaggedClouds {
    pub d: usize,
    /// (ΣN_b · D) values.
    pub x: Vec<f64>,
    pub x_lengths: Vec<usize>,
    /// (ΣM_b · D) values.
    pub y: Vec<f64>,
    pub y_lengths: Vec<usize>,
}

/// `items` pairs of clouds, a fixed function of (seed, items, min_size, max_size, d): sizes
/// `round(exp(U(ln min_size, ln max_size)))` (log-uniform), N_b and M_b independent; points
/// uniform in the unit cube.
pub fn random_ragged_clouds(
    seed: u64,
    items: usize,
    min_size: usize,
    max_size: usize,
    d: usize,
) -> Result<RaggedClouds> {
    if items == 0 {
        bail!("--ragged needs at least one item");
    }
    if min_size == 0 || min_size > max_size {
        bail!(
            "--min-size and --max-size must satisfy 1 ≤ min ≤ max, got {min_size} and {max_size}"
        );
    }
    if d == 0 {
        bail!("--d must be at least 1");
    }
    let key = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (items as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
        ^ (min_size as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (max_size as u64).wrapping_mul(0x1656_67B1_9E37_79F9)
        ^ (d as u64).wrapping_mul(0x27D4_EB2F_1656_67C5)
        ^ 0x5241_4747_4544; // "RAGGED"
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    let (lo, hi) = ((min_size as f64).ln(), (max_size as f64).ln());
    let size = |rng: &mut rand_chacha::ChaCha8Rng| -> usize {
        let u: f64 = rng.random();
        ((lo + u * (hi - lo)).exp().round() as usize).clamp(min_size, max_size)
    };
    let mut x_lengths = Vec::with_capacity(items);
    let mut y_lengths = Vec::with_capacity(items);
    for _ in 0..items {
        x_lengths.push(size(&mut rng));
        y_lengths.push(size(&mut rng));
    }
    let sn: usize = x_lengths.iter().sum();
    let sm: usize = y_lengths.iter().sum();
    let x: Vec<f64> = (0..sn * d).map(|_| rng.random::<f64>()).collect();
    let y: Vec<f64> = (0..sm * d).map(|_| rng.random::<f64>()).collect();
    Ok(RaggedClouds {
        d,
        x,
        x_lengths,
        y,
        y_lengths,
    })
}

/// A packed cloud as a padded batch: points (B, N_max, D), each item padded with copies of
/// its first point, and weights (B, N_max), `1/N_b` on the item's points and 0 on the padding.
pub fn pad_cloud(p: &[f64], lengths: &[usize], d: usize) -> Result<(Tensor, Tensor)> {
    let b = lengths.len();
    let n_max = lengths.iter().copied().max().unwrap_or(0);
    let mut points = Vec::with_capacity(b * n_max * d);
    let mut weights = Vec::with_capacity(b * n_max);
    let mut off = 0;
    for &n in lengths {
        let item = &p[off * d..(off + n) * d];
        points.extend_from_slice(item);
        for _ in n..n_max {
            points.extend_from_slice(&item[..d]);
        }
        weights.extend(std::iter::repeat_n(1.0 / n as f64, n));
        weights.extend(std::iter::repeat_n(0.0, n_max - n));
        off += n;
    }
    Ok((
        Tensor::from_vec(points, (b, n_max, d), &Device::Cpu)?,
        Tensor::from_vec(weights, (b, n_max), &Device::Cpu)?,
    ))
}

/// One timed loss + ∂/∂x: `call(x)` returns the losses; returns (the losses in f64, seconds).
fn timed_loss_grad(
    device: &Device,
    x: &Tensor,
    call: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<(Vec<f64>, f64)> {
    let xv = Var::from_tensor(x)?;
    device.synchronize()?;
    let t0 = Instant::now();
    let losses = call(xv.as_tensor())?;
    let sum = losses.sum_all()?;
    let g = sum.backward()?;
    let gx = g
        .get(xv.as_tensor())
        .ok_or_else(|| anyhow!("no gradient for x"))?;
    total(gx)?;
    device.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    let v = losses
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok((v, dt))
}

/// Runs `warmup + reps` timed calls; returns the last losses, the median and the timed runs.
fn repeat_timed(
    cfg: &RaggedBenchConfig,
    x: &Tensor,
    call: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<(Vec<f64>, f64, Vec<f64>)> {
    let mut times = Vec::with_capacity(cfg.reps);
    let mut last = Vec::new();
    for rep in 0..cfg.warmup + cfg.reps {
        let (v, dt) = timed_loss_grad(&cfg.device, x, &call)?;
        if rep >= cfg.warmup {
            times.push(dt);
        }
        last = v;
    }
    Ok((last, median(&times), times))
}

/// Runs the ragged benchmark (see [`RaggedBenchConfig`]).
pub fn run_ragged(cfg: &RaggedBenchConfig) -> Result<RaggedBenchResult> {
    if cfg.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if cfg.options.tol.is_some() {
        bail!("--tol does not apply to --ragged: the pair count needs GeomLoss's fixed ε schedule (a batch's extra iterations follow its slowest item)");
    }
    if cfg.single_size == 0 {
        bail!("--single-size must be at least 1");
    }
    let mut options = cfg.options.clone();
    if options.loss == Loss::Sinkhorn && options.diameter.is_none() {
        options.diameter = Some((cfg.d as f64).sqrt());
    }
    let clouds = random_ragged_clouds(cfg.seed, cfg.items, cfg.min_size, cfg.max_size, cfg.d)?;
    let (xl, yl) = (&clouds.x_lengths, &clouds.y_lengths);
    let d = cfg.d;

    // The single cloud first: its diagnostics give the schedule's length K.
    let single = run(&BenchConfig {
        options: options.clone(),
        n: cfg.single_size,
        m: cfg.single_size,
        d,
        device: cfg.device.clone(),
        dtype: cfg.dtype,
        grad: true,
        op: BenchOp::Loss,
        reps: cfg.reps,
        warmup: cfg.warmup,
        seed: cfg.seed,
        input: None,
    })
    .context("the single-cloud reference run")?;
    let k = single.schedule_steps.unwrap_or(0);
    if options.loss == Loss::Sinkhorn && single.schedule_steps.is_none() {
        bail!("the single-cloud run returned no Sinkhorn diagnostics: cannot count the pairs");
    }

    let loss = SamplesLoss::from_options(options.clone())?;
    let to_dev =
        |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(cfg.dtype)?.to_device(&cfg.device)?) };
    let xp = to_dev(Tensor::from_vec(
        clouds.x.clone(),
        (clouds.x.len() / d, d),
        &Device::Cpu,
    )?)?;
    let yp = to_dev(Tensor::from_vec(
        clouds.y.clone(),
        (clouds.y.len() / d, d),
        &Device::Cpu,
    )?)?;
    let (ragged_losses, ragged_s, ragged_times) = repeat_timed(cfg, &xp, |x| {
        loss.forward_packed(None, x, xl, None, &yp, yl)
    })?;

    let (padded_s, padded_times, padded_diff) = if cfg.padded {
        let (x_pad, a_pad) = pad_cloud(&clouds.x, xl, d)?;
        let (y_pad, b_pad) = pad_cloud(&clouds.y, yl, d)?;
        let (x_pad, a_pad, y_pad, b_pad) = (
            to_dev(x_pad)?,
            to_dev(a_pad)?,
            to_dev(y_pad)?,
            to_dev(b_pad)?,
        );
        let (padded_losses, s, times) = repeat_timed(cfg, &x_pad, |x| {
            loss.forward_weighted(&a_pad, x, &b_pad, &y_pad)
        })?;
        let diff = ragged_losses
            .iter()
            .zip(&padded_losses)
            .map(|(r, p)| (r - p).abs())
            .fold(0.0, f64::max);
        let scale = padded_losses.iter().map(|p| p.abs()).fold(0.0, f64::max);
        (
            Some(s),
            Some(times),
            Some(if scale > 0.0 { diff / scale } else { diff }),
        )
    } else {
        (None, None, None)
    };

    let total_pairs: f64 = xl.iter().zip(yl).map(|(&n, &m)| n as f64 * m as f64).sum();
    let n_max = xl.iter().copied().max().unwrap_or(0) as f64;
    let m_max = yl.iter().copied().max().unwrap_or(0) as f64;
    let pairs: f64 = xl
        .iter()
        .zip(yl)
        .map(|(&n, &m)| loss_pairs(&options, n, m, k, true))
        .sum();
    let at_single_rate_s = pairs / single.pairs_per_s;
    Ok(RaggedBenchResult {
        x_lengths: xl.clone(),
        y_lengths: yl.clone(),
        total_pairs,
        padded_pairs: cfg.items as f64 * n_max * m_max,
        pairs,
        schedule_steps: single.schedule_steps,
        diameter: options.diameter,
        ragged_s,
        ragged_times_s: ragged_times,
        ragged_pairs_per_s: pairs / ragged_s,
        loss: ragged_losses.iter().sum(),
        padded_s,
        padded_times_s: padded_times,
        speedup_vs_padded: padded_s.map(|p| p / ragged_s),
        padded_loss_rel_diff: padded_diff,
        vs_single_cloud_rate: ragged_s / at_single_rate_s,
        single,
        peak_rss_bytes: peak_rss_bytes(),
    })
}
