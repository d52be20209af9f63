//! The CPU kernel of the grid softmin: one pass of 1-D log-sum-exps along one axis,
//!
//! ```text
//! dst[o, i, l] = scale · log Σ_j exp(src[o, j, l] − κ[|i − j|]),
//! ```
//!
//! for an array `(outer, n, inner)` and a kernel table `κ` (n values). A pass treats
//! [`L`] lines at once (SIMD lanes): neighbouring columns `l` of one `o` when `inner > 1`,
//! neighbouring `o` when the axis is the last one (`inner = 1`); the lines are gathered into a
//! `(n, L)` scratch so that both cases run the same vectorised loops.
//!
//! # Exact truncation
//!
//! Each lane is first shifted by its own maximum over the line (the log-sum-exp is
//! shift-equivariant, and the shift is added back to the output), so that the lanes of a group,
//! whose levels may differ by thousands (potentials over ε), share one level and the bounds
//! below, taken over all lanes at once, are tight. Each output then gets its exact maximum `m_l = max_j (v_j,l − κ_|i−j|)` (lane by lane).
//! The sum `Σ_j exp(v_j,l − κ_|i−j| − m_l)` then runs only over the columns `j ∈ [j_lo, j_hi]`
//! outside which every term of every lane is below `exp(−T)`, with `T = ln n + 17.4` (f32) or
//! `ln n + 37.5` (f64): the at most `n` dropped terms add less than `e^{−17.4} = 2.8·10⁻⁸`
//! (f32) or `5·10⁻¹⁷` (f64) to a sum that is at least 1 (the maximum's own term), i.e. less
//! than half an ulp of the dtype. The truncated value is therefore the full one to the
//! rounding of the dtype, whatever the densities and potentials; the tests compare both with
//! the dense twin. The maximum itself is found by a branch-and-bound over blocks of [`BJ`]
//! columns: a block whose bound `max_j,l v_j,l − min_j κ_|i−j|` does not exceed the smallest
//! lane maximum found so far cannot change any lane's maximum and is skipped (exactly).

#![allow(clippy::needless_range_loop)]

use crate::softmin::online::cpu::{simd_level, SimdLevel};
use crate::softmin::online::real::Real;
use rayon::prelude::*;

/// Lines per group (SIMD lanes).
pub(crate) const L: usize = 16;
/// Columns per block of the branch-and-bound maximum.
const BJ: usize = 16;

/// The truncation threshold `T` of the module docs for lines of length `n`.
fn threshold<T: Real>(n: usize) -> T {
    let digits = if std::mem::size_of::<T>() == 4 {
        17.4
    } else {
        37.5
    };
    T::from_f64((n.max(1) as f64).ln() + digits)
}

/// One group of `L` lines: `buf` (n, L) → `out` (n, L) (unscaled log-sum-exps).
/// `ks` is the symmetric kernel, `ks[n − 1 + d] = κ[|d|]`, length `2n − 1`.
#[inline(always)]
fn group_body<T: Real>(buf: &mut [[T; L]], ks: &[T], out: &mut [[T; L]], thresh: T) {
    let n = buf.len();
    // Shift every lane by its own maximum (log-sum-exps are shift-equivariant): the lanes are
    // different lines whose levels may differ by thousands (the potentials over ε), and the
    // bounds below, taken over all lanes at once, are only tight once the lanes share a level.
    let mut lane_max = [T::NEG_INFINITY; L];
    for r in buf.iter() {
        for l in 0..L {
            lane_max[l] = lane_max[l].fmax(r[l]);
        }
    }
    for l in 0..L {
        if lane_max[l] == T::NEG_INFINITY {
            lane_max[l] = T::ZERO;
        }
    }
    for r in buf.iter_mut() {
        for l in 0..L {
            r[l] = r[l] - lane_max[l];
        }
    }
    let buf = &*buf;
    // Per-column maximum over the lanes, and per-block maxima of those.
    let colmax: Vec<T> = buf
        .iter()
        .map(|r| r.iter().fold(T::NEG_INFINITY, |a, &b| a.fmax(b)))
        .collect();
    let nb = n.div_ceil(BJ);
    let blockmax: Vec<T> = (0..nb)
        .map(|b| {
            colmax[b * BJ..((b + 1) * BJ).min(n)]
                .iter()
                .fold(T::NEG_INFINITY, |a, &c| a.fmax(c))
        })
        .collect();
    // Lanes with at least one finite value (padding lanes and masked lines are dead: their
    // maximum stays −∞ whatever is skipped).
    let mut live = [false; L];
    for r in buf {
        for l in 0..L {
            live[l] |= r[l] != T::NEG_INFINITY;
        }
    }
    for i in 0..n {
        // κ_|i−j| for j = 0..n.
        let k = &ks[n - 1 - i..2 * n - 1 - i];
        let mut m = [T::NEG_INFINITY; L];
        let mut mmin = T::NEG_INFINITY; // min over lanes of m (a lower bound for every lane)
        let ib = i / BJ;
        // Blocks in the order ib, ib+1, ib−1, ib+2, ib−2, …
        for step in 0..2 * nb {
            let b = if step % 2 == 0 {
                ib + step / 2
            } else if step / 2 < ib {
                ib - step / 2 - 1
            } else {
                continue;
            };
            if b >= nb {
                continue;
            }
            let (j0, j1) = (b * BJ, ((b + 1) * BJ).min(n));
            // The smallest κ over the block: at the column nearest i.
            let dmin = if i < j0 {
                j0 - i
            } else if i >= j1 {
                i + 1 - j1
            } else {
                0
            };
            let kmin = ks[n - 1 + dmin];
            if blockmax[b] - kmin <= mmin {
                continue;
            }
            for j in j0..j1 {
                let kj = k[j];
                let r = &buf[j];
                for l in 0..L {
                    m[l] = m[l].fmax(r[l] - kj);
                }
            }
            mmin = -T::NEG_INFINITY;
            for l in 0..L {
                if live[l] && m[l] < mmin {
                    mmin = m[l];
                }
            }
        }
        // Lanes with a finite maximum; the truncation bound uses the smallest of them.
        let mut shift = [T::ZERO; L];
        let mut lo = T::NEG_INFINITY;
        let mut any = false;
        for l in 0..L {
            if m[l] != T::NEG_INFINITY {
                shift[l] = m[l];
                lo = if any && lo < m[l] { lo } else { m[l] };
                any = true;
            }
        }
        if !any {
            out[i] = [T::NEG_INFINITY; L];
            continue;
        }
        let cut = lo - thresh;
        let mut j_lo = 0;
        while j_lo < n && colmax[j_lo] - k[j_lo] < cut {
            j_lo += 1;
        }
        let mut j_hi = n;
        while j_hi > j_lo && colmax[j_hi - 1] - k[j_hi - 1] < cut {
            j_hi -= 1;
        }
        let mut s = [T::ZERO; L];
        for j in j_lo..j_hi {
            let kj = k[j];
            let r = &buf[j];
            for l in 0..L {
                s[l] += (r[l] - kj - shift[l]).exp_le0();
            }
        }
        for l in 0..L {
            out[i][l] = if m[l] == T::NEG_INFINITY {
                T::NEG_INFINITY
            } else {
                lane_max[l] + (m[l] + s[l].ln())
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn group_avx512<T: Real>(buf: &mut [[T; L]], ks: &[T], out: &mut [[T; L]], thresh: T) {
    group_body(buf, ks, out, thresh)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2<T: Real>(buf: &mut [[T; L]], ks: &[T], out: &mut [[T; L]], thresh: T) {
    group_body(buf, ks, out, thresh)
}

fn group<T: Real>(level: SimdLevel, buf: &mut [[T; L]], ks: &[T], out: &mut [[T; L]], thresh: T) {
    match level {
        // SAFETY: the level was detected at run time on this CPU by `simd_level`.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { group_avx512(buf, ks, out, thresh) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { group_avx2(buf, ks, out, thresh) },
        _ => group_body(buf, ks, out, thresh),
    }
}

/// One axis pass (module docs): `src`, `dst` are `(outer, n, inner)`, `kern` holds κ[0..n].
pub(crate) fn lse_pass<T: Real>(
    src: &[T],
    dst: &mut [T],
    (outer, n, inner): (usize, usize, usize),
    kern: &[T],
    scale: T,
) {
    debug_assert_eq!(src.len(), outer * n * inner);
    debug_assert_eq!(kern.len(), n);
    if n == 0 || outer * inner == 0 {
        return;
    }
    let level = simd_level();
    let thresh = threshold::<T>(n);
    let ks: Vec<T> = (0..2 * n - 1)
        .map(|t| kern[(t as isize - (n as isize - 1)).unsigned_abs()])
        .collect();
    // A group: its first element, the stride between its lanes and between its columns.
    let groups: Vec<(usize, usize, usize, usize)> = if inner == 1 {
        (0..outer.div_ceil(L))
            .map(|g| (g * L * n, n, 1, L.min(outer - g * L)))
            .collect()
    } else {
        (0..outer)
            .flat_map(|o| {
                (0..inner.div_ceil(L))
                    .map(move |c| (o * n * inner + c * L, 1, inner, L.min(inner - c * L)))
            })
            .collect()
    };
    let results: Vec<Vec<[T; L]>> = crate::threads::install(|| {
        groups
            .par_iter()
            .map(|&(base, lane_stride, col_stride, lanes)| {
                let mut buf = vec![[T::NEG_INFINITY; L]; n];
                for (j, row) in buf.iter_mut().enumerate() {
                    for (l, v) in row.iter_mut().enumerate().take(lanes) {
                        *v = src[base + l * lane_stride + j * col_stride];
                    }
                }
                let mut out = vec![[T::ZERO; L]; n];
                group(level, &mut buf, &ks, &mut out, thresh);
                out
            })
            .collect()
    });
    for (&(base, lane_stride, col_stride, lanes), out) in groups.iter().zip(&results) {
        for (i, row) in out.iter().enumerate() {
            for (l, &v) in row.iter().enumerate().take(lanes) {
                dst[base + l * lane_stride + i * col_stride] = scale * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(src: &[f64], (outer, n, inner): (usize, usize, usize), kern: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; src.len()];
        for o in 0..outer {
            for i in 0..n {
                for l in 0..inner {
                    let t: Vec<f64> = (0..n)
                        .map(|j| src[(o * n + j) * inner + l] - kern[i.abs_diff(j)])
                        .collect();
                    let m = t.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    out[(o * n + i) * inner + l] = if m == f64::NEG_INFINITY {
                        m
                    } else {
                        m + t.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
                    };
                }
            }
        }
        out
    }

    #[test]
    fn pass_matches_the_naive_sum_on_every_layout() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 11) as f64) / ((1u64 << 53) as f64)
        };
        for &(outer, n, inner) in &[(1, 1, 1), (3, 17, 1), (2, 29, 5), (1, 40, 33), (37, 7, 1)] {
            let src: Vec<f64> = (0..outer * n * inner)
                .map(|t| {
                    if t % 7 == 3 {
                        f64::NEG_INFINITY
                    } else {
                        30.0 * rnd() - 15.0
                    }
                })
                .collect();
            let kern: Vec<f64> = (0..n).map(|d| 0.7 * (d * d) as f64).collect();
            let want = naive(&src, (outer, n, inner), &kern);
            let mut got = vec![0.0; src.len()];
            lse_pass(&src, &mut got, (outer, n, inner), &kern, 1.0);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g == w) || (g - w).abs() <= 1e-13 * w.abs().max(1.0),
                    "({outer}, {n}, {inner}): {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn all_masked_lines_give_minus_infinity() {
        let src = vec![f64::NEG_INFINITY; 12];
        let mut got = vec![0.0; 12];
        lse_pass(&src, &mut got, (3, 4, 1), &[0.0, 1.0, 4.0, 9.0], 1.0);
        assert!(got.iter().all(|v| *v == f64::NEG_INFINITY));
    }
}
