//! [`ImagesLoss`]: Sinkhorn divergences between densities on regular grids (images and
//! volumes), GeomLoss's `geomloss.sinkhorn_divergence` for grids
//! (`_legacy/sinkhorn_images.py`), on any grid size and domain.
//!
//! # The maths
//!
//! A density `a` on a grid of shape `(n_1, …, n_D)` (`D` = 2 for images, 3 for volumes) is the
//! measure `α = Σ_i a_i δ_{x_i}` on the pixel positions `x_i = (i_1 h_1, …, i_D h_D)`, with the
//! spacing `h_k = extent_k / n_k` of the domain `[0, extent_1) × … × [0, extent_D)` (GeomLoss's
//! `axes`; the unit square / cube by default). The costs are GeomLoss's:
//! $C(x, y) = \tfrac12 \lVert x - y \rVert^2$ for `p = 2` and the **L1** distance
//! $C(x, y) = \sum_k |x_k - y_k|$ for `p = 1` (not the Euclidean distance of point clouds).
//! Both are separable, so every softmin is `D` passes of 1-D log-sum-exps
//! ([`crate::softmin::grid`]). The loss is the Sinkhorn divergence of [`crate::SamplesLoss`]
//! on these measures: `S_ε(α, β) = OT_ε(α, β) − ½ OT_ε(α, α) − ½ OT_ε(β, β)` (debiased) or
//! `OT_ε(α, β)`, balanced or unbalanced (`ρ = reach^p`), with `ε = blur^p`.
//!
//! # The multi-level loop
//!
//! The ε-scaling loop runs on a pyramid (the generic [`crate::sinkhorn::sinkhorn_multilevel`]):
//!
//! - **Pyramid.** Level 0 is the grid; level `l + 1` halves every axis with more than one
//!   pixel, `n ↦ ⌈n/2⌉`, by summing blocks of `2^D` pixels (a missing last row or column counts
//!   as zero mass), so its spacing is `2^(l+1) h_k`. The coarsest level is the first whose
//!   largest axis has at most 2 pixels. On a square power-of-two grid this is GeomLoss's
//!   pyramid of 2×2 sums, from 2×2 up.
//! - **Schedule.** GeomLoss's ε list with `diameter` = the domain's largest extent (1 on the
//!   unit square, as GeomLoss) down to `blur` (default: one pixel of the finest axis,
//!   `min_k h_k`, GeomLoss's `1/n`).
//! - **Jumps.** The loop leaves a level after the first update whose ε is below
//!   `s_l^p`, `s_l` the level's pixel size (its largest spacing over axes with more than one
//!   pixel; GeomLoss's `1/n_l`), as GeomLoss does. The potentials are then extrapolated to the
//!   next level by linear interpolation along each axis (GeomLoss's bilinear / trilinear
//!   `interpolate(scale_factor=2, align_corners=False)`: fine pixel `i` reads the coarse
//!   position `max(0, i/2 − ¼)`, clamped to the last coarse pixel). No kernel truncation is
//!   needed: the grid softmin is exact.
//! - **End.** As in GeomLoss, when the last ε is itself a jump (e.g. `scaling = 0.5`), the
//!   potentials are the extrapolated ones and no update runs on the full grid. When the
//!   schedule ends before reaching the full grid (a `blur` above the coarse pixel sizes, which
//!   GeomLoss refuses), the remaining jumps happen after the last ε and the loop ends with one
//!   update on the full grid. With `tol`, the loop always iterates on the full grid until the
//!   update is below `tol·ε`: it then solves the problem on the grid exactly, and equals
//!   [`crate::SamplesLoss`] with `tol` on the pixel cloud (p = 2; the tests check 1e-8 in f64).
//!
//! # Gradients
//!
//! The value is computed from the detached potentials with the weights entering explicitly
//! (as for point clouds, GeomLoss's `sinkhorn_cost`), so `∂S/∂a = F` in the balanced case (the envelope
//! theorem at convergence; GeomLoss's gradient too) and the exact unbalanced derivative
//! `(ρ + ε)(e^{−f_aa/ρ} − e^{−f_ba/ρ})` (debiased) where GeomLoss's grid code returns
//! `(ρ + ε/2)(…)` (see docs/geomloss-differences.md).
//!
//! # Zero densities
//!
//! Zero pixels have log-weight −∞ and are masked out of every softmin (GeomLoss floors the log
//! at −10000, which lets them back in once costs over ε exceed 10⁴).

use crate::divergence::{sinkhorn_cost, sinkhorn_potentials};
use crate::error::{opt_err, OtError};
use crate::samples_loss::{all_finite, unit_roundoff};
use crate::schedule::{epsilon_schedule, schedule_len, MAX_SCHEDULE_LEN};
use crate::sinkhorn::{
    sinkhorn_multilevel, CostSet, DualPotentials, Level, LoopParams, Multilevel, Refined,
    SinkhornDiagnostics, SoftminLevel,
};
use crate::softmin::grid::{Grid, GridCost};
use crate::softmin::Softmin;
use candle_core::{DType, Result, Tensor};

/// Options of [`ImagesLoss`], GeomLoss's names and defaults.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ImagesLossOptions {
    /// Grid dimension: 2 (images) or 3 (volumes); the last `dims` axes of the densities.
    pub dims: usize,
    /// 1 (L1 cost) or 2 (½ squared Euclidean). Default 2.
    pub p: u32,
    /// ε = blur^p. `None`: one pixel of the finest axis (GeomLoss: 1/n).
    pub blur: Option<f64>,
    /// ρ = reach^p for unbalanced OT; `None` (default) is balanced.
    pub reach: Option<f64>,
    /// Ratio of successive blurs in the ε schedule, in (0, 1). Default 0.5.
    pub scaling: f64,
    /// Debiased divergence (default) or raw OT_ε.
    pub debias: bool,
    /// Iterate on the full grid until `max_i |f̃_i − f_i|/ε < tol`. Default `None` (GeomLoss's
    /// fixed schedule).
    pub tol: Option<f64>,
    /// The most extra iterations `tol` may take. Default 1000.
    pub max_iter: usize,
    /// The domain's extent along each grid axis (GeomLoss's `axes` as `hi − lo`); `None`: 1
    /// per axis (the unit square / cube).
    pub extent: Option<Vec<f64>>,
    /// How the `tol` iterations run (default Anderson), as
    /// [`crate::SamplesLossOptions::acceleration`].
    #[cfg_attr(feature = "serde", serde(default))]
    pub acceleration: crate::sinkhorn::Acceleration,
    /// With `tol`: an error ([`crate::OtError::NotConverged`]) instead of an unconverged value,
    /// as [`crate::SamplesLossOptions::require_convergence`].
    #[cfg_attr(feature = "serde", serde(default))]
    pub require_convergence: bool,
    /// Called after every update of the loop (see [`crate::sinkhorn::Observer`]). Not
    /// serialized.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub observer: Option<crate::sinkhorn::Observer>,
}

impl ImagesLossOptions {
    /// Checks every option; the error names the option and its range.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &'static str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                opt_err(name, format!("must be a finite number > 0, got {v}"))
            }
        };
        if !(self.dims == 2 || self.dims == 3) {
            return opt_err(
                "dims",
                format!("must be 2 (images) or 3 (volumes), got {}", self.dims),
            );
        }
        if !(self.p == 1 || self.p == 2) {
            return opt_err("p", format!("must be 1 or 2, got {}", self.p));
        }
        if let Some(b) = self.blur {
            pos("blur", b)?;
        }
        if let Some(r) = self.reach {
            pos("reach", r)?;
        }
        if !(self.scaling > 0.0 && self.scaling < 1.0) {
            return opt_err(
                "scaling",
                format!("must be in the open interval (0, 1), got {}", self.scaling),
            );
        }
        if let Some(t) = self.tol {
            pos("tol", t)?;
            if self.max_iter == 0 {
                return opt_err(
                    "max_iter",
                    "must be at least 1 when tol is set (the iterations tol may take), got 0",
                );
            }
        }
        if let Some(e) = &self.extent {
            if e.len() != self.dims {
                return opt_err(
                    "axes",
                    format!(
                        "needs one extent per grid axis ({}), got {}",
                        self.dims,
                        e.len()
                    ),
                );
            }
            for &v in e {
                pos("axes", v)?;
            }
        }
        Ok(())
    }
}

/// Builder of [`ImagesLoss`]; `build` validates the options.
#[derive(Clone, Debug)]
pub struct ImagesLossBuilder {
    opts: ImagesLossOptions,
}

impl ImagesLossBuilder {
    /// p (1: L1, 2: ½ squared Euclidean).
    pub fn p(mut self, p: u32) -> Self {
        self.opts.p = p;
        self
    }
    /// The blur (ε = blur^p), in the domain's units; `None` is one pixel.
    pub fn blur(mut self, blur: impl Into<Option<f64>>) -> Self {
        self.opts.blur = blur.into();
        self
    }
    /// The reach (ρ = reach^p) of unbalanced OT; `None` is balanced.
    pub fn reach(mut self, reach: impl Into<Option<f64>>) -> Self {
        self.opts.reach = reach.into();
        self
    }
    /// The ε-scaling ratio, in (0, 1).
    pub fn scaling(mut self, scaling: f64) -> Self {
        self.opts.scaling = scaling;
        self
    }
    /// Debiased divergence (true) or raw OT_ε (false).
    pub fn debias(mut self, debias: bool) -> Self {
        self.opts.debias = debias;
        self
    }
    /// Iterate on the full grid until the update is below `tol` (units of ε).
    pub fn tol(mut self, tol: impl Into<Option<f64>>) -> Self {
        self.opts.tol = tol.into();
        self
    }
    /// The most extra iterations for `tol` (default 1000).
    pub fn max_iter(mut self, max_iter: usize) -> Self {
        self.opts.max_iter = max_iter;
        self
    }
    /// See [`ImagesLossOptions::acceleration`].
    pub fn acceleration(mut self, acceleration: crate::sinkhorn::Acceleration) -> Self {
        self.opts.acceleration = acceleration;
        self
    }
    /// See [`ImagesLossOptions::require_convergence`].
    pub fn require_convergence(mut self, require: bool) -> Self {
        self.opts.require_convergence = require;
        self
    }
    /// See [`ImagesLossOptions::observer`].
    pub fn observer(mut self, observer: impl Into<Option<crate::sinkhorn::Observer>>) -> Self {
        self.opts.observer = observer.into();
        self
    }
    /// The domain, GeomLoss's `axes`: one `(lo, hi)` per grid axis. Only `hi − lo` matters
    /// (the costs are translation invariant).
    pub fn axes(mut self, axes: &[(f64, f64)]) -> Self {
        self.opts.extent = Some(axes.iter().map(|(lo, hi)| hi - lo).collect());
        self
    }
    /// Checks the options and builds the loss.
    pub fn build(self) -> Result<ImagesLoss> {
        self.opts.validate()?;
        Ok(ImagesLoss { opts: self.opts })
    }
}

/// The Sinkhorn divergence between densities on a regular grid (module docs).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_ot::ImagesLoss;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let a = Var::from_tensor(&(Tensor::rand(0f32, 1., (2, 24, 40), &dev)? + 0.1)?)?; // (B, n1, n2)
/// let a_n = a.broadcast_div(&a.sum_keepdim((1, 2))?)?;
/// let b = Tensor::rand(0f32, 1., (2, 24, 40), &dev)?;
/// let b = b.broadcast_div(&b.sum_keepdim((1, 2))?)?;
/// let loss = ImagesLoss::builder(2).scaling(0.7).build()?;
/// let s = loss.forward(&a_n, &b)?; // (B,)
/// let grads = s.sum_all()?.backward()?;
/// assert_eq!(grads.get(&a).expect("a is a variable").dims(), &[2, 24, 40]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ImagesLoss {
    opts: ImagesLossOptions,
}

/// Everything [`ImagesLoss::solve`] computes. Tensors are shaped like the densities (or, for
/// the loss, like their leading batch axes).
#[derive(Clone, Debug)]
pub struct ImagesSolution {
    /// The loss, one value per batch item (a scalar without batch axes). Differentiable with
    /// respect to `a` and `b`.
    pub loss: Tensor,
    /// F on a's grid (detached): `f_ba − f_aa` (debiased) or `f_ba`.
    pub f: Tensor,
    /// G on b's grid (detached).
    pub g: Tensor,
    /// The raw potentials of OT_ε(α, β), OT_ε(α, α), OT_ε(β, β) (detached).
    pub potentials: DualPotentials,
    /// ε = blur^p.
    pub eps: f64,
    /// The blur used (the default one pixel, or the option).
    pub blur: f64,
    /// The grid of each pyramid level, coarsest first.
    pub pyramid: Vec<Vec<usize>>,
    /// What the loop did.
    pub diagnostics: SinkhornDiagnostics,
    /// Pixel pairs reduced by all the softmins, `Σ N_l · Σ_k n_{l,k}` over the softmins on
    /// grids of `N_l` pixels (the separable work; the pairs of a dense solve would be `N²`).
    pub pixel_pairs: u64,
    /// The full-resolution cost and log b (B, grid…), for the plan operators.
    cost: GridCost,
    log_b: Tensor,
}

impl ImagesSolution {
    /// The barycentric map of the entropic plan of OT_ε(α, β), from the raw potentials
    /// f_ba, g_ab: for every pixel `i` of a's grid,
    ///
    /// $$
    /// T(x_i) = \frac{\sum_j \pi_{ij}\, y_j}{a_i} = \sum_j b_j\, e^{(f_{ba,i} + g_{ab,j} - C(x_i, y_j))/\varepsilon}\, y_j,
    /// $$
    ///
    /// computed per axis `k` with the grid softmin, `T_k = exp((f_ba − softmin_ε(C, log b +
    /// g_ab/ε + log y_k))/ε)` (pixel coordinates `y_{j,k} = j_k h_k ≥ 0`, in the domain's units
    /// from its lower corner). Returns `(…, n_1, …, n_D, D)`, shaped like `a` plus the axis of
    /// coordinates. Where `a_i = 0` it is the map of the plan's conditional, still defined.
    pub fn barycentric_map(&self) -> Result<Tensor> {
        let f = &self.potentials.f_ba; // (…, grid)
        let g = &self.potentials.g_ab;
        let d = self.cost.spacing.len();
        let dims = g.dims().to_vec();
        let grid = &dims[dims.len() - d..];
        let bsz = g.elem_count() / grid.iter().product::<usize>();
        let mut full = vec![bsz];
        full.extend_from_slice(grid);
        let h = (&self.log_b + (g.reshape(full.clone())? / self.eps)?)?;
        let f = f.reshape(full.clone())?;
        let mut out = Vec::with_capacity(d);
        for k in 0..d {
            // log y_k on the grid: log(j_k h_k), −∞ at j_k = 0.
            let n = grid[k];
            let logs: Vec<f64> = (0..n)
                .map(|j| (j as f64 * self.cost.spacing[k]).ln())
                .collect();
            let mut shape = vec![1usize; d + 1];
            shape[k + 1] = n;
            let ly = Tensor::from_vec(logs, n, h.device())?
                .to_dtype(h.dtype())?
                .reshape(shape)?;
            let sm =
                Grid.softmin_no_grad(self.eps, &self.cost, &h.broadcast_add(&ly)?.contiguous()?)?;
            out.push(((&f - sm)? / self.eps)?.exp()?);
        }
        let mut shape = dims.clone();
        shape.push(d);
        Tensor::stack(&out, d + 1)?.reshape(shape)
    }
}

/// A density pyramid: level 0 is the grid (B, n_1, …, n_D).
pub(crate) fn pyramid(a: &Tensor, dims: usize, levels: usize) -> Result<Vec<Tensor>> {
    let mut out = vec![a.clone()];
    for _ in 1..levels {
        let mut t = out.last().expect("level 0").clone();
        for k in 0..dims {
            let ax = 1 + k;
            let n = t.dim(ax)?;
            if n <= 1 {
                continue;
            }
            if n % 2 == 1 {
                t = t.pad_with_zeros(ax, 0, 1)?;
            }
            let mut shape = t.dims().to_vec();
            shape[ax] = n.div_ceil(2);
            shape.insert(ax + 1, 2);
            t = t.reshape(shape)?.sum(ax + 1)?;
        }
        out.push(t);
    }
    Ok(out)
}

/// The grid shapes of the pyramid, finest first: halve (ceil) every axis with more than one
/// pixel until the largest axis has at most 2 pixels.
pub(crate) fn pyramid_shapes(grid: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![grid.to_vec()];
    while out
        .last()
        .expect("level 0")
        .iter()
        .max()
        .copied()
        .unwrap_or(1)
        > 2
    {
        let next = out
            .last()
            .expect("level 0")
            .iter()
            .map(|&n| n.div_ceil(2))
            .collect();
        out.push(next);
    }
    out
}

/// Linear interpolation of `t` (B, n_1, …, n_D) on the coarse grid to the fine grid `fine`:
/// along each axis, fine pixel `i` reads the coarse position `max(0, i/2 − ¼)` (PyTorch's
/// `interpolate(scale_factor=2, align_corners=False)`), clamped to the last coarse pixel.
pub(crate) fn upsample(t: &Tensor, fine: &[usize]) -> Result<Tensor> {
    let mut t = t.clone();
    let dev = t.device().clone();
    for (k, &nf) in fine.iter().enumerate() {
        let ax = 1 + k;
        let nc = t.dim(ax)?;
        if nc == nf {
            continue;
        }
        let (mut i0, mut i1, mut w1) = (vec![], vec![], vec![]);
        for i in 0..nf {
            let src = (i as f64 / 2.0 - 0.25).max(0.0);
            let lo = (src.floor() as usize).min(nc - 1);
            i0.push(lo as u32);
            i1.push((lo + 1).min(nc - 1) as u32);
            w1.push(src - lo as f64);
        }
        let mut wshape = vec![1usize; t.rank()];
        wshape[ax] = nf;
        let w1 = Tensor::from_vec(w1, nf, &dev)?
            .to_dtype(t.dtype())?
            .reshape(wshape)?;
        let w0 = (1.0 - &w1)?;
        let a = t.index_select(&Tensor::from_vec(i0, nf, &dev)?, ax)?;
        let b = t.index_select(&Tensor::from_vec(i1, nf, &dev)?, ax)?;
        t = (a.broadcast_mul(&w0)? + b.broadcast_mul(&w1)?)?;
    }
    Ok(t)
}

/// The grid softmin, counting pixel pairs: `N · Σ_k n_k` per softmin on a grid of `N` pixels
/// (the pairs its `D` passes of 1-D log-sum-exps reduce, before truncation).
#[derive(Default)]
struct Counting {
    pairs: std::cell::Cell<u64>,
}

impl Counting {
    fn count(&self, c: &GridCost, h: &Tensor) {
        let dims = h.dims();
        let grid = &dims[dims.len() - c.spacing.len()..];
        let n = h.elem_count() as u64;
        self.pairs
            .set(self.pairs.get() + n * grid.iter().map(|&k| k as u64).sum::<u64>());
    }
}

impl crate::softmin::Softmin for Counting {
    type Cost = GridCost;
    fn softmin(&self, eps: f64, c: &GridCost, h: &Tensor) -> Result<Tensor> {
        self.count(c, h);
        Grid.softmin(eps, c, h)
    }
    fn softmin_no_grad(&self, eps: f64, c: &GridCost, h: &Tensor) -> Result<Tensor> {
        self.count(c, h);
        Grid.softmin_no_grad(eps, c, h)
    }
}

/// The pyramid as the loop's levels.
struct GridPyramid<'a> {
    softmin: &'a Counting,
    p: u32,
    debias: bool,
    /// log a, log b per level, finest first.
    log_a: Vec<Tensor>,
    log_b: Vec<Tensor>,
    /// Grid and spacing per level, finest first.
    shapes: Vec<Vec<usize>>,
    spacings: Vec<Vec<f64>>,
    /// Whether a jump after the last ε ends the loop (no forced jump, see `grid_jumps`).
    ends: bool,
}

impl<'a> GridPyramid<'a> {
    fn level(&self, l: usize) -> Box<dyn Level + 'a> {
        let cost = GridCost {
            p: self.p,
            spacing: self.spacings[l].clone(),
        };
        Box::new(SoftminLevel {
            softmin: self.softmin,
            costs: CostSet {
                xy: cost.clone(),
                yx: cost.clone(),
                xx: self.debias.then(|| cost.clone()),
                yy: self.debias.then(|| cost.clone()),
            },
            log_a: self.log_a[l].clone(),
            log_b: self.log_b[l].clone(),
            track: Box::new(|_, _| Ok(None)),
        })
    }

    /// The pixel size of level `l`: its largest spacing over axes with more than one pixel.
    fn scale(&self, l: usize) -> f64 {
        self.shapes[l]
            .iter()
            .zip(&self.spacings[l])
            .filter(|(n, _)| **n > 1)
            .map(|(_, h)| *h)
            .fold(0.0, f64::max)
    }

    /// GeomLoss's jumps (`sinkhorn_images.py`), then forced ones after the last ε if the
    /// schedule ends above the full grid; and whether there were none of those (a jump after
    /// the last ε then ends the loop, as in GeomLoss).
    fn grid_jumps(&self, eps_list: &[f64]) -> (Vec<usize>, bool) {
        let mut cur = self.shapes.len() - 1; // coarsest
        let mut jumps = Vec::new();
        for (i, &eps) in eps_list.iter().enumerate().skip(1) {
            if cur > 0 && self.scale(cur).powi(self.p as i32) > eps {
                jumps.push(i);
                cur -= 1;
            }
        }
        let ends = cur == 0;
        jumps.extend(std::iter::repeat_n(eps_list.len() - 1, cur));
        (jumps, ends)
    }
}

impl<'a> Multilevel<'a> for GridPyramid<'a> {
    fn jumps(&self, eps_list: &[f64]) -> Vec<usize> {
        self.grid_jumps(eps_list).0
    }

    fn first(&mut self) -> Result<Box<dyn Level + 'a>> {
        Ok(self.level(self.shapes.len() - 1))
    }

    fn refine(
        &mut self,
        k: usize,
        _coarse: &dyn Level,
        pot: &DualPotentials,
        _eps: f64,
    ) -> Result<Refined<'a>> {
        let fine_l = self.shapes.len() - 2 - k;
        let fine = &self.shapes[fine_l];
        let up = |t: &Tensor| upsample(t, fine);
        Ok(Refined {
            level: self.level(fine_l),
            potentials: DualPotentials {
                f_ba: up(&pot.f_ba)?,
                g_ab: up(&pot.g_ab)?,
                f_aa: pot.f_aa.as_ref().map(up).transpose()?,
                g_bb: pot.g_bb.as_ref().map(up).transpose()?,
            },
            passes: 0,
        })
    }

    fn extrapolation_ends_loop(&self) -> bool {
        self.ends
    }
}

/// The dtype densities are computed in: f64 stays f64, f32 / f16 / bf16 run in f32; any other
/// dtype is an error naming the argument `name`.
pub(crate) fn compute_dtype(name: &str, dt: DType) -> Result<DType> {
    match dt {
        DType::F64 => Ok(DType::F64),
        DType::F32 | DType::F16 | DType::BF16 => Ok(DType::F32),
        dt => Err(
            OtError::Unsupported(format!("{name} of dtype {dt:?} (f32, f64, f16 or bf16)")).into(),
        ),
    }
}

/// Checks densities `t` viewed as `rows` rows: finite, non-negative, every row with mass
/// (`empty(row)` says which item sums to 0). Returns the row sums, in f64.
pub(crate) fn density_masses(
    name: &'static str,
    t: &Tensor,
    rows: usize,
    empty: impl Fn(usize) -> String,
) -> Result<Vec<f64>> {
    if !all_finite(t)? {
        return Err(OtError::NonFinite { name }.into());
    }
    let flat = t.detach().to_dtype(DType::F64)?.reshape((rows, ()))?;
    let min = flat.flatten_all()?.min(0)?.to_scalar::<f64>()?;
    if min < 0.0 {
        return Err(OtError::Weights {
            name,
            reason: format!("densities must be >= 0, got a minimum of {min}"),
        }
        .into());
    }
    let sums = flat.sum(1)?.to_vec1::<f64>()?;
    if let Some(i) = sums.iter().position(|v| *v <= 0.0) {
        return Err(OtError::Weights {
            name,
            reason: empty(i),
        }
        .into());
    }
    Ok(sums)
}

impl ImagesLoss {
    /// A builder with GeomLoss's defaults for `dims`-dimensional grids (2: images, 3: volumes).
    pub fn builder(dims: usize) -> ImagesLossBuilder {
        ImagesLossBuilder {
            opts: ImagesLossOptions {
                dims,
                p: 2,
                blur: None,
                reach: None,
                scaling: 0.5,
                debias: true,
                tol: None,
                max_iter: 1000,
                extent: None,
                acceleration: crate::sinkhorn::Acceleration::default(),
                require_convergence: false,
                observer: None,
            },
        }
    }

    /// The options.
    pub fn options(&self) -> &ImagesLossOptions {
        &self.opts
    }

    /// The loss between densities `a`, `b` shaped `(…, n_1, …, n_D)` (every leading axis is a
    /// batch axis, the same for both). Returns one value per batch item, shaped like the
    /// leading axes (a scalar without them).
    pub fn forward(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(self.solve(a, b)?.loss)
    }

    /// GeomLoss's `potentials=True`: `(F, G)`, shaped like `a` and `b`.
    pub fn potentials(&self, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self.solve(a, b)?;
        Ok((s.f, s.g))
    }

    /// Checks the densities: `(leading…, grid…)`, the same shape, finite, non-negative, with
    /// mass in every batch item (and equal masses when balanced). Returns the batch shape,
    /// the grid and the compute dtype.
    fn check(&self, a: &Tensor, b: &Tensor) -> Result<(Vec<usize>, Vec<usize>, DType)> {
        let d = self.opts.dims;
        let expected = if d == 2 {
            "(…, n1, n2): an image, or a batch of images with leading batch axes"
        } else {
            "(…, n1, n2, n3): a volume, or a batch of volumes with leading batch axes"
        };
        for (name, t) in [("a", a), ("b", b)] {
            if t.rank() < d || t.dims()[t.rank() - d..].contains(&0) {
                return Err(OtError::Shape {
                    name,
                    expected: expected.into(),
                    got: t.dims().to_vec(),
                }
                .into());
            }
        }
        if a.dims() != b.dims() {
            return Err(OtError::Mismatch(format!(
                "a and b must have the same shape (the same grid and batch axes), got {:?} and {:?}",
                a.dims(),
                b.dims()
            ))
            .into());
        }
        if !a.device().same_device(b.device()) {
            return Err(OtError::Mismatch("a and b must be on the same device".into()).into());
        }
        let dtype = compute_dtype("densities", a.dtype())?;
        if b.dtype() != a.dtype() {
            return Err(OtError::Mismatch(format!(
                "a and b must have the same dtype, got {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ))
            .into());
        }
        let rank = a.rank();
        let batch = a.dims()[..rank - d].to_vec();
        let grid = a.dims()[rank - d..].to_vec();
        let n: usize = grid.iter().product();
        let bsz: usize = batch.iter().product();
        let mut sums = Vec::new();
        for (name, t) in [("a", a), ("b", b)] {
            sums.push(density_masses(name, t, bsz, |i| {
                format!("the density of batch item {i} sums to 0: it needs mass")
            })?);
        }
        if self.opts.reach.is_none() {
            // The masses are summed in f64, but densities normalised in their own dtype carry
            // its rounding: a sum of n values rounded to unit roundoff u is off by up to n·u
            // relative, so the tolerance is 1e-5 + n·u (n = pixels per item).
            let tol = 1e-5 + n as f64 * unit_roundoff(a.dtype());
            for (i, (sa, sb)) in sums[0].iter().zip(&sums[1]).enumerate() {
                if (sa - sb).abs() > tol * sa.max(*sb) {
                    return Err(OtError::Weights {
                        name: "a, b",
                        reason: format!(
                            "balanced OT needs equal total masses (to a relative {tol:.1e}: 1e-5 plus the rounding of {n} pixels in {:?}), got {sa} and {sb} (batch item {i}); normalise the densities or set a reach", a.dtype()
                        ),
                    }
                    .into());
                }
            }
        }
        Ok((batch, grid, dtype))
    }

    /// Solves the problem (module docs): the loss, the potentials and the diagnostics.
    pub fn solve(&self, a: &Tensor, b: &Tensor) -> Result<ImagesSolution> {
        let o = &self.opts;
        let (batch, grid, dtype) = self.check(a, b)?;
        let bsz: usize = batch.iter().product();
        let mut full = vec![bsz];
        full.extend_from_slice(&grid);
        let (a_c, b_c) = (
            a.to_dtype(dtype)?.reshape(full.clone())?,
            b.to_dtype(dtype)?.reshape(full.clone())?,
        ); // (B, n_1, …, n_D), tracked
        let extent = o.extent.clone().unwrap_or_else(|| vec![1.0; o.dims]);
        let spacing0: Vec<f64> = extent
            .iter()
            .zip(&grid)
            .map(|(e, n)| e / *n as f64)
            .collect();
        let blur = o
            .blur
            .unwrap_or_else(|| spacing0.iter().copied().fold(f64::INFINITY, f64::min));
        let pf = o.p as f64;
        let (eps, rho) = (blur.powf(pf), o.reach.map(|r| r.powf(pf)));
        let diameter = extent.iter().copied().fold(0.0, f64::max);
        let len = schedule_len(o.p, diameter, blur, o.scaling);
        if len > MAX_SCHEDULE_LEN as f64 {
            return opt_err(
                "scaling",
                format!(
                    "the ε schedule from the domain's extent {diameter:e} down to blur {blur:e} with scaling {} would take {len:e} steps (at most {MAX_SCHEDULE_LEN}); raise blur or lower scaling",
                    o.scaling
                ),
            );
        }
        let shapes = pyramid_shapes(&grid);
        let spacings: Vec<Vec<f64>> = (0..shapes.len())
            .map(|l| spacing0.iter().map(|h| h * (1u64 << l) as f64).collect())
            .collect();
        let detached_logs = |t: &Tensor| -> Result<Vec<Tensor>> {
            pyramid(&t.detach(), o.dims, shapes.len())?
                .iter()
                .map(|t| t.log())
                .collect()
        };
        let softmin = Counting::default();
        let mut levels = GridPyramid {
            softmin: &softmin,
            p: o.p,
            debias: o.debias,
            log_a: detached_logs(&a_c)?,
            log_b: detached_logs(&b_c)?,
            shapes: shapes.clone(),
            spacings,
            ends: false,
        };
        let params = LoopParams {
            eps_list: epsilon_schedule(o.p, diameter, blur, o.scaling),
            rho,
            debias: o.debias,
            tol: o.tol,
            max_iter: o.max_iter,
            acceleration: o.acceleration,
            observer: o.observer.clone(),
        };
        levels.ends = levels.grid_jumps(&params.eps_list).1;
        let (pot, diagnostics) = sinkhorn_multilevel(&mut levels, &params)?;
        if let (Some(tol), true, Some(false)) =
            (o.tol, o.require_convergence, diagnostics.converged)
        {
            return Err(crate::OtError::NotConverged {
                iterations: diagnostics.extra_iterations,
                update_error: diagnostics.update_error,
                tol,
                stopped: diagnostics.stopped,
            }
            .into());
        }
        let flat = |t: &Tensor| t.reshape((bsz, ()));
        let pot_flat = DualPotentials {
            f_ba: flat(&pot.f_ba)?,
            g_ab: flat(&pot.g_ab)?,
            f_aa: pot.f_aa.as_ref().map(flat).transpose()?,
            g_bb: pot.g_bb.as_ref().map(flat).transpose()?,
        };
        let loss = sinkhorn_cost(&flat(&a_c)?, &flat(&b_c)?, &pot_flat, eps, rho)?; // (B,)
        let loss = loss.reshape(batch.clone())?.to_dtype(a.dtype())?;
        let log_b = levels.log_b[0].clone();
        let (f, g) = sinkhorn_potentials(&pot)?;
        let mut out_shape = batch.clone();
        out_shape.extend_from_slice(&grid);
        let shaped = |t: &Tensor| t.detach().reshape(out_shape.clone());
        Ok(ImagesSolution {
            loss,
            f: shaped(&f)?,
            g: shaped(&g)?,
            potentials: DualPotentials {
                f_ba: shaped(&pot.f_ba)?,
                g_ab: shaped(&pot.g_ab)?,
                f_aa: pot.f_aa.as_ref().map(shaped).transpose()?,
                g_bb: pot.g_bb.as_ref().map(shaped).transpose()?,
            },
            eps,
            blur,
            pyramid: shapes.into_iter().rev().collect(),
            diagnostics,
            pixel_pairs: softmin.pairs.get(),
            cost: GridCost {
                p: o.p,
                spacing: spacing0,
            },
            log_b,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyramid_halves_with_ceil_down_to_two() {
        assert_eq!(
            pyramid_shapes(&[8, 8]),
            vec![vec![8, 8], vec![4, 4], vec![2, 2]]
        );
        assert_eq!(
            pyramid_shapes(&[17, 5]),
            vec![vec![17, 5], vec![9, 3], vec![5, 2], vec![3, 1], vec![2, 1]]
        );
        assert_eq!(pyramid_shapes(&[1, 2]), vec![vec![1, 2]]);
    }

    #[test]
    fn pyramid_sums_blocks_and_keeps_mass() -> Result<()> {
        let a = Tensor::arange(0f64, 15., &candle_core::Device::Cpu)?.reshape((1, 3, 5))?;
        let p = pyramid(&a, 2, 3)?;
        assert_eq!(p[1].dims(), &[1, 2, 3]);
        // rows {0,1} × cols {0,1}: 0 + 1 + 5 + 6
        assert_eq!(p[1].to_vec3::<f64>()?[0][0][0], 12.0);
        // the last row (10..15) alone, last column (14) alone.
        assert_eq!(p[1].to_vec3::<f64>()?[0][1][2], 14.0);
        let total = |t: &Tensor| t.sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert_eq!(total(&p[2]), total(&a));
        Ok(())
    }

    #[test]
    fn upsample_is_pytorch_bilinear_on_doubling_grids() -> Result<()> {
        // 1-D along the last axis: [0, 1] → [0, 0.25, 0.75, 1].
        let t = Tensor::new(&[[[0f64, 1.0]]], &candle_core::Device::Cpu)?;
        let u = upsample(&t, &[1, 4])?.to_vec3::<f64>()?;
        assert_eq!(u[0][0], vec![0.0, 0.25, 0.75, 1.0]);
        Ok(())
    }
}
