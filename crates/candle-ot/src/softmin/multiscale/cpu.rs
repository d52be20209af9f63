//! Block-sparse streaming CPU reductions: the online kernels restricted to kept blocks.
//!
//! Row cluster I of a [`Blocks`] pattern is reduced over its column spans only. Rows are cut
//! into tasks of at most [`ROWS_PER_TASK`] rows inside one cluster (so a task has one span
//! list), each task in blocks of [`L`] rows (a partial block is padded with its last row).
//! For each span, the vectorised block kernels of [`crate::softmin::online::cpu`]
//! (`softmin_block`, `grad_block`) return a running `(max, sum)` (or `(max, acc)`), and spans are
//! combined with the same associative rule
//! `(m, s) + (m', s') = (M, s·e^{m−M} + s'·e^{m'−M})`, `M = max(m, m')`, guarded so that two
//! −∞ maxima give `(−∞, 0)`. Each output row is reduced by one thread in a fixed order: results
//! do not depend on the number of threads.

#![allow(clippy::needless_range_loop)]

use super::cluster::Blocks;
use crate::cost::CostKind;
use crate::softmin::online::cpu::{grad_block, simd_level, softmin_block, L};
use crate::softmin::online::real::Real;
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 4 * L;

/// Row tasks `(start, end, row cluster)` of a pattern, each inside one cluster.
fn tasks(blocks: &Blocks) -> Vec<(usize, usize, usize)> {
    let mut t = Vec::new();
    for (r, &(s, e)) in blocks.rows.iter().enumerate() {
        let (s, e) = (s as usize, e as usize);
        let mut i = s;
        while i < e {
            let j = (i + ROWS_PER_TASK).min(e);
            t.push((i, j, r));
            i = j;
        }
    }
    t
}

/// Splits `out` (rows of `width` values) into the disjoint row ranges of `tasks`, which cover
/// `0..n` in order.
fn split_rows<'a, T>(
    mut out: &'a mut [T],
    tasks: &[(usize, usize, usize)],
    width: usize,
) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(tasks.len());
    let mut at = 0;
    for &(s, e, _) in tasks {
        debug_assert_eq!(s, at);
        let (head, tail) = std::mem::take(&mut out).split_at_mut((e - s) * width);
        parts.push(head);
        out = tail;
        at = e;
    }
    parts
}

/// `e^{a − safe}` and `e^{b − safe}` for the combine, with `safe = max(a, b)` or 0 when both
/// are −∞.
#[inline(always)]
fn combine_factors<T: Real>(a: T, b: T) -> (T, T, T) {
    let nm = a.fmax(b);
    let safe = if nm == T::NEG_INFINITY { T::ZERO } else { nm };
    ((a - safe).exp_le0(), (b - safe).exp_le0(), nm)
}

/// Block-sparse softmin of one batch item: `f_i = −ε log Σ_{j ∈ kept(i)} exp(h_j − C(x_i, y_j)/ε)`.
/// x (N·D) sorted by row cluster, y (M·D), h (M), out (N). A row with no kept column gives +∞.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_softmin<T: Real>(
    cost: CostKind,
    eps: f64,
    x: &[T],
    y: &[T],
    h: &[T],
    d: usize,
    blocks: &Blocks,
    out: &mut [T],
) {
    let level = simd_level();
    let inv_eps = T::from_f64(1.0 / eps);
    let eps_t = T::from_f64(eps);
    let tasks = tasks(blocks);
    let parts = split_rows(out, &tasks, 1);
    crate::threads::install(|| {
        parts
            .into_par_iter()
            .zip(tasks.par_iter())
            .for_each(|(out_task, &(s, e, r))| {
                let spans = blocks.spans_of(r);
                let mut xs = vec![[T::ZERO; L]; d];
                for (blk, out_blk) in out_task.chunks_mut(L).enumerate() {
                    let i0 = s + blk * L;
                    for l in 0..L {
                        let i = (i0 + l).min(e - 1);
                        for k in 0..d {
                            xs[k][l] = x[i * d + k];
                        }
                    }
                    let mut mx = [T::NEG_INFINITY; L];
                    let mut sm = [T::ZERO; L];
                    for &(c0, c1) in spans {
                        let (c0, c1) = (c0 as usize, c1 as usize);
                        let (m2, s2) = softmin_block(
                            level,
                            cost,
                            d,
                            inv_eps,
                            &xs,
                            &y[c0 * d..c1 * d],
                            &h[c0..c1],
                        );
                        for l in 0..L {
                            let (f1, f2, nm) = combine_factors(mx[l], m2[l]);
                            sm[l] = sm[l] * f1 + s2[l] * f2;
                            mx[l] = nm;
                        }
                    }
                    for (l, o) in out_blk.iter_mut().enumerate() {
                        *o = -eps_t * (mx[l] + sm[l].ln());
                    }
                }
            })
    })
}

/// Block-sparse gradient reduction of one batch item (the online `Weighted::Grad` mode):
/// `out_r = e^{M_r} [Σ_c e^{z_rc − M_r} w_c ∇₁C(p_r, q_c), Σ_c e^{z_rc − M_r} w_c]` over the
/// kept columns c of row r, with `z_rc = α_r + β_c − C(p_r, q_c)/ε`.
/// Rows `[p (D), α]` (N·(D+1)), columns `[q (D), β, w]` (M·(D+2)), out N·(D + with_mass).
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_grad<T: Real>(
    cost: CostKind,
    eps: f64,
    rows: &[T],
    cols: &[T],
    d: usize,
    with_mass: bool,
    blocks: &Blocks,
    out: &mut [T],
) {
    let level = simd_level();
    let inv_eps = T::from_f64(1.0 / eps);
    let (rs, cs) = (d + 1, d + 2);
    let od = d + with_mass as usize;
    let tasks = tasks(blocks);
    let parts = split_rows(out, &tasks, od);
    crate::threads::install(|| {
        parts
            .into_par_iter()
            .zip(tasks.par_iter())
            .for_each(|(out_task, &(s, e, r))| {
                let spans = blocks.spans_of(r);
                let mut xs = vec![[T::ZERO; L]; d];
                let mut acc = vec![[T::ZERO; L]; d + 1];
                let mut tot = vec![[T::ZERO; L]; d + 1];
                for (blk, out_blk) in out_task.chunks_mut(L * od).enumerate() {
                    let i0 = s + blk * L;
                    let mut alpha = [T::ZERO; L];
                    for l in 0..L {
                        let i = (i0 + l).min(e - 1);
                        for k in 0..d {
                            xs[k][l] = rows[i * rs + k];
                        }
                        alpha[l] = rows[i * rs + d];
                    }
                    let mut mx = [T::NEG_INFINITY; L];
                    for t in tot.iter_mut() {
                        *t = [T::ZERO; L];
                    }
                    for &(c0, c1) in spans {
                        let (c0, c1) = (c0 as usize, c1 as usize);
                        let m2 = grad_block(
                            level,
                            cost,
                            with_mass,
                            d,
                            inv_eps,
                            &xs,
                            &alpha,
                            &cols[c0 * cs..c1 * cs],
                            &mut acc,
                        );
                        for l in 0..L {
                            let (f1, f2, nm) = combine_factors(mx[l], m2[l]);
                            for k in 0..od {
                                tot[k][l] = tot[k][l] * f1 + acc[k][l] * f2;
                            }
                            mx[l] = nm;
                        }
                    }
                    for (l, o) in out_blk.chunks_mut(od).enumerate() {
                        let total = if mx[l] == T::NEG_INFINITY {
                            T::ZERO
                        } else {
                            mx[l].exp()
                        };
                        for (k, ok) in o.iter_mut().enumerate() {
                            *ok = tot[k][l] * total;
                        }
                    }
                }
            })
    })
}
