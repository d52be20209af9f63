//! The tensorized backend: dense N×M cost matrices and Candle tensor ops, on any device.
//!
//! It is also the plain twin of every fused op: the tests assert that [`super::Online`] agrees
//! with it, values and gradients. Memory is O(N·M·D) (the differences `x_i − y_j` are formed
//! explicitly, so that costs never go through `|x|² + |y|² − 2⟨x, y⟩`).

use super::{PointSoftmin, Softmin};
use crate::cost::{dense_cost, dense_kernel, CostKind, KernelKind};
use candle_core::{DType, Result, Tensor, D};

/// Dense softmin on Candle ops.
#[derive(Clone, Copy, Debug)]
pub struct Tensorized {
    /// The ground cost.
    pub cost: CostKind,
}

/// A log-sum-exp over the last axis, stable, with masked (−∞) entries:
/// the maximum is detached (it cancels in value and gradient) and floored at the dtype's
/// lowest finite value, so that an all-masked row gives −∞ instead of NaN.
pub(crate) fn logsumexp_last(z: &Tensor) -> Result<Tensor> {
    let lowest = match z.dtype() {
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    };
    let m = z
        .max_keepdim(D::Minus1)?
        .detach()
        .clamp(lowest, f64::INFINITY)?; // (.., 1)
    let s = z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?; // (.., 1)
    (s + m)?.squeeze(D::Minus1)
}

impl Softmin for Tensorized {
    type Cost = Tensor;

    fn softmin(&self, eps: f64, c: &Tensor, h: &Tensor) -> Result<Tensor> {
        let z = h.unsqueeze(1)?.broadcast_sub(&(c / eps)?)?; // (B, N, M)
        logsumexp_last(&z)? * (-eps) // (B, N)
    }
}

impl PointSoftmin for Tensorized {
    fn cost(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        dense_cost(self.cost, x, y) // (B, N, M)
    }

    fn kernel_product(
        &self,
        kind: KernelKind,
        sigma: f64,
        x: &Tensor,
        y: &Tensor,
        b: &Tensor,
    ) -> Result<Tensor> {
        let k = dense_kernel(kind, sigma, x, y)?; // (B, N, M)
        k.matmul(&b.unsqueeze(2)?)?.squeeze(2) // (B, N)
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
        let c = dense_cost(self.cost, x, y)?; // (B, N, M)
        let z = h
            .unsqueeze(1)?
            .broadcast_sub(&(c / eps)?)?
            .broadcast_add(&(f / eps)?.unsqueeze(2)?)?; // (B, N, M)
                                                        // Shift each row by its (detached, floored) maximum before exponentiating.
        let m = z.max_keepdim(2)?.detach().clamp(-1e30, f64::INFINITY)?; // (B, N, 1)
        let e = z.broadcast_sub(&m)?.exp()?; // (B, N, M)
        e.matmul(&v.contiguous()?)?.broadcast_mul(&m.exp()?) // (B, N, K)
    }
}
