//! Streaming CPU reductions over point pairs (x_i, y_j), never materialising the N×M matrix.
//!
//! - [`softmin`]: `f_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)`, the hot loop of every Sinkhorn
//!   iteration. Rows are processed in blocks of [`L`] (struct-of-arrays, so that the loops over
//!   the block's lanes vectorise), columns in tiles of [`TJ`] held in L1. Each lane keeps a
//!   running `(max, sum)` pair; a tile first finds its maxima, rescales the running sums once,
//!   then adds `exp(z − max)`: one exponential per pair, never of an unshifted value.
//!   Small dimensions (1, 2, 3, 4, 8) are compiled as constants; x86-64 picks AVX-512 or
//!   AVX2+FMA at run time, with a portable fallback (SSE2 on x86-64, NEON on aarch64).
//! - [`lse_weighted`]: `out_r = Σ_c exp(α_r + β_c − C(p_r, q_c)/ε) φ_rc` with a streaming
//!   maximum, for gradients (φ = w_c ∇₁C) and plan applications (φ = v_c).
//! - [`kernel_sums`]: `out_r = Σ_c w_c k(p_r, q_c)` and `Σ_c w_c ∇₁k(p_r, q_c)` for the
//!   kernel losses.
//!
//! All functions work on one batch item of contiguous row-major slices; the `*_batched`
//! drivers spread rows over the thread pool. Each output row is reduced by one thread in a
//! fixed order: results do not depend on the number of threads.

// Lane loops index several fixed-size arrays in lock step: that is what vectorises.
#![allow(clippy::needless_range_loop)]

use super::real::Real;
use crate::cost::{CostKind, KernelKind};
use rayon::prelude::*;

/// Rows per block of the softmin kernel (SIMD lanes).
pub(crate) const L: usize = 16;
/// Columns per tile.
pub(crate) const TJ: usize = 128;
/// Rows per parallel task.
const ROWS_PER_TASK: usize = 4 * L;

// ---------------------------------------------------------------------------------------
// softmin
// ---------------------------------------------------------------------------------------

/// Running `(max, sum)` of one block of rows against all columns.
#[inline(always)]
fn softmin_block_body<T: Real, const P1: bool>(
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    y: &[T],
    h: &[T],
) -> ([T; L], [T; L]) {
    let half = T::from_f64(0.5);
    let m = h.len();
    let mut mx = [T::NEG_INFINITY; L];
    let mut s = [T::ZERO; L];
    let mut zb = [[T::ZERO; L]; TJ];
    let mut j0 = 0;
    while j0 < m {
        let tj = TJ.min(m - j0);
        let mut tmax = [T::NEG_INFINITY; L];
        for (jj, z) in zb.iter_mut().enumerate().take(tj) {
            let j = j0 + jj;
            let yj = &y[j * d..j * d + d];
            let mut sq = [T::ZERO; L];
            for (k, xk) in xs.iter().enumerate().take(d) {
                let yk = yj[k];
                for l in 0..L {
                    let t = xk[l] - yk;
                    sq[l] += t * t;
                }
            }
            let hj = h[j];
            for l in 0..L {
                let c = if P1 { sq[l].sqrt() } else { sq[l] * half };
                z[l] = hj - c * inv_eps;
                tmax[l] = tmax[l].fmax(z[l]);
            }
        }
        // (max, sum) combine; an all-masked tile (max −∞) shifts by 0 and adds exact zeros.
        let mut shift = [T::ZERO; L];
        for l in 0..L {
            let nm = mx[l].fmax(tmax[l]);
            let safe = if nm == T::NEG_INFINITY { T::ZERO } else { nm };
            s[l] *= (mx[l] - safe).exp_le0();
            mx[l] = nm;
            shift[l] = safe;
        }
        for z in zb.iter().take(tj) {
            for l in 0..L {
                s[l] += (z[l] - shift[l]).exp_le0();
            }
        }
        j0 += tj;
    }
    (mx, s)
}

#[inline(always)]
fn softmin_block_dispatch_d<T: Real>(
    cost: CostKind,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    y: &[T],
    h: &[T],
) -> ([T; L], [T; L]) {
    macro_rules! by_d {
        ($p1:expr) => {
            match d {
                1 => softmin_block_body::<T, $p1>(1, inv_eps, xs, y, h),
                2 => softmin_block_body::<T, $p1>(2, inv_eps, xs, y, h),
                3 => softmin_block_body::<T, $p1>(3, inv_eps, xs, y, h),
                4 => softmin_block_body::<T, $p1>(4, inv_eps, xs, y, h),
                8 => softmin_block_body::<T, $p1>(8, inv_eps, xs, y, h),
                _ => softmin_block_body::<T, $p1>(d, inv_eps, xs, y, h),
            }
        };
    }
    match cost {
        CostKind::Euclidean => by_d!(true),
        CostKind::SqEuclidean => by_d!(false),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn softmin_block_avx512<T: Real>(
    cost: CostKind,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    y: &[T],
    h: &[T],
) -> ([T; L], [T; L]) {
    softmin_block_dispatch_d(cost, d, inv_eps, xs, y, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmin_block_avx2<T: Real>(
    cost: CostKind,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    y: &[T],
    h: &[T],
) -> ([T; L], [T; L]) {
    softmin_block_dispatch_d(cost, d, inv_eps, xs, y, h)
}

/// Which instruction set the CPU kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// AVX-512F (x86-64).
    Avx512,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// The portable build (SSE2 on x86-64, NEON on aarch64, scalar elsewhere).
    Portable,
}

/// Detects the instruction set once (the detection macros cache their answer).
pub fn simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("CANDLE_OT_NO_SIMD").is_some() {
            return SimdLevel::Portable;
        }
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return SimdLevel::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Portable
}

#[inline]
fn softmin_block<T: Real>(
    level: SimdLevel,
    cost: CostKind,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    y: &[T],
    h: &[T],
) -> ([T; L], [T; L]) {
    match level {
        // SAFETY: the level was detected at run time on this CPU by `simd_level`.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { softmin_block_avx512(cost, d, inv_eps, xs, y, h) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { softmin_block_avx2(cost, d, inv_eps, xs, y, h) },
        _ => softmin_block_dispatch_d(cost, d, inv_eps, xs, y, h),
    }
}

/// Softmin of one batch item: x (N·D), y (M·D), h (M) → out (N).
#[allow(clippy::too_many_arguments)]
fn softmin_item<T: Real>(
    level: SimdLevel,
    cost: CostKind,
    eps: f64,
    x: &[T],
    y: &[T],
    h: &[T],
    d: usize,
    out: &mut [T],
) {
    let n = out.len();
    let inv_eps = T::from_f64(1.0 / eps);
    let eps_t = T::from_f64(eps);
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, out_task)| {
            let mut xs = vec![[T::ZERO; L]; d];
            let i_task = task * ROWS_PER_TASK;
            for (blk, out_blk) in out_task.chunks_mut(L).enumerate() {
                let i0 = i_task + blk * L;
                for l in 0..L {
                    // Pad a partial block with its last row; padded lanes are discarded.
                    let i = (i0 + l).min(n - 1);
                    for k in 0..d {
                        xs[k][l] = x[i * d + k];
                    }
                }
                let (mx, s) = softmin_block(level, cost, d, inv_eps, &xs, y, h);
                for (l, o) in out_blk.iter_mut().enumerate() {
                    *o = -eps_t * (mx[l] + s[l].ln());
                }
            }
        });
}

/// Batched softmin: x (B, N, D), y (B, M, D), h (B, M) → out (B, N).
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmin<T: Real>(
    cost: CostKind,
    eps: f64,
    x: &[T],
    y: &[T],
    h: &[T],
    (b, n, m, d): (usize, usize, usize, usize),
    out: &mut [T],
) {
    let level = simd_level();
    crate::threads::install(|| {
        out.par_chunks_mut(n).enumerate().for_each(|(bi, ob)| {
            let _ = b;
            softmin_item(
                level,
                cost,
                eps,
                &x[bi * n * d..(bi + 1) * n * d],
                &y[bi * m * d..(bi + 1) * m * d],
                &h[bi * m..(bi + 1) * m],
                d,
                ob,
            )
        })
    })
}

// ---------------------------------------------------------------------------------------
// softmax-weighted sums (gradients, plan application)
// ---------------------------------------------------------------------------------------

/// What [`lse_weighted`] accumulates for each pair (r, c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Weighted {
    /// φ = w_c ∇₁C(p_r, q_c) (D values), followed by w_c (1 value) when `with_mass`.
    /// Column data: `[q (D), β, w]`.
    Grad { with_mass: bool },
    /// φ = v_c (K values). Column data: `[q (D), β, v (K)]`.
    Values { k: usize },
}

impl Weighted {
    pub(crate) fn out_dim(self, d: usize) -> usize {
        match self {
            Weighted::Grad { with_mass } => d + with_mass as usize,
            Weighted::Values { k } => k,
        }
    }
    pub(crate) fn col_dim(self, d: usize) -> usize {
        match self {
            Weighted::Grad { .. } => d + 2,
            Weighted::Values { k } => d + 1 + k,
        }
    }
}

#[inline(always)]
fn sq_dist<T: Real>(p: &[T], q: &[T]) -> T {
    let mut s = T::ZERO;
    for (a, b) in p.iter().zip(q) {
        let t = *a - *b;
        s += t * t;
    }
    s
}

/// One batch item of `out_r = Σ_c exp(α_r + β_c − C(p_r, q_c)/ε) φ_rc`.
///
/// Rows: `[p (D), α]` (stride D+1). Columns: see [`Weighted`]. Out: `mode.out_dim(D)` per row.
#[allow(clippy::too_many_arguments)]
fn lse_weighted_item<T: Real>(
    cost: CostKind,
    eps: f64,
    rows: &[T],
    cols: &[T],
    d: usize,
    mode: Weighted,
    out: &mut [T],
) {
    let rs = d + 1;
    let cs = mode.col_dim(d);
    let od = mode.out_dim(d);
    let m = cols.len() / cs;
    let inv_eps = T::from_f64(1.0 / eps);
    let half = T::from_f64(0.5);
    out.par_chunks_mut(od).enumerate().for_each(|(r, o)| {
        let p = &rows[r * rs..r * rs + d];
        let alpha = rows[r * rs + d];
        let mut acc = vec![T::ZERO; od];
        let mut mx = T::NEG_INFINITY;
        let mut zb = [T::ZERO; TJ];
        let mut j0 = 0;
        while j0 < m {
            let tj = TJ.min(m - j0);
            let mut tmax = T::NEG_INFINITY;
            for (jj, z) in zb.iter_mut().enumerate().take(tj) {
                let c = &cols[(j0 + jj) * cs..(j0 + jj + 1) * cs];
                let sq = sq_dist(p, &c[..d]);
                let cost_v = match cost {
                    CostKind::SqEuclidean => sq * half,
                    CostKind::Euclidean => sq.sqrt(),
                };
                *z = alpha + c[d] - cost_v * inv_eps;
                tmax = tmax.fmax(*z);
            }
            let nm = mx.fmax(tmax);
            let safe = if nm == T::NEG_INFINITY { T::ZERO } else { nm };
            let rescale = (mx - safe).exp_le0();
            for a in acc.iter_mut() {
                *a *= rescale;
            }
            mx = nm;
            for (jj, z) in zb.iter().enumerate().take(tj) {
                let e = (*z - safe).exp_le0();
                if e == T::ZERO {
                    continue;
                }
                let c = &cols[(j0 + jj) * cs..(j0 + jj + 1) * cs];
                match mode {
                    Weighted::Grad { with_mass } => {
                        let ew = e * c[d + 1];
                        let scale = match cost {
                            CostKind::SqEuclidean => ew,
                            CostKind::Euclidean => {
                                let dist = sq_dist(p, &c[..d]).sqrt();
                                if dist > T::ZERO {
                                    ew / dist
                                } else {
                                    T::ZERO
                                }
                            }
                        };
                        for k in 0..d {
                            acc[k] += scale * (p[k] - c[k]);
                        }
                        if with_mass {
                            acc[d] += ew;
                        }
                    }
                    Weighted::Values { k } => {
                        for (a, v) in acc.iter_mut().zip(&c[d + 1..d + 1 + k]) {
                            *a += e * *v;
                        }
                    }
                }
            }
            j0 += tj;
        }
        let total = if mx == T::NEG_INFINITY {
            T::ZERO
        } else {
            mx.exp()
        };
        for (oo, a) in o.iter_mut().zip(&acc) {
            *oo = *a * total;
        }
    });
}

/// The gradient reduction of one block of [`L`] rows (struct of arrays, vectorised over the
/// rows like [`softmin_block_body`]): `acc[k][l] = Σ_c e^{z_lc − max_l} w_c ∇₁C(p_l, q_c)_k`
/// and, with `MASS`, `acc[D][l] = Σ_c e^{z_lc − max_l} w_c`. Returns the running maxima.
#[inline(always)]
fn grad_block_body<T: Real, const P1: bool, const MASS: bool>(
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    alpha: &[T; L],
    cols: &[T],
    acc: &mut [[T; L]],
) -> [T; L] {
    let half = T::from_f64(0.5);
    let cs = d + 2;
    let m = cols.len() / cs;
    let mut mx = [T::NEG_INFINITY; L];
    for a in acc.iter_mut() {
        *a = [T::ZERO; L];
    }
    let mut zb = [[T::ZERO; L]; TJ];
    let mut db = [[T::ZERO; L]; TJ];
    let mut j0 = 0;
    while j0 < m {
        let tj = TJ.min(m - j0);
        let mut tmax = [T::NEG_INFINITY; L];
        for jj in 0..tj {
            let q = &cols[(j0 + jj) * cs..(j0 + jj + 1) * cs];
            let mut sq = [T::ZERO; L];
            for k in 0..d {
                let qk = q[k];
                for l in 0..L {
                    let t = xs[k][l] - qk;
                    sq[l] += t * t;
                }
            }
            let beta = q[d];
            for l in 0..L {
                let dist = sq[l].sqrt();
                let c = if P1 { dist } else { sq[l] * half };
                let z = alpha[l] + beta - c * inv_eps;
                zb[jj][l] = z;
                db[jj][l] = dist;
                tmax[l] = tmax[l].fmax(z);
            }
        }
        let mut shift = [T::ZERO; L];
        let mut rescale = [T::ZERO; L];
        for l in 0..L {
            let nm = mx[l].fmax(tmax[l]);
            let safe = if nm == T::NEG_INFINITY { T::ZERO } else { nm };
            rescale[l] = (mx[l] - safe).exp_le0();
            mx[l] = nm;
            shift[l] = safe;
        }
        for a in acc.iter_mut() {
            for l in 0..L {
                a[l] *= rescale[l];
            }
        }
        for jj in 0..tj {
            let q = &cols[(j0 + jj) * cs..(j0 + jj + 1) * cs];
            let w = q[d + 1];
            let mut ew = [T::ZERO; L];
            let mut eg = [T::ZERO; L];
            for l in 0..L {
                ew[l] = (zb[jj][l] - shift[l]).exp_le0() * w;
                eg[l] = if P1 {
                    if db[jj][l] > T::ZERO {
                        ew[l] / db[jj][l]
                    } else {
                        T::ZERO
                    }
                } else {
                    ew[l]
                };
            }
            for k in 0..d {
                let qk = q[k];
                for l in 0..L {
                    acc[k][l] += eg[l] * (xs[k][l] - qk);
                }
            }
            if MASS {
                for l in 0..L {
                    acc[d][l] += ew[l];
                }
            }
        }
        j0 += tj;
    }
    mx
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_block_dispatch<T: Real>(
    cost: CostKind,
    with_mass: bool,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    alpha: &[T; L],
    cols: &[T],
    acc: &mut [[T; L]],
) -> [T; L] {
    macro_rules! by_d {
        ($p1:expr, $mass:expr) => {
            match d {
                1 => grad_block_body::<T, $p1, $mass>(1, inv_eps, xs, alpha, cols, acc),
                2 => grad_block_body::<T, $p1, $mass>(2, inv_eps, xs, alpha, cols, acc),
                3 => grad_block_body::<T, $p1, $mass>(3, inv_eps, xs, alpha, cols, acc),
                4 => grad_block_body::<T, $p1, $mass>(4, inv_eps, xs, alpha, cols, acc),
                _ => grad_block_body::<T, $p1, $mass>(d, inv_eps, xs, alpha, cols, acc),
            }
        };
    }
    match (cost, with_mass) {
        (CostKind::Euclidean, false) => by_d!(true, false),
        (CostKind::Euclidean, true) => by_d!(true, true),
        (CostKind::SqEuclidean, false) => by_d!(false, false),
        (CostKind::SqEuclidean, true) => by_d!(false, true),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn grad_block_avx512<T: Real>(
    cost: CostKind,
    with_mass: bool,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    alpha: &[T; L],
    cols: &[T],
    acc: &mut [[T; L]],
) -> [T; L] {
    grad_block_dispatch(cost, with_mass, d, inv_eps, xs, alpha, cols, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn grad_block_avx2<T: Real>(
    cost: CostKind,
    with_mass: bool,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    alpha: &[T; L],
    cols: &[T],
    acc: &mut [[T; L]],
) -> [T; L] {
    grad_block_dispatch(cost, with_mass, d, inv_eps, xs, alpha, cols, acc)
}

/// The blocked gradient reduction of one batch item (see [`Weighted::Grad`]).
#[allow(clippy::too_many_arguments)]
fn grad_item<T: Real>(
    level: SimdLevel,
    cost: CostKind,
    eps: f64,
    rows: &[T],
    cols: &[T],
    d: usize,
    with_mass: bool,
    out: &mut [T],
) {
    let rs = d + 1;
    let od = d + with_mass as usize;
    let n = out.len() / od;
    let inv_eps = T::from_f64(1.0 / eps);
    out.par_chunks_mut(ROWS_PER_TASK * od)
        .enumerate()
        .for_each(|(task, out_task)| {
            let mut xs = vec![[T::ZERO; L]; d];
            let mut acc = vec![[T::ZERO; L]; d + 1];
            let i_task = task * ROWS_PER_TASK;
            for (blk, out_blk) in out_task.chunks_mut(L * od).enumerate() {
                let i0 = i_task + blk * L;
                let mut alpha = [T::ZERO; L];
                for l in 0..L {
                    let i = (i0 + l).min(n - 1);
                    for k in 0..d {
                        xs[k][l] = rows[i * rs + k];
                    }
                    alpha[l] = rows[i * rs + d];
                }
                let mx = match level {
                    // SAFETY: the level was detected at run time on this CPU.
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx512 => unsafe {
                        grad_block_avx512(cost, with_mass, d, inv_eps, &xs, &alpha, cols, &mut acc)
                    },
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx2 => unsafe {
                        grad_block_avx2(cost, with_mass, d, inv_eps, &xs, &alpha, cols, &mut acc)
                    },
                    _ => grad_block_dispatch(
                        cost, with_mass, d, inv_eps, &xs, &alpha, cols, &mut acc,
                    ),
                };
                for (l, o) in out_blk.chunks_mut(od).enumerate() {
                    let total = if mx[l] == T::NEG_INFINITY {
                        T::ZERO
                    } else {
                        mx[l].exp()
                    };
                    for (k, ok) in o.iter_mut().enumerate() {
                        *ok = acc[k][l] * total;
                    }
                }
            }
        });
}

/// Batched [`lse_weighted_item`]: rows (B, N, D+1), cols (B, M, col_dim) → out (B, N, out_dim).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lse_weighted<T: Real>(
    cost: CostKind,
    eps: f64,
    rows: &[T],
    cols: &[T],
    (n, m, d): (usize, usize, usize),
    mode: Weighted,
    out: &mut [T],
) {
    let rs = d + 1;
    let cs = mode.col_dim(d);
    let od = mode.out_dim(d);
    let level = simd_level();
    crate::threads::install(|| {
        out.par_chunks_mut(n * od).enumerate().for_each(|(bi, ob)| {
            if let Weighted::Grad { with_mass } = mode {
                return grad_item(
                    level,
                    cost,
                    eps,
                    &rows[bi * n * rs..(bi + 1) * n * rs],
                    &cols[bi * m * cs..(bi + 1) * m * cs],
                    d,
                    with_mass,
                    ob,
                );
            }
            lse_weighted_item(
                cost,
                eps,
                &rows[bi * n * rs..(bi + 1) * n * rs],
                &cols[bi * m * cs..(bi + 1) * m * cs],
                d,
                mode,
                ob,
            )
        })
    })
}

// ---------------------------------------------------------------------------------------
// kernel sums
// ---------------------------------------------------------------------------------------

/// `k(r)` and `k'(r)/r` as functions of the squared distance (so that ∇₁k = k'(r)/r · (p − q)).
#[inline(always)]
fn kernel_and_grad<T: Real>(kind: KernelKind, inv_sigma: T, sq: T) -> (T, T) {
    match kind {
        KernelKind::Gaussian => {
            // k = exp(−r²/2σ²), ∇k = −k (p − q)/σ²
            let k = (-(sq * inv_sigma * inv_sigma) * T::from_f64(0.5)).exp_le0();
            (k, -k * inv_sigma * inv_sigma)
        }
        KernelKind::Laplacian => {
            // k = exp(−r/σ), ∇k = −k/(σ r) (p − q), 0 at r = 0
            let r = sq.sqrt();
            let k = (-(r * inv_sigma)).exp_le0();
            let g = if r > T::ZERO {
                -k * inv_sigma / r
            } else {
                T::ZERO
            };
            (k, g)
        }
        KernelKind::Energy => {
            // k = −r, ∇k = −(p − q)/r, 0 at r = 0
            let r = sq.sqrt();
            let g = if r > T::ZERO { -T::ONE / r } else { T::ZERO };
            (-r, g)
        }
    }
}

/// One batch item of `out_r = [Σ_c w_c ∇₁k(p_r, q_c) (D values, when `grad`), Σ_c w_c k(p_r, q_c)]`.
/// Rows: `p (D)`; columns: `[q (D), w]`.
fn kernel_sums_item<T: Real>(
    kind: KernelKind,
    sigma: f64,
    rows: &[T],
    cols: &[T],
    d: usize,
    grad: bool,
    out: &mut [T],
) {
    let od = if grad { d + 1 } else { 1 };
    let cs = d + 1;
    let m = cols.len() / cs;
    let inv_sigma = T::from_f64(1.0 / sigma);
    out.par_chunks_mut(od).enumerate().for_each(|(r, o)| {
        let p = &rows[r * d..(r + 1) * d];
        let mut acc_k = T::ZERO;
        let mut acc_g = vec![T::ZERO; if grad { d } else { 0 }];
        for j in 0..m {
            let c = &cols[j * cs..(j + 1) * cs];
            let w = c[d];
            let (k, g) = kernel_and_grad(kind, inv_sigma, sq_dist(p, &c[..d]));
            acc_k += w * k;
            if grad {
                let gw = g * w;
                for kk in 0..d {
                    acc_g[kk] += gw * (p[kk] - c[kk]);
                }
            }
        }
        if grad {
            o[..d].copy_from_slice(&acc_g);
        }
        o[od - 1] = acc_k;
    });
}

/// Batched [`kernel_sums_item`]: rows (B, N, D), cols (B, M, D+1) → out (B, N, D+1 or 1).
#[allow(clippy::too_many_arguments)]
pub(crate) fn kernel_sums<T: Real>(
    kind: KernelKind,
    sigma: f64,
    rows: &[T],
    cols: &[T],
    (n, m, d): (usize, usize, usize),
    grad: bool,
    out: &mut [T],
) {
    let od = if grad { d + 1 } else { 1 };
    crate::threads::install(|| {
        out.par_chunks_mut(n * od).enumerate().for_each(|(bi, ob)| {
            kernel_sums_item(
                kind,
                sigma,
                &rows[bi * n * d..(bi + 1) * n * d],
                &cols[bi * m * (d + 1)..(bi + 1) * m * (d + 1)],
                d,
                grad,
                ob,
            )
        })
    })
}
