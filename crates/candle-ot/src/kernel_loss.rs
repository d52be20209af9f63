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
use crate::softmin::{Lengths, PointSoftmin};
use candle_core::{Result, Tensor};

/// Kernel-norm loss (B,) and its potentials F (B, N), G (B, M). The batch is ragged when
/// `lens = Some((x lengths, y lengths))` (stored padded, zero weights on the padding; see
/// [`PointSoftmin::kernel_product_ragged`]); the potentials are then 0 on padding rows for a
/// backend that knows lengths.
#[allow(clippy::too_many_arguments)]
pub fn kernel_loss<S: PointSoftmin>(
    backend: &S,
    kind: KernelKind,
    sigma: f64,
    a: &Tensor,
    x: &Tensor,
    b: &Tensor,
    y: &Tensor,
    lens: Option<(&Lengths, &Lengths)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xl, yl) = (lens.map(|l| l.0), lens.map(|l| l.1));
    let kp = |p: &Tensor, pl: Option<&Lengths>, q: &Tensor, ql: Option<&Lengths>, w: &Tensor| match (
        pl, ql,
    ) {
        (Some(pl), Some(ql)) => backend.kernel_product_ragged(kind, sigma, p, pl, q, ql, w),
        _ => backend.kernel_product(kind, sigma, p, q, w),
    };
    let a_x = kp(x, xl, x, xl, a)?; // K_xx a, (B, N)
    let b_y = kp(y, yl, y, yl, b)?; // K_yy b, (B, M)
    let b_x = kp(x, xl, y, yl, b)?; // K_xy b, (B, N)
    let loss = ((scal(a, &a_x)? * 0.5)? + (scal(b, &b_y)? * 0.5)?)?;
    let loss = (loss - scal(a, &b_x)?)?;
    let f = (a_x.detach() - b_x.detach())?;
    // K_yx a is only needed for the potential G, outside the graph.
    let a_y = kp(&y.detach(), yl, &x.detach(), xl, &a.detach())?; // (B, M)
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
///
/// `(a, x, log_a)`: weights (B, N), points (B, N, D), log-weights; `(b, y, log_b)` alike. The
/// batch is ragged when `lens = Some((x lengths, y lengths))` (stored padded, zero weights on
/// the padding; see [`PointSoftmin::cost_ragged`]).
pub fn hausdorff_loss<S: PointSoftmin>(
    backend: &S,
    eps: f64,
    rho: Option<f64>,
    exact: bool,
    (a, x, log_a): (&Tensor, &Tensor, &Tensor),
    (b, y, log_b): (&Tensor, &Tensor, &Tensor),
    lens: Option<(&Lengths, &Lengths)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let lam = dampening(eps, rho);
    let (log_a, log_b) = (log_a.detach(), log_b.detach());
    let (xl, yl) = (lens.map(|l| l.0), lens.map(|l| l.1));
    let cost = |p: &Tensor, pl: Option<&Lengths>, q: &Tensor, ql: Option<&Lengths>| match (pl, ql) {
        (Some(pl), Some(ql)) => backend.cost_ragged(p, pl, q, ql),
        _ => backend.cost(p, q),
    };
    let sm = |p: (&Tensor, Option<&Lengths>), q: (&Tensor, Option<&Lengths>), h: &Tensor| {
        backend.softmin(eps, &cost(p.0, p.1, q.0, q.1)?, h)
    };
    // GeomLoss differentiates through the rows only; the exact gradient through both clouds.
    let (xc, yc) = if exact {
        (x.clone(), y.clone())
    } else {
        (x.detach(), y.detach())
    };
    let s_xy = sm((x, xl), (&yc, yl), &log_b)?; // (B, N)
    let s_xx = sm((x, xl), (&xc, xl), &log_a)?; // (B, N)
    let s_yx = sm((y, yl), (&xc, xl), &log_a)?; // (B, M)
    let s_yy = sm((y, yl), (&yc, yl), &log_b)?; // (B, M)
    let f = ((&s_xy - &s_xx)? * lam)?; // (B, N)
    let g = ((&s_yx - &s_yy)? * lam)?; // (B, M)
    let mut loss = ((scal(a, &f)? + scal(b, &g)?)? * 0.5)?;
    if exact {
        // K_j = Σ_i c_i exp((S_i − C(p_i, q_j))/ε) for rows p with weights c and columns q.
        let k = |q: (&Tensor, Option<&Lengths>),
                 p: (&Tensor, Option<&Lengths>),
                 log_c: &Tensor,
                 s: &Tensor|
         -> Result<Tensor> {
            let (qd, pd) = (q.0.detach(), p.0.detach());
            let h = (log_c + (s.detach() / eps)?)?;
            let c = cost(&qd, q.1, &pd, p.1)?;
            (backend.softmin_no_grad(eps, &c, &h)? / (-eps))?.exp()
        };
        let c = 0.5 * lam * eps;
        // ∂L/∂b_j = ½λε (Σ_i b_i e^{(S_yy,i − C(y_i, y_j))/ε} − Σ_i a_i e^{(S_xy,i − C(x_i, y_j))/ε}),
        // ∂L/∂a_j = ½λε (Σ_i a_i e^{(S_xx,i − C(x_i, x_j))/ε} − Σ_i b_i e^{(S_yx,i − C(y_i, x_j))/ε}).
        let (yy, xx) = ((y, yl), (x, xl));
        let db = ((k(yy, yy, &log_b, &s_yy)? - k(yy, xx, &log_a, &s_xy)?)? * c)?; // (B, M)
        let da = ((k(xx, xx, &log_a, &s_xx)? - k(xx, yy, &log_b, &s_yx)?)? * c)?; // (B, N)
        let t = (scal(a, &da)? + scal(b, &db)?)?;
        loss = (loss + (&t - t.detach())?)?;
    }
    Ok((loss, f.detach(), g.detach()))
}
