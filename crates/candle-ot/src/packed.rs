//! Packed (ragged) batches: clouds of different sizes in one call, as PyTorch's packed
//! sequences. A packed tensor holds the items one after the other, `(ΣN_b, …)`, with the sizes
//! `N_b` given apart ([`SamplesLoss::forward_packed`](crate::SamplesLoss::forward_packed),
//! [`SamplesLoss::solve_packed`](crate::SamplesLoss::solve_packed)). Inside, a batch is
//! laid out padded, `(B, N_max, …)`, with the lengths handed to the backend
//! ([`crate::softmin::Lengths`]); this module converts between the two layouts and gives the
//! results of a packed solve back packed.

use crate::error::OtError;
use crate::plan::TransportPlan;
use crate::samples_loss::Solution;
use candle_core::{Result, Tensor};

/// Items `0..B` of a padded `(B, N_max, …)` tensor, each cut to its length and concatenated:
/// `(ΣN_b, …)`. Differentiable.
pub fn pack(t: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    if t.rank() < 2 || t.dim(0)? != lengths.len() || lengths.iter().any(|&n| n > t.dims()[1]) {
        return Err(OtError::Mismatch(format!(
            "pack: a (B, N_max, …) tensor with B = {} items of at most N_max points each expected, got {:?}",
            lengths.len(),
            t.dims()
        ))
        .into());
    }
    let items = lengths
        .iter()
        .enumerate()
        .map(|(b, &n)| t.get(b)?.narrow(0, 0, n))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&items, 0)
}

/// A packed `(ΣN_b, …)` tensor laid out padded, `(B, n_max, …)`, with zeros on the padding.
/// Differentiable. `name` is the argument named in the errors.
pub fn unpack(t: &Tensor, lengths: &[usize], n_max: usize, name: &'static str) -> Result<Tensor> {
    let total: usize = lengths.iter().sum();
    if t.rank() == 0 || t.dim(0)? != total || lengths.iter().any(|&n| n > n_max) {
        return Err(OtError::Shape {
            name,
            expected: format!("({total}, …): one row per packed point"),
            got: t.dims().to_vec(),
        }
        .into());
    }
    let tail = &t.dims()[1..];
    let (mut off, mut items) = (0usize, Vec::with_capacity(lengths.len()));
    for &n in lengths {
        let item = t.narrow(0, off, n)?;
        off += n;
        items.push(if n < n_max {
            let mut pad_shape = vec![n_max - n];
            pad_shape.extend_from_slice(tail);
            let zeros = Tensor::zeros(pad_shape, t.dtype(), t.device())?;
            Tensor::cat(&[&item, &zeros], 0)?
        } else {
            item
        });
    }
    Tensor::stack(&items, 0)
}

/// Everything [`SamplesLoss::solve_packed`](crate::SamplesLoss::solve_packed) computes for a
/// packed batch: the loss per item and the potentials, packed like the points.
#[derive(Clone, Debug)]
pub struct PackedSolution {
    /// The loss per item, (B,). Differentiable.
    pub loss: Tensor,
    /// The potential F on the packed x, (ΣN_b,), detached (see [`Solution::f`]).
    pub f: Tensor,
    /// The potential G on the packed y, (ΣM_b,), detached.
    pub g: Tensor,
    /// The sizes N_b of the items of x.
    pub x_lengths: Vec<usize>,
    /// The sizes M_b of the items of y.
    pub y_lengths: Vec<usize>,
    /// The same solve in its padded layout: potentials (B, N_max) with 0 on the padding when
    /// the backend skipped it, diagnostics, certified bound and marginal error.
    pub padded: Solution,
}

impl PackedSolution {
    /// A packed potential of the padded solution (`f_ba`, `g_ab`, …) by name of side.
    fn pack_side(&self, t: &Option<Tensor>, x_side: bool) -> Result<Option<Tensor>> {
        let lengths = if x_side {
            &self.x_lengths
        } else {
            &self.y_lengths
        };
        t.as_ref().map(|t| pack(t, lengths)).transpose()
    }

    /// The raw potentials `(f_ba, g_ab, f_aa, g_bb)` packed (Sinkhorn only; the symmetric
    /// ones when debiased).
    #[allow(clippy::type_complexity)]
    pub fn raw_potentials(
        &self,
    ) -> Result<(
        Option<Tensor>,
        Option<Tensor>,
        Option<Tensor>,
        Option<Tensor>,
    )> {
        let p = &self.padded;
        Ok((
            self.pack_side(&p.f_ba, true)?,
            self.pack_side(&p.g_ab, false)?,
            self.pack_side(&p.f_aa, true)?,
            self.pack_side(&p.g_bb, false)?,
        ))
    }

    /// The entropic transport plans of the items, as streaming operators on packed values
    /// (Sinkhorn losses only).
    pub fn plan(&self) -> Result<PackedPlan<'_>> {
        Ok(PackedPlan {
            plan: self.padded.plan()?,
            x_lengths: &self.x_lengths,
            y_lengths: &self.y_lengths,
        })
    }
}

/// The transport plans of a packed batch, item by item: the operators of [`TransportPlan`]
/// on packed values. v (ΣM_b, K) → (ΣN_b, K) and so on; each item's plan only couples that
/// item's points. On the online backend the streaming passes skip the padding.
#[derive(Clone, Copy, Debug)]
pub struct PackedPlan<'a> {
    plan: &'a TransportPlan,
    x_lengths: &'a [usize],
    y_lengths: &'a [usize],
}

impl PackedPlan<'_> {
    fn max_x(&self) -> usize {
        self.x_lengths.iter().copied().max().unwrap_or(0)
    }

    fn max_y(&self) -> usize {
        self.y_lengths.iter().copied().max().unwrap_or(0)
    }

    /// $(\pi v)_i = \sum_j \pi_{ij} v_j$ within each item: v (ΣM_b, K) → (ΣN_b, K).
    pub fn apply(&self, v: &Tensor) -> Result<Tensor> {
        let v = unpack(v, self.y_lengths, self.max_y(), "v")?; // (B, M_max, K)
        pack(&self.plan.apply(&v)?, self.x_lengths)
    }

    /// $(\pi^\top u)_j = \sum_i \pi_{ij} u_i$ within each item: u (ΣN_b, K) → (ΣM_b, K).
    pub fn apply_transpose(&self, u: &Tensor) -> Result<Tensor> {
        let u = unpack(u, self.x_lengths, self.max_x(), "u")?; // (B, N_max, K)
        pack(&self.plan.apply_transpose(&u)?, self.y_lengths)
    }

    /// Soft transfer $\sum_j \pi_{ij} v_j / a_i$ within each item (see
    /// [`TransportPlan::transfer`]): v (ΣM_b, K) → (ΣN_b, K).
    pub fn transfer(&self, v: &Tensor) -> Result<Tensor> {
        let v = unpack(v, self.y_lengths, self.max_y(), "v")?; // (B, M_max, K)
        pack(&self.plan.transfer(&v)?, self.x_lengths)
    }

    /// Row masses $\sum_j \pi_{ij}$, (ΣN_b,).
    pub fn row_marginal(&self) -> Result<Tensor> {
        pack(&self.plan.row_marginal()?, self.x_lengths)
    }

    /// Column masses $\sum_i \pi_{ij}$, (ΣM_b,).
    pub fn col_marginal(&self) -> Result<Tensor> {
        pack(&self.plan.col_marginal()?, self.y_lengths)
    }

    /// The barycentric map $x_i \mapsto \sum_j \pi_{ij} y_j / \sum_j \pi_{ij}$ within each item,
    /// (ΣN_b, D).
    pub fn barycentric_map(&self) -> Result<Tensor> {
        pack(&self.plan.barycentric_map()?, self.x_lengths)
    }

    /// The largest L1 marginal error over the items (see [`TransportPlan::marginal_error`]).
    pub fn marginal_error(&self) -> Result<f64> {
        self.plan.marginal_error()
    }

    /// The padded plan, (B, N_max) × (B, M_max), zero on the padding.
    pub fn padded(&self) -> &TransportPlan {
        self.plan
    }
}
