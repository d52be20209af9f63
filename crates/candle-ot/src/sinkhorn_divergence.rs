//! The Sinkhorn divergence as a named, differentiable Candle op.
//!
//! $$
//! S_\varepsilon(\alpha, \beta) = \mathrm{OT}_\varepsilon(\alpha, \beta) - \tfrac12 \mathrm{OT}_\varepsilon(\alpha, \alpha) - \tfrac12 \mathrm{OT}_\varepsilon(\beta, \beta)
//! = \langle a, f_{ba} - f_{aa} \rangle + \langle b, g_{ab} - g_{bb} \rangle
//! $$
//!
//! for $\alpha = \sum_i a_i \delta_{x_i}$, $\beta = \sum_j b_j \delta_{y_j}$, cost
//! $C(x, y) = |x - y|^p / p$, $\varepsilon = \text{blur}^p$ (Feydy et al., *Interpolating between
//! Optimal Transport and MMD using Sinkhorn Divergences*, AISTATS 2019; GeomLoss's
//! `SamplesLoss("sinkhorn")`). With a `reach`, the unbalanced divergence of Séjourné et al. 2019
//! (see [`crate::SamplesLoss`]'s docs for its value).
//!
//! **Forward**: the ε-scaling loop (GeomLoss's `sinkhorn_loop`) on detached inputs, to the
//! potentials at the final ε, then one last update whose costs `C(x, ȳ)` keep `x` (resp. `y`)
//! in the graph. **Backward** (envelope theorem: the loop is not unrolled): the backward of that
//! update's softmin ops, which read the converged potentials, `∂a_i = F_i`, `∂b_j = G_j`
//! (balanced) and `∂x_i = a_i ∇F(x_i)` with
//! `∇f_ba(x_i) = Σ_j π_ij ∇₁C(x_i, y_j) / Σ_j π_ij`, one streaming reduction per potential
//! (four in all when debiased), on the device of the inputs. docs/performance.md ("The
//! backward of the Sinkhorn divergence") measures it against the alternatives.

use crate::error::OtError;
use crate::options::{Loss, SamplesLossBuilder, SamplesLossOptions};
use crate::samples_loss::{SamplesLoss, Solution};
use candle_core::{Result, Tensor};

/// The Sinkhorn divergence $S_\varepsilon(\alpha, \beta)$ as a loss inside a Candle graph (see
/// the [module docs](self) for the formula, the forward and the backward).
///
/// It is [`SamplesLoss`] restricted to `Loss::Sinkhorn`: the same options (blur, p, reach,
/// scaling, debias, backend, `tol`, ...), the same values and gradients to the bit; use
/// `SamplesLoss` for the other losses, `SinkhornDivergence` where code wants the divergence by
/// name. Shapes: a (N,) or (B, N), x (N, D) or (B, N, D), likewise b and y; the value is a
/// scalar, or (B,). Gradients flow to every input that autograd tracks.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_ot::SinkhornDivergence;
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[[0.0f64, 0.0], [1.0, 0.0], [0.0, 1.0]], &Device::Cpu)?; // (N, D)
/// let y = Tensor::new(&[[0.5f64, 0.5], [1.5, 0.5]], &Device::Cpu)?; // (M, D)
/// let s = SinkhornDivergence::new(0.05)?;
/// let value = s.forward_uniform(x.as_tensor(), &y)?; // scalar
/// let grads = value.backward()?;
/// assert!(value.to_scalar::<f64>()? > 0.0 && grads.get(&x).is_some());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SinkhornDivergence {
    loss: SamplesLoss,
}

impl SinkhornDivergence {
    /// GeomLoss's defaults (p = 2, debiased, scaling 0.5, backend `Auto`) at this `blur`
    /// (units of x). Errors: a `blur` that is not finite and positive.
    pub fn new(blur: f64) -> Result<Self> {
        Self::builder().blur(blur).build_divergence()
    }

    /// A builder with every [`SamplesLoss`] option, loss fixed to `Loss::Sinkhorn`; finish with
    /// [`SamplesLossBuilder::build_divergence`].
    pub fn builder() -> SamplesLossBuilder {
        SamplesLoss::builder(Loss::Sinkhorn)
    }

    /// From options, validated. Errors: an option error, or `opts.loss` other than
    /// `Loss::Sinkhorn` (`OtError::Option` naming `loss`).
    pub fn from_options(opts: SamplesLossOptions) -> Result<Self> {
        if opts.loss != Loss::Sinkhorn {
            return Err(OtError::Option {
                name: "loss",
                reason: format!(
                    "a SinkhornDivergence computes the sinkhorn loss, got {:?}; use SamplesLoss for the others",
                    opts.loss
                ),
            }
            .into());
        }
        Ok(Self {
            loss: SamplesLoss::from_options(opts)?,
        })
    }

    /// The options.
    pub fn options(&self) -> &SamplesLossOptions {
        self.loss.options()
    }

    /// The same divergence as a [`SamplesLoss`] (for its other entry points: potentials,
    /// transport plan, `with_target`).
    pub fn as_samples_loss(&self) -> &SamplesLoss {
        &self.loss
    }

    /// $S_\varepsilon(\alpha, \beta)$ between weighted clouds: a (N,) or (B, N), x (N, D) or
    /// (B, N, D), b and y alike. Returns a scalar, or (B,).
    pub fn forward(&self, a: &Tensor, x: &Tensor, b: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.loss.forward_weighted(a, x, b, y)
    }

    /// $S_\varepsilon$ between uniformly weighted clouds (weights `1/N`, `1/M`).
    pub fn forward_uniform(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.loss.forward(x, y)
    }

    /// $S_\varepsilon$ per item of a packed (ragged) batch, (B,): see
    /// [`SamplesLoss::forward_packed`].
    pub fn forward_packed(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        x_lengths: &[usize],
        b: Option<&Tensor>,
        y: &Tensor,
        y_lengths: &[usize],
    ) -> Result<Tensor> {
        self.loss.forward_packed(a, x, x_lengths, b, y, y_lengths)
    }

    /// The value with the potentials and the loop's diagnostics ([`SamplesLoss::solve`]).
    pub fn solve(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Solution> {
        self.loss.solve(a, x, b, y)
    }
}

impl SamplesLossBuilder {
    /// Validates the options and builds a [`SinkhornDivergence`] (errors as
    /// [`SinkhornDivergence::from_options`]).
    pub fn build_divergence(self) -> Result<SinkhornDivergence> {
        SinkhornDivergence::from_options(self.build()?.options().clone())
    }
}
