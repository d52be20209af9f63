//! Values of the Sinkhorn losses from the dual potentials (GeomLoss's `sinkhorn_cost`).
//!
//! With `⟨a, f⟩ = Σ_i a_i f_i` per batch item, ε = blur^p and ρ = reach^p:
//!
//! | | balanced | unbalanced |
//! |---|---|---|
//! | debiased `S_ε` | `⟨a, f_ba − f_aa⟩ + ⟨b, g_ab − g_bb⟩` | `⟨a, (ρ + ε/2)(e^{−f_aa/ρ} − e^{−f_ba/ρ})⟩ + ⟨b, (ρ + ε/2)(e^{−g_bb/ρ} − e^{−g_ab/ρ})⟩` |
//! | raw `OT_ε` | `⟨a, f_ba⟩ + ⟨b, g_ab⟩` | `⟨a, (ρ + ε/2)(1 − e^{−f_ba/ρ})⟩ + ⟨b, (ρ + ε/2)(1 − e^{−g_ab/ρ})⟩` |
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
        None => {
            let fa = match &pot.f_aa {
                Some(f_aa) => (&pot.f_ba - f_aa)?,
                None => pot.f_ba.clone(),
            };
            let gb = match &pot.g_bb {
                Some(g_bb) => (&pot.g_ab - g_bb)?,
                None => pot.g_ab.clone(),
            };
            scal(a, &fa)? + scal(b, &gb)?
        }
        Some(rho) => {
            let w = rho + eps / 2.0;
            let e = |f: &Tensor| (f * (-1.0 / rho))?.exp(); // e^{−f/ρ}
            let fa = match &pot.f_aa {
                Some(f_aa) => (e(f_aa)? - e(&pot.f_ba)?)?,
                None => (1.0 - e(&pot.f_ba)?)?,
            };
            let gb = match &pot.g_bb {
                Some(g_bb) => (e(g_bb)? - e(&pot.g_ab)?)?,
                None => (1.0 - e(&pot.g_ab)?)?,
            };
            (scal(a, &fa)? + scal(b, &gb)?)? * w
        }
    }
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
