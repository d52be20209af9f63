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
//! By default, as in GeomLoss, gradients flow through the first argument of each cost and
//! through the explicit weights of the value, never through the log-weights: not the
//! derivative of the value. `SamplesLossOptions::exact_hausdorff_gradient` gives the exact
//! derivative ([`hausdorff_loss`]).

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
///
/// `exact = false` is GeomLoss's gradient: each softmin differentiates through its rows only
/// (`softmin(x, ȳ, log b̄)`, the other cloud and the log-weights detached), which is not the
/// derivative of the value. `exact = true` gives the derivative of the value in x, y, a and b:
/// every softmin is differentiated in both clouds (the softmin op's backward reduces over
/// columns too), and the log-weights enter through a surrogate whose gradient is the exact
/// one, finite also at zero weights:
///
/// $$
/// \frac{\partial}{\partial w_j} \mathrm{softmin}\_\varepsilon(C_{pq}, \log w)_i
///   = -\varepsilon\, e^{(S_i - C(p_i, q_j))/\varepsilon}, \qquad
/// \sum_i c_i e^{(S_i - C(p_i, q_j))/\varepsilon}
///   = \exp\big(-\mathrm{softmin}\_\varepsilon(C_{qp}, \log c + S/\varepsilon)_j / \varepsilon\big),
/// $$
///
/// one more (gradient-free) softmin per term, so 8 passes instead of 4 (plus the backward).
#[allow(clippy::too_many_arguments)]
pub fn hausdorff_loss<S: PointSoftmin>(
    backend: &S,
    eps: f64,
    rho: Option<f64>,
    exact: bool,
    a: &Tensor,
    x: &Tensor,
    log_a: &Tensor,
    b: &Tensor,
    y: &Tensor,
    log_b: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let lam = dampening(eps, rho);
    let (log_a, log_b) = (log_a.detach(), log_b.detach());
    let sm = |p: &Tensor, q: &Tensor, h: &Tensor| -> Result<Tensor> {
        backend.softmin(eps, &backend.cost(p, q)?, h)
    };
    // GeomLoss differentiates through the rows only; the exact gradient through both clouds.
    let (xc, yc) = if exact {
        (x.clone(), y.clone())
    } else {
        (x.detach(), y.detach())
    };
    let s_xy = sm(x, &yc, &log_b)?; // (B, N)
    let s_xx = sm(x, &xc, &log_a)?; // (B, N)
    let s_yx = sm(y, &xc, &log_a)?; // (B, M)
    let s_yy = sm(y, &yc, &log_b)?; // (B, M)
    let f = ((&s_xy - &s_xx)? * lam)?; // (B, N)
    let g = ((&s_yx - &s_yy)? * lam)?; // (B, M)
    let mut loss = ((scal(a, &f)? + scal(b, &g)?)? * 0.5)?;
    if exact {
        // K_j = Σ_i c_i exp((S_i − C(p_i, q_j))/ε) for rows p with weights c and columns q.
        let k = |q: &Tensor, p: &Tensor, log_c: &Tensor, s: &Tensor| -> Result<Tensor> {
            let (q, p) = (q.detach(), p.detach());
            let h = (log_c + (s.detach() / eps)?)?;
            (backend.softmin_no_grad(eps, &backend.cost(&q, &p)?, &h)? / (-eps))?.exp()
        };
        let c = 0.5 * lam * eps;
        // ∂L/∂b_j = ½λε (Σ_i b_i e^{(S_yy,i − C(y_i, y_j))/ε} − Σ_i a_i e^{(S_xy,i − C(x_i, y_j))/ε}),
        // ∂L/∂a_j = ½λε (Σ_i a_i e^{(S_xx,i − C(x_i, x_j))/ε} − Σ_i b_i e^{(S_yx,i − C(y_i, x_j))/ε}).
        let db = ((k(y, y, &log_b, &s_yy)? - k(y, x, &log_a, &s_xy)?)? * c)?; // (B, M)
        let da = ((k(x, x, &log_a, &s_xx)? - k(x, y, &log_b, &s_yx)?)? * c)?; // (B, N)
        let t = (scal(a, &da)? + scal(b, &db)?)?;
        loss = (loss + (&t - t.detach())?)?;
    }
    Ok((loss, f.detach(), g.detach()))
}
