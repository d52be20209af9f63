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

use super::real::{fma, Real, PORTABLE_FMA};
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

/// The running `(max, sum)` of one block of [`L`] rows (`xs`, struct of arrays) against the
/// columns `y` (M·D) with offsets `h` (M), on the instruction set `level`. Also used by the
/// block-sparse multiscale kernels, one call per kept column range.
#[inline]
pub(crate) fn softmin_block<T: Real>(
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

// ---------------------------------------------------------------------------------------
// squared Euclidean cost: the base-2 dot-product form
// ---------------------------------------------------------------------------------------
//
// For C = ½|x − y|², any centre c and κ = log₂e,
//
//   κ (h_j − C_ij/ε) = H_j + X_i·Y_j − R_i,
//   Y_j = y_j − c,   X_i = κ (x_i − c)/ε,   H_j = κ (h_j − |y_j − c|²/2ε),   R_i = κ |x_i − c|²/2ε.
//
// R_i is constant along row i, so it leaves the streaming (max, sum) and is put back in f64 at
// the end. A pair then costs D fused multiply-adds for its exponent z = H_j + X_i·Y_j (against
// D subtractions, D multiply-adds and a scale for the distance form) and a base-2 exponential
// `exp2_le0`, which needs no Cody–Waite reduction. The centre is the midpoint of the clouds'
// bounding box, so that |x − c| and |y − c| stay below the diameter: the terms of X_i·Y_j are
// then no larger than those of C_ij/ε, and the rounding of z is that of the distance form
// (the reference suite checks both dtypes). Only the p = 1 cost, which needs the distance
// itself, and the block-sparse kernels use the distance form.

/// The midpoint of the bounding box of two clouds (N·D and M·D values), in f64.
fn centre<T: Real>(x: &[T], y: &[T], d: usize) -> Vec<f64> {
    if d == 0 {
        return vec![];
    }
    let mut lo = vec![f64::INFINITY; d];
    let mut hi = vec![f64::NEG_INFINITY; d];
    for p in x.chunks_exact(d).chain(y.chunks_exact(d)) {
        for k in 0..d {
            let v = p[k].to_f64();
            lo[k] = lo[k].min(v);
            hi[k] = hi[k].max(v);
        }
    }
    (0..d)
        .map(|k| {
            if lo[k] <= hi[k] {
                0.5 * (lo[k] + hi[k])
            } else {
                0.0
            }
        })
        .collect()
}

/// The columns of the dot-product form, `[Y_j (D), H_j, rest_j…]` (stride D + 1 + rest), from
/// `col(j) = (y_j, h_j, rest_j)`.
fn dot_cols<'a, T: Real>(
    m: usize,
    d: usize,
    c: &[f64],
    eps: f64,
    col: impl Fn(usize) -> (&'a [T], T, &'a [T]),
) -> Vec<T> {
    let kappa = std::f64::consts::LOG2_E;
    let mut out = Vec::with_capacity(m * (d + 1 + col(0).2.len()));
    for j in 0..m {
        let (yj, hj, rest) = col(j);
        let mut sq = 0.0;
        for k in 0..d {
            let t = yj[k].to_f64() - c[k];
            sq += t * t;
            out.push(T::from_f64(t));
        }
        out.push(T::from_f64(kappa * (hj.to_f64() - sq / (2.0 * eps))));
        out.extend_from_slice(rest);
    }
    out
}

/// Loads rows `i0..i0 + L` of `p` (stride `ps`; a partial block is padded with row `n − 1`)
/// as the block `X` of the dot-product form, and returns their `R_i` (f64).
fn dot_rows<T: Real>(
    p: &[T],
    ps: usize,
    (i0, n, d): (usize, usize, usize),
    c: &[f64],
    eps: f64,
    xs: &mut [[T; L]],
) -> [f64; L] {
    let kappa = std::f64::consts::LOG2_E;
    let mut r = [0.0; L];
    for l in 0..L {
        let i = (i0 + l).min(n - 1);
        let mut sq = 0.0;
        for k in 0..d {
            let t = p[i * ps + k].to_f64() - c[k];
            sq += t * t;
            xs[k][l] = T::from_f64(kappa * t / eps);
        }
        r[l] = kappa * sq / (2.0 * eps);
    }
    r
}

/// `z_l = H + Σ_k X_kl Y_k` of one column `q = [Y (D), H, …]` against a block of rows.
#[inline(always)]
fn dot_exponent<T: Real, const F: bool>(d: usize, xs: &[[T; L]], q: &[T]) -> [T; L] {
    let mut z = [q[d]; L];
    for k in 0..d {
        let yk = q[k];
        for l in 0..L {
            z[l] = fma::<T, F>(xs[k][l], yk, z[l]);
        }
    }
    z
}

/// Folds a tile's maxima into the running maxima `mx` (base 2); returns the factors that
/// rescale the running sums and the shifts of the tile's exponents (0 where the maximum is
/// still −∞, so that nothing is ever exponentiated unshifted or as −∞ − (−∞)). A maximum
/// that does not move rescales by exactly 1 (the f32 polynomial's 2^0 is 1 + 1 ulp, which
/// would otherwise compound over the tiles).
#[inline(always)]
fn fold_max2<T: Real, const F: bool>(mx: &mut [T; L], tmax: &[T; L]) -> ([T; L], [T; L]) {
    let mut rescale = [T::ZERO; L];
    let mut shift = [T::ZERO; L];
    for l in 0..L {
        let nm = mx[l].fmax(tmax[l]);
        let safe = if nm == T::NEG_INFINITY { T::ZERO } else { nm };
        let r = (mx[l] - safe).exp2_le0::<F>();
        rescale[l] = if mx[l] == nm { T::ONE } else { r };
        mx[l] = nm;
        shift[l] = safe;
    }
    (rescale, shift)
}

/// Running base-2 `(max, sum)` of one block of rows `xs` (the `X` of the dot-product form)
/// against the columns `cols = [Y_j (D), H_j]`: `max_l = max_j z_lj`, `sum_l = Σ_j 2^{z_lj − max_l}`.
/// Each tile of [`TJ`] columns is one pass computing and storing its exponents (D FMAs each) and
/// their maxima, a rescale of the sums, and one pass of exponentials.
#[inline(always)]
fn softmin_dot_body<T: Real, const F: bool>(
    d: usize,
    xs: &[[T; L]],
    cols: &[T],
) -> ([T; L], [T; L]) {
    let cs = d + 1;
    let mut mx = [T::NEG_INFINITY; L];
    let mut s = [T::ZERO; L];
    let mut zb = [[T::ZERO; L]; TJ];
    for tile in cols.chunks(TJ * cs) {
        let mut tmax = [T::NEG_INFINITY; L];
        for (z, q) in zb.iter_mut().zip(tile.chunks_exact(cs)) {
            *z = dot_exponent::<T, F>(d, xs, q);
            for l in 0..L {
                tmax[l] = tmax[l].fmax(z[l]);
            }
        }
        let (rescale, shift) = fold_max2::<T, F>(&mut mx, &tmax);
        for l in 0..L {
            s[l] *= rescale[l];
        }
        for z in zb.iter().take(tile.len() / cs) {
            for l in 0..L {
                // s += p·2^n: the product is exact, so one FMA rounds as the add did.
                let (p, scale) = (z[l] - shift[l]).exp2_split::<F>();
                s[l] = fma::<T, F>(p, scale, s[l]);
            }
        }
    }
    (mx, s)
}

/// The gradient reduction of one block of rows in the dot-product form, columns
/// `[Y_j (D), H_j, w_j]`: `acc[k][l] = Σ_j 2^{z_lj − max_l} w_j Y_jk` (k < D) and
/// `acc[D][l] = Σ_j 2^{z_lj − max_l} w_j`. Returns the running maxima (base 2).
#[inline(always)]
fn grad_dot_body<T: Real, const F: bool>(
    d: usize,
    xs: &[[T; L]],
    cols: &[T],
    acc: &mut [[T; L]],
) -> [T; L] {
    let cs = d + 2;
    let mut mx = [T::NEG_INFINITY; L];
    for a in acc.iter_mut() {
        *a = [T::ZERO; L];
    }
    let mut zb = [[T::ZERO; L]; TJ];
    for tile in cols.chunks(TJ * cs) {
        let mut tmax = [T::NEG_INFINITY; L];
        for (z, q) in zb.iter_mut().zip(tile.chunks_exact(cs)) {
            *z = dot_exponent::<T, F>(d, xs, q);
            for l in 0..L {
                tmax[l] = tmax[l].fmax(z[l]);
            }
        }
        let (rescale, shift) = fold_max2::<T, F>(&mut mx, &tmax);
        for a in acc.iter_mut() {
            for l in 0..L {
                a[l] *= rescale[l];
            }
        }
        for (z, q) in zb.iter().zip(tile.chunks_exact(cs)) {
            let w = q[d + 1];
            let mut ew = [T::ZERO; L];
            for l in 0..L {
                ew[l] = (z[l] - shift[l]).exp2_le0::<F>() * w;
            }
            for k in 0..d {
                let yk = q[k];
                for l in 0..L {
                    acc[k][l] = fma::<T, F>(ew[l], yk, acc[k][l]);
                }
            }
            for l in 0..L {
                acc[d][l] += ew[l];
            }
        }
    }
    mx
}

/// Instantiates a dot-form block kernel for the small dimensions, and for the x86-64 SIMD
/// levels (with FMA) behind run-time detection: `$name(level, d, args…)`.
macro_rules! dot_kernel {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[inline(always)]
        fn $name<T: Real>(level: SimdLevel, d: usize, $($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn by_d<T: Real, const F: bool>(d: usize, $($arg: $ty),*) -> $ret {
                match d {
                    1 => $body::<T, F>(1, $($arg),*),
                    2 => $body::<T, F>(2, $($arg),*),
                    3 => $body::<T, F>(3, $($arg),*),
                    4 => $body::<T, F>(4, $($arg),*),
                    8 => $body::<T, F>(8, $($arg),*),
                    _ => $body::<T, F>(d, $($arg),*),
                }
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
            unsafe fn avx512<T: Real>(d: usize, $($arg: $ty),*) -> $ret {
                by_d::<T, true>(d, $($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<T: Real>(d: usize, $($arg: $ty),*) -> $ret {
                by_d::<T, true>(d, $($arg),*)
            }
            match level {
                // SAFETY: the level was detected at run time on this CPU by `simd_level`.
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx512 => unsafe { avx512::<T>(d, $($arg),*) },
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx2 => unsafe { avx2::<T>(d, $($arg),*) },
                _ => by_d::<T, PORTABLE_FMA>(d, $($arg),*),
            }
        }
    };
}

dot_kernel!(softmin_dot_block, softmin_dot_body, (xs: &[[T; L]], cols: &[T]) -> ([T; L], [T; L]));
dot_kernel!(grad_dot_block, grad_dot_body, (xs: &[[T; L]], cols: &[T], acc: &mut [[T; L]]) -> [T; L]);

/// Softmin of one batch item for the squared Euclidean cost, in the dot-product form.
fn softmin_item_dot<T: Real>(
    level: SimdLevel,
    eps: f64,
    (x, y, h): (&[T], &[T], &[T]),
    d: usize,
    out: &mut [T],
) {
    let n = out.len();
    let c = centre(x, y, d);
    let cols = dot_cols(h.len(), d, &c, eps, |j| (&y[j * d..j * d + d], h[j], &[]));
    let ln2 = std::f64::consts::LN_2;
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, out_task)| {
            let mut xs = vec![[T::ZERO; L]; d];
            for (blk, out_blk) in out_task.chunks_mut(L).enumerate() {
                let i0 = task * ROWS_PER_TASK + blk * L;
                let r = dot_rows(x, d, (i0, n, d), &c, eps, &mut xs);
                let (mx, s) = softmin_dot_block(level, d, &xs, &cols);
                for (l, o) in out_blk.iter_mut().enumerate() {
                    // −ε (ln 2 (max − R) + ln sum); +∞ for a row whose columns are all masked.
                    let v = ln2 * (mx[l].to_f64() - r[l]) + s[l].to_f64().ln();
                    *o = T::from_f64(-eps * v);
                }
            }
        });
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

/// The sizes `(rows, columns)` that batch item `bi` reduces: its lengths for a ragged batch,
/// else the full `(n, m)`.
#[inline]
pub(crate) fn item_sizes(
    lens: Option<(&[usize], &[usize])>,
    bi: usize,
    n: usize,
    m: usize,
) -> (usize, usize) {
    match lens {
        Some((r, c)) => (r[bi].min(n), c[bi].min(m)),
        None => (n, m),
    }
}

/// Batched softmin: x (B, N, D), y (B, M, D), h (B, M) → out (B, N). With `lens` (a ragged
/// batch stored padded: rows and columns per item), item b reduces its first `rows[b]` rows
/// over its first `cols[b]` columns only and leaves its padding rows untouched.
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmin<T: Real>(
    cost: CostKind,
    eps: f64,
    x: &[T],
    y: &[T],
    h: &[T],
    (b, n, m, d): (usize, usize, usize, usize),
    lens: Option<(&[usize], &[usize])>,
    out: &mut [T],
) {
    let level = simd_level();
    crate::threads::install(|| {
        out.par_chunks_mut(n).enumerate().for_each(|(bi, ob)| {
            let _ = b;
            let (nb, mb) = item_sizes(lens, bi, n, m);
            if nb == 0 {
                return;
            }
            let (xb, yb, hb) = (
                &x[bi * n * d..(bi * n + nb) * d],
                &y[bi * m * d..(bi * m + mb) * d],
                &h[bi * m..bi * m + mb],
            );
            let ob = &mut ob[..nb];
            if cost == CostKind::SqEuclidean && mb > 0 {
                return softmin_item_dot(level, eps, (xb, yb, hb), d, ob);
            }
            softmin_item(level, cost, eps, xb, yb, hb, d, ob)
        })
    })
}

// ---------------------------------------------------------------------------------------
// roofline
// ---------------------------------------------------------------------------------------

/// The instruction mix of the roofline micro-benchmark ([`roofline`]). Internal: used by the
/// `roofline` example and `docs/performance.md`, hidden from the API docs.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RooflineMix {
    /// The softmin's mix, per pair: the distance (D subtractions and D multiply-adds), the
    /// exponent `z = h − C/ε` (one FMA), the running max, the exponential, the accumulate.
    Distance,
    /// The mix of the softmin kernel's squared-Euclidean path: the exponent `z = H + X·Y`
    /// (D FMAs), the running max, the exponential, the accumulate.
    Dot,
}

/// Columns of the roofline: few enough to stay in L1 (and in the load ports' broadcasts).
const ROOF_COLS: usize = 64;

/// Rows per roofline block (one kernel block).
const ROOF_ROWS: usize = L;
/// Columns per roofline step: their exponents are computed first, then their exponentials,
/// with one accumulator each, so that the loop exposes independent work to the out-of-order
/// core instead of one exponential's latency after another (the kernel gets the same effect
/// from its two passes per tile).
const ROOF_UNROLL: usize = 2;

/// One block of `ROOF_ROWS` rows against `reps` sweeps of `ROOF_COLS` columns `[y (D), h]`,
/// with no intermediate stores: the running max and the sum of `2^z` (the columns are chosen
/// with z ≤ 0, so the shift is the bound 0). Returns a checksum.
#[inline(always)]
fn roofline_body<T: Real, const F: bool, const DOT: bool>(
    d: usize,
    xs: &[[T; ROOF_ROWS]],
    cols: &[T],
    reps: usize,
) -> T {
    let cs = d + 1;
    let neg_k = T::from_f64(-1.0);
    let mut mx = [T::NEG_INFINITY; ROOF_ROWS];
    let mut s = [[T::ZERO; ROOF_ROWS]; ROOF_UNROLL];
    for _ in 0..reps {
        for qs in cols.chunks_exact(cs * ROOF_UNROLL) {
            let mut z = [[T::ZERO; ROOF_ROWS]; ROOF_UNROLL];
            for (zu, q) in z.iter_mut().zip(qs.chunks_exact(cs)) {
                if DOT {
                    *zu = dot_exponent::<T, F>(d, xs, q);
                } else {
                    let mut sq = [T::ZERO; ROOF_ROWS];
                    for k in 0..d {
                        for l in 0..ROOF_ROWS {
                            let t = xs[k][l] - q[k];
                            sq[l] = fma::<T, F>(t, t, sq[l]);
                        }
                    }
                    for l in 0..ROOF_ROWS {
                        zu[l] = fma::<T, F>(sq[l], neg_k, q[d]);
                    }
                }
            }
            for (zu, su) in z.iter().zip(s.iter_mut()) {
                for l in 0..ROOF_ROWS {
                    mx[l] = mx[l].fmax(zu[l]);
                    let (p, scale) = zu[l].exp2_split::<F>();
                    su[l] = fma::<T, F>(p, scale, su[l]);
                }
            }
        }
    }
    let mut t = T::ZERO;
    for l in 0..ROOF_ROWS {
        t += mx[l];
        for su in &s {
            t += su[l];
        }
    }
    t
}

dot_kernel!(roofline_dot_block, roofline_dot_body, (xs: &[[T; ROOF_ROWS]], cols: &[T], reps: usize) -> T);
dot_kernel!(roofline_dist_block, roofline_dist_body, (xs: &[[T; ROOF_ROWS]], cols: &[T], reps: usize) -> T);

#[inline(always)]
fn roofline_dot_body<T: Real, const F: bool>(
    d: usize,
    xs: &[[T; ROOF_ROWS]],
    c: &[T],
    r: usize,
) -> T {
    roofline_body::<T, F, true>(d, xs, c, r)
}

#[inline(always)]
fn roofline_dist_body<T: Real, const F: bool>(
    d: usize,
    xs: &[[T; ROOF_ROWS]],
    c: &[T],
    r: usize,
) -> T {
    roofline_body::<T, F, false>(d, xs, c, r)
}

/// The roofline micro-benchmark: the per-pair instruction mix of the softmin kernel with its
/// exponential, on blocks of `ROOF_ROWS` rows held in registers against `ROOF_COLS`
/// columns held in L1, with none of the kernel's memory traffic (no stored exponents, no
/// tiles, no rescale). Runs about `n × m` pairs (`n` rounded up to blocks, `m` to
/// `ROOF_COLS`) over the thread pool, on the instruction set of [`simd_level`]. Returns
/// `(pairs run, checksum)`. Internal (benchmarks), hidden from the API docs.
#[doc(hidden)]
pub fn roofline(
    mix: RooflineMix,
    dtype: candle_core::DType,
    (n, m, d): (usize, usize, usize),
) -> candle_core::Result<(u64, f64)> {
    match dtype {
        candle_core::DType::F32 => Ok(roofline_t::<f32>(mix, n, m, d)),
        candle_core::DType::F64 => Ok(roofline_t::<f64>(mix, n, m, d)),
        dt => candle_core::bail!("roofline: unsupported dtype {dt:?} (f32 or f64)"),
    }
}

fn roofline_t<T: Real>(mix: RooflineMix, n: usize, m: usize, d: usize) -> (u64, f64) {
    let level = simd_level();
    let blocks = n.div_ceil(ROOF_ROWS).max(1);
    let reps = m.div_ceil(ROOF_COLS).max(1);
    // Rows in [0, 1), columns with h ≤ 0 so that every exponent is ≤ 0 in both mixes.
    let xs: Vec<[T; ROOF_ROWS]> = (0..d)
        .map(|k| std::array::from_fn(|l| T::from_f64(((l * 7 + k * 3) % 16) as f64 / 16.0)))
        .collect();
    let mut cols = Vec::with_capacity(ROOF_COLS * (d + 1));
    for j in 0..ROOF_COLS {
        for k in 0..d {
            cols.push(T::from_f64(((j * 5 + k) % 16) as f64 / 16.0 * 0.01));
        }
        cols.push(T::from_f64(-((j % 8) as f64) - 8.0));
    }
    let sum = crate::threads::install(|| {
        (0..blocks)
            .into_par_iter()
            .map(|_| {
                let t = match mix {
                    RooflineMix::Dot => roofline_dot_block(level, d, &xs, &cols, reps),
                    RooflineMix::Distance => roofline_dist_block(level, d, &xs, &cols, reps),
                };
                t.to_f64()
            })
            .sum::<f64>()
    });
    ((blocks * ROOF_ROWS * reps * ROOF_COLS) as u64, sum)
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

/// One block of [`L`] rows of the gradient reduction on the instruction set `level` (see
/// [`grad_block_body`]): overwrites `acc` and returns the running maxima. Also used by the
/// block-sparse multiscale kernels, one call per kept column range.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) fn grad_block<T: Real>(
    level: SimdLevel,
    cost: CostKind,
    with_mass: bool,
    d: usize,
    inv_eps: T,
    xs: &[[T; L]],
    alpha: &[T; L],
    cols: &[T],
    acc: &mut [[T; L]],
) -> [T; L] {
    match level {
        // SAFETY: the level was detected at run time on this CPU by `simd_level`.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe {
            grad_block_avx512(cost, with_mass, d, inv_eps, xs, alpha, cols, acc)
        },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe {
            grad_block_avx2(cost, with_mass, d, inv_eps, xs, alpha, cols, acc)
        },
        _ => grad_block_dispatch(cost, with_mass, d, inv_eps, xs, alpha, cols, acc),
    }
}

/// The blocked gradient reduction of one batch item (see [`Weighted::Grad`]) for the squared
/// Euclidean cost, in the dot-product form: `out_r = 2^{max_r − R_r} [(p_r − c)·mass_r − acc_r,
/// mass_r]`, the sum `Σ_c e^{z_rc} w_c (p_r − q_c)` split as `(p_r − c) Σ_c e^{z_rc} w_c −
/// Σ_c e^{z_rc} w_c (q_c − c)`, with `R_r = κ(|p_r − c|²/2ε − α_r)`.
#[allow(clippy::too_many_arguments)]
fn grad_item_dot<T: Real>(
    level: SimdLevel,
    eps: f64,
    rows: &[T],
    cols: &[T],
    d: usize,
    with_mass: bool,
    out: &mut [T],
) {
    let (rs, cs) = (d + 1, d + 2);
    let od = d + with_mass as usize;
    let n = out.len() / od;
    let m = cols.len() / cs;
    let kappa = std::f64::consts::LOG2_E;
    let mut c = vec![0.0; d];
    {
        // The centre of the rows' and columns' points (both strided here).
        let (mut lo, mut hi) = (vec![f64::INFINITY; d], vec![f64::NEG_INFINITY; d]);
        for p in rows.chunks_exact(rs).chain(cols.chunks_exact(cs)) {
            for k in 0..d {
                lo[k] = lo[k].min(p[k].to_f64());
                hi[k] = hi[k].max(p[k].to_f64());
            }
        }
        for k in 0..d {
            if lo[k] <= hi[k] {
                c[k] = 0.5 * (lo[k] + hi[k]);
            }
        }
    }
    let prep = dot_cols(m, d, &c, eps, |j| {
        let q = &cols[j * cs..(j + 1) * cs];
        (&q[..d], q[d], &q[d + 1..])
    });
    out.par_chunks_mut(ROWS_PER_TASK * od)
        .enumerate()
        .for_each(|(task, out_task)| {
            let mut xs = vec![[T::ZERO; L]; d];
            let mut acc = vec![[T::ZERO; L]; d + 1];
            for (blk, out_blk) in out_task.chunks_mut(L * od).enumerate() {
                let i0 = task * ROWS_PER_TASK + blk * L;
                let r = dot_rows(rows, rs, (i0, n, d), &c, eps, &mut xs);
                let mx = grad_dot_block(level, d, &xs, &prep, &mut acc);
                for (l, o) in out_blk.chunks_mut(od).enumerate() {
                    let i = i0 + l;
                    let alpha = rows[i * rs + d].to_f64();
                    let total = (mx[l].to_f64() - r[l] + kappa * alpha).exp2();
                    let mass = acc[d][l].to_f64();
                    for k in 0..d {
                        let pk = rows[i * rs + k].to_f64() - c[k];
                        o[k] = T::from_f64(total * (pk * mass - acc[k][l].to_f64()));
                    }
                    if with_mass {
                        o[d] = T::from_f64(total * mass);
                    }
                }
            }
        });
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
/// With `lens` (ragged, see [`softmin`]) item b reduces its first `rows[b]` rows over its first
/// `cols[b]` columns and leaves its padding rows untouched.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lse_weighted<T: Real>(
    cost: CostKind,
    eps: f64,
    rows: &[T],
    cols: &[T],
    (n, m, d): (usize, usize, usize),
    mode: Weighted,
    lens: Option<(&[usize], &[usize])>,
    out: &mut [T],
) {
    let rs = d + 1;
    let cs = mode.col_dim(d);
    let od = mode.out_dim(d);
    let level = simd_level();
    crate::threads::install(|| {
        out.par_chunks_mut(n * od).enumerate().for_each(|(bi, ob)| {
            let (nb, mb) = item_sizes(lens, bi, n, m);
            if nb == 0 {
                return;
            }
            let (rb, cb) = (
                &rows[bi * n * rs..(bi * n + nb) * rs],
                &cols[bi * m * cs..(bi * m + mb) * cs],
            );
            let ob = &mut ob[..nb * od];
            if let Weighted::Grad { with_mass } = mode {
                if cost == CostKind::SqEuclidean && mb > 0 {
                    return grad_item_dot(level, eps, rb, cb, d, with_mass, ob);
                }
                return grad_item(level, cost, eps, rb, cb, d, with_mass, ob);
            }
            lse_weighted_item(cost, eps, rb, cb, d, mode, ob)
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
/// With `lens` (ragged, see [`softmin`]) item b sums its first `cols[b]` columns for its first
/// `rows[b]` rows and leaves its padding rows untouched.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kernel_sums<T: Real>(
    kind: KernelKind,
    sigma: f64,
    rows: &[T],
    cols: &[T],
    (n, m, d): (usize, usize, usize),
    grad: bool,
    lens: Option<(&[usize], &[usize])>,
    out: &mut [T],
) {
    let od = if grad { d + 1 } else { 1 };
    crate::threads::install(|| {
        out.par_chunks_mut(n * od).enumerate().for_each(|(bi, ob)| {
            let (nb, mb) = item_sizes(lens, bi, n, m);
            kernel_sums_item(
                kind,
                sigma,
                &rows[bi * n * d..(bi * n + nb) * d],
                &cols[bi * m * (d + 1)..(bi * m + mb) * (d + 1)],
                d,
                grad,
                &mut ob[..nb * od],
            )
        })
    })
}
