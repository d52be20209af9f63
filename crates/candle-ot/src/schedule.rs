//! The ε-scaling schedule, the diameter estimate and the unbalanced dampening, exactly as
//! GeomLoss 0.3.1 computes them.

use candle_core::{Result, Tensor};

/// The diameter of `x ∪ y`: the Euclidean length of the diagonal of their common bounding box,
/// over all batch items together (GeomLoss's `max_diameter`). x (.., D), y (.., D).
pub fn estimate_diameter(x: &Tensor, y: &Tensor) -> Result<f64> {
    box_diagonal(&points(x, y)?, None)
}

/// The diameter of the points of `x ∪ y` with positive weight: [`estimate_diameter`] over the
/// rows where `a > 0` (for x) and `b > 0` (for y), so that points of zero weight change
/// nothing. GeomLoss takes every point (a zero-weight point far away widens its ε schedule).
/// x (B, N, D), a (B, N), y (B, M, D), b (B, M). Every batch item has a positive weight
/// (checked by the caller), so the box is never empty.
pub fn estimate_diameter_weighted(x: &Tensor, a: &Tensor, y: &Tensor, b: &Tensor) -> Result<f64> {
    let w = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
    box_diagonal(&points(x, y)?, Some(&w.detach().gt(0.0)?))
}

/// The points of x and y stacked, detached, in f64: (B·N + B·M, D).
fn points(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    Tensor::cat(&[x.reshape(((), d))?, y.reshape(((), d))?], 0)?
        .detach()
        .to_dtype(candle_core::DType::F64)
}

/// The diagonal of the bounding box of `pts` (P, D), over the rows where `keep` (P,) is
/// nonzero (all rows without it).
fn box_diagonal(pts: &Tensor, keep: Option<&Tensor>) -> Result<f64> {
    let (lo, hi) = match keep {
        None => (pts.min(0)?, pts.max(0)?),
        Some(keep) => {
            let keep = keep.unsqueeze(1)?.broadcast_as(pts.shape())?; // (P, D)
            let inf = Tensor::full(f64::INFINITY, pts.shape(), pts.device())?;
            (
                keep.where_cond(pts, &inf)?.min(0)?,
                keep.where_cond(pts, &inf.neg()?)?.max(0)?,
            )
        }
    };
    let (lo, hi) = (lo.to_vec1::<f64>()?, hi.to_vec1::<f64>()?);
    Ok(lo
        .iter()
        .zip(&hi)
        .map(|(l, h)| (h - l) * (h - l))
        .sum::<f64>()
        .sqrt())
}

/// GeomLoss's ε list:
///
/// ```text
/// [diameter^p] + [exp(e) for e in numpy.arange(p·ln(diameter), p·ln(blur), p·ln(scaling))] + [blur^p]
/// ```
///
/// `diameter^p` appears twice (once alone, once as the first value of the `arange`). The
/// `arange` is reproduced to the last bit: numpy computes `len = ceil((stop − start)/step)`
/// and the values `start + i·δ` with `δ = (start + step) − start`.
///
/// When the diameter is 0 (all points identical), the schedule is the single value `blur^p`.
pub fn epsilon_schedule(p: u32, diameter: f64, blur: f64, scaling: f64) -> Vec<f64> {
    let pf = p as f64;
    let blur_p = blur.powf(pf);
    if diameter <= 0.0 || !diameter.is_finite() {
        return vec![blur_p];
    }
    let start = pf * diameter.ln();
    let stop = pf * blur.ln();
    let step = pf * scaling.ln();
    let mut eps = vec![diameter.powf(pf)];
    let len = ((stop - start) / step).ceil();
    if len > 0.0 {
        let len = len as usize;
        let delta = (start + step) - start;
        for i in 0..len {
            let e = if i == 0 {
                start
            } else {
                start + (i as f64) * delta
            };
            eps.push(e.exp());
        }
    }
    eps.push(blur_p);
    eps
}

/// The most ε values a schedule may hold. Defaults give a few dozen; options such as a tiny
/// `blur`, a huge `diameter` and `scaling` close to 1 could otherwise ask for billions.
pub const MAX_SCHEDULE_LEN: usize = 1_000_000;

/// The length of [`epsilon_schedule`], computed without building it (as an f64: it may be
/// astronomically large).
pub fn schedule_len(p: u32, diameter: f64, blur: f64, scaling: f64) -> f64 {
    if diameter <= 0.0 || !diameter.is_finite() {
        return 1.0;
    }
    let pf = p as f64;
    let len = ((pf * blur.ln() - pf * diameter.ln()) / (pf * scaling.ln())).ceil();
    2.0 + len.max(0.0)
}

/// The dampening factor $\lambda(\varepsilon) = 1 / (1 + \varepsilon/\rho)$ of unbalanced OT (1 when
/// balanced).
pub fn dampening(eps: f64, rho: Option<f64>) -> f64 {
    match rho {
        None => 1.0,
        Some(rho) => 1.0 / (1.0 + eps / rho),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_repeats_the_diameter_and_ends_at_blur() {
        let e = epsilon_schedule(2, 2.0, 0.05, 0.5);
        assert_eq!(e[0], 4.0);
        assert!((e[1] - 4.0).abs() < 1e-12);
        assert_eq!(*e.last().unwrap(), 0.05f64.powi(2));
        // arange(ln 4, ln 0.0025, ln 0.25): ceil(ln(1600)/ln 4) = ceil(5.32) = 6 values.
        assert_eq!(e.len(), 1 + 6 + 1);
    }

    #[test]
    fn zero_diameter_gives_a_single_blur() {
        assert_eq!(epsilon_schedule(1, 0.0, 0.1, 0.5), vec![0.1]);
    }

    #[test]
    fn diameter_below_blur_skips_the_arange() {
        assert_eq!(epsilon_schedule(1, 0.01, 0.1, 0.5), vec![0.01, 0.1]);
    }
}
