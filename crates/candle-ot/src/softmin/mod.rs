//! The softmin abstraction that the Sinkhorn loop is written against.
//!
//! Every backend supplies one reduction, the *softmin*
//!
//! ```text
//! softmin_ε(C, h)_i = −ε · log Σ_j exp(h_j − C(x_i, y_j) / ε)
//! ```
//!
//! over a cost `C` in its own representation (a dense matrix for [`Tensorized`], the two point
//! clouds for [`Online`], a grid for [`Grid`]). The loop in [`crate::sinkhorn`] only calls
//! [`Softmin::softmin`] through its levels; point-cloud backends also build their costs
//! ([`PointSoftmin::cost`]). The loop knows nothing of devices or memory layouts.
//!
//! Backends are algorithms; devices live inside each backend's ops (`cpu_fwd` / `cuda_fwd` /
//! `metal_fwd` of the online custom ops, Candle's own kernels for the tensorized one).

/// Evaluates `$body` with `$T` bound to the float type of `$dtype` (f32 or f64); any other
/// dtype is an error naming `$op` (and `$on`, the device, where given). Shared by the online and
/// multiscale ops on every device.
macro_rules! with_float {
    ($dtype:expr, $op:expr, |$T:ident| $body:expr) => {
        with_float!($dtype, $op, "", |$T| $body)
    };
    ($dtype:expr, $op:expr, $on:literal, |$T:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}{} (f32 or f64)", $op, $on),
        }
    };
}

pub mod grid;
pub mod multiscale;
pub mod online;
pub mod tensorized;

use crate::cost::{CostKind, KernelKind};
use candle_core::{Result, Tensor};
use std::sync::Arc;

pub use grid::Grid;
pub use tensorized::Tensorized;

/// A softmin implementation (one per backend): the only thing the Sinkhorn loop needs.
pub trait Softmin {
    /// The backend's representation of a cost `C(x_i, y_j)` (a dense matrix, two point
    /// clouds, a block pattern, a grid).
    type Cost;

    /// $f_i = -\varepsilon \log \sum_j \exp(h_j - C_{ij} / \varepsilon)$ for h (B, M); returns (B, N)
    /// (grids: `(B, n_1, …, n_D)` both).
    /// `h` may hold −∞ (masked points); a row whose `h` is all −∞ gives +∞.
    fn softmin(&self, eps: f64, cost: &Self::Cost, h: &Tensor) -> Result<Tensor>;

    /// Same as [`Softmin::softmin`], for the loop's inner iterations, where no gradient is
    /// needed. Backends may skip graph bookkeeping here.
    fn softmin_no_grad(&self, eps: f64, cost: &Self::Cost, h: &Tensor) -> Result<Tensor> {
        Ok(self.softmin(eps, cost, h)?.detach())
    }
}

/// A softmin over point clouds: it also builds its cost from two clouds and supplies the
/// kernel product and the plan operator of the point-cloud losses.
pub trait PointSoftmin: Softmin {
    /// The ground cost between `x` (B, N, D) and `y` (B, M, D). Gradients of later softmins
    /// flow into whichever of `x`, `y` is tracked by autograd (the loop detaches `y`).
    fn cost(&self, x: &Tensor, y: &Tensor) -> Result<Self::Cost>;

    /// The cost between two **ragged** batches stored padded: x (B, N, D) whose item b owns
    /// rows `0..x_len[b]` (the rest is padding), likewise y (B, M, D) and `y_len`. A backend
    /// that knows lengths never visits a padding pair: its softmin leaves padding rows at 0 and
    /// ignores padding columns whatever their `h`. The default ignores the lengths and returns
    /// [`PointSoftmin::cost`], which is equivalent only when the padding carries zero weight
    /// (`h = −∞` on padding columns) and the padding rows' outputs are not used; the
    /// Sinkhorn loop's ragged entry ([`crate::sinkhorn::sinkhorn_loop_ragged`]) guarantees both.
    fn cost_ragged(
        &self,
        x: &Tensor,
        x_len: &Lengths,
        y: &Tensor,
        y_len: &Lengths,
    ) -> Result<Self::Cost> {
        let _ = (x_len, y_len);
        self.cost(x, y)
    }

    /// The kernel product $u_i = \sum_j k(x_i, y_j) b_j$, differentiable in x, y and b.
    /// x (B, N, D), y (B, M, D), b (B, M) → (B, N).
    fn kernel_product(
        &self,
        kind: KernelKind,
        sigma: f64,
        x: &Tensor,
        y: &Tensor,
        b: &Tensor,
    ) -> Result<Tensor>;

    /// [`PointSoftmin::kernel_product`] on ragged batches stored padded (see
    /// [`PointSoftmin::cost_ragged`]): `u_i = Σ_{j < y_len[b]} k(x_i, y_j) b_j` for rows
    /// `i < x_len[b]`, 0 on padding rows. The default ignores the lengths (equivalent when
    /// `b` is 0 on padding columns and padding rows are not used).
    #[allow(clippy::too_many_arguments)]
    fn kernel_product_ragged(
        &self,
        kind: KernelKind,
        sigma: f64,
        x: &Tensor,
        x_len: &Lengths,
        y: &Tensor,
        y_len: &Lengths,
        b: &Tensor,
    ) -> Result<Tensor> {
        let _ = (x_len, y_len);
        self.kernel_product(kind, sigma, x, y, b)
    }

    /// The plan applied to values,
    /// $\mathrm{out}_i = \sum_j \exp\big(f_i/\varepsilon + h_j - C(x_i, y_j)/\varepsilon\big) v_j$,
    /// for x (B, N, D), f (B, N), y (B, M, D), h (B, M), v (B, M, K) → (B, N, K). With
    /// $h = \log b + g/\varepsilon$ this is $\sum_j \pi_{ij} v_j / a_i$ for the plan
    /// $\pi_{ij} = a_i b_j \exp\big((f_i + g_j - C_{ij})/\varepsilon\big)$.
    #[allow(clippy::too_many_arguments)]
    fn plan_apply(
        &self,
        eps: f64,
        x: &Tensor,
        f: &Tensor,
        y: &Tensor,
        h: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor>;
}

/// The streaming backend: costs are never materialised; each softmin is one pass of the
/// [`online::softmin`] custom op over all pairs, O((N + M)·D) memory.
#[derive(Clone, Copy, Debug)]
pub struct Online {
    /// The ground cost.
    pub cost: CostKind,
}

/// The per-item sizes of a **ragged batch** stored padded: item b of a (B, N_max, ·) tensor
/// owns rows `0..len[b]`; the rows after them are padding. Cheap to clone (shared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lengths(Arc<[usize]>);

impl Lengths {
    /// One size per batch item.
    pub fn new(sizes: impl Into<Vec<usize>>) -> Self {
        Self(sizes.into().into())
    }

    /// The sizes, one per item.
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }

    /// The number of items B.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The largest size (0 for no items): the padded extent.
    pub fn max(&self) -> usize {
        self.0.iter().copied().max().unwrap_or(0)
    }

    /// A clear error unless there is one size per item of a (B, `n`, ·) tensor, each ≤ `n`.
    pub(crate) fn check(&self, b: usize, n: usize, what: &str) -> Result<()> {
        if self.0.len() != b || self.0.iter().any(|&l| l > n) {
            candle_core::bail!(
                "candle-ot: the lengths of {what} must give one size ≤ {n} per item of {b}, got {:?}",
                self.0
            )
        }
        Ok(())
    }
}

/// The online backend's cost: the two clouds, contiguous. x (B, N, D), y (B, M, D).
#[derive(Clone, Debug)]
pub struct PointPair {
    /// Rows of the cost, (B, N, D).
    pub x: Tensor,
    /// Columns of the cost, (B, M, D).
    pub y: Tensor,
    /// For a ragged batch stored padded, the sizes of the items of x and of y
    /// ([`PointSoftmin::cost_ragged`]); `None`: every row and column is a point.
    pub lengths: Option<(Lengths, Lengths)>,
}

impl Softmin for Online {
    type Cost = PointPair;

    fn softmin(&self, eps: f64, c: &PointPair, h: &Tensor) -> Result<Tensor> {
        online::softmin_ragged(self.cost, eps, &c.x, &c.y, h, c.lengths.as_ref())
    }

    fn softmin_no_grad(&self, eps: f64, c: &PointPair, h: &Tensor) -> Result<Tensor> {
        online::softmin_no_bwd(self.cost, eps, &c.x, &c.y, h, c.lengths.as_ref())
    }
}

impl PointSoftmin for Online {
    fn cost(&self, x: &Tensor, y: &Tensor) -> Result<PointPair> {
        Ok(PointPair {
            x: x.contiguous()?,
            y: y.contiguous()?,
            lengths: None,
        })
    }

    fn cost_ragged(
        &self,
        x: &Tensor,
        x_len: &Lengths,
        y: &Tensor,
        y_len: &Lengths,
    ) -> Result<PointPair> {
        x_len.check(x.dim(0)?, x.dim(1)?, "x")?;
        y_len.check(y.dim(0)?, y.dim(1)?, "y")?;
        Ok(PointPair {
            x: x.contiguous()?,
            y: y.contiguous()?,
            lengths: Some((x_len.clone(), y_len.clone())),
        })
    }

    fn kernel_product_ragged(
        &self,
        kind: KernelKind,
        sigma: f64,
        x: &Tensor,
        x_len: &Lengths,
        y: &Tensor,
        y_len: &Lengths,
        b: &Tensor,
    ) -> Result<Tensor> {
        x_len.check(x.dim(0)?, x.dim(1)?, "x")?;
        y_len.check(y.dim(0)?, y.dim(1)?, "y")?;
        online::kernel_product_ragged(kind, sigma, x, y, b, Some(&(x_len.clone(), y_len.clone())))
    }

    fn kernel_product(
        &self,
        kind: KernelKind,
        sigma: f64,
        x: &Tensor,
        y: &Tensor,
        b: &Tensor,
    ) -> Result<Tensor> {
        online::kernel_product(kind, sigma, x, y, b)
    }

    fn plan_apply(
        &self,
        eps: f64,
        x: &Tensor,
        f: &Tensor,
        y: &Tensor,
        h: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        online::plan_apply(self.cost, eps, x, f, y, h, v)
    }
}
