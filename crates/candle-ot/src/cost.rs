//! Ground costs and kernels.
//!
//! - Sinkhorn and Hausdorff use $C(x, y) = \frac{1}{p}|x - y|^p$: $p = 1$ gives the Euclidean
//!   distance, $p = 2$ half the squared distance (GeomLoss's convention).
//! - The kernel losses use `energy`: $k(x, y) = -|x - y|$; `gaussian`:
//!   $k(x, y) = \exp(-|x - y|^2 / 2\sigma^2)$; `laplacian`: $k(x, y) = \exp(-|x - y| / \sigma)$,
//!   with $\sigma$ = blur.
//!
//! Distances are always computed from the differences `x_i − y_j`, never through
//! `|x|² + |y|² − 2⟨x, y⟩`, which loses every digit on translated clouds. The gradient of
//! `|x − y|` at `x = y` is taken as 0.

use candle_core::{DType, Result, Tensor};

/// The ground cost $C(x, y) = \frac{1}{p}|x - y|^p$, $p \in \lbrace 1, 2 \rbrace$.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CostKind {
    /// `p = 1`: `C(x, y) = |x − y|`.
    Euclidean,
    /// `p = 2`: `C(x, y) = ½ |x − y|²`.
    SqEuclidean,
}

impl CostKind {
    /// The cost for an exponent `p` (1 or 2).
    pub fn from_p(p: u32) -> Option<Self> {
        match p {
            1 => Some(Self::Euclidean),
            2 => Some(Self::SqEuclidean),
            _ => None,
        }
    }
    /// The exponent `p`.
    pub fn p(self) -> u32 {
        match self {
            Self::Euclidean => 1,
            Self::SqEuclidean => 2,
        }
    }

    /// The cost's part of a kernel name (`softmin_{name}_f32`, `candle_ot_kernels::entry_point`).
    #[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
    pub(crate) fn kernel_name(self) -> &'static str {
        match self {
            Self::SqEuclidean => "sqeuclidean",
            Self::Euclidean => "euclidean",
        }
    }
}

/// The kernels of the kernel-norm losses (σ = blur).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// `k(x, y) = exp(−|x − y|² / 2σ²)`.
    Gaussian,
    /// `k(x, y) = exp(−|x − y| / σ)`.
    Laplacian,
    /// `k(x, y) = −|x − y|` (the energy distance; σ is unused).
    Energy,
}

impl KernelKind {
    /// The kernel's part of a kernel name (`kernel_product_{name}_f32`).
    #[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
    pub(crate) fn kernel_name(self) -> &'static str {
        match self {
            Self::Gaussian => "gaussian",
            Self::Laplacian => "laplacian",
            Self::Energy => "energy",
        }
    }
}

/// A tiny shift under the square root, so that `d|x − y|` at `x = y` is `0 · finite = 0`
/// in autograd instead of `0 · ∞ = NaN`. Its effect on a distance is below `sqrt(δ)`:
/// 1e-150 in f64, 3e-19 in f32.
fn sqrt_shift(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-300,
        _ => 1e-37,
    }
}

/// Dense squared distances `|x_i − y_j|²` from differences: x (B, N, D), y (B, M, D) → (B, N, M).
pub(crate) fn dense_sq_dist(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let diff = x.unsqueeze(2)?.broadcast_sub(&y.unsqueeze(1)?)?; // (B, N, M, D)
    diff.sqr()?.sum(3) // (B, N, M)
}

/// Dense distances `|x_i − y_j|` with a zero gradient at zero distance. (B, N, M)
pub(crate) fn dense_dist(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let sq = dense_sq_dist(x, y)?;
    (sq + sqrt_shift(x.dtype()))?.sqrt()
}

/// Dense cost matrix `C(x_i, y_j)`: x (B, N, D), y (B, M, D) → (B, N, M).
pub(crate) fn dense_cost(cost: CostKind, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    match cost {
        CostKind::Euclidean => dense_dist(x, y),
        CostKind::SqEuclidean => dense_sq_dist(x, y)? * 0.5,
    }
}

/// Dense kernel matrix `k(x_i, y_j)`: (B, N, M).
pub(crate) fn dense_kernel(kind: KernelKind, sigma: f64, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    match kind {
        KernelKind::Gaussian => (dense_sq_dist(x, y)? * (-0.5 / (sigma * sigma)))?.exp(),
        KernelKind::Laplacian => (dense_dist(x, y)? * (-1.0 / sigma))?.exp(),
        KernelKind::Energy => dense_dist(x, y)?.neg(),
    }
}
