//! # candle-ot
//!
//! Optimal-transport losses between weighted point clouds for the
//! [Candle](https://github.com/huggingface/candle) ML framework: the Sinkhorn divergence,
//! the Hausdorff divergence and kernel norms, with the options, defaults and numbers of
//! GeomLoss 0.3.1's `SamplesLoss`, differentiable through Candle's autograd.
//!
//! ## The maths
//!
//! For measures $\alpha = \sum_i a_i \delta_{x_i}$ and $\beta = \sum_j b_j \delta_{y_j}$, a cost
//! $C(x, y) = \frac1p |x - y|^p$ ($p \in \lbrace 1, 2 \rbrace$), $\varepsilon = \text{blur}^p$ and, for
//! unbalanced transport, $\rho = \text{reach}^p$, entropic optimal transport is
//!
//! $$
//! \mathrm{OT}\_\varepsilon(\alpha, \beta) = \min_{\pi \geq 0} \langle \pi, C \rangle +
//!   \varepsilon \mathrm{KL}(\pi \mid \alpha \otimes \beta) +
//!   \rho \mathrm{KL}(\pi \mathbf{1} \mid \alpha) + \rho \mathrm{KL}(\pi^\top \mathbf{1} \mid \beta)
//! $$
//!
//! (the last two terms replaced by the marginal constraints when balanced). Its dual
//! potentials solve
//! $f = \lambda \mathrm{softmin}\_\varepsilon(C, \log b + g/\varepsilon)$,
//! $g = \lambda \mathrm{softmin}\_\varepsilon(C^\top, \log a + f/\varepsilon)$ with
//!
//! $$
//! \mathrm{softmin}\_\varepsilon(C, h)\_i = -\varepsilon \log \sum_j \exp\big(h_j - C(x_i, y_j)/\varepsilon\big),
//! \qquad \lambda = \frac{1}{1 + \varepsilon/\rho}
//! $$
//!
//! and the debiased Sinkhorn divergence is
//!
//! $$
//! S\_\varepsilon(\alpha, \beta) = \mathrm{OT}\_\varepsilon(\alpha, \beta) -
//!   \tfrac12 \mathrm{OT}\_\varepsilon(\alpha, \alpha) - \tfrac12 \mathrm{OT}\_\varepsilon(\beta, \beta).
//! $$
//!
//! [`ImagesLoss`] computes the same divergences between densities on 2-D and 3-D grids
//! (images, volumes), where the costs are separable and every softmin is a few 1-D
//! log-sum-exps ([`softmin::grid`]); see [`images`].
//!
//! [`sinkhorn`] runs GeomLoss's ε-scaling loop ([`sinkhorn::sinkhorn_loop`]) against any
//! [`softmin::PointSoftmin`]: the building block for a loss of your own.
//!
//! ## The public surface
//!
//! - **The losses and solvers** (crate root): [`SamplesLoss`] (with [`Solution`],
//!   [`TransportPlan`], the diagnostics), the named [`SinkhornDivergence`], [`ImagesLoss`], [`ImagesBarycenter`],
//!   [`FreeSupportBarycenter`], the one-liners of [`loss`], [`OtError`], the thread count.
//! - **The building blocks**: the differentiable softmin ops and backends of [`softmin`]
//!   (online, tensorized, grid), the loop of [`sinkhorn`], the ε schedule of [`schedule`],
//!   the costs of [`cost`].
//! - [`internals`]: the multiscale machinery, the loop's multilevel traits and the roofline
//!   benchmark's kernels, public for this project's tests, benches and CLI only: no
//!   stability promise.
//!
//! ## Quick start
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_ot::{Backend, Loss, SamplesLoss};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Var::from_tensor(&Tensor::rand(0f32, 1., (200, 3), &dev)?)?; // (N, D)
//! let y = Tensor::rand(0f32, 1., (300, 3), &dev)?; // (M, D)
//! let loss = SamplesLoss::builder(Loss::Sinkhorn)
//!     .p(2)
//!     .blur(0.05)
//!     .scaling(0.5)
//!     .backend(Backend::Online)
//!     .build()?;
//! let value = loss.forward(&x, &y)?; // a scalar tensor
//! let grads = value.backward()?;
//! let grad_x = grads.get(&x).expect("x is a variable"); // (N, D)
//! assert_eq!(grad_x.dims(), &[200, 3]);
//! # Ok(()) }
//! ```
//!
//! ## Backends
//!
//! - [`Backend::Tensorized`]: dense matrices, any device, O(N·M) memory.
//! - [`Backend::Online`]: streaming custom ops with a `(max, sum)` log-sum-exp, O(N + M)
//!   memory, multi-threaded and vectorised on the CPU.
//! - [`Backend::Multiscale`]: GeomLoss's coarse-to-fine scheme (voxel-grid clusters, kernel
//!   truncation, block-sparse streaming softmins) for 10⁵–10⁶ points in D ≤ 3; kernels on the
//!   CPU, CUDA and Metal (the clustering and truncation run on the host).
//! - [`Backend::Auto`]: online on the CPU (multiscale for large f32 Sinkhorn problems in
//!   D ≤ 3), tensorized elsewhere.
//!
//! Inputs are f32 or f64 (f16/bf16 are computed in f32); batches are `(B, N, D)` with weights
//! `(B, N)`. Errors are [`OtError`] values converted into [`candle_core::Error`].

pub mod barycenter;
pub mod cost;
pub mod distributed;
mod divergence;
pub mod error;
pub mod free_support;
pub mod images;
mod kernel_loss;
pub mod loss;
mod multiscale;
pub mod options;
pub mod packed;
pub mod plan;
pub mod samples_loss;
pub mod schedule;
pub mod sinkhorn;
pub mod sinkhorn_divergence;
pub mod softmin;
mod threads;

pub use barycenter::{
    BarycenterDiagnostics, ImagesBarycenter, ImagesBarycenterBuilder, ImagesBarycenterOptions,
    ImagesBarycenterSolution,
};
pub use cost::{CostKind, KernelKind};
pub use error::OtError;
pub use free_support::{Cloud, FreeSupportBarycenter, FreeSupportDiagnostics, FreeSupportSolution};
pub use images::{ImagesLoss, ImagesLossBuilder, ImagesLossOptions, ImagesSolution};
pub use options::{Backend, Loss, SamplesLossBuilder, SamplesLossOptions};
pub use packed::{PackedPlan, PackedSolution};
pub use plan::TransportPlan;
pub use samples_loss::{SamplesLoss, Solution, TargetLoss, F32_PROMOTION_EXPONENT};
pub use sinkhorn::{
    Acceleration, DualPotentials, Observer, Phase, Progress, SinkhornDiagnostics, ValueErrorBound,
    ACCURACY_WARNING_THRESHOLD,
};
pub use sinkhorn_divergence::SinkhornDivergence;
pub use threads::{num_threads, set_num_threads};

/// Internals, public for this project's own tests, benches and CLI: the multiscale backend's
/// block-sparse softmin and jump rule, the Sinkhorn loop's multilevel traits (how the
/// multiscale backend and grids plug their levels in), and the roofline benchmark's kernels.
/// Not a stable API: use the crate root, [`softmin`], [`sinkhorn::sinkhorn_loop`] and
/// [`schedule`] instead.
pub mod internals {
    #[doc(inline)]
    pub use crate::sinkhorn::{
        sinkhorn_multilevel, CostSet, Level, Multilevel, Pair, Refined, SoftminLevel, TrackFn,
    };
    #[doc(inline)]
    pub use crate::softmin::multiscale::{
        block_softmin, jump_index, multiscale_setup, BlockCost, BlockSparse,
    };
    #[doc(inline)]
    pub use crate::softmin::online::{roofline, RooflineMix};
}
