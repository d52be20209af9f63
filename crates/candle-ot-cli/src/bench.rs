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

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_ot::{CostKind, SamplesLoss, SamplesLossOptions};
use rand::{Rng, SeedableRng};
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
        BenchOp::Loss => {
            let debias = o.debias && o.loss == candle_ot::Loss::Sinkhorn;
            let per_pass = 2.0 * nf * mf + if debias { nf * nf + mf * mf } else { 0.0 };
            let passes = if o.loss == candle_ot::Loss::Sinkhorn {
                (k_passes + 2) as f64
            } else {
                1.0
            };
            let grad = if cfg.grad {
                nf * mf + if debias { nf * nf } else { 0.0 }
            } else {
                0.0
            };
            bf * (passes * per_pass + grad)
        }
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
    })
}
