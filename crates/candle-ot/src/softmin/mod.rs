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

/// The online backend's cost: the two clouds, contiguous. x (B, N, D), y (B, M, D).
#[derive(Clone, Debug)]
pub struct PointPair {
    /// Rows of the cost, (B, N, D).
    pub x: Tensor,
    /// Columns of the cost, (B, M, D).
    pub y: Tensor,
}

impl Softmin for Online {
    type Cost = PointPair;

    fn softmin(&self, eps: f64, c: &PointPair, h: &Tensor) -> Result<Tensor> {
        online::softmin(self.cost, eps, &c.x, &c.y, h)
    }

    fn softmin_no_grad(&self, eps: f64, c: &PointPair, h: &Tensor) -> Result<Tensor> {
        online::softmin_no_bwd(self.cost, eps, &c.x, &c.y, h)
    }
}

impl PointSoftmin for Online {
    fn cost(&self, x: &Tensor, y: &Tensor) -> Result<PointPair> {
        Ok(PointPair {
            x: x.contiguous()?,
            y: y.contiguous()?,
        })
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
