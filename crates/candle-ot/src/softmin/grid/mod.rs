//! The separable softmin on regular grids (images, volumes): the softmin of the
//! [`ImagesLoss`](crate::ImagesLoss).
//!
//! Pixel `i = (i_1, …, i_D)` of a grid with spacings `h_k` sits at `(i_1 h_1, …, i_D h_D)`. The
//! costs of GeomLoss's grid code are separable,
//!
//! ```text
//! p = 2:  C(i, j) = ½ ‖x_i − y_j‖² = Σ_k ½ (h_k (i_k − j_k))²        (squared Euclidean)
//! p = 1:  C(i, j) = Σ_k h_k |i_k − j_k|                              (L1, not Euclidean)
//! ```
//!
//! so the Gibbs kernel is a product over the axes and the softmin over all `N = Π n_k` pixels
//! is `D` passes of 1-D log-sum-exps, one along each axis:
//!
//! ```text
//! softmin_ε(C, h)_i = −ε log Σ_{j_1} e^{−c_1(i_1, j_1)/ε} … Σ_{j_D} e^{h_j − c_D(i_D, j_D)/ε},
//! ```
//!
//! `O(N · Σ_k n_k)` work instead of `O(N²)`, exactly (GeomLoss's `softmin_grid`). Each pass is
//! the `grid_lse_axis` reduction of `candle-ot-kernels` (CPU: the `cpu` module, with an exact
//! truncation of negligible columns; CUDA / Metal: `cuda_fwd` / `metal_fwd` behind the
//! features). [`softmin_dense`] is the plain tensorized twin (the N×N cost on the pixel
//! coordinates), the oracle of the tests.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;

use super::online::real::Real;
use super::Softmin;
use crate::error::OtError;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The cost of a regular grid: `p` (1: L1, 2: ½ squared Euclidean) and the spacing `h_k` of
/// each grid axis (the distance between two neighbouring pixels, in the domain's units).
#[derive(Clone, Debug, PartialEq)]
pub struct GridCost {
    /// 1 (L1 distance, as GeomLoss's grid code) or 2 (½ squared Euclidean distance).
    pub p: u32,
    /// Spacing of each grid axis, `D` values (the last `D` axes of the potentials).
    pub spacing: Vec<f64>,
}

impl GridCost {
    /// The 1-D kernel table of axis `k` for `n` pixels: `κ[d] = c(d · h_k) / ε`.
    pub(crate) fn kernel(&self, k: usize, n: usize, eps: f64) -> Vec<f64> {
        let h = self.spacing[k];
        (0..n)
            .map(|d| {
                let t = d as f64 * h;
                if self.p == 1 {
                    t / eps
                } else {
                    0.5 * t * t / eps
                }
            })
            .collect()
    }
}

/// The grid softmin backend (an implementation of [`Softmin`] whose cost is a [`GridCost`]).
/// Potentials are tensors `(B, n_1, …, n_D)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Grid;

impl Softmin for Grid {
    type Cost = GridCost;

    fn softmin(&self, eps: f64, cost: &GridCost, h: &Tensor) -> Result<Tensor> {
        softmin(eps, cost, h)
    }

    fn softmin_no_grad(&self, eps: f64, cost: &GridCost, h: &Tensor) -> Result<Tensor> {
        h.detach()
            .contiguous()?
            .apply_op1_no_bwd(&GridSoftminOp::new(eps, cost, h)?)
    }
}

/// One axis pass: `(outer, n, inner)` and the kernel table `κ` (n values).
#[derive(Clone, Debug)]
pub(crate) struct AxisPass {
    pub outer: usize,
    pub n: usize,
    pub inner: usize,
    pub kernel: Vec<f64>,
}

/// `h ↦ softmin_ε(C, h)` on a grid, `h` `(B, n_1, …, n_D)` contiguous. The passes run from the
/// last axis to the first; the last one multiplies by `−ε`.
#[derive(Clone, Debug)]
pub(crate) struct GridSoftminOp {
    pub eps: f64,
    pub cost: GridCost,
}

impl GridSoftminOp {
    fn new(eps: f64, cost: &GridCost, h: &Tensor) -> Result<Self> {
        let d = cost.spacing.len();
        if h.rank() < d + 1 || d == 0 {
            return Err(OtError::Shape {
                name: "h",
                expected: format!("(B, n_1, …, n_{d}) for a {d}-D grid"),
                got: h.dims().to_vec(),
            }
            .into());
        }
        Ok(Self {
            eps,
            cost: cost.clone(),
        })
    }

    /// The passes for the shape `dims` (B, n_1, …, n_D), last axis first.
    pub(crate) fn passes(&self, dims: &[usize]) -> Vec<AxisPass> {
        let d = self.cost.spacing.len();
        let grid = &dims[dims.len() - d..];
        let batch: usize = dims[..dims.len() - d].iter().product();
        (0..d)
            .rev()
            .map(|k| AxisPass {
                outer: batch * grid[..k].iter().product::<usize>(),
                n: grid[k],
                inner: grid[k + 1..].iter().product(),
                kernel: self.cost.kernel(k, grid[k], self.eps),
            })
            .collect()
    }

    fn cpu_passes<T: Real + candle_core::WithDType>(&self, h: &[T], dims: &[usize]) -> Vec<T> {
        let passes = self.passes(dims);
        let mut cur = h.to_vec();
        let mut next = vec![T::ZERO; cur.len()];
        let last = passes.len() - 1;
        for (t, p) in passes.iter().enumerate() {
            let kern: Vec<T> = p.kernel.iter().map(|&v| <T as Real>::from_f64(v)).collect();
            let scale = if t == last {
                <T as Real>::from_f64(-self.eps)
            } else {
                T::ONE
            };
            cpu::lse_pass(&cur, &mut next, (p.outer, p.n, p.inner), &kern, scale);
            std::mem::swap(&mut cur, &mut next);
        }
        cur
    }
}

impl CustomOp1 for GridSoftminOp {
    fn name(&self) -> &'static str {
        "candle-ot-grid-softmin"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("candle-ot grid softmin: h must be contiguous".into())
        })?;
        let dims = l.dims();
        let out = with_float!(s.dtype(), self.name(), |T| {
            let h = &s.as_slice::<T>()?[a..b];
            <T as candle_core::WithDType>::to_cpu_storage_owned(self.cpu_passes::<T>(h, dims))
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::grid_softmin_fwd(self, s, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        metal::grid_softmin_fwd(self, s, l)
    }

    /// `∂f_i/∂h_j = −ε π_ij` with `π_ij = exp(h_j − C_ij/ε + f_i/ε)`, so
    /// `∂L/∂h_j = −ε e^{h_j} Σ_i e^{f_i/ε − C_ij/ε} w_i` for `w = ∂L/∂f`. The cost is symmetric:
    /// the sum is a grid log-sum-exp of `f/ε + log w` (the same op), taken on the positive and
    /// negative parts of `w` separately, `∂L/∂h = −ε (e^{h + L⁺} − e^{h + L⁻})`,
    /// `L^± = −softmin_ε(C, f/ε + log w^±)/ε`. Each `e^{h + L^±} = Σ_i π_ij w_i^±` is bounded
    /// by `Σ_i |w_i|`, so nothing overflows.
    fn bwd(&self, h: &Tensor, f: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
        let eps = self.eps;
        let lowest = match f.dtype() {
            candle_core::DType::F64 => f64::MIN,
            _ => f32::MIN as f64,
        };
        // Rows whose h is all masked have f = +∞ and no plan: clamp to keep the sums finite.
        let fe = (f.detach() / eps)?.clamp(lowest, -lowest)?;
        let lse = |w: &Tensor| -> Result<Tensor> {
            let arg = (&fe + w.relu()?.log()?)?.contiguous()?;
            arg.apply_op1_no_bwd(self)? / (-eps)
        };
        let hd = h.detach();
        let pos = (&hd + lse(w)?)?.exp()?;
        let neg = (&hd + lse(&w.neg()?)?)?.exp()?;
        Ok(Some(((pos - neg)? * (-eps))?))
    }
}

/// The grid softmin, differentiable in `h` (its backward is the same op, see the module
/// docs): `f_i = −ε log Σ_j exp(h_j − C(i, j)/ε)` for `h` `(B, n_1, …, n_D)` with
/// `D = cost.spacing.len()`; returns the same shape. `h` may hold −∞ (masked pixels); an
/// all-masked `h` gives +∞.
pub fn softmin(eps: f64, cost: &GridCost, h: &Tensor) -> Result<Tensor> {
    let op = GridSoftminOp::new(eps, cost, h)?;
    h.contiguous()?.apply_op1(op)
}

/// The pixel coordinates `(i_1 h_1, …, i_D h_D)` of a grid `shape` (`n_1, …, n_D`), in the
/// row-major order of the grid's tensors: `(N, D)` with `N = Π n_k`, f64 on `device`.
pub fn pixel_coordinates(
    shape: &[usize],
    spacing: &[f64],
    device: &candle_core::Device,
) -> Result<Tensor> {
    let d = shape.len();
    let n: usize = shape.iter().product();
    let mut v = Vec::with_capacity(n * d);
    for flat in 0..n {
        let mut rem = flat;
        let mut idx = vec![0usize; d];
        for k in (0..d).rev() {
            idx[k] = rem % shape[k];
            rem /= shape[k];
        }
        for k in 0..d {
            v.push(idx[k] as f64 * spacing[k]);
        }
    }
    Tensor::from_vec(v, (n, d), device)
}

/// The dense twin of [`softmin`]: the `N × N` cost on [`pixel_coordinates`] and a plain
/// log-sum-exp of Candle ops (differentiable by Candle's autograd). `O(N²)` memory: the test
/// oracle, for small grids.
pub fn softmin_dense(eps: f64, cost: &GridCost, h: &Tensor) -> Result<Tensor> {
    let d = cost.spacing.len();
    let dims = h.dims().to_vec();
    let grid = &dims[dims.len() - d..];
    let n: usize = grid.iter().product();
    let b = h.elem_count() / n.max(1);
    let x = pixel_coordinates(grid, &cost.spacing, h.device())?.to_dtype(h.dtype())?; // (N, D)
    let diff = x.unsqueeze(1)?.broadcast_sub(&x.unsqueeze(0)?)?; // (N, N, D)
    let c = if cost.p == 1 {
        diff.abs()?.sum(2)?
    } else {
        (diff.sqr()?.sum(2)? * 0.5)?
    }; // (N, N)
    let z = h
        .reshape((b, 1, n))?
        .broadcast_sub(&(c / eps)?.unsqueeze(0)?)?; // (B, N, N)
    let f = (super::tensorized::logsumexp_last(&z)? * (-eps))?; // (B, N)
    f.reshape(dims)
}
