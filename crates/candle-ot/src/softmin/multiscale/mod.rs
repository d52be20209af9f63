//! The multiscale backend: clustering, kernel truncation and block-sparse streaming softmins
//! (GeomLoss's `sinkhorn_multiscale`, for 10⁵–10⁶ points in D ≤ 3).
//!
//! 1. Each cloud (each batch item) is clustered on a voxel grid of side `cluster_scale`
//!    (default `diameter / (√D · 2000^{1/D})`, about 2000 cells over the bounding box):
//!    centroids x̄_I, summed weights ā_I, points sorted cluster by cluster (`cluster`).
//! 2. The ε-scaling loop runs on the centroids (the [`super::Online`] softmin over all cluster
//!    pairs) up to ε_J, the last ε of the schedule not below `cluster_scale^p` (GeomLoss's
//!    `jumps`: the first ε below it is the first fine iteration).
//! 3. At ε_J, *kernel truncation*: the block (I, J) is kept iff
//!    `f̄_I + ḡ_J > C(x̄_I, ȳ_J) − truncate·ε_J` on the coarse potentials (GeomLoss's
//!    `kernel_truncation`, no cluster-radius correction), and alike for (x, x) with f̄_aa and
//!    (y, y) with ḡ_bb. Every row and column cluster keeps at least its best block.
//! 4. The potentials are extrapolated to the points (a softmin of fine points against the coarse
//!    other cloud), and the loop finishes on the points with the block-sparse softmin
//!    [`BlockSparse`], whose last update is differentiable ([`block_softmin`], a `CustomOp3`
//!    whose `bwd` streams over the same kept blocks, transposed for ∂y and ∂h).
//!
//! This module imports nothing from the loop: the two-level solve that drives it through
//! [`crate::sinkhorn::sinkhorn_multilevel`] lives in `crate::multiscale`. Results are
//! returned in the input order.
//!
//! Devices: the clustering's voxel keys and cluster sums and the truncation's scores are Candle
//! tensor ops on the points' device (`on_device`); the host receives one `u32` key per point
//! (a stable counting sort) and the kept pairs. On the CPU the truncation keeps its rayon host
//! code (`kept_lists`), which the tensor path matches exactly in tests. The coarse loop runs on
//! the online kernels and the fine loop on block-sparse kernels: the two fine-level ops have `cpu_fwd` (`cpu.rs`) and, with
//! the `cuda` / `metal` features, `cuda_fwd` / `metal_fwd`, which call the online ops' one
//! launcher per device (`online/{cuda,metal}.rs` with `Tiles::Tasks`) on `candle-ot-kernels`'
//! `block_softmin_*` / `block_lse_grad_*`, with a task table built from the pattern (row
//! blocks inside one row cluster, each with its column spans), uploaded once per pattern and
//! device and reused by every iteration (`cluster::Pattern::table`). On a device whose
//! online kernels are not compiled in, the backend is an `Unsupported` error.

pub(crate) mod cluster;
pub(crate) mod cpu;
pub(crate) mod on_device;

use crate::cost::{CostKind, KernelKind};
use crate::softmin::online::dims3;
use crate::softmin::{online, Online, PointSoftmin, Softmin};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Tensor, WithDType,
};
use cluster::{grid_cluster, Blocks, Clustering, Pattern};
use std::sync::Arc;

/// The largest dimension the multiscale backend clusters (a voxel grid in D > 3 has too many
/// cells for a useful coarse level).
pub const MAX_DIM: usize = 3;

/// What the multiscale backend did (in [`crate::Solution::multiscale`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MultiscaleDiagnostics {
    /// The cluster (voxel) side.
    pub cluster_scale: f64,
    /// Clusters of x, per batch item.
    pub clusters_x: Vec<usize>,
    /// Clusters of y, per batch item.
    pub clusters_y: Vec<usize>,
    /// ε_J, where the loop jumped from the centroids to the points (truncation and
    /// extrapolation).
    pub jump_eps: f64,
    /// Kept point pairs of C_xy, summed over the batch (C_yx keeps the same, transposed).
    pub kept_pairs: u64,
    /// All point pairs of C_xy, `B·N·M`.
    pub total_pairs: u64,
    /// `kept_pairs / total_pairs`.
    pub kept_fraction: f64,
    /// Kept cluster pairs (I, J) of C_xy, summed over the batch.
    pub kept_blocks: u64,
    /// Kept point pairs of C_xx and C_yy together (debiased only), and their fraction of
    /// `B·(N² + M²)`.
    pub kept_pairs_sym: u64,
    /// `kept_pairs_sym / (B·(N² + M²))` (0 when not debiased).
    pub kept_fraction_sym: f64,
    /// With `tol`: `max |f̃ − f| / ε` of one exact (untruncated, online) update from the
    /// multiscale potentials, over every potential. `None` without `tol`.
    pub exact_update_error: Option<f64>,
    /// With `tol`: the multiscale potentials failed the exact check (not converged, or an exact
    /// update error above `max(10·tol, MULTISCALE_EXACT_CHECK)` = 1e-2: the truncation dropped
    /// pairs the converged plan needs), and the solution is the online backend's
    /// (`Solution::backend` says `Online`).
    pub fell_back_to_online: bool,
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("candle-ot: multiscale op inputs must be contiguous"),
    }
}

fn check_pattern(p: &[Blocks], b: usize, n: usize, m: usize, op: &str) -> Result<()> {
    let ok = p.len() == b
        && p.iter().all(|blk| {
            blk.rows.last().map(|r| r.1 as usize) == Some(n)
                && blk.spans.iter().all(|s| s.1 as usize <= m)
        });
    if !ok {
        candle_core::bail!(
            "candle-ot {op}: the block pattern does not match the inputs ({b}, {n}, {m})"
        )
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

/// `(x, y, h) ↦ f`, `f_i = −ε log Σ_{j ∈ kept(i)} exp(h_j − C(x_i, y_j)/ε)` over the pattern
/// `fwd`; `tr` is its transpose (for the backward over columns).
#[derive(Clone, Debug)]
struct BlockSoftminOp {
    cost: CostKind,
    eps: f64,
    fwd: Arc<Pattern>,
    tr: Arc<Pattern>,
}

impl BlockSoftminOp {
    /// `(B, N, D, M)` of the inputs, checked against each other and the pattern.
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (b, n, d) = dims3(l1, "x")?;
        let (by, m, dy) = dims3(l2, "y")?;
        if (by, dy) != (b, d) {
            candle_core::bail!(
                "candle-ot block softmin: x is {:?} but y is {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        if l3.shape().dims() != [b, m] {
            candle_core::bail!("candle-ot block softmin: h must be (B, M) = ({b}, {m}), got {l3:?}")
        }
        check_pattern(&self.fwd, b, n, m, "candle-ot-block-softmin")?;
        Ok((b, n, d, m))
    }
}

impl CustomOp3 for BlockSoftminOp {
    fn name(&self) -> &'static str {
        "candle-ot-block-softmin"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d, m) = self.check(l1, l2, l3)?;
        let out = with_float!(s1.dtype(), self.name(), |T| {
            let mut out = vec![<T as WithDType>::from_f64(0.0); b * n];
            let (x, y, h) = (
                contiguous::<T>(s1, l1)?,
                contiguous::<T>(s2, l2)?,
                contiguous::<T>(s3, l3)?,
            );
            for (bi, ob) in out.chunks_mut(n).enumerate() {
                cpu::block_softmin(
                    self.cost,
                    self.eps,
                    &x[bi * n * d..(bi + 1) * n * d],
                    &y[bi * m * d..(bi + 1) * m * d],
                    &h[bi * m..(bi + 1) * m],
                    d,
                    &self.fwd[bi],
                    ob,
                );
            }
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from((b, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let tiles = online::Tiles::Tasks(&self.fwd);
        online::cuda::softmin_fwd(self.cost, self.eps, (s1, l1), (s2, l2), (s3, l3), tiles)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let tiles = online::Tiles::Tasks(&self.fwd);
        online::metal::softmin_fwd(self.cost, self.eps, (s1, l1), (s2, l2), (s3, l3), tiles)
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        h: &Tensor,
        f: &Tensor,
        grad_f: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The online op's bwd, over the kept blocks (the transposed pattern for the y-side).
        online::softmin_bwd(self.eps, (x, y, h, f, grad_f), |rows, cols, transposed| {
            let pattern = if transposed { &self.tr } else { &self.fwd };
            block_grad(self.cost, self.eps, rows, cols, pattern)
        })
    }
}

/// Block-sparse softmax-weighted sums `[Σ_c π_rc w_c ∇₁C(p_r, q_c), Σ_c π_rc w_c]` over a pattern.
#[derive(Clone, Debug)]
struct BlockGradOp {
    cost: CostKind,
    eps: f64,
    pattern: Arc<Pattern>,
}

impl BlockGradOp {
    /// `(B, N, D, M)` of packed rows (B, N, D+1) and cols (B, M, D+2), checked against each
    /// other and the pattern.
    fn check(&self, l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (b, n, d1) = dims3(l1, "rows")?;
        let (bc, m, cd) = dims3(l2, "cols")?;
        if d1 == 0 || bc != b || cd != d1 + 1 {
            candle_core::bail!(
                "candle-ot block grad: rows (B, N, D+1) and cols (B, M, D+2) expected, got {:?} and {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        check_pattern(&self.pattern, b, n, m, "candle-ot-block-grad")?;
        Ok((b, n, d1 - 1, m))
    }
}

impl CustomOp2 for BlockGradOp {
    fn name(&self) -> &'static str {
        "candle-ot-block-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d, m) = self.check(l1, l2)?;
        let od = d + 1;
        let out = with_float!(s1.dtype(), self.name(), |T| {
            let mut out = vec![<T as WithDType>::from_f64(0.0); b * n * od];
            let (rows, cols) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            let (rs, cs) = (d + 1, d + 2);
            for (bi, ob) in out.chunks_mut(n * od).enumerate() {
                cpu::block_grad(
                    self.cost,
                    self.eps,
                    &rows[bi * n * rs..(bi + 1) * n * rs],
                    &cols[bi * m * cs..(bi + 1) * m * cs],
                    d,
                    true,
                    &self.pattern[bi],
                    ob,
                );
            }
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from((b, n, od))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check(l1, l2)?;
        let grad = online::Weighted::Grad { with_mass: true };
        let tiles = online::Tiles::Tasks(&self.pattern);
        online::cuda::lse_weighted_fwd(self.cost, self.eps, grad, (s1, l1), (s2, l2), tiles)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.check(l1, l2)?;
        let grad = online::Weighted::Grad { with_mass: true };
        let tiles = online::Tiles::Tasks(&self.pattern);
        online::metal::lse_weighted_fwd(self.cost, self.eps, grad, (s1, l1), (s2, l2), tiles)
    }
}

fn block_grad(
    cost: CostKind,
    eps: f64,
    rows: &Tensor,
    cols: &Tensor,
    pattern: &Arc<Pattern>,
) -> Result<Tensor> {
    rows.contiguous()?.apply_op2_no_bwd(
        &cols.contiguous()?,
        &BlockGradOp {
            cost,
            eps,
            pattern: pattern.clone(),
        },
    )
}

#[doc(hidden)]
/// Block-sparse streaming softmin over the kept blocks of `c`, differentiable with respect to
/// `c.x`, `c.y` and `h`. x (B, N, D), y (B, M, D), h (B, M) → (B, N).
pub fn block_softmin(cost: CostKind, eps: f64, c: &BlockCost, h: &Tensor) -> Result<Tensor> {
    c.x.contiguous()?.apply_op3(
        &c.y.contiguous()?,
        &h.contiguous()?,
        BlockSoftminOp {
            cost,
            eps,
            fwd: c.fwd.clone(),
            tr: c.tr.clone(),
        },
    )
}

// ---------------------------------------------------------------------------------------

#[doc(hidden)]
/// The block-sparse softmin of the fine level. Its [`PointSoftmin::cost`] keeps every pair (one
/// block), which makes it the online softmin; the truncated costs come from the multiscale
/// solve. Kernel products and plans are the online backend's (exact).
#[derive(Clone, Copy, Debug)]
pub struct BlockSparse {
    /// The ground cost.
    pub cost: CostKind,
}

#[doc(hidden)]
/// A block-sparse cost: rows x (B, N, D), columns y (B, M, D), both sorted cluster by cluster,
/// and the kept pattern per batch item with its transpose.
#[derive(Clone, Debug)]
pub struct BlockCost {
    /// Rows, (B, N, D).
    pub x: Tensor,
    /// Columns, (B, M, D).
    pub y: Tensor,
    fwd: Arc<Pattern>,
    tr: Arc<Pattern>,
}

impl BlockCost {
    /// Kept point pairs, summed over the batch.
    pub fn kept_pairs(&self) -> u64 {
        self.fwd.iter().map(|b| b.pairs).sum()
    }

    /// The same pattern with other rows (a tracked copy of `x`).
    pub(crate) fn with_rows(&self, x: &Tensor) -> BlockCost {
        BlockCost {
            x: x.clone(),
            ..self.clone()
        }
    }
}

impl Softmin for BlockSparse {
    type Cost = BlockCost;

    fn softmin(&self, eps: f64, c: &BlockCost, h: &Tensor) -> Result<Tensor> {
        block_softmin(self.cost, eps, c, h)
    }

    fn softmin_no_grad(&self, eps: f64, c: &BlockCost, h: &Tensor) -> Result<Tensor> {
        c.x.contiguous()?.apply_op3_no_bwd(
            &c.y.contiguous()?,
            &h.contiguous()?,
            &BlockSoftminOp {
                cost: self.cost,
                eps,
                fwd: c.fwd.clone(),
                tr: c.tr.clone(),
            },
        )
    }
}

impl PointSoftmin for BlockSparse {
    fn cost(&self, x: &Tensor, y: &Tensor) -> Result<BlockCost> {
        let (b, n, _) = x.dims3()?;
        let m = y.dim(1)?;
        Ok(BlockCost {
            x: x.contiguous()?,
            y: y.contiguous()?,
            fwd: Arc::new(Pattern::new(vec![Blocks::dense(n, m); b])),
            tr: Arc::new(Pattern::new(vec![Blocks::dense(m, n); b])),
        })
    }

    fn kernel_product(
        &self,
        kind: KernelKind,
        sigma: f64,
        x: &Tensor,
        y: &Tensor,
        b: &Tensor,
    ) -> Result<Tensor> {
        online::kernel_product(kind, sigma, x, y, b)
    }

    fn plan_apply(
        &self,
        eps: f64,
        x: &Tensor,
        f: &Tensor,
        y: &Tensor,
        h: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        Online { cost: self.cost }.plan_apply(eps, x, f, y, h, v)
    }
}

// ---------------------------------------------------------------------------------------

/// GeomLoss's jump index: the iteration after which the loop moves to the points, i.e. the
/// last ε before the first ε of `eps_list[2..]` below `cluster_scale^p`
/// (`len − 1` when there is none). Internal, hidden from the API docs.
#[doc(hidden)]
pub fn jump_index(eps_list: &[f64], cluster_scale: f64, p: u32) -> usize {
    let cp = cluster_scale.powi(p as i32);
    for (i, &eps) in eps_list.iter().enumerate().skip(2) {
        if cp > eps {
            return i - 1;
        }
    }
    eps_list.len() - 1
}

/// One clustered cloud set: per batch item clusterings, and the tensors of both levels.
pub(crate) struct Clouds {
    pub clusters: Vec<Clustering>,
    /// Centroids (B, Nc, D), padded with copies of the first centroid.
    pub coarse: Tensor,
    /// log ā (B, Nc), −∞ for zero weights and padding.
    pub log_coarse: Tensor,
    /// The points in cluster order, (B, N, D), differentiable with respect to the input.
    pub sorted: Tensor,
    /// log weights in cluster order, (B, N), detached.
    pub log_sorted: Tensor,
    /// Flat gather index from the sorted order back to the input order, (B·N,).
    pub inverse: Tensor,
}

pub(crate) fn clouds(x: &Tensor, w: &Tensor, scale: f64) -> Result<Clouds> {
    clouds_with(x, w, scale, false)
}

/// [`clouds`], clustering with the host code when `on_host` (benchmarks: the set-up before
/// #15).
fn clouds_with(x: &Tensor, w: &Tensor, scale: f64, on_host: bool) -> Result<Clouds> {
    let (b, n, d) = x.dims3()?;
    let dev = x.device();
    let cpu = candle_core::Device::Cpu;
    // Keys and sums on the device, a counting sort of the keys on the host (`on_device`);
    // the host code when the voxel grid is too fine for exact keys.
    let on_device = if on_host {
        None
    } else {
        on_device::cluster(x, w, scale, None)?
    };
    let clusters = match on_device {
        Some(c) => c,
        None => host_clusters(x, w, scale)?,
    };
    let nc = clusters.iter().map(|c| c.len()).max().unwrap_or(1);
    let mut cen = Vec::with_capacity(b * nc * d);
    let mut logw = Vec::with_capacity(b * nc);
    let mut fwd = Vec::with_capacity(b * n);
    let mut inv = vec![0u32; b * n];
    for (bi, c) in clusters.iter().enumerate() {
        for k in 0..nc {
            let kk = if k < c.len() { k } else { 0 };
            cen.extend_from_slice(&c.centroids[kk * d..(kk + 1) * d]);
            logw.push(if k < c.len() {
                c.weights[k].ln()
            } else {
                f64::NEG_INFINITY
            });
        }
        for (k, &i) in c.perm.iter().enumerate() {
            fwd.push((bi * n) as u32 + i);
            inv[bi * n + i as usize] = (bi * n + k) as u32;
        }
    }
    let dtype = x.dtype();
    let coarse = Tensor::from_vec(cen, (b, nc, d), &cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?;
    let log_coarse = Tensor::from_vec(logw, (b, nc), &cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?;
    let fwd = Tensor::from_vec(fwd, b * n, dev)?;
    let inverse = Tensor::from_vec(inv, b * n, dev)?;
    let sorted = x
        .reshape((b * n, d))?
        .index_select(&fwd, 0)?
        .reshape((b, n, d))?; // (B, N, D)
    let log_sorted = w
        .detach()
        .reshape(b * n)?
        .index_select(&fwd, 0)?
        .reshape((b, n))?
        .log()?; // (B, N)
    Ok(Clouds {
        clusters,
        coarse,
        log_coarse,
        sorted,
        log_sorted,
        inverse,
    })
}

/// [`grid_cluster`] of every batch item on host copies of the points (to the CPU first: Metal
/// has no f64).
fn host_clusters(x: &Tensor, w: &Tensor, scale: f64) -> Result<Vec<Clustering>> {
    let d = x.dim(2)?;
    let cpu = candle_core::Device::Cpu;
    let xs = x
        .detach()
        .to_device(&cpu)?
        .to_dtype(DType::F64)?
        .to_vec3::<f64>()?;
    let ws = w
        .detach()
        .to_device(&cpu)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    Ok(xs
        .iter()
        .zip(&ws)
        .map(|(xb, wb)| {
            let flat: Vec<f64> = xb.iter().flatten().copied().collect();
            grid_cluster(&flat, wb, d, scale)
        })
        .collect())
}

#[doc(hidden)]
/// The set-up of one debiased multiscale solve, for benchmarks: clusters `x` (B, N, D) with
/// weights `a` (B, N) and `y` (B, M, D) with `b` (B, M) at `cluster_scale`, then truncates
/// C_xy, C_xx and C_yy at `eps` with zero coarse potentials (the blocks within `truncate·ε` of
/// cost: a ball, as at a real jump). `host_clustering`: the host code's clustering (before
/// #15) instead of the keys and sums of `on_device`; `truncation_on_device`: the tensor-op
/// truncation (the GPU path) even on the CPU. Returns the kept pairs of C_xy and of
/// C_xx + C_yy.
#[allow(clippy::too_many_arguments)]
pub fn multiscale_setup(
    cost: CostKind,
    x: &Tensor,
    a: &Tensor,
    y: &Tensor,
    b: &Tensor,
    cluster_scale: f64,
    eps: f64,
    truncate_at: f64,
    host_clustering: bool,
    truncation_on_device: bool,
) -> Result<(u64, u64)> {
    let cx = clouds_with(x, a, cluster_scale, host_clustering)?;
    let cy = clouds_with(y, b, cluster_scale, host_clustering)?;
    let zeros = |c: &Clouds| c.log_coarse.zeros_like();
    let (f, g) = (zeros(&cx)?, zeros(&cy)?);
    let ms = MultiscaleParams {
        cost,
        truncate: truncate_at,
        cluster_scale,
        setup_on_device: truncation_on_device,
    };
    let t = truncate(ms, &cx, &cy, &f, &g, Some(&f), Some(&g), eps)?;
    Ok((t.kept_pairs, t.kept_pairs_sym))
}

/// Back to the input order: t (B, N) in cluster order.
pub(crate) fn unsort(t: &Tensor, inverse: &Tensor) -> Result<Tensor> {
    let (b, n) = t.dims2()?;
    t.reshape(b * n)?.index_select(inverse, 0)?.reshape((b, n))
}

/// The kept column clusters of every row cluster (one batch item, sorted lists):
/// `f_I + g_J > C(x̄_I, ȳ_J) − truncate·ε`, plus the best block of every row and of every
/// column (so that no fine potential is a softmin over nothing), plus the diagonal when `sym`.
/// Rows in parallel: O(Nc²) cost evaluations, O(kept) memory.
#[allow(clippy::too_many_arguments)]
fn kept_lists(
    cost: CostKind,
    d: usize,
    rx: &Clustering,
    ry: &Clustering,
    f: &[f64],
    g: &[f64],
    thresh: f64,
    sym: bool,
) -> Result<Vec<Vec<u32>>> {
    use rayon::prelude::*;
    let nc = ry.len();
    let p1 = cost == CostKind::Euclidean;
    // The column centroids as three coordinate arrays (zeros beyond D): the row loop below
    // then vectorises.
    let soa: [Vec<f64>; 3] = std::array::from_fn(|k| {
        (0..nc)
            .map(|j| if k < d { ry.centroids[j * d + k] } else { 0.0 })
            .collect()
    });
    // One row of scores s_J = f_I + g_J − C(x̄_I, ȳ_J) into `out`.
    let row = |i: usize, out: &mut Vec<f64>| {
        let p: [f64; 3] =
            std::array::from_fn(|k| if k < d { rx.centroids[i * d + k] } else { 0.0 });
        out.clear();
        out.resize(nc, 0.0);
        let (q0, q1, q2, g) = (&soa[0][..nc], &soa[1][..nc], &soa[2][..nc], &g[..nc]);
        for j in 0..nc {
            let (t0, t1, t2) = (p[0] - q0[j], p[1] - q1[j], p[2] - q2[j]);
            let sq = t0 * t0 + t1 * t1 + t2 * t2;
            out[j] = f[i] + g[j] - if p1 { sq.sqrt() } else { 0.5 * sq };
        }
    };
    let mut lists: Vec<Vec<u32>> = crate::threads::install(|| {
        (0..rx.len())
            .into_par_iter()
            .map_init(Vec::new, |buf, i| {
                row(i, buf);
                let mut l = Vec::new();
                let mut best = (f64::NEG_INFINITY, 0usize);
                for (j, &s) in buf.iter().enumerate() {
                    if s > thresh || (sym && i == j) {
                        l.push(j as u32);
                    }
                    if s > best.0 {
                        best = (s, j);
                    }
                }
                insert_sorted(&mut l, best.1 as u32);
                l
            })
            .collect()
    });
    // Columns that no row kept: add their best row (one more pass over the scores).
    cover_columns(&mut lists, nc, || {
        let mut col_best = vec![(f64::NEG_INFINITY, 0u32); nc];
        let mut buf = Vec::new();
        for i in 0..rx.len() {
            row(i, &mut buf);
            for (j, &s) in buf.iter().enumerate() {
                if s > col_best[j].0 {
                    col_best[j] = (s, i as u32);
                }
            }
        }
        Ok(col_best.into_iter().map(|b| b.1).collect())
    })?;
    Ok(lists)
}

/// Inserts `j` into the sorted list `l` unless it holds it already.
fn insert_sorted(l: &mut Vec<u32>, j: u32) {
    if let Err(at) = l.binary_search(&j) {
        l.insert(at, j);
    }
}

/// Adds every column of `0..nc` that no list holds to the list of its best row: `best_rows()`
/// gives the best row of every column, and runs only when a column is missing (the host and
/// the tensor-op truncations share this rule: no fine potential is a softmin over nothing).
fn cover_columns(
    lists: &mut [Vec<u32>],
    nc: usize,
    best_rows: impl FnOnce() -> Result<Vec<u32>>,
) -> Result<()> {
    let mut seen = vec![false; nc];
    for l in lists.iter() {
        for &j in l {
            seen[j as usize] = true;
        }
    }
    if seen.iter().all(|&s| s) {
        return Ok(());
    }
    let best = best_rows()?;
    for j in (0..nc).filter(|&j| !seen[j]) {
        insert_sorted(&mut lists[best[j] as usize], j as u32);
    }
    Ok(())
}

/// The transposed lists: row J of the result holds the I whose list holds J (sorted).
fn transpose_lists(lists: &[Vec<u32>], nc: usize) -> Vec<Vec<u32>> {
    let mut t = vec![Vec::new(); nc];
    for (i, l) in lists.iter().enumerate() {
        for &j in l {
            t[j as usize].push(i as u32);
        }
    }
    t
}

/// The multiscale options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MultiscaleParams {
    pub cost: CostKind,
    pub truncate: f64,
    pub cluster_scale: f64,
    /// Run the truncation with the tensor ops of `on_device` even on the CPU (tests: the
    /// GPU path, checked against the host code).
    pub setup_on_device: bool,
}

/// The costs of the fine level after kernel truncation (`xy`, `yx`, `xx`, `yy`, the last two
/// when debiased) and those of the extrapolation (fine points against the coarse other
/// cloud: `ext_xy = C(x_i, ȳ_J)`, `ext_yx = C(y_j, x̄_I)`, `ext_xx = C(x_i, x̄_K)`,
/// `ext_yy = C(y_j, ȳ_L)`), with the kept pairs (C_xy, C_xx + C_yy) and kept cluster pairs.
pub(crate) struct Truncated {
    pub xy: BlockCost,
    pub yx: BlockCost,
    pub xx: Option<BlockCost>,
    pub yy: Option<BlockCost>,
    pub ext_xy: BlockCost,
    pub ext_yx: BlockCost,
    pub ext_xx: Option<BlockCost>,
    pub ext_yy: Option<BlockCost>,
    pub kept_pairs: u64,
    pub kept_pairs_sym: u64,
    pub kept_blocks: u64,
}

/// Kernel truncation at ε (module docs, step 3) from the coarse potentials f̄_ba, ḡ_ab and,
/// debiased, f̄_aa, ḡ_bb (each (B, Nc)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn truncate(
    ms: MultiscaleParams,
    cx: &Clouds,
    cy: &Clouds,
    f_ba: &Tensor,
    g_ab: &Tensor,
    f_aa: Option<&Tensor>,
    g_bb: Option<&Tensor>,
    eps: f64,
) -> Result<Truncated> {
    let (bsz, _, d) = cx.sorted.dims3()?;
    let host = |t: &Tensor| {
        t.to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()
    };
    let thresh = -ms.truncate * eps;
    // One cost's pattern, its transpose, and the extrapolation patterns of both (fine rows
    // against the coarse columns, one column per cluster).
    let singles =
        |c: &Clustering| -> Vec<(u32, u32)> { (0..c.len() as u32).map(|j| (j, j + 1)).collect() };
    type Patterns = [Arc<Pattern>; 4];
    let pattern = |rx: &[Clustering],
                   ry: &[Clustering],
                   f: &Tensor,
                   g: &Tensor,
                   sym: bool|
     -> Result<Patterns> {
        // On the CPU the host code (rayon, f64); elsewhere the tensor ops of `on_device`, so
        // that only the kept pairs leave the device.
        let on_host = !ms.setup_on_device && f.device().is_cpu();
        let (fh, gh) = if on_host {
            (host(f)?, host(g)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let (mut fwd, mut tr, mut ext_fwd, mut ext_tr) = (vec![], vec![], vec![], vec![]);
        for bi in 0..bsz {
            let (r, c) = (&rx[bi], &ry[bi]);
            let keep = if on_host {
                kept_lists(ms.cost, d, r, c, &fh[bi], &gh[bi], thresh, sym)?
            } else {
                let dev = f.device();
                let dt = on_device::setup_dtype(dev);
                let pot = |t: &Tensor, n: usize| t.get(bi)?.narrow(0, 0, n)?.to_dtype(dt);
                let xc = on_device::centroids(r, d, dt, dev)?;
                // C_xx / C_yy: the rows are the columns, one upload.
                let yc = if sym {
                    xc.clone()
                } else {
                    on_device::centroids(c, d, dt, dev)?
                };
                on_device::kept_lists(
                    ms.cost,
                    &xc,
                    &yc,
                    &pot(f, r.len())?,
                    &pot(g, c.len())?,
                    thresh,
                    sym,
                )?
            };
            let keep_t = transpose_lists(&keep, c.len());
            fwd.push(Blocks::from_lists(&r.ranges, &c.ranges, &keep));
            ext_fwd.push(Blocks::from_lists(&r.ranges, &singles(c), &keep));
            tr.push(Blocks::from_lists(&c.ranges, &r.ranges, &keep_t));
            ext_tr.push(Blocks::from_lists(&c.ranges, &singles(r), &keep_t));
        }
        Ok([
            Arc::new(Pattern::new(fwd)),
            Arc::new(Pattern::new(tr)),
            Arc::new(Pattern::new(ext_fwd)),
            Arc::new(Pattern::new(ext_tr)),
        ])
    };
    let cost = |x: &Tensor, y: &Tensor, fwd: &Arc<Pattern>, tr: &Arc<Pattern>| BlockCost {
        x: x.clone(),
        y: y.clone(),
        fwd: fwd.clone(),
        tr: tr.clone(),
    };
    let (sx, sy) = (&cx.sorted.detach(), &cy.sorted.detach());
    // Extrapolation costs carry no transpose: they are never differentiated.
    let none = Arc::new(Pattern::default());
    let [fwd, tr, ext_xy, ext_yx] = pattern(&cx.clusters, &cy.clusters, f_ba, g_ab, false)?;
    let xy = cost(sx, sy, &fwd, &tr);
    let yx = cost(sy, sx, &tr, &fwd);
    let mut sym_pairs = 0u64;
    let mut sym =
        |cl: &Clouds, pot: Option<&Tensor>| -> Result<(Option<BlockCost>, Option<BlockCost>)> {
            let Some(pot) = pot else {
                return Ok((None, None));
            };
            let [fwd, tr, ext, _] = pattern(&cl.clusters, &cl.clusters, pot, pot, true)?;
            sym_pairs += fwd.iter().map(|b| b.pairs).sum::<u64>();
            let s = cl.sorted.detach();
            Ok((
                Some(cost(&s, &s, &fwd, &tr)),
                Some(cost(&s, &cl.coarse, &ext, &none)),
            ))
        };
    let (xx, ext_xx) = sym(cx, f_aa)?;
    let (yy, ext_yy) = sym(cy, g_bb)?;
    Ok(Truncated {
        kept_pairs: xy.kept_pairs(),
        kept_pairs_sym: sym_pairs,
        kept_blocks: fwd.iter().map(|b| b.cluster_pairs).sum(),
        xy,
        yx,
        xx,
        yy,
        ext_xy: cost(sx, &cy.coarse, &ext_xy, &none),
        ext_yx: cost(sy, &cx.coarse, &ext_yx, &none),
        ext_xx,
        ext_yy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The truncation through the tensor ops (the GPU path) keeps exactly the host code's
    /// blocks, for every pattern of a debiased solve: C_xy, its transpose, C_xx, C_yy and the
    /// extrapolation patterns.
    #[test]
    fn device_truncation_keeps_the_same_pairs() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let dev = candle_core::Device::Cpu;
        let (b, n, m, d) = (2, 700, 500, 3);
        let mut rand = |shape: &[usize]| {
            let len: usize = shape.iter().product();
            let v: Vec<f64> = (0..len).map(|_| rng.random::<f64>()).collect();
            Tensor::from_vec(v, shape, &dev)
        };
        let (x, y) = (rand(&[b, n, d])?, rand(&[b, m, d])?);
        let (a, w) = (rand(&[b, n])?, rand(&[b, m])?);
        let scale = 0.1;
        let (cx, cy) = (clouds(&x, &a, scale)?, clouds(&y, &w, scale)?);
        let ncx = cx.coarse.dim(1)?;
        let ncy = cy.coarse.dim(1)?;
        let (f, g) = ((rand(&[b, ncx])? * 0.01)?, (rand(&[b, ncy])? * 0.01)?);
        let (faa, gbb) = ((rand(&[b, ncx])? * 0.01)?, (rand(&[b, ncy])? * 0.01)?);
        for cost in [CostKind::SqEuclidean, CostKind::Euclidean] {
            let run = |on_device: bool| {
                let ms = MultiscaleParams {
                    cost,
                    truncate: 5.0,
                    cluster_scale: scale,
                    setup_on_device: on_device,
                };
                truncate(ms, &cx, &cy, &f, &g, Some(&faa), Some(&gbb), 0.005)
            };
            let (host, device) = (run(false)?, run(true)?);
            let pats = |t: &Truncated| -> Vec<Arc<Pattern>> {
                let c = |c: &BlockCost| [c.fwd.clone(), c.tr.clone()];
                let o = |c: &Option<BlockCost>| c.as_ref().map(|c| c.fwd.clone());
                let mut v: Vec<Arc<Pattern>> = [&t.xy, &t.yx].into_iter().flat_map(c).collect();
                v.extend([t.ext_xy.fwd.clone(), t.ext_yx.fwd.clone()]);
                v.extend(
                    [o(&t.xx), o(&t.yy), o(&t.ext_xx), o(&t.ext_yy)]
                        .into_iter()
                        .flatten(),
                );
                v
            };
            let (ph, pd) = (pats(&host), pats(&device));
            assert_eq!(ph.len(), 10);
            for (u, v) in ph.iter().zip(&pd) {
                for (p, q) in u.iter().zip(v.iter()) {
                    assert_eq!(
                        (&p.rows, &p.offsets, &p.spans),
                        (&q.rows, &q.offsets, &q.spans)
                    );
                    assert_eq!((p.pairs, p.cluster_pairs), (q.pairs, q.cluster_pairs));
                }
            }
            assert_eq!(host.kept_pairs, device.kept_pairs);
            assert_eq!(host.kept_pairs_sym, device.kept_pairs_sym);
            // Truncated, not everything.
            assert!(
                host.kept_pairs < (b * n * m) as u64 / 2,
                "{}",
                host.kept_pairs
            );
        }
        Ok(())
    }

    #[test]
    fn jump_is_the_last_eps_not_below_the_cluster_scale() {
        let eps = [3.0, 3.0, 0.75, 0.1875, 0.047, 0.0117, 0.0029, 0.0025];
        // 0.0794² = 0.0063: the first ε below it is 0.0029 (index 6): jump after index 5.
        assert_eq!(jump_index(&eps, 0.0794, 2), 5);
        assert_eq!(jump_index(&eps, 1e-3, 2), 7);
        assert_eq!(jump_index(&eps, 10.0, 2), 1);
    }
}
