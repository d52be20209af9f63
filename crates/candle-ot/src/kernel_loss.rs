//! Kernel-norm losses (energy, gaussian, laplacian) and the Hausdorff divergence.
//!
//! **Kernel norms** (GeomLoss's `kernel_*` routines), with $K_{xy}$ the matrix of the $k(x_i, y_j)$:
//!
//! $$
//! \mathcal{L} = \tfrac12 a^\top K_{xx} a + \tfrac12 b^\top K_{yy} b - a^\top K_{xy} b, \qquad
//! F = K_{xx} a - K_{xy} b, \qquad G = K_{yy} b - K_{yx} a.
//! $$
//!
//! Gradients are the full derivatives of this value (in x, y, a and b); `∂/∂a = F`, `∂/∂b = G`.
//!
//! **Hausdorff** (GeomLoss's formula; GeomLoss 0.3.1 itself crashes on it), with one softmin
//! per term at ε = blur^p, λ = 1/(1 + ε/ρ) when a reach is set (else 1):
//!
//! $$
//! \begin{aligned}
//! F &= \lambda \big(\mathrm{softmin}\_\varepsilon(C_{xy}, \log b) - \mathrm{softmin}\_\varepsilon(C_{xx}, \log a)\big), \\\\
//! G &= \lambda \big(\mathrm{softmin}\_\varepsilon(C_{yx}, \log a) - \mathrm{softmin}\_\varepsilon(C_{yy}, \log b)\big), \\\\
//! \mathcal{L} &= \tfrac12 \langle a, F \rangle + \tfrac12 \langle b, G \rangle.
//! \end{aligned}
//! $$
//!
//! As in the Sinkhorn loop, gradients flow through the first argument of each cost and through
//! the explicit weights of the value, never through the log-weights.

use crate::cost::KernelKind;
use crate::divergence::scal;
use crate::schedule::dampening;
use crate::softmin::PointSoftmin;
use candle_core::{Result, Tensor};

/// Kernel-norm loss (B,) and its potentials F (B, N), G (B, M).
pub fn kernel_loss<S: PointSoftmin>(
    backend: &S,
    kind: KernelKind,
    sigma: f64,
    a: &Tensor,
    x: &Tensor,
    b: &Tensor,
    y: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let a_x = backend.kernel_product(kind, sigma, x, x, a)?; // K_xx a, (B, N)
    let b_y = backend.kernel_product(kind, sigma, y, y, b)?; // K_yy b, (B, M)
    let b_x = backend.kernel_product(kind, sigma, x, y, b)?; // K_xy b, (B, N)
    let loss = ((scal(a, &a_x)? * 0.5)? + (scal(b, &b_y)? * 0.5)?)?;
    let loss = (loss - scal(a, &b_x)?)?;
    let f = (a_x.detach() - b_x.detach())?;
    // K_yx a is only needed for the potential G, outside the graph.
    let a_y = backend.kernel_product(kind, sigma, &y.detach(), &x.detach(), &a.detach())?;
    let g = (b_y.detach() - a_y)?;
    Ok((loss, f, g))
}

/// Hausdorff divergence (B,) and its potentials F (B, N), G (B, M).
#[allow(clippy::too_many_arguments)]
pub fn hausdorff_loss<S: PointSoftmin>(
    backend: &S,
    eps: f64,
    rho: Option<f64>,
    a: &Tensor,
    x: &Tensor,
    log_a: &Tensor,
    b: &Tensor,
    y: &Tensor,
    log_b: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let lam = dampening(eps, rho);
    let (xd, yd) = (x.detach(), y.detach());
    let (log_a, log_b) = (log_a.detach(), log_b.detach());
    let sm = |p: &Tensor, q: &Tensor, h: &Tensor| -> Result<Tensor> {
        backend.softmin(eps, &backend.cost(p, q)?, h)
    };
    let f = ((sm(x, &yd, &log_b)? - sm(x, &xd, &log_a)?)? * lam)?; // (B, N)
    let g = ((sm(y, &xd, &log_a)? - sm(y, &yd, &log_b)?)? * lam)?; // (B, M)
    let loss = ((scal(a, &f)? + scal(b, &g)?)? * 0.5)?;
    Ok((loss, f.detach(), g.detach()))
}
