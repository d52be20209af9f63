//! The symmetric, ε-scaling Sinkhorn loop of GeomLoss, generic over a [`Softmin`].
//!
//! This file contains no device code: it only calls [`Softmin::cost`] and
//! [`Softmin::softmin`]. With `λ(ε) = 1/(1 + ε/ρ)` (1 when balanced) and ε₀ the first value
//! of the schedule:
//!
//! 1. init: `f_ba = λ softmin(ε₀, C_xy, log b)`, `g_ab = λ softmin(ε₀, C_yx, log a)` and,
//!    debiased, `f_aa = λ softmin(ε₀, C_xx, log a)`, `g_bb = λ softmin(ε₀, C_yy, log b)`;
//! 2. for each ε of the schedule, all updates from the current values, then averaged:
//!    `f̃_ba = λ softmin(ε, C_xy, log b + g_ab/ε)`, `g̃_ab = λ softmin(ε, C_yx, log a + f_ba/ε)`,
//!    `f̃_aa = λ softmin(ε, C_xx, log a + f_aa/ε)`, `g̃_bb = λ softmin(ε, C_yy, log b + g_bb/ε)`,
//!    `f ← ½(f + f̃)` for each;
//! 3. optionally (`tol`), more iterations at the last ε until `max_i |f̃_i − f_i| / ε < tol`
//!    over every potential updated (f̃ the next non-averaged update; f_ba, g_ab alternate,
//!    f_aa, g_bb stay averaged);
//! 4. one last non-averaged update at the last ε, the only differentiable step: its costs are
//!    `C(x, y.detach())`, `C(y, x.detach())`, `C(x, x.detach())`, `C(y, y.detach())` and its
//!    right-hand sides `log b + g_ab/ε` etc. are detached, as in GeomLoss.
//!
//! Zero weights enter as `log a = −∞` and are masked out of every softmin.

use crate::schedule::dampening;
use crate::softmin::Softmin;
use candle_core::{Result, Tensor};

/// Parameters of one run of the loop.
#[derive(Clone, Debug)]
pub struct LoopParams {
    /// The ε schedule (last value = blur^p).
    pub eps_list: Vec<f64>,
    /// ρ = reach^p for unbalanced OT, `None` for balanced.
    pub rho: Option<f64>,
    /// Also compute the symmetric potentials f_aa, g_bb.
    pub debias: bool,
    /// Keep iterating at the last ε until the update is below `tol` (in units of ε).
    pub tol: Option<f64>,
    /// The most extra iterations `tol` may take.
    pub max_iter: usize,
}

/// The dual potentials of the last (differentiable) update. All (B, N) or (B, M).
#[derive(Clone, Debug)]
pub struct DualPotentials {
    /// f_ba, the potential on x of OT_ε(α, β).
    pub f_ba: Tensor,
    /// g_ab, the potential on y of OT_ε(α, β).
    pub g_ab: Tensor,
    /// f_aa, the potential of OT_ε(α, α) (debiased only).
    pub f_aa: Option<Tensor>,
    /// g_bb, the potential of OT_ε(β, β) (debiased only).
    pub g_bb: Option<Tensor>,
}

/// What the loop did.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkhornDiagnostics {
    /// The ε schedule that was run (GeomLoss's list; the last value is used again by the extra
    /// `tol` iterations and by the final update).
    pub eps_list: Vec<f64>,
    /// Softmin passes over all pairs (one per potential per update).
    pub softmin_passes: usize,
    /// Iterations at the last ε beyond the schedule (only with `tol`).
    pub extra_iterations: usize,
    /// `max_i |f̃_i − f_i| / ε` of the final update against the values it started from, over
    /// every potential: for balanced problems the log marginal error of the returned plan.
    pub update_error: f64,
    /// With `tol`: whether `update_error < tol` was reached before `max_iter`.
    /// Without `tol`: `None` (GeomLoss's fixed schedule makes no claim).
    pub converged: Option<bool>,
}

struct State {
    f_ba: Tensor,
    g_ab: Tensor,
    f_aa: Option<Tensor>,
    g_bb: Option<Tensor>,
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}

/// Runs the loop. x (B, N, D), y (B, M, D), log_a (B, N), log_b (B, M), detached log-weights
/// (−∞ for zero weights). The returned potentials depend on `x` and `y` through the last update
/// only (see the module docs), and are detached from `log_a`, `log_b`.
pub fn sinkhorn_loop<S: Softmin>(
    softmin: &S,
    x: &Tensor,
    y: &Tensor,
    log_a: &Tensor,
    log_b: &Tensor,
    params: &LoopParams,
) -> Result<(DualPotentials, SinkhornDiagnostics)> {
    let eps_list = &params.eps_list;
    let debias = params.debias;
    let rho = params.rho;
    let (xd, yd) = (x.detach(), y.detach());
    let (log_a, log_b) = (log_a.detach(), log_b.detach());
    let c_xy = softmin.cost(&xd, &yd)?;
    let c_yx = softmin.cost(&yd, &xd)?;
    let (c_xx, c_yy) = if debias {
        (Some(softmin.cost(&xd, &xd)?), Some(softmin.cost(&yd, &yd)?))
    } else {
        (None, None)
    };
    let mut passes = 0usize;
    let mut sm = |eps: f64, c: &S::Cost, h: &Tensor| -> Result<Tensor> {
        passes += 1;
        softmin.softmin_no_grad(eps, c, h)
    };

    // 1. Initialisation at ε₀.
    let eps0 = eps_list[0];
    let lam = dampening(eps0, rho);
    let mut st = State {
        f_ba: (sm(eps0, &c_xy, &log_b)? * lam)?,
        g_ab: (sm(eps0, &c_yx, &log_a)? * lam)?,
        f_aa: match &c_xx {
            Some(c) => Some((sm(eps0, c, &log_a)? * lam)?),
            None => None,
        },
        g_bb: match &c_yy {
            Some(c) => Some((sm(eps0, c, &log_b)? * lam)?),
            None => None,
        },
    };

    // One symmetric update from the current values: the four f̃ of the module docs.
    let mut update = |st: &State, eps: f64| -> Result<State> {
        let lam = dampening(eps, rho);
        let h_b = (&log_b + (&st.g_ab / eps)?)?;
        let h_a = (&log_a + (&st.f_ba / eps)?)?;
        Ok(State {
            f_ba: (sm(eps, &c_xy, &h_b)? * lam)?,
            g_ab: (sm(eps, &c_yx, &h_a)? * lam)?,
            f_aa: match (&c_xx, &st.f_aa) {
                (Some(c), Some(f)) => Some((sm(eps, c, &(&log_a + (f / eps)?)?)? * lam)?),
                _ => None,
            },
            g_bb: match (&c_yy, &st.g_bb) {
                (Some(c), Some(g)) => Some((sm(eps, c, &(&log_b + (g / eps)?)?)? * lam)?),
                _ => None,
            },
        })
    };
    let average = |a: &Tensor, b: &Tensor| -> Result<Tensor> { (a + b)? * 0.5 };
    let average_opt = |a: &Option<Tensor>, b: &Option<Tensor>| -> Result<Option<Tensor>> {
        match (a, b) {
            (Some(a), Some(b)) => Ok(Some(average(a, b)?)),
            _ => Ok(None),
        }
    };
    let step_error = |new: &State, old: &State, eps: f64| -> Result<f64> {
        let mut err = max_abs_diff(&new.f_ba, &old.f_ba)?.max(max_abs_diff(&new.g_ab, &old.g_ab)?);
        if let (Some(a), Some(b)) = (&new.f_aa, &old.f_aa) {
            err = err.max(max_abs_diff(a, b)?);
        }
        if let (Some(a), Some(b)) = (&new.g_bb, &old.g_bb) {
            err = err.max(max_abs_diff(a, b)?);
        }
        Ok(err / eps)
    };

    // 2. ε-scaling with averaged updates, exactly as GeomLoss.
    for &eps in eps_list {
        let new = update(&st, eps)?;
        st = State {
            f_ba: average(&st.f_ba, &new.f_ba)?,
            g_ab: average(&st.g_ab, &new.g_ab)?,
            f_aa: average_opt(&st.f_aa, &new.f_aa)?,
            g_bb: average_opt(&st.g_bb, &new.g_bb)?,
        };
    }

    // 3. Optional extra iterations at the last ε until the update is below `tol`. The cross
    //    potentials alternate (Gauss–Seidel: g̃_ab uses the new f̃_ba), which converges about
    //    four times faster than the averaged parallel update; the symmetric ones keep the
    //    averaging, without which they oscillate.
    let eps_last = *eps_list.last().expect("non-empty schedule");
    let mut extra = 0usize;
    let mut converged = None;
    if let Some(tol) = params.tol {
        let eps = eps_last;
        let lam = dampening(eps, rho);
        converged = Some(false);
        while extra < params.max_iter {
            extra += 1;
            let f_ba = (sm(eps, &c_xy, &(&log_b + (&st.g_ab / eps)?)?)? * lam)?;
            let g_ab = (sm(eps, &c_yx, &(&log_a + (&f_ba / eps)?)?)? * lam)?;
            let mut err = max_abs_diff(&f_ba, &st.f_ba)?.max(max_abs_diff(&g_ab, &st.g_ab)?);
            st.f_ba = f_ba;
            st.g_ab = g_ab;
            if let (Some(c), Some(f)) = (&c_xx, &st.f_aa) {
                let ft = (sm(eps, c, &(&log_a + (f / eps)?)?)? * lam)?;
                err = err.max(max_abs_diff(&ft, f)?);
                st.f_aa = Some(average(f, &ft)?);
            }
            if let (Some(c), Some(g)) = (&c_yy, &st.g_bb) {
                let gt = (sm(eps, c, &(&log_b + (g / eps)?)?)? * lam)?;
                err = err.max(max_abs_diff(&gt, g)?);
                st.g_bb = Some(average(g, &gt)?);
            }
            if err / eps < tol {
                converged = Some(true);
                break;
            }
        }
    }

    // 4. The last, non-averaged and differentiable update at ε = blur^p.
    let eps = eps_last;
    let lam = dampening(eps, rho);
    // Its costs C(x, y.detach()) etc. differ from the loop's only when their first argument is
    // tracked by autograd; otherwise the loop's detached costs serve as they are.
    let cost_t = |a: &Tensor, b: &Tensor| -> Result<Option<S::Cost>> {
        if a.track_op() {
            Ok(Some(softmin.cost(a, b)?))
        } else {
            Ok(None)
        }
    };
    let c_xy_t = cost_t(x, &yd)?;
    let c_yx_t = cost_t(y, &xd)?;
    let h_b = (&log_b + (&st.g_ab / eps)?)?.detach();
    let h_a = (&log_a + (&st.f_ba / eps)?)?.detach();
    let final_sm = |c_t: &Option<S::Cost>, c: &S::Cost, h: &Tensor| -> Result<Tensor> {
        softmin.softmin(eps, c_t.as_ref().unwrap_or(c), h)? * lam
    };
    let f_ba = final_sm(&c_xy_t, &c_xy, &h_b)?;
    let g_ab = final_sm(&c_yx_t, &c_yx, &h_a)?;
    passes += 2;
    let (f_aa, g_bb) = match (&c_xx, &c_yy, &st.f_aa, &st.g_bb) {
        (Some(cxx), Some(cyy), Some(f_aa), Some(g_bb)) => {
            let c_xx_t = cost_t(x, &xd)?;
            let c_yy_t = cost_t(y, &yd)?;
            let h_aa = (&log_a + (f_aa / eps)?)?.detach();
            let h_bb = (&log_b + (g_bb / eps)?)?.detach();
            passes += 2;
            (
                Some(final_sm(&c_xx_t, cxx, &h_aa)?),
                Some(final_sm(&c_yy_t, cyy, &h_bb)?),
            )
        }
        _ => (None, None),
    };
    let out = State {
        f_ba,
        g_ab,
        f_aa,
        g_bb,
    };
    let update_error = step_error(&out, &st, eps)?;
    let diagnostics = SinkhornDiagnostics {
        eps_list: eps_list.clone(),
        softmin_passes: passes,
        extra_iterations: extra,
        update_error,
        converged,
    };
    Ok((
        DualPotentials {
            f_ba: out.f_ba,
            g_ab: out.g_ab,
            f_aa: out.f_aa,
            g_bb: out.g_bb,
        },
        diagnostics,
    ))
}
