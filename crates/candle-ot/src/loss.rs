//! Free functions in the style of `candle_nn::loss`: one call, GeomLoss's defaults for every
//! option but the blur, uniform weights. For other options, weights, potentials or
//! diagnostics, build a [`crate::SamplesLoss`].
//!
//! ```
//! use candle_core::{Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let x = Tensor::rand(0f32, 1., (200, 3), &Device::Cpu)?; // (N, D) or (B, N, D)
//! let y = Tensor::rand(0f32, 1., (300, 3), &Device::Cpu)?; // (M, D) or (B, M, D)
//! let s = candle_ot::loss::sinkhorn(&x, &y, 0.05)?;        // debiased S_ε, ε = blur²
//! let e = candle_ot::loss::energy(&x, &y)?;
//! assert!(s.to_scalar::<f32>()? >= 0.0 && e.to_scalar::<f32>()? >= 0.0);
//! # Ok(()) }
//! ```
//!
//! Each returns a scalar for `(N, D)` inputs and `(B,)` for batches, differentiable in `x` and
//! `y`; errors as [`crate::SamplesLoss::forward`].

use crate::{Loss, SamplesLoss, SamplesLossOptions};
use candle_core::{Result, Tensor};

fn with(loss: Loss, blur: f64, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    SamplesLoss::from_options(SamplesLossOptions {
        loss,
        blur,
        ..Default::default()
    })?
    .forward(x, y)
}

/// The debiased Sinkhorn divergence `S_ε(α, β)` with `p = 2` (`C = ½|x − y|²`), `ε = blur²`,
/// GeomLoss's schedule (`SamplesLoss("sinkhorn", p=2, blur=blur)`).
pub fn sinkhorn(x: &Tensor, y: &Tensor, blur: f64) -> Result<Tensor> {
    with(Loss::Sinkhorn, blur, x, y)
}

/// The Hausdorff divergence with `p = 2`, `ε = blur²` (`SamplesLoss("hausdorff", blur=blur)`).
pub fn hausdorff(x: &Tensor, y: &Tensor, blur: f64) -> Result<Tensor> {
    with(Loss::Hausdorff, blur, x, y)
}

/// The energy distance, kernel `k(x, y) = −|x − y|` (`SamplesLoss("energy")`).
pub fn energy(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    with(Loss::Energy, 0.05, x, y)
}

/// The Gaussian kernel norm, `k(x, y) = exp(−|x − y|² / 2σ²)`, σ = `blur`.
pub fn gaussian(x: &Tensor, y: &Tensor, blur: f64) -> Result<Tensor> {
    with(Loss::Gaussian, blur, x, y)
}

/// The Laplacian kernel norm, `k(x, y) = exp(−|x − y| / σ)`, σ = `blur`.
pub fn laplacian(x: &Tensor, y: &Tensor, blur: f64) -> Result<Tensor> {
    with(Loss::Laplacian, blur, x, y)
}
