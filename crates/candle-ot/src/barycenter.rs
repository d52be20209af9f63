//! [`ImagesBarycenter`]: Wasserstein barycenters of densities on regular grids, GeomLoss 0.3.1's
//! `ImagesBarycenter` (`geomloss/_legacy/wasserstein_barycenter_images.py`), a fixed number of
//! debiased Sinkhorn barycenter iterations (Janati, Cuturi & Gramfort, *Debiased Sinkhorn
//! barycenters*, ICML 2020) on a density pyramid.
//!
//! # The problem
//!
//! Given `K` densities `a_1, …, a_K` on one grid (the measures `α_k = Σ_i a_{k,i} δ_{x_i}`,
//! pixel `i` at `x_i = (i_1 h_1, …, i_D h_D)` with `h_k = 1/n_k` on the unit square / cube,
//! GeomLoss's `i/n`) and weights `w_k ≥ 0` with `Σ_k w_k = 1`, the debiased barycenter is
//!
//! $$
//! \beta^\star = \arg\min_\beta \sum_k w_k\, S_\varepsilon(\alpha_k, \beta),
//! $$
//!
//! `S_ε` the Sinkhorn divergence with GeomLoss's grid cost (p = 2: `C(x, y) = ½‖x − y‖²`;
//! p = 1: the L1 distance `Σ_k |x_k − y_k|`). This module does not solve it to convergence: it
//! runs GeomLoss's schedule, whose output is a fixed-iteration approximation **whose total mass
//! is not 1** (about 0.71 on the 32×32 reference case); normalise it yourself if you need a
//! probability density.
//!
//! # The iteration
//!
//! With the grid softmin
//! $\mathrm{smin}\_\varepsilon(h)\_i = -\varepsilon \log \sum_j \exp(h_j - C(x_i, x_j)/\varepsilon)$
//! ([`crate::softmin::grid`]), potentials `f_k` (on the barycenter's side), `g_k` (on `α_k`'s
//! side) and the log-density `log d` of the debiasing term, one iteration at temperature ε is
//! (GeomLoss's `barycenter_iteration`):
//!
//! $$
//! \begin{aligned}
//! \tilde f_k &= \mathrm{smin}\_\varepsilon(\log a_k + g_k/\varepsilon), &
//! \log \beta &= \log d - \textstyle\sum_k w_k \tilde f_k / \varepsilon, \\\\
//! \tilde g_k &= \mathrm{smin}\_\varepsilon(\log \beta + f_k/\varepsilon), &
//! f_k &\leftarrow \tfrac12 (f_k + \tilde f_k), \quad g_k \leftarrow \tfrac12 (g_k + \tilde g_k), \\\\
//! \log \beta &= \log d - \textstyle\sum_k w_k\, \mathrm{smin}\_\varepsilon(\log a_k + g_k/\varepsilon) / \varepsilon, &
//! \log d &\leftarrow \tfrac12 \big(\log d + \log \beta + \mathrm{smin}\_\varepsilon(\log d)/\varepsilon\big),
//! \end{aligned}
//! $$
//!
//! the symmetric (averaged) Sinkhorn updates between each `α_k` and `β`, with
//! `β = d ⊙ Π_k (e^{−f̃_k/ε})^{w_k}` and the debiasing fixed point `d = sqrt(d ⊙ β / K d)`
//! (`K = e^{−C/ε}`) of Janati et al. written in the log domain. The result is `exp(log β)` of
//! the last iteration.
//!
//! # The schedule
//!
//! - **Pyramid.** As [`crate::ImagesLoss`]: level `l + 1` halves (ceil) every axis with more
//!   than one pixel by summing blocks of `2^D` pixels, spacing `2^l h_k` on level `l`, down to
//!   the first level whose largest axis has at most 2 pixels. On a square power-of-two grid
//!   this is GeomLoss's `pyramid(a)[1:]` (2×2, 4×4, …, n×n), spacing `1/n_l` per level.
//! - **Temperatures.** `σ` starts at 1 (the unit domain's diameter); each iteration runs at
//!   `ε = σ^p`, then `σ ← max(σ · 2^{−1/N}, blur)`, `N = scaling_n` (default 10) iterations per
//!   level, coarsest level first: σ halves per level. `blur` defaults to one pixel of the
//!   finest axis, `1/max_k n_k` (GeomLoss: `1/n`).
//! - **Start.** `f_k = g_k = smin_1(log a_k)` on the coarsest level (ε = 1) and `log d` uniform
//!   there (`log ¼` on 2×2, GeomLoss's `d_log`).
//! - **Jumps.** After the `N` iterations of a level, `f_k`, `g_k` and `log d` are upsampled to the
//!   next level by (bi/tri)linear interpolation, PyTorch's
//!   `interpolate(scale_factor=2, align_corners=False)` (see [`crate::images`]).
//!
//! On square power-of-two images this is GeomLoss's code step by step (`tests/barycenter.rs`
//! checks its reference to 1e-6 relative in f64). Other sizes follow ImagesLoss's pyramid rules.
//! Volumes (`dims = 3`) run the same iteration with trilinear upsampling and `log d = log ⅛` on
//! the 2×2×2 level (GeomLoss's code is written for images only).
//!
//! # Differences from GeomLoss
//!
//! - Zero pixels have log-density −∞ and are masked out of every softmin; GeomLoss floors the
//!   log at −10000 (`log_dens`), which only differs once costs over ε exceed 10⁴.
//! - The output is detached: GeomLoss's `backward_iterations` (gradients through extra
//!   iterations when the inputs require them) are not implemented, so this is GeomLoss's
//!   result for inputs that do not require gradients.
//!
//! # Shapes and errors
//!
//! `measures` `(B, K, n_1, …, n_D)` (f32, f64, f16 or bf16; computed in f64 for f64, in f32
//! otherwise), `weights` `(B, K)` (any float dtype), the result `(B, n_1, …, n_D)` in the
//! measures' dtype. Errors name the argument: a wrong shape ([`OtError::Shape`]), non-finite
//! values ([`OtError::NonFinite`]), a negative density or a measure without mass, negative
//! weights or weights that do not sum to 1 per batch item ([`OtError::Weights`]), devices that
//! differ ([`OtError::Mismatch`]), an option out of range ([`OtError::Option`]).

use crate::error::{opt_err, OtError};
use crate::images::{compute_dtype, density_masses, pyramid, pyramid_shapes, upsample};
use crate::samples_loss::{all_finite, unit_roundoff};
use crate::softmin::grid::{Grid, GridCost};
use crate::softmin::Softmin;
use candle_core::{DType, Result, Tensor};

/// Options of [`ImagesBarycenter`], GeomLoss's names and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagesBarycenterOptions {
    /// Grid dimension: 2 (images) or 3 (volumes); the last `dims` axes of the measures.
    pub dims: usize,
    /// 1 (L1 cost) or 2 (½ squared Euclidean). Default 2.
    pub p: u32,
    /// The final blur (ε = blur^p). `None`: one pixel of the finest axis (GeomLoss: 1/n).
    pub blur: Option<f64>,
    /// Iterations per pyramid level (GeomLoss's `scaling_N`); σ halves over each level.
    /// Default 10.
    pub scaling_n: usize,
}

impl ImagesBarycenterOptions {
    /// Checks every option; the error names the option and its range.
    pub fn validate(&self) -> Result<()> {
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
            if !(b.is_finite() && b > 0.0) {
                return opt_err("blur", format!("must be a finite number > 0, got {b}"));
            }
        }
        if self.scaling_n == 0 {
            return opt_err(
                "scaling_n",
                "must be at least 1 (iterations per pyramid level), got 0",
            );
        }
        Ok(())
    }
}

/// Builder of [`ImagesBarycenter`]; `build` validates the options.
#[derive(Clone, Debug)]
pub struct ImagesBarycenterBuilder {
    opts: ImagesBarycenterOptions,
}

impl ImagesBarycenterBuilder {
    /// p (1: L1, 2: ½ squared Euclidean).
    pub fn p(mut self, p: u32) -> Self {
        self.opts.p = p;
        self
    }
    /// The final blur (ε = blur^p), in the unit domain's units; `None` is one pixel.
    pub fn blur(mut self, blur: impl Into<Option<f64>>) -> Self {
        self.opts.blur = blur.into();
        self
    }
    /// Iterations per pyramid level (GeomLoss's `scaling_N`, default 10).
    pub fn scaling_n(mut self, scaling_n: usize) -> Self {
        self.opts.scaling_n = scaling_n;
        self
    }
    /// Checks the options and builds the barycenter solver.
    pub fn build(self) -> Result<ImagesBarycenter> {
        self.opts.validate()?;
        Ok(ImagesBarycenter { opts: self.opts })
    }
}

/// Debiased Sinkhorn barycenters of densities on a grid, GeomLoss's `ImagesBarycenter`
/// (module docs).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_ot::ImagesBarycenter;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let m = (Tensor::rand(0f32, 1., (1, 3, 16, 16), &dev)? + 0.1)?; // (B, K, n1, n2)
/// let m = m.broadcast_div(&m.sum_keepdim((2, 3))?)?;
/// let w = Tensor::new(&[[0.5f32, 0.25, 0.25]], &dev)?; // (B, K)
/// let bary = ImagesBarycenter::builder(2).build()?.geomloss(&m, &w)?;
/// assert_eq!(bary.dims(), &[1, 16, 16]); // (B, n1, n2); its mass is not exactly 1
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ImagesBarycenter {
    opts: ImagesBarycenterOptions,
}

/// The checked inputs: batch size, number of measures, grid and compute dtype.
struct Checked {
    b: usize,
    k: usize,
    grid: Vec<usize>,
    dtype: DType,
}

impl ImagesBarycenter {
    /// A builder with GeomLoss's defaults for `dims`-dimensional grids (2: images, 3: volumes).
    pub fn builder(dims: usize) -> ImagesBarycenterBuilder {
        ImagesBarycenterBuilder {
            opts: ImagesBarycenterOptions {
                dims,
                p: 2,
                blur: None,
                scaling_n: 10,
            },
        }
    }

    /// The options.
    pub fn options(&self) -> &ImagesBarycenterOptions {
        &self.opts
    }

    /// Checks `measures` (B, K, grid…) and `weights` (B, K) (module docs, "Shapes and errors").
    fn check(&self, measures: &Tensor, weights: &Tensor) -> Result<Checked> {
        let d = self.opts.dims;
        let expected = if d == 2 {
            "(B, K, n1, n2): B batch items of K images each"
        } else {
            "(B, K, n1, n2, n3): B batch items of K volumes each"
        };
        if measures.rank() != d + 2 || measures.dims().contains(&0) {
            return Err(OtError::Shape {
                name: "measures",
                expected: expected.into(),
                got: measures.dims().to_vec(),
            }
            .into());
        }
        let (b, k) = (measures.dim(0)?, measures.dim(1)?);
        if weights.dims() != [b, k] {
            return Err(OtError::Shape {
                name: "weights",
                expected: format!("(B, K) = ({b}, {k}), one weight per measure"),
                got: weights.dims().to_vec(),
            }
            .into());
        }
        if !measures.device().same_device(weights.device()) {
            return Err(OtError::Mismatch(
                "measures and weights must be on the same device".into(),
            )
            .into());
        }
        let dtype = compute_dtype("measures", measures.dtype())?;
        compute_dtype("weights", weights.dtype())?; // a float dtype
        let wu = unit_roundoff(weights.dtype());
        if !all_finite(weights)? {
            return Err(OtError::NonFinite { name: "weights" }.into());
        }
        let grid = measures.dims()[2..].to_vec();
        density_masses("measures", measures, b * k, |i| {
            format!(
                "measure {} of batch item {} sums to 0: every measure needs mass",
                i % k,
                i / k
            )
        })?;
        let w = weights.detach().to_dtype(DType::F64)?;
        let wmin = w.flatten_all()?.min(0)?.to_scalar::<f64>()?;
        if wmin < 0.0 {
            return Err(OtError::Weights {
                name: "weights",
                reason: format!("barycentric weights must be >= 0, got a minimum of {wmin}"),
            }
            .into());
        }
        // Weights normalised in their own dtype carry its rounding: K values rounded to unit
        // roundoff u sum to 1 within K·u; 1e-5 more for weights typed as decimals.
        let tol = 1e-5 + k as f64 * wu;
        for (i, s) in w.sum(1)?.to_vec1::<f64>()?.iter().enumerate() {
            if (s - 1.0).abs() > tol {
                return Err(OtError::Weights {
                    name: "weights",
                    reason: format!(
                        "the weights of batch item {i} must sum to 1 (within {tol:.1e}), got {s}"
                    ),
                }
                .into());
            }
        }
        Ok(Checked { b, k, grid, dtype })
    }

    /// GeomLoss's `ImagesBarycenter(measures, weights)` (module docs): the barycenter of the
    /// `K` densities of each batch item, `(B, n_1, …, n_D)` in the measures' dtype, detached.
    /// `measures` is `(B, K, n_1, …, n_D)` (non-negative, finite, every measure with mass),
    /// `weights` `(B, K)` (non-negative, summing to 1 per batch item). Its mass is not 1: it is
    /// GeomLoss's fixed-iteration approximation.
    pub fn geomloss(&self, measures: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let o = &self.opts;
        let Checked { b, k, grid, dtype } = self.check(measures, weights)?;
        let dev = measures.device();
        let mut full = vec![b * k];
        full.extend_from_slice(&grid);
        let a = measures.detach().to_dtype(dtype)?.reshape(full)?; // (B·K, grid…)
        let w = weights.detach().to_dtype(dtype)?.reshape((b, k, 1))?;
        let shapes = pyramid_shapes(&grid); // finest first
        let levels = shapes.len();
        let spacing0: Vec<f64> = grid.iter().map(|n| 1.0 / *n as f64).collect();
        let blur = o
            .blur
            .unwrap_or_else(|| spacing0.iter().copied().fold(f64::INFINITY, f64::min));
        // log a_k per level (−∞ on zero pixels), finest first.
        let ak_log = pyramid(&a, o.dims, levels)?
            .iter()
            .map(|t| t.log())
            .collect::<Result<Vec<_>>>()?;
        let costs: Vec<GridCost> = (0..levels)
            .map(|l| GridCost {
                p: o.p,
                spacing: spacing0.iter().map(|h| h * (1u64 << l) as f64).collect(),
            })
            .collect();
        let coarsest = levels - 1;
        let p = o.p as i32;
        let ratio = 2f64.powf(-1.0 / o.scaling_n as f64);
        let mut sigma = 1.0f64;
        let f0 = Grid.softmin_no_grad(sigma.powi(p), &costs[coarsest], &ak_log[coarsest])?;
        let mut f = f0.clone();
        let mut g = f0;
        let mut dshape = vec![b];
        dshape.extend_from_slice(&shapes[coarsest]);
        let n_coarse: usize = shapes[coarsest].iter().product();
        let mut d_log = Tensor::full(-(n_coarse as f64).ln(), dshape, dev)?.to_dtype(dtype)?;
        let mut bar_log = None;
        for l in (0..levels).rev() {
            let it = Iteration {
                cost: &costs[l],
                ak_log: &ak_log[l],
                w: &w,
                b,
                k,
            };
            for _ in 0..o.scaling_n {
                let eps = sigma.powi(p);
                let (f2, g2, d2, bar) = it.step(&f, &g, &d_log, eps)?;
                (f, g, d_log, bar_log) = (f2, g2, d2, Some(bar));
                sigma = (sigma * ratio).max(blur);
            }
            if l > 0 {
                let fine = &shapes[l - 1];
                f = upsample(&f, fine)?;
                g = upsample(&g, fine)?;
                d_log = upsample(&d_log, fine)?;
            }
        }
        let bar_log = bar_log.expect("scaling_n >= 1 runs at least one iteration");
        bar_log.exp()?.to_dtype(measures.dtype())
    }
}

/// One level of the loop: its cost, `log a_k` (B·K, grid…) and the weights (B, K, 1).
struct Iteration<'a> {
    cost: &'a GridCost,
    ak_log: &'a Tensor,
    w: &'a Tensor,
    b: usize,
    k: usize,
}

impl Iteration<'_> {
    fn smin(&self, eps: f64, h: &Tensor) -> Result<Tensor> {
        Grid.softmin_no_grad(eps, self.cost, h)
    }

    /// `Σ_k w_k t_k` for `t` (B·K, grid…): (B, grid…).
    fn weighted(&self, t: &Tensor) -> Result<Tensor> {
        let shape = t.dims()[1..].to_vec();
        let mut out = vec![self.b];
        out.extend_from_slice(&shape);
        t.reshape((self.b, self.k, ()))?
            .broadcast_mul(self.w)?
            .sum(1)?
            .reshape(out)
    }

    /// GeomLoss's `barycenter_iteration` (module docs): the new `f_k`, `g_k`, `log d` and
    /// `log β`.
    fn step(
        &self,
        f: &Tensor,
        g: &Tensor,
        d_log: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (b, k) = (self.b, self.k);
        // From the measures to the barycenter (computed once: GeomLoss's first two softmins
        // are the same one).
        let ft = self.smin(eps, &(self.ak_log + (g / eps)?)?)?;
        let bar_log = (d_log - self.weighted(&(&ft / eps)?)?)?;
        // From the barycenter to the measures: log β broadcast over the K measures.
        let h = (f / eps)?
            .reshape((b, k, ()))?
            .broadcast_add(&bar_log.reshape((b, 1, ()))?)?
            .reshape(f.dims())?;
        let gt = self.smin(eps, &h)?;
        let f = ((f + ft)? / 2.0)?;
        let g = ((g + gt)? / 2.0)?;
        let ft = (self.smin(eps, &(self.ak_log + (&g / eps)?)?)? / eps)?;
        let bar_log = (d_log - self.weighted(&ft)?)?;
        let d_log = (((d_log + &bar_log)? + (self.smin(eps, d_log)? / eps)?)? * 0.5)?;
        Ok((f, g, d_log, bar_log))
    }
}
