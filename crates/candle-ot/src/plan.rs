//! Transport-plan operators: the entropic plan of `OT_ε(α, β)` applied to values, streamed,
//! never materialised.
//!
//! $$
//! \pi_{ij} = a_i b_j \exp\big((f_{ba,i} + g_{ab,j} - C(x_i, y_j)) / \varepsilon\big)
//! $$
//!
//! built from the raw potentials `f_ba`, `g_ab` of `OT_ε(α, β)` (never the debiased `F`, `G`),
//! balanced or unbalanced (with a reach the potentials are the dampened ones and the plan's
//! marginals are not `a`, `b`). On the online backend every operator is one streaming pass
//! with a `(max, sum)` accumulator; on the tensorized backend it is a dense product.
//!
//! Get one from [`crate::Solution::plan`].

use crate::cost::{dense_cost, CostKind};
use crate::error::OtError;
use crate::options::Backend;
use crate::softmin::{Lengths, Online, PointSoftmin, Tensorized};
use candle_core::{Result, Tensor};

/// The most entries [`TransportPlan::dense`] materialises (B·N·M).
pub const DENSE_PLAN_LIMIT: usize = 100_000_000;

/// The entropic transport plan of a solved Sinkhorn problem (see the module docs).
#[derive(Clone, Debug)]
pub struct TransportPlan {
    pub(crate) cost: CostKind,
    pub(crate) eps: f64,
    pub(crate) backend: Backend,
    pub(crate) x: Tensor,     // (B, N, D), detached
    pub(crate) y: Tensor,     // (B, M, D), detached
    pub(crate) log_a: Tensor, // (B, N), −∞ for zero weights
    pub(crate) log_b: Tensor, // (B, M)
    pub(crate) f_ba: Tensor,  // (B, N)
    pub(crate) g_ab: Tensor,  // (B, M)
    pub(crate) batched: bool,
    /// A ragged batch stored padded: the sizes of the items of x and y (the streaming passes
    /// of the online backend then skip the padding).
    pub(crate) lengths: Option<(Lengths, Lengths)>,
    /// The dtype of every output: the solve's own, or f32 for an f32 problem solved in f64
    /// (see [`crate::samples_loss::F32_PROMOTION_EXPONENT`]).
    pub(crate) out_dtype: candle_core::DType,
}

impl TransportPlan {
    /// ε of the plan.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// `Σ_j exp(α_i + β_j − C(p_i, q_j)/ε) v_j` on the plan's backend, with α = f/ε.
    #[allow(clippy::too_many_arguments)]
    /// `transposed`: rows y, columns x (for the lengths of a ragged batch).
    fn stream(
        &self,
        (p, f): (&Tensor, &Tensor),
        (q, h): (&Tensor, &Tensor),
        v: &Tensor,
        transposed: bool,
    ) -> Result<Tensor> {
        match self.backend {
            // The multiscale plan is the exact plan of its potentials, streamed.
            Backend::Online | Backend::Multiscale => {
                let lens = self.lengths_for(transposed);
                crate::softmin::online::plan_apply_ragged(
                    self.cost,
                    self.eps,
                    (p, f),
                    (q, h),
                    v,
                    lens.as_ref(),
                )
            }
            _ => Tensorized { cost: self.cost }.plan_apply(self.eps, p, f, q, h, v),
        }
    }

    /// The (rows, columns) lengths of a ragged plan, for rows x (or y when `transposed`).
    fn lengths_for(&self, transposed: bool) -> Option<(Lengths, Lengths)> {
        self.lengths.as_ref().map(|(xl, yl)| {
            if transposed {
                (yl.clone(), xl.clone())
            } else {
                (xl.clone(), yl.clone())
            }
        })
    }

    fn batch_values(&self, v: &Tensor, name: &'static str, k_points: usize) -> Result<Tensor> {
        let b = self.x.dim(0)?;
        let v = if self.batched {
            v.clone()
        } else {
            v.unsqueeze(0)?
        };
        if v.rank() != 3 || v.dim(0)? != b || v.dim(1)? != k_points {
            let expected = if self.batched {
                format!("({b}, {k_points}, K)")
            } else {
                format!("({k_points}, K)")
            };
            return Err(OtError::Shape {
                name,
                expected,
                got: v.dims().to_vec(),
            }
            .into());
        }
        v.to_dtype(self.x.dtype())?.contiguous()
    }

    fn unbatch(&self, t: Tensor) -> Result<Tensor> {
        let t = if self.batched { t } else { t.squeeze(0)? };
        t.to_dtype(self.out_dtype)
    }

    /// $(\pi v)\_i = \sum_j \pi_{ij} v_j$: v (M, K) or (B, M, K) → (N, K) or (B, N, K).
    pub fn apply(&self, v: &Tensor) -> Result<Tensor> {
        let (_, m, _) = self.y.dims3()?;
        let v = self.batch_values(v, "v", m)?;
        // a_i folds into the row offset: f + ε log a (−∞ rows give exact zeros).
        let f = (&self.f_ba + (&self.log_a * self.eps)?)?;
        let h = (&self.log_b + (&self.g_ab / self.eps)?)?;
        let out = self.stream((&self.x, &f), (&self.y, &h), &v, false)?;
        self.unbatch(out)
    }

    /// $(\pi^\top u)\_j = \sum_i \pi_{ij} u_i$: u (N, K) or (B, N, K) → (M, K) or (B, M, K).
    pub fn apply_transpose(&self, u: &Tensor) -> Result<Tensor> {
        let (_, n, _) = self.x.dims3()?;
        let u = self.batch_values(u, "u", n)?;
        let g = (&self.g_ab + (&self.log_b * self.eps)?)?;
        let h = (&self.log_a + (&self.f_ba / self.eps)?)?;
        // The cost is symmetric: C(y_j, x_i) = C(x_i, y_j).
        let out = self.stream((&self.y, &g), (&self.x, &h), &u, true)?;
        self.unbatch(out)
    }

    /// Soft transfer
    /// $\sum_j \pi_{ij} v_j / a_i = \sum_j b_j \exp\big((f_{ba,i} + g_{ab,j} - C_{ij})/\varepsilon\big) v_j$
    /// (label transfer; defined for zero-weight points too).
    pub fn transfer(&self, v: &Tensor) -> Result<Tensor> {
        let (_, m, _) = self.y.dims3()?;
        let v = self.batch_values(v, "v", m)?;
        let h = (&self.log_b + (&self.g_ab / self.eps)?)?;
        let out = self.stream((&self.x, &self.f_ba), (&self.y, &h), &v, false)?;
        self.unbatch(out)
    }

    /// Row masses $\sum_j \pi_{ij}$, (N,) or (B, N). Equal to `a` for converged balanced plans.
    pub fn row_marginal(&self) -> Result<Tensor> {
        let (b, m, _) = self.y.dims3()?;
        let ones = Tensor::ones((b, m, 1), self.y.dtype(), self.y.device())?;
        let ones = if self.batched { ones } else { ones.squeeze(0)? };
        self.apply(&ones)?.squeeze(candle_core::D::Minus1)
    }

    /// Column masses $\sum_i \pi_{ij}$, (M,) or (B, M).
    pub fn col_marginal(&self) -> Result<Tensor> {
        let (b, n, _) = self.x.dims3()?;
        let ones = Tensor::ones((b, n, 1), self.x.dtype(), self.x.device())?;
        let ones = if self.batched { ones } else { ones.squeeze(0)? };
        self.apply_transpose(&ones)?.squeeze(candle_core::D::Minus1)
    }

    /// `‖π 1 − a‖₁ + ‖πᵀ 1 − b‖₁`, the largest over the batch (units of mass): how far the
    /// plan is from the marginals a, b (zero for a converged balanced plan). Two softmin
    /// passes: the row masses are `a_i exp((f_ba,i − f̃_i)/ε)` with
    /// `f̃ = softmin_ε(C_xy, log b + g_ab/ε)`, and likewise the column masses.
    pub fn marginal_error(&self) -> Result<f64> {
        let err = match self.backend {
            Backend::Online | Backend::Multiscale => {
                self.marginal_l1(&Online { cost: self.cost })?
            }
            _ => self.marginal_l1(&Tensorized { cost: self.cost })?,
        };
        let err = err.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        Ok(err.into_iter().fold(0.0, f64::max))
    }

    /// (B,) L1 marginal errors on `backend`.
    fn marginal_l1<S: PointSoftmin>(&self, backend: &S) -> Result<Tensor> {
        let eps = self.eps;
        let side = |p: &Tensor,
                    pot_p: &Tensor,
                    log_wp: &Tensor,
                    q: &Tensor,
                    pot_q: &Tensor,
                    log_wq: &Tensor,
                    transposed: bool| {
            let h = (log_wq + (pot_q / eps)?)?; // (B, M)
            let cost = match self.lengths_for(transposed) {
                Some((pl, ql)) => backend.cost_ragged(p, &pl, q, &ql)?,
                None => backend.cost(p, q)?,
            };
            let f_t = backend.softmin_no_grad(eps, &cost, &h)?; // (B, N)
                                                                // Zero weights: exp(−∞) = 0 on both sides.
            let mass = (log_wp + ((pot_p - f_t)? / eps)?)?.exp()?; // (B, N)
            (mass - log_wp.exp()?)?.abs()?.sum(1) // (B,)
        };
        side(
            &self.x,
            &self.f_ba,
            &self.log_a,
            &self.y,
            &self.g_ab,
            &self.log_b,
            false,
        )? + side(
            &self.y,
            &self.g_ab,
            &self.log_b,
            &self.x,
            &self.f_ba,
            &self.log_a,
            true,
        )?
    }

    /// The barycentric map $x_i \mapsto \sum_j \pi_{ij} y_j / \sum_j \pi_{ij}$, (N, D) or (B, N, D).
    ///
    /// It divides by the row mass of the plan, not by `a_i`: the two differ for unbalanced
    /// plans and for plans that are not converged. Rows of zero-weight points use the
    /// conditional distribution `b_j exp((f_i + g_j − C_ij)/ε)` all the same.
    ///
    /// On the online and multiscale backends with `p = 2` it is one pass of the vectorised
    /// gradient reduction (the softmin's backward):
    /// $x_i - \sum_j \pi_{ij} (x_i - y_j) / \sum_j \pi_{ij}$, `∇₁C(x, y) = x − y`; otherwise
    /// one plan application to the `D + 1` columns `[y, 1]`.
    pub fn barycentric_map(&self) -> Result<Tensor> {
        let (_, _, d) = self.y.dims3()?;
        if matches!(self.backend, Backend::Online | Backend::Multiscale)
            && self.cost == CostKind::SqEuclidean
        {
            // Rows [x, f/ε], columns [y, log b + g/ε, 1]: [Σ_j π_ij (x_i − y_j), Σ_j π_ij]
            // up to the row factor a_i, which the ratio cancels.
            let rows = Tensor::cat(&[&self.x, &(&self.f_ba / self.eps)?.unsqueeze(2)?], 2)?;
            let h = (&self.log_b + (&self.g_ab / self.eps)?)?.unsqueeze(2)?; // (B, M, 1)
            let cols = Tensor::cat(&[&self.y, &h, &h.ones_like()?], 2)?; // (B, M, D + 2)
            let s = crate::softmin::online::lse_weighted(
                self.cost,
                self.eps,
                &rows,
                &cols,
                crate::softmin::online::Weighted::Grad { with_mass: true },
                self.lengths_for(false).as_ref(),
            )?; // (B, N, D + 1)
            let t = (&self.x - s.narrow(2, 0, d)?.broadcast_div(&s.narrow(2, d, 1)?)?)?;
            return self.unbatch(t);
        }
        let ones = self.y.narrow(2, 0, 1)?.ones_like()?;
        let v = Tensor::cat(&[&self.y, &ones], 2)?; // (B, M, D + 1)
        let v = if self.batched { v } else { v.squeeze(0)? };
        let s = self.transfer(&v)?; // (.., N, D + 1)
        let last = s.rank() - 1;
        s.narrow(last, 0, d)?.broadcast_div(&s.narrow(last, d, 1)?)
    }

    /// The dense plan `π`, (N, M) or (B, N, M), for small problems only: an error above
    /// [`DENSE_PLAN_LIMIT`] entries.
    pub fn dense(&self) -> Result<Tensor> {
        let (b, n, _) = self.x.dims3()?;
        let m = self.y.dim(1)?;
        let entries = b.saturating_mul(n).saturating_mul(m);
        if entries > DENSE_PLAN_LIMIT {
            return Err(OtError::Unsupported(format!(
                "a dense plan of {b}×{n}×{m} = {entries} entries is above the limit of {DENSE_PLAN_LIMIT}; use apply / transfer / barycentric_map, which stream"
            ))
            .into());
        }
        let c = dense_cost(self.cost, &self.x, &self.y)?; // (B, N, M)
        let rows = ((&self.f_ba / self.eps)? + &self.log_a)?.unsqueeze(2)?; // (B, N, 1)
        let cols = ((&self.g_ab / self.eps)? + &self.log_b)?.unsqueeze(1)?; // (B, 1, M)
        let z = (c / (-self.eps))?
            .broadcast_add(&rows)?
            .broadcast_add(&cols)?;
        self.unbatch(z.exp()?)
    }
}
