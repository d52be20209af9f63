//! Values of the Sinkhorn losses from the dual potentials (GeomLoss's `sinkhorn_cost`).
//!
//! With $\langle a, f \rangle = \sum_i a_i f_i$ per batch item, $\varepsilon = \text{blur}^p$ and
//! $\rho = \text{reach}^p$:
//!
//! | | balanced | unbalanced |
//! |---|---|---|
//! | debiased $S_\varepsilon$ | $\langle a, f_{ba} - f_{aa} \rangle + \langle b, g_{ab} - g_{bb} \rangle$ | $(\rho + \tfrac{\varepsilon}{2}) \big[\langle a, e^{-f_{aa}/\rho} - e^{-f_{ba}/\rho} \rangle + \langle b, e^{-g_{bb}/\rho} - e^{-g_{ab}/\rho} \rangle\big]$ |
//! | raw $\mathrm{OT}\_\varepsilon$ | $\langle a, f_{ba} \rangle + \langle b, g_{ab} \rangle$ | $(\rho + \tfrac{\varepsilon}{2}) \big[\langle a, 1 - e^{-f_{ba}/\rho} \rangle + \langle b, 1 - e^{-g_{ab}/\rho} \rangle\big]$ |
//!
//! The weights `a`, `b` enter explicitly, so autograd gives `∂/∂a = F` in the balanced case.

use crate::sinkhorn::DualPotentials;
use candle_core::{Result, Tensor};

/// `⟨a, f⟩` per batch item: a, f (B, N) → (B,).
pub(crate) fn scal(a: &Tensor, f: &Tensor) -> Result<Tensor> {
    (a * f)?.sum(1)
}

/// The loss value (B,) from the potentials of [`crate::sinkhorn::sinkhorn_loop`].
pub fn sinkhorn_cost(
    a: &Tensor,
    b: &Tensor,
    pot: &DualPotentials,
    eps: f64,
    rho: Option<f64>,
) -> Result<Tensor> {
    match rho {
        // Balanced: ⟨a, F⟩ + ⟨b, G⟩ with GeomLoss's potentials F, G.
        None => {
            let (f, g) = sinkhorn_potentials(pot)?;
            scal(a, &f)? + scal(b, &g)?
        }
        Some(rho) => unbalanced_cost(a, b, pot, eps, rho),
    }
}

/// The unbalanced value, with the exact gradients of that value at convergence.
///
/// GeomLoss 0.3.1 multiplies by `ρ + ε/2` and lets autograd differentiate that product; its
/// custom backward (factor `ρ + ε`) is never called, and its gradients disagree with finite
/// differences of its own value by 10–17%. Here the value is the same, and the gradient is
/// the derivative of the dual objective at its optimum (envelope theorem), with `ρ = reach^p`:
///
/// - debiased: $\partial_{a_i} = (\rho+\varepsilon)(e^{-f_{aa,i}/\rho} - e^{-f_{ba,i}/\rho})$,
///   $\partial_{x_i} = a_i (1+\varepsilon/\rho) \big[e^{-f_{ba,i}/\rho} \nabla f_{ba}(x_i) - e^{-f_{aa,i}/\rho} \nabla f_{aa}(x_i)\big]$;
/// - raw: $\partial_{a_i} = (\rho+\varepsilon)(1 - e^{-f_{ba,i}/\rho}) - \varepsilon/2$,
///   $\partial_{x_i} = a_i (1+\varepsilon/\rho) e^{-f_{ba,i}/\rho} \nabla f_{ba}(x_i)$;
///
/// and symmetrically for b and y. `∇f_ba` is the gradient of the last (differentiable) update.
/// It is implemented as `value + (T − T.detach())` with a surrogate `T` whose gradient is the
/// one above: the value is unchanged to the bit, and the gradient flows through `a`, `b` and
/// the potentials of the last update.
fn unbalanced_cost(
    a: &Tensor,
    b: &Tensor,
    pot: &DualPotentials,
    eps: f64,
    rho: f64,
) -> Result<Tensor> {
    let w = rho + eps / 2.0;
    let e = |f: &Tensor| (f.detach() * (-1.0 / rho))?.exp(); // e^{−f/ρ}, detached
    let (ad, bd) = (a.detach(), b.detach());
    // The value, GeomLoss's formula.
    let (fa, gb) = match (&pot.f_aa, &pot.g_bb) {
        (Some(f_aa), Some(g_bb)) => ((e(f_aa)? - e(&pot.f_ba)?)?, (e(g_bb)? - e(&pot.g_ab)?)?),
        _ => ((1.0 - e(&pot.f_ba)?)?, (1.0 - e(&pot.g_ab)?)?),
    };
    let value = ((scal(&ad, &fa)? + scal(&bd, &gb)?)? * w)?; // (B,)
                                                             // The surrogate: weights times their exact derivative, potentials times theirs.
    let k = 1.0 + eps / rho;
    let (da, db) = match (&pot.f_aa, &pot.g_bb) {
        (Some(_), Some(_)) => ((&fa * (rho + eps))?, (&gb * (rho + eps))?),
        _ => (
            ((&fa * (rho + eps))? - eps / 2.0)?,
            ((&gb * (rho + eps))? - eps / 2.0)?,
        ),
    };
    let mut t = (scal(a, &da)? + scal(b, &db)?)?;
    t = (t + scal(&((&ad * k)? * e(&pot.f_ba)?)?, &pot.f_ba)?)?;
    t = (t + scal(&((&bd * k)? * e(&pot.g_ab)?)?, &pot.g_ab)?)?;
    if let (Some(f_aa), Some(g_bb)) = (&pot.f_aa, &pot.g_bb) {
        t = (t - scal(&((&ad * k)? * e(f_aa)?)?, f_aa)?)?;
        t = (t - scal(&((&bd * k)? * e(g_bb)?)?, g_bb)?)?;
    }
    value + (&t - t.detach())?
}

/// The potentials GeomLoss returns with `potentials=True`: `F = f_ba − f_aa`, `G = g_ab − g_bb`
/// when debiased, else `F = f_ba`, `G = g_ab` (also when unbalanced).
pub fn sinkhorn_potentials(pot: &DualPotentials) -> Result<(Tensor, Tensor)> {
    let f = match &pot.f_aa {
        Some(f_aa) => (&pot.f_ba - f_aa)?,
        None => pot.f_ba.clone(),
    };
    let g = match &pot.g_bb {
        Some(g_bb) => (&pot.g_ab - g_bb)?,
        None => pot.g_ab.clone(),
    };
    Ok((f, g))
}

/// A certified interval for the converged value of a balanced Sinkhorn loss, from the
/// returned potentials (two exact softmin passes per OT term), with [`value_error_bound`].
///
/// For one term `OT_ε(α, β)` with column potential `g` (the loop's `g_ab`, or `f_aa` for
/// `OT_ε(α, α)`), the semi-dual $\Phi(g) = \langle a, \tilde f \rangle + \langle b, g \rangle$,
/// $\tilde f = \mathrm{softmin}_\varepsilon(C_{xy}, \log b + g/\varepsilon)$, is concave in g,
/// its maximum is the converged value $V^\*$ and its gradient is $b - c$, with
/// $c_j = b_j \exp((g_j - \tilde g_j)/\varepsilon)$ the column marginal of the plan of
/// $(\tilde f, g)$ and $\tilde g = \mathrm{softmin}_\varepsilon(C_{yx}, \log a + \tilde f/\varepsilon)$.
/// Concavity and $\sum_j (b - c)_j = 0$ give
///
/// $$ \Phi(g) \le V^\* \le \Phi(g) + \tfrac12 \lVert b - c \rVert_1 \big(C_{\max} + \operatorname{osc} g\big), $$
///
/// since a converged potential is a c-transform, whose oscillation on the support of b is at
/// most $C_{\max}$ (costs ≥ 0), here `diameter^p / p` over the points of positive weight. The
/// debiased value `V_ab − ½V_aa − ½V_bb` takes the interval sums. The clouds come with their
/// log-weights: (x (B, N, D), log a (B, N)), (y (B, M, D), log b (B, M)). Returns B pairs
/// `(lo, hi)`.
pub(crate) fn converged_value_interval<S: crate::softmin::PointSoftmin>(
    backend: &S,
    eps: f64,
    c_max: f64,
    (x, log_a): (&Tensor, &Tensor),
    (y, log_b): (&Tensor, &Tensor),
    pot: &DualPotentials,
    lens: Option<&(crate::softmin::Lengths, crate::softmin::Lengths)>,
) -> Result<Vec<(f64, f64)>> {
    use candle_core::DType;
    let (xl, yl) = (lens.map(|l| &l.0), lens.map(|l| &l.1));
    let cost = |p: &Tensor, pl, q: &Tensor, ql| match (pl, ql) {
        (Some(pl), Some(ql)) => backend.cost_ragged(p, pl, q, ql),
        _ => backend.cost(p, q),
    };
    // One OT term: rows p (log-weights lw_r), columns q (lw_c) with potential g on q.
    let term = |(p, pl), (q, ql), lw_r: &Tensor, lw_c: &Tensor, g: &Tensor| {
        let g = g.detach();
        let f_t = backend.softmin_no_grad(eps, &cost(p, pl, q, ql)?, &(lw_c + (&g / eps)?)?)?; // (B, N)
        let g_t = backend.softmin_no_grad(eps, &cost(q, ql, p, pl)?, &(lw_r + (&f_t / eps)?)?)?; // (B, M)
        let host = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec2::<f64>();
        let (f_t, g_t, g) = (host(&f_t)?, host(&g_t)?, host(&g)?);
        let (w_r, w_c) = (host(&lw_r.exp()?)?, host(&lw_c.exp()?)?);
        let mut out = Vec::with_capacity(g.len());
        for k in 0..g.len() {
            let mut phi = 0.0;
            for (w, f) in w_r[k].iter().zip(&f_t[k]) {
                if *w > 0.0 {
                    phi += w * f;
                }
            }
            let (mut marg, mut lo_g, mut hi_g) = (0.0, f64::INFINITY, f64::NEG_INFINITY);
            for ((w, gj), gt) in w_c[k].iter().zip(&g[k]).zip(&g_t[k]) {
                if *w > 0.0 {
                    phi += w * gj;
                    marg += w * (1.0 - ((gj - gt) / eps).exp()).abs();
                    lo_g = lo_g.min(*gj);
                    hi_g = hi_g.max(*gj);
                }
            }
            let delta = 0.5 * marg * (c_max + (hi_g - lo_g));
            out.push((phi, if delta.is_nan() { f64::INFINITY } else { delta }));
        }
        Ok::<_, candle_core::Error>(out)
    };
    let ab = term((x, xl), (y, yl), log_a, log_b, &pot.g_ab)?;
    match (&pot.f_aa, &pot.g_bb) {
        (Some(f_aa), Some(g_bb)) => {
            let aa = term((x, xl), (x, xl), log_a, log_a, f_aa)?;
            let bb = term((y, yl), (y, yl), log_b, log_b, g_bb)?;
            Ok(ab
                .iter()
                .zip(&aa)
                .zip(&bb)
                .map(|((ab, aa), bb)| {
                    let mid = ab.0 - 0.5 * aa.0 - 0.5 * bb.0;
                    (mid - 0.5 * aa.1 - 0.5 * bb.1, mid + ab.1)
                })
                .collect())
        }
        _ => Ok(ab.iter().map(|(phi, d)| (*phi, phi + d)).collect()),
    }
}
