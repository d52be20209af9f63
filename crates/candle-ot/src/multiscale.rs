//! The two-level solve of the multiscale backend (GeomLoss's `sinkhorn_multiscale`): the
//! [`Multilevel`] whose coarse level is the cluster centroids (the online softmin) and whose
//! fine level is the points (the block-sparse softmin of [`crate::softmin::multiscale`], after
//! kernel truncation), run by the generic loop [`sinkhorn_multilevel`].
//!
//! 1. the init and the averaged ε-scaling updates on the centroids for `eps_list[..=jump]`;
//! 2. at ε_J = `eps_list[jump]`, kernel truncation on the coarse potentials builds the fine
//!    costs and the extrapolation costs;
//! 3. extrapolation of the four potentials to the points, each a softmin of fine points against
//!    the coarse other cloud: `f_ba(x_i) = λ softmin_{ε_J}(C(x_i, ȳ), log b̄ + ḡ_ab/ε_J)` and
//!    alike for `g_ab` (from f̄_ba), `f_aa`, `g_bb` (the cross updates in parallel);
//! 4. the averaged updates for `eps_list[jump+1..]`, the `tol` iterations and the last,
//!    differentiable update on the fine costs, whose rows are the tracked points.
//!
//! With `jump = len − 1` the fine level runs no annealing step: only the `tol` iterations and
//! the last update (GeomLoss would instead return the extrapolated potentials there).

use crate::error::OtError;
use crate::schedule::dampening;
use crate::sinkhorn::{
    sinkhorn_multilevel, CostSet, DualPotentials, Level, LoopParams, Multilevel, Pair, Refined,
    SinkhornDiagnostics, SoftminLevel,
};
use crate::softmin::multiscale::{
    clouds, jump_index, truncate, unsort, BlockCost, BlockSparse, Clouds, MultiscaleDiagnostics,
    MultiscaleParams, MAX_DIM,
};
use crate::softmin::{online, Online, PointSoftmin, Softmin};
use candle_core::{Result, Tensor};

/// The centroids, then the points.
struct TwoScale<'a> {
    ms: MultiscaleParams,
    rho: Option<f64>,
    debias: bool,
    jump: usize,
    cx: &'a Clouds,
    cy: &'a Clouds,
    coarse: &'a Online,
    fine: &'a BlockSparse,
    /// Kept pairs of C_xy, of C_xx + C_yy, and kept cluster pairs of C_xy.
    kept: (u64, u64, u64),
}

impl<'a> Multilevel<'a> for TwoScale<'a> {
    fn jumps(&self, eps_list: &[f64]) -> Vec<usize> {
        vec![self.jump.min(eps_list.len() - 1)]
    }

    fn first(&mut self) -> Result<Box<dyn Level + 'a>> {
        let coarse = self.coarse;
        let (xc, yc) = (self.cx.coarse.detach(), self.cy.coarse.detach());
        let cost = |a: &Tensor, b: &Tensor| coarse.cost(a, b);
        Ok(Box::new(SoftminLevel {
            softmin: coarse,
            costs: CostSet {
                xy: cost(&xc, &yc)?,
                yx: cost(&yc, &xc)?,
                xx: self.debias.then(|| cost(&xc, &xc)).transpose()?,
                yy: self.debias.then(|| cost(&yc, &yc)).transpose()?,
            },
            log_a: self.cx.log_coarse.detach(),
            log_b: self.cy.log_coarse.detach(),
            track: Box::new(|_, _| Ok(None)),
        }))
    }

    fn refine(
        &mut self,
        _k: usize,
        coarse: &dyn Level,
        pot: &DualPotentials,
        eps_j: f64,
    ) -> Result<Refined<'a>> {
        let t = truncate(
            self.ms,
            self.cx,
            self.cy,
            &pot.f_ba,
            &pot.g_ab,
            pot.f_aa.as_ref(),
            pot.g_bb.as_ref(),
            eps_j,
        )?;
        self.kept = (t.kept_pairs, t.kept_pairs_sym, t.kept_blocks);
        let lam = dampening(eps_j, self.rho);
        let fine = self.fine;
        let mut passes = 0;
        let mut extrapolate = |c: &BlockCost, log_w: &Tensor, pot: &Tensor| -> Result<Tensor> {
            passes += 1;
            fine.softmin_no_grad(eps_j, c, &(log_w + (pot / eps_j)?)?)? * lam
        };
        let (log_ac, log_bc) = (coarse.log_a(), coarse.log_b());
        let potentials = DualPotentials {
            f_ba: extrapolate(&t.ext_xy, log_bc, &pot.g_ab)?,
            g_ab: extrapolate(&t.ext_yx, log_ac, &pot.f_ba)?,
            f_aa: match (&t.ext_xx, &pot.f_aa) {
                (Some(c), Some(f)) => Some(extrapolate(c, log_ac, f)?),
                _ => None,
            },
            g_bb: match (&t.ext_yy, &pot.g_bb) {
                (Some(c), Some(g)) => Some(extrapolate(c, log_bc, g)?),
                _ => None,
            },
        };
        // The last update differentiates through the (tracked) sorted points.
        let (rows_x, rows_y) = (self.cx.sorted.clone(), self.cy.sorted.clone());
        let track = move |pair: Pair, c: &BlockCost| -> Result<Option<BlockCost>> {
            let rows = match pair {
                Pair::Xy | Pair::Xx => &rows_x,
                Pair::Yx | Pair::Yy => &rows_y,
            };
            Ok(rows.track_op().then(|| c.with_rows(rows)))
        };
        Ok(Refined {
            level: Box::new(SoftminLevel {
                softmin: fine,
                costs: CostSet {
                    xy: t.xy,
                    yx: t.yx,
                    xx: t.xx,
                    yy: t.yy,
                },
                log_a: self.cx.log_sorted.detach(),
                log_b: self.cy.log_sorted.detach(),
                track: Box::new(track),
            }),
            potentials,
            passes,
        })
    }
}

/// Runs the two-scale Sinkhorn loop. x (B, N, D), y (B, M, D) (tracked or not), a (B, N),
/// b (B, M). The potentials are in the input order.
pub(crate) fn solve(
    ms: MultiscaleParams,
    x: &Tensor,
    a: &Tensor,
    y: &Tensor,
    b: &Tensor,
    params: &LoopParams,
) -> Result<(DualPotentials, SinkhornDiagnostics, MultiscaleDiagnostics)> {
    let (bsz, n, d) = x.dims3()?;
    let m = y.dim(1)?;
    if !online::supports(x.device()) {
        return Err(OtError::Unsupported(format!(
            "the multiscale backend's kernels for {:?} are not compiled in: enable candle-ot's \
             `cuda` / `metal` feature, or use Backend::Tensorized",
            x.device().location()
        ))
        .into());
    }
    if d > MAX_DIM {
        return Err(OtError::Unsupported(format!(
            "the multiscale backend clusters points in D ≤ {MAX_DIM} dimensions, got D = {d}; use Backend::Online"
        ))
        .into());
    }
    let cx = clouds(x, a, ms.cluster_scale)?;
    let cy = clouds(y, b, ms.cluster_scale)?;
    let jump = jump_index(&params.eps_list, ms.cluster_scale, ms.cost.p());
    let (coarse, fine) = (Online { cost: ms.cost }, BlockSparse { cost: ms.cost });
    let mut two = TwoScale {
        ms,
        rho: params.rho,
        debias: params.debias,
        jump,
        cx: &cx,
        cy: &cy,
        coarse: &coarse,
        fine: &fine,
        kept: (0, 0, 0),
    };
    let (pot, diag) = sinkhorn_multilevel(&mut two, params)?;
    let (kept, kept_sym, kept_blocks) = two.kept;
    let pot = DualPotentials {
        f_ba: unsort(&pot.f_ba, &cx.inverse)?,
        g_ab: unsort(&pot.g_ab, &cy.inverse)?,
        f_aa: pot.f_aa.map(|t| unsort(&t, &cx.inverse)).transpose()?,
        g_bb: pot.g_bb.map(|t| unsort(&t, &cy.inverse)).transpose()?,
    };
    let total = (bsz * n * m) as u64;
    let total_sym = (bsz * (n * n + m * m)) as u64;
    let ms_diag = MultiscaleDiagnostics {
        cluster_scale: ms.cluster_scale,
        clusters_x: cx.clusters.iter().map(|c| c.len()).collect(),
        clusters_y: cy.clusters.iter().map(|c| c.len()).collect(),
        jump_eps: params.eps_list[jump.min(params.eps_list.len() - 1)],
        kept_pairs: kept,
        total_pairs: total,
        kept_fraction: kept as f64 / total as f64,
        kept_blocks,
        kept_pairs_sym: kept_sym,
        kept_fraction_sym: if params.debias {
            kept_sym as f64 / total_sym as f64
        } else {
            0.0
        },
        exact_update_error: None,
        fell_back_to_online: false,
    };
    Ok((pot, diag, ms_diag))
}
