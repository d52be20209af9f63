//! Helpers shared by the behaviour tests: the per-device test macro, seeded data, error metrics.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Expands `fn name(dev: &Device) -> Result<()>` into a CPU test and CUDA / Metal tests that
/// run only where such a device is available (else they print a skip message and pass).
#[allow(unused_macros)] // not every test file expands it
macro_rules! test_device {
    ($fn_name:ident, $cpu:ident, $cuda:ident, $metal:ident) => {
        #[test]
        fn $cpu() -> candle_core::Result<()> {
            $fn_name(&candle_core::Device::Cpu)
        }

        #[test]
        fn $cuda() -> candle_core::Result<()> {
            if !candle_core::utils::cuda_is_available() {
                eprintln!("skipping {}: no CUDA device", stringify!($cuda));
                return Ok(());
            }
            $fn_name(&candle_core::Device::new_cuda(0)?)
        }

        #[test]
        fn $metal() -> candle_core::Result<()> {
            if !candle_core::utils::metal_is_available() {
                eprintln!("skipping {}: no Metal device", stringify!($metal));
                return Ok(());
            }
            $fn_name(&candle_core::Device::new_metal(0)?)
        }
    };
}

/// A seeded generator.
/// Every loss, for tests that run them all.
pub const ALL_LOSSES: [candle_ot::Loss; 5] = [
    candle_ot::Loss::Sinkhorn,
    candle_ot::Loss::Hausdorff,
    candle_ot::Loss::Energy,
    candle_ot::Loss::Gaussian,
    candle_ot::Loss::Laplacian,
];

/// An f64 CPU tensor of `lo + (hi − lo)·u`, u uniform in [0, 1), drawn in order from `rng`.
pub fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| lo + (hi - lo) * rng.random::<f64>())
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [lo, hi).
pub fn uniform_vec(rng: &mut ChaCha8Rng, len: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// A tensor of uniform values in [lo, hi), generated in f64 then cast to `dtype` on `dev`.
pub fn uniform(
    rng: &mut ChaCha8Rng,
    dims: &[usize],
    lo: f64,
    hi: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let len = dims.iter().product();
    Tensor::from_vec(uniform_vec(rng, len, lo, hi), dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// Positive random weights with zeros at `zeros`, each batch item normalised to `total`.
/// `batch = None` gives (n,), `Some(b)` gives (b, n). Always f64 on the CPU.
pub fn weights(
    rng: &mut ChaCha8Rng,
    batch: Option<usize>,
    n: usize,
    zeros: &[usize],
    total: f64,
) -> Result<Tensor> {
    let nb = batch.unwrap_or(1);
    let mut v = Vec::with_capacity(nb * n);
    for _ in 0..nb {
        let mut w: Vec<f64> = (0..n).map(|_| rng.random_range(0.5..1.5)).collect();
        for &z in zeros {
            if z < n {
                w[z] = 0.0;
            }
        }
        let s: f64 = w.iter().sum();
        v.extend(w.into_iter().map(|x| x * total / s));
    }
    match batch {
        None => Tensor::from_vec(v, n, &Device::Cpu),
        Some(b) => Tensor::from_vec(v, (b, n), &Device::Cpu),
    }
}

/// All values as f64, flattened.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to f64 vector")
}

/// max|got − want| / max|want| over the whole tensor (max|got − want| when want is 0).
/// NaN anywhere gives NaN.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    rel_err_vec(&flat(got), &flat(want))
}

/// [`rel_err`] on vectors.
pub fn rel_err_vec(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut d = 0f64;
    let mut s = 0f64;
    for (g, w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
            return f64::NAN;
        }
        d = d.max((g - w).abs());
        s = s.max(w.abs());
    }
    if s == 0.0 {
        d
    } else {
        d / s
    }
}

/// Whether every value is finite.
pub fn all_finite(t: &Tensor) -> bool {
    flat(t).iter().all(|v| v.is_finite())
}

/// The scalar value of a 0-d or 1-element tensor, as f64.
pub fn scalar(t: &Tensor) -> f64 {
    let v = flat(t);
    assert_eq!(v.len(), 1, "expected one value, got {}", v.len());
    v[0]
}

/// Whether `dtype` can live on `dev` (Metal has no f64).
pub fn dtype_supported(dtype: DType, dev: &Device) -> bool {
    !(dtype == DType::F64 && dev.is_metal())
}

/// Dense f64 ground cost `|x − y|^p / p`.
pub fn cost(p: u32, x: &[f64], y: &[f64]) -> f64 {
    let sq: f64 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
    if p == 1 {
        sq.sqrt()
    } else {
        0.5 * sq
    }
}

/// Dense f64 softmin `−ε log Σ_j exp(h_j − C(x_i, y_j)/ε)` for one batch item:
/// x (n·d), y (m·d), h (m) → (n). An all −∞ `h` gives +∞.
pub fn dense_softmin(p: u32, eps: f64, x: &[f64], y: &[f64], h: &[f64], d: usize) -> Vec<f64> {
    x.chunks(d)
        .map(|xi| {
            let z: Vec<f64> = y
                .chunks(d)
                .zip(h)
                .map(|(yj, hj)| hj - cost(p, xi, yj) / eps)
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                return f64::INFINITY;
            }
            let s: f64 = z.iter().map(|zj| (zj - m).exp()).sum();
            -eps * (m + s.ln())
        })
        .collect()
}

/// Dense f64 kernel `k(x, y)` of the kernel losses, σ = blur.
pub fn kernel(kind: candle_ot::KernelKind, sigma: f64, x: &[f64], y: &[f64]) -> f64 {
    let sq: f64 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
    match kind {
        candle_ot::KernelKind::Gaussian => (-sq / (2.0 * sigma * sigma)).exp(),
        candle_ot::KernelKind::Laplacian => (-sq.sqrt() / sigma).exp(),
        candle_ot::KernelKind::Energy => -sq.sqrt(),
    }
}

/// `t` (B, …) divided by its sum over all axes but the first (each batch item sums to 1).
pub fn normalised(t: &Tensor) -> Result<Tensor> {
    let b = t.dim(0)?;
    let s = t.reshape((b, ()))?.sum(1)?;
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, t.rank() - 1));
    t.broadcast_div(&s.reshape(shape)?)
}
