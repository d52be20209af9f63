//! The online (streaming) backend: Candle custom ops that never materialise an N×M matrix.
//!
//! Candle's custom ops take at most three tensors. The softmin needs three (`x`, `y`, `h`)
//! and is a [`CustomOp3`]; the reductions of its backward need five (`x`, `y`, `h`, the
//! output `f`, the incoming gradient) and take them *packed*: one tensor of rows
//! `[x_i, α_i]` and one of columns `[y_j, β_j, w_j…]`, built with a `cat` on the last axis.
//! This keeps each reduction one pass over the pairs, with the per-point scalars next to the
//! coordinates they go with (one cache line), and needs no change to Candle.
//!
//! Ops (each a private struct with `cpu_fwd`, and `cuda_fwd` / `metal_fwd` behind the `cuda` /
//! `metal` features, which launch the kernels of `candle-ot-kernels` on the same packed layouts;
//! see `cuda.rs` and `metal.rs`):
//! - `SoftminOp`: `(x, y, h) ↦ f`, `f_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)`, with a `bwd`
//!   that streams the gradients with respect to all three inputs;
//! - `LseWeightedOp`: packed softmax-weighted sums, used by that `bwd` and by plan application;
//! - `KernelProductOp`: `(x, y, b) ↦ Σ_j k(x_i, y_j) b_j` with a streaming `bwd`;
//! - `KernelSumsOp`: the packed sums of that `bwd`.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;
pub(crate) mod real;

pub use cpu::{roofline, simd_level, RooflineMix, SimdLevel};

use crate::cost::{CostKind, KernelKind};
use crate::softmin::Lengths;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
    WithDType,
};
pub(crate) use cpu::Weighted;
use real::Real;

/// Whether the online ops have kernels for `device` in this build: always on the CPU, on CUDA
/// with the `cuda` feature, on Metal with the `metal` feature.
pub fn supports(device: &candle_core::Device) -> bool {
    match device {
        candle_core::Device::Cpu => true,
        candle_core::Device::Cuda(_) => cfg!(feature = "cuda"),
        candle_core::Device::Metal(_) => cfg!(feature = "metal"),
    }
}

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("candle-ot: online op inputs must be contiguous"),
    }
}

/// `(B, N, D)` of a rank-3 layout, or a clear error naming the input.
pub(crate) fn dims3(l: &Layout, name: &str) -> Result<(usize, usize, usize)> {
    match l.shape().dims() {
        &[b, n, d] => Ok((b, n, d)),
        d => candle_core::bail!("candle-ot: {name} must be (B, N, D), got {d:?}"),
    }
}

/// The kernel `{family}_{variant}_{dtype}` of `list` (a `*_KERNELS` list of
/// `candle_ot_kernels::{cuda, metal}`), through the kernels crate's one name builder
/// ([`candle_ot_kernels::entry_point`]), or a clear error when the build has none.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) fn entry(
    list: &'static [&'static str],
    family: &str,
    variant: &str,
    dtype: &str,
) -> Result<&'static str> {
    candle_ot_kernels::entry_point(list, family, variant, dtype).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "candle-ot: no kernel {family}_{variant}_{dtype} in candle-ot-kernels"
        ))
    })
}

/// How a GPU launch covers the output rows (the CUDA and Metal launchers share it).
#[cfg(any(feature = "cuda", feature = "metal"))]
#[derive(Clone, Copy, Debug)]
pub(crate) enum Tiles<'a> {
    /// Every row of every batch item: the dense grid `(ceil(N / ROWS), B)` of
    /// `candle_ot_kernels::launch_config`, each row reduced over all M columns.
    Rows,
    /// One block (threadgroup) per task of the block-sparse task table of these patterns (one
    /// per batch item; `multiscale::cluster::task_table`): the multiscale fine level's kept
    /// blocks, or a ragged batch's per-item tiles. Rows no task covers are left at 0.
    Tasks(&'a crate::softmin::multiscale::cluster::Pattern),
}

/// A size as the kernels' `u32`, or a clear error (the GPU kernels take 32-bit sizes).
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("candle-ot: {what} = {v} exceeds u32")))
}

/// The sizes of a ragged batch stored padded, `(rows, columns)`: item b of an op reduces its
/// first `rows[b]` rows over its first `cols[b]` columns (see [`crate::softmin::PointSoftmin::cost_ragged`]).
pub(crate) type Ragged = (Lengths, Lengths);

/// The lengths as the CPU kernels take them, checked against the op's `(B, N, M)`.
fn ragged_slices(
    lens: Option<&Ragged>,
    b: usize,
    n: usize,
    m: usize,
) -> Result<Option<(&[usize], &[usize])>> {
    match lens {
        Some((r, c)) => {
            r.check(b, n, "the rows")?;
            c.check(b, m, "the columns")?;
            Ok(Some((r.as_slice(), c.as_slice())))
        }
        None => Ok(None),
    }
}

/// The rows and columns swapped (the y-side reductions of a backward).
fn transpose(lens: Option<&Ragged>) -> Option<Ragged> {
    lens.map(|(r, c)| (c.clone(), r.clone()))
}

/// `1` on the first `len[b]` entries of each row of a (B, `n`) mask, `0` on the padding.
fn length_mask(len: &Lengths, n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let idx = Tensor::arange(0u32, n as u32, device)?.unsqueeze(0)?; // (1, n)
    let len: Vec<u32> = len.as_slice().iter().map(|&l| l as u32).collect();
    let len = Tensor::new(len.as_slice(), device)?.unsqueeze(1)?; // (B, 1)
    idx.broadcast_lt(&len) // (B, n) u8
}

/// The block patterns that cover each item's own rows and columns: the ragged batch as the
/// block-sparse GPU kernels' task table (one launch for the whole batch, each task a tile of
/// one item's rows against that item's columns).
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) fn ragged_patterns((r, c): &Ragged) -> crate::softmin::multiscale::cluster::Pattern {
    use crate::softmin::multiscale::cluster::{Blocks, Pattern};
    let blocks = r
        .as_slice()
        .iter()
        .zip(c.as_slice())
        .map(|(&n, &m)| {
            if n == 0 {
                Blocks {
                    rows: vec![],
                    offsets: vec![0],
                    spans: vec![],
                    pairs: 0,
                    cluster_pairs: 0,
                }
            } else {
                Blocks::dense(n, m)
            }
        })
        .collect();
    Pattern::new(blocks)
}

/// The block pattern of a GPU launch over rows `l1` (B, N, ·) and columns `l2` (B, M, ·):
/// `None` (the dense grid, [`Tiles::Rows`]) without lengths, else the ragged batch's per-item
/// tiles ([`ragged_patterns`]), its lengths checked against the shapes first.
#[cfg(any(feature = "cuda", feature = "metal"))]
fn ragged_pattern(
    lens: Option<&Ragged>,
    l1: &Layout,
    l2: &Layout,
) -> Result<Option<crate::softmin::multiscale::cluster::Pattern>> {
    let Some(lens) = lens else {
        return Ok(None);
    };
    let (b, n, _) = dims3(l1, "rows")?;
    ragged_slices(Some(lens), b, n, dims3(l2, "cols")?.1)?;
    Ok(Some(ragged_patterns(lens)))
}

// ---------------------------------------------------------------------------------------

/// `(x, y, h) ↦ f`, `f_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)`.
/// x (B, N, D), y (B, M, D), h (B, M) → f (B, N). With `lens`, a ragged batch: item b reduces
/// rows `i < rows[b]` over columns `j < cols[b]`; its padding rows are 0.
#[derive(Clone, Debug)]
struct SoftminOp {
    cost: CostKind,
    eps: f64,
    lens: Option<Ragged>,
}

impl CustomOp3 for SoftminOp {
    fn name(&self) -> &'static str {
        "candle-ot-softmin"
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
        let (b, n, d) = dims3(l1, "x")?;
        let (_, m, _) = dims3(l2, "y")?;
        if l3.shape().dims() != [b, m] {
            candle_core::bail!("candle-ot softmin: h must be (B, M) = ({b}, {m}), got {l3:?}")
        }
        let lens = ragged_slices(self.lens.as_ref(), b, n, m)?;
        let out = with_float!(s1.dtype(), self.name(), |T| {
            let mut out = vec![T::ZERO; b * n];
            let (x, y, h) = (
                contiguous::<T>(s1, l1)?,
                contiguous::<T>(s2, l2)?,
                contiguous::<T>(s3, l3)?,
            );
            cpu::softmin(self.cost, self.eps, x, y, h, (b, n, m, d), lens, &mut out);
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
        let ins = ((s1, l1), (s2, l2), (s3, l3));
        let pattern = ragged_pattern(self.lens.as_ref(), l1, l2)?;
        let tiles = pattern.as_ref().map_or(Tiles::Rows, Tiles::Tasks);
        cuda::softmin_fwd(self.cost, self.eps, ins.0, ins.1, ins.2, tiles)
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
        let ins = ((s1, l1), (s2, l2), (s3, l3));
        let pattern = ragged_pattern(self.lens.as_ref(), l1, l2)?;
        let tiles = pattern.as_ref().map_or(Tiles::Rows, Tiles::Tasks);
        metal::softmin_fwd(self.cost, self.eps, ins.0, ins.1, ins.2, tiles)
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        h: &Tensor,
        f: &Tensor,
        grad_f: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        softmin_bwd(self.eps, (x, y, h, f, grad_f), |rows, cols, transposed| {
            let lens = if transposed {
                transpose(self.lens.as_ref())
            } else {
                self.lens.clone()
            };
            lse_weighted(
                self.cost,
                self.eps,
                rows,
                cols,
                Weighted::Grad { with_mass: true },
                lens.as_ref(),
            )
        })
    }
}

/// The backward of a softmin `f = softmin_ε(x, y, h)` from its output: `(∂x, ∂y, ∂h)` of
/// `Σ_i grad_f_i f_i`, with `π_ij = exp(h_j + f_i/ε − C_ij/ε)`. `grad(rows, cols, transposed)`
/// is the gradient reduction `[Σ_c π_rc w_c ∇₁C(p_r, q_c), Σ_c π_rc w_c]` over the pairs the
/// forward reduced (all of them for the online op, the kept blocks for the multiscale one;
/// `transposed` for the y-side, rows y against columns x).
pub(crate) fn softmin_bwd(
    eps: f64,
    (x, y, h, f, grad_f): (&Tensor, &Tensor, &Tensor, &Tensor, &Tensor),
    grad: impl Fn(&Tensor, &Tensor, bool) -> Result<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    // π_ij = exp(h_j + f_i/ε − C_ij/ε): the softmax weights of row i (rows sum to 1).
    let alpha = (f / eps)?.unsqueeze(2)?; // (B, N, 1)
    let d = x.dim(2)?;
    let grad_x = {
        // Σ_j π_ij ∇₁C(x_i, y_j), times grad_f_i. The weights are normalised by their own
        // streamed sum Σ_j π_ij (= 1 up to rounding) rather than trusted through α = f/ε:
        // at small ε, f/ε rounded in f32 would shift every weight of the row by ~1e-7·|f|/ε.
        let rows = Tensor::cat(&[x, &alpha], 2)?; // (B, N, D+1)
        let ones = h.ones_like()?.unsqueeze(2)?;
        let cols = Tensor::cat(&[y, &h.unsqueeze(2)?, &ones], 2)?; // (B, M, D+2)
        let s = grad(&rows, &cols, false)?; // (B, N, D+1)
                                            // The mass is ≈ 1 on every reduced row; rows a ragged reduction skips hold 0 / 0, which
                                            // the floor turns into 0 (below it nothing is representable that a row could sum to).
        let mass = s.narrow(2, d, 1)?.maximum(1e-30)?; // (B, N, 1)
        s.narrow(2, 0, d)?
            .broadcast_div(&mass)?
            .broadcast_mul(&grad_f.unsqueeze(2)?)? // (B, N, D)
    };
    let (grad_y, grad_h) = if y.track_op() || h.track_op() {
        // Σ_i g_i π_ij [∇₁C(y_j, x_i), 1]: ∂f_i/∂y_j = π_ij ∇₁C(y_j, x_i), ∂f_i/∂h_j = −ε π_ij.
        let rows = Tensor::cat(&[y, &h.unsqueeze(2)?], 2)?; // (B, M, D+1)
        let cols = Tensor::cat(&[x, &alpha, &grad_f.unsqueeze(2)?], 2)?; // (B, N, D+2)
        let s = grad(&rows, &cols, true)?; // (B, M, D+1)
        let gy = s.narrow(2, 0, d)?; // (B, M, D)
        let gh = (s.narrow(2, d, 1)?.squeeze(2)? * (-eps))?; // (B, M)
        (Some(gy), Some(gh))
    } else {
        (None, None)
    };
    Ok((Some(grad_x), grad_y, grad_h))
}

/// Streaming softmin, differentiable with respect to `x`, `y` and `h`:
///
/// $$ f_i = -\varepsilon \log \sum_j \exp\big(h_j - C(x_i, y_j)/\varepsilon\big). $$
///
/// x (B, N, D), y (B, M, D), h (B, M) → (B, N). Computed with a running (max, sum) pair over
/// tiles of y (never an N×M matrix); a row whose `h` is all −∞ gives +∞. Gradients:
/// $\partial f_i / \partial x_i = \sum_j \pi_{ij} \nabla_x C(x_i, y_j)$,
/// $\partial f_i / \partial h_j = -\varepsilon \pi_{ij}$ with the row-softmax weights
/// $\pi_{ij} = \exp\big((f_i - C(x_i, y_j))/\varepsilon + h_j\big)$, streamed the same way.
pub fn softmin(cost: CostKind, eps: f64, x: &Tensor, y: &Tensor, h: &Tensor) -> Result<Tensor> {
    softmin_ragged(cost, eps, x, y, h, None)
}

/// [`softmin`] on a ragged batch stored padded, `lens = (x lengths, y lengths)`: item b
/// reduces rows `i < x_len[b]` over columns `j < y_len[b]` only (no padding pair is visited,
/// whatever `h` holds there) and its padding rows are 0, with gradients 0 there. On CUDA and
/// Metal it runs the block-sparse kernels with one block per item: one launch for the batch.
pub(crate) fn softmin_ragged(
    cost: CostKind,
    eps: f64,
    x: &Tensor,
    y: &Tensor,
    h: &Tensor,
    lens: Option<&Ragged>,
) -> Result<Tensor> {
    let op = SoftminOp {
        cost,
        eps,
        lens: lens.cloned(),
    };
    x.contiguous()?
        .apply_op3(&y.contiguous()?, &h.contiguous()?, op)
}

/// Same as [`softmin_ragged`], outside the autograd graph (for the loop's inner iterations).
pub(crate) fn softmin_no_bwd(
    cost: CostKind,
    eps: f64,
    x: &Tensor,
    y: &Tensor,
    h: &Tensor,
    lens: Option<&Ragged>,
) -> Result<Tensor> {
    let op = SoftminOp {
        cost,
        eps,
        lens: lens.cloned(),
    };
    x.contiguous()?
        .apply_op3_no_bwd(&y.contiguous()?, &h.contiguous()?, &op)
}

// ---------------------------------------------------------------------------------------

/// Packed softmax-weighted sums, see [`cpu::lse_weighted`].
#[derive(Clone, Debug)]
struct LseWeightedOp {
    cost: CostKind,
    eps: f64,
    mode: Weighted,
    /// Ragged rows and columns; on CUDA and Metal only with `Weighted::Grad { with_mass: true }`
    /// (the wrapper [`lse_weighted`] masks the other modes there).
    lens: Option<Ragged>,
}

impl CustomOp2 for LseWeightedOp {
    fn name(&self) -> &'static str {
        "candle-ot-lse-weighted"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d1) = dims3(l1, "rows")?;
        let (_, m, _) = dims3(l2, "cols")?;
        let d = d1 - 1;
        let od = self.mode.out_dim(d);
        let lens = ragged_slices(self.lens.as_ref(), b, n, m)?;
        let out = with_float!(s1.dtype(), self.name(), |T| {
            let mut out = vec![T::ZERO; b * n * od];
            let (rows, cols) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            cpu::lse_weighted(
                self.cost,
                self.eps,
                rows,
                cols,
                (n, m, d),
                self.mode,
                lens,
                &mut out,
            );
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
        let (cost, eps, mode) = (self.cost, self.eps, self.mode);
        let pattern = ragged_pattern(self.lens.as_ref(), l1, l2)?;
        let tiles = pattern.as_ref().map_or(Tiles::Rows, Tiles::Tasks);
        cuda::lse_weighted_fwd(cost, eps, mode, (s1, l1), (s2, l2), tiles)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (cost, eps, mode) = (self.cost, self.eps, self.mode);
        let pattern = ragged_pattern(self.lens.as_ref(), l1, l2)?;
        let tiles = pattern.as_ref().map_or(Tiles::Rows, Tiles::Tasks);
        metal::lse_weighted_fwd(cost, eps, mode, (s1, l1), (s2, l2), tiles)
    }
}

/// The packed sums of [`cpu::lse_weighted`] (on any device), ragged with `lens`. On CUDA and
/// Metal the ragged modes other than the gradient run padded, with the padding columns masked
/// (`h = −∞`) and the padding rows zeroed: the same values.
pub(crate) fn lse_weighted(
    cost: CostKind,
    eps: f64,
    rows: &Tensor,
    cols: &Tensor,
    mode: Weighted,
    lens: Option<&Ragged>,
) -> Result<Tensor> {
    if let Some((rl, cl)) = lens {
        if !rows.device().is_cpu() && mode != (Weighted::Grad { with_mass: true }) {
            let (n, m, d) = (rows.dim(1)?, cols.dim(1)?, rows.dim(2)? - 1);
            let keep = length_mask(cl, m, cols.device())?; // (B, M)
            let h = cols.narrow(2, d, 1)?.squeeze(2)?; // (B, M)
            let h = keep.where_cond(&h, &h.ones_like()?.affine(0.0, f64::NEG_INFINITY)?)?;
            let cw = cols.dim(2)?;
            let cols = Tensor::cat(
                &[
                    &cols.narrow(2, 0, d)?,
                    &h.unsqueeze(2)?,
                    &cols.narrow(2, d + 1, cw - d - 1)?,
                ],
                2,
            )?;
            let out = lse_weighted(cost, eps, rows, &cols, mode, None)?; // (B, N, K)
            let rows_kept = length_mask(rl, n, rows.device())?.to_dtype(out.dtype())?;
            return out.broadcast_mul(&rows_kept.unsqueeze(2)?);
        }
    }
    let op = LseWeightedOp {
        cost,
        eps,
        mode,
        lens: lens.cloned(),
    };
    rows.contiguous()?
        .apply_op2_no_bwd(&cols.contiguous()?, &op)
}

/// Streaming plan application `out_i = Σ_j exp(f_i/ε + h_j − C(x_i, y_j)/ε) v_j`.
/// x (B, N, D), f (B, N), y (B, M, D), h (B, M), v (B, M, K) → (B, N, K).
pub(crate) fn plan_apply(
    cost: CostKind,
    eps: f64,
    x: &Tensor,
    f: &Tensor,
    y: &Tensor,
    h: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    plan_apply_ragged(cost, eps, (x, f), (y, h), v, None)
}

/// [`plan_apply`] on a ragged batch stored padded (`lens` = rows, columns): padding pairs are
/// not visited on the CPU, and masked on CUDA and Metal; padding rows are 0.
pub(crate) fn plan_apply_ragged(
    cost: CostKind,
    eps: f64,
    (x, f): (&Tensor, &Tensor),
    (y, h): (&Tensor, &Tensor),
    v: &Tensor,
    lens: Option<&Ragged>,
) -> Result<Tensor> {
    let k = v.dim(2)?;
    let rows = Tensor::cat(&[x, &(f / eps)?.unsqueeze(2)?], 2)?; // (B, N, D+1)
    let cols = Tensor::cat(&[y, &h.unsqueeze(2)?, v], 2)?; // (B, M, D+1+K)
    lse_weighted(cost, eps, &rows, &cols, Weighted::Values { k }, lens)
}

// ---------------------------------------------------------------------------------------

/// `(x, y, b) ↦ u`, `u_i = Σ_j k(x_i, y_j) b_j`. x (B, N, D), y (B, M, D), b (B, M) → (B, N).
/// `lens` (ragged rows and columns) only on the CPU: [`kernel_product_ragged`] masks elsewhere.
#[derive(Clone, Debug)]
struct KernelProductOp {
    kind: KernelKind,
    sigma: f64,
    lens: Option<Ragged>,
}

impl CustomOp3 for KernelProductOp {
    fn name(&self) -> &'static str {
        "candle-ot-kernel-product"
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
        let (b, n, d) = dims3(l1, "x")?;
        let (_, m, _) = dims3(l2, "y")?;
        if l3.shape().dims() != [b, m] {
            candle_core::bail!(
                "candle-ot kernel product: b must be (B, M) = ({b}, {m}), got {l3:?}"
            )
        }
        let lens = ragged_slices(self.lens.as_ref(), b, n, m)?;
        let out = with_float!(s1.dtype(), self.name(), |T| {
            let (x, y, w) = (
                contiguous::<T>(s1, l1)?,
                contiguous::<T>(s2, l2)?,
                contiguous::<T>(s3, l3)?,
            );
            // Pack [y_j, b_j] once: O(M·D), the layout the sum streams over.
            let mut cols = Vec::with_capacity(b * m * (d + 1));
            for (yj, wj) in y.chunks(d).zip(w) {
                cols.extend_from_slice(yj);
                cols.push(*wj);
            }
            let mut out = vec![T::ZERO; b * n];
            cpu::kernel_sums(
                self.kind,
                self.sigma,
                x,
                &cols,
                (n, m, d),
                false,
                lens,
                &mut out,
            );
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
        if self.lens.is_some() {
            candle_core::bail!("candle-ot: the ragged kernel product runs masked on CUDA")
        }
        cuda::kernel_product_fwd(self.kind, self.sigma, (s1, l1), (s2, l2), (s3, l3))
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
        if self.lens.is_some() {
            candle_core::bail!("candle-ot: the ragged kernel product runs masked on Metal")
        }
        metal::kernel_product_fwd(self.kind, self.sigma, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        b: &Tensor,
        _u: &Tensor,
        grad_u: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(2)?;
        let grad_x = if x.track_op() {
            let cols = Tensor::cat(&[y, &b.unsqueeze(2)?], 2)?; // (B, M, D+1)
            let s = kernel_sums(self.kind, self.sigma, x, &cols, true, self.lens.as_ref())?; // (B, N, D+1)
            Some(s.narrow(2, 0, d)?.broadcast_mul(&grad_u.unsqueeze(2)?)?)
        } else {
            None
        };
        let (grad_y, grad_b) = if y.track_op() || b.track_op() {
            let cols = Tensor::cat(&[x, &grad_u.unsqueeze(2)?], 2)?; // (B, N, D+1)
            let lens = transpose(self.lens.as_ref());
            let s = kernel_sums(self.kind, self.sigma, y, &cols, true, lens.as_ref())?; // (B, M, D+1)
            let gy = s.narrow(2, 0, d)?.broadcast_mul(&b.unsqueeze(2)?)?;
            let gb = s.narrow(2, d, 1)?.squeeze(2)?;
            (Some(gy), Some(gb))
        } else {
            (None, None)
        };
        Ok((grad_x, grad_y, grad_b))
    }
}

/// Streaming kernel product, differentiable in x, y and b:
///
/// $$ u_i = \sum_j k(x_i, y_j) b_j. $$
///
/// x (B, N, D), y (B, M, D), b (B, M) → (B, N).
pub fn kernel_product(
    kind: KernelKind,
    sigma: f64,
    x: &Tensor,
    y: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    kernel_product_ragged(kind, sigma, x, y, b, None)
}

/// [`kernel_product`] on a ragged batch stored padded, `lens = (x lengths, y lengths)`: rows
/// `i < x_len[b]` sum columns `j < y_len[b]` only, padding rows are 0. On the CPU no padding
/// pair is visited; on CUDA and Metal it runs padded with the padding masked (same values).
pub(crate) fn kernel_product_ragged(
    kind: KernelKind,
    sigma: f64,
    x: &Tensor,
    y: &Tensor,
    b: &Tensor,
    lens: Option<&Ragged>,
) -> Result<Tensor> {
    if let Some((xl, yl)) = lens {
        if !x.device().is_cpu() {
            let (n, m) = (x.dim(1)?, y.dim(1)?);
            let keep_y = length_mask(yl, m, y.device())?.to_dtype(b.dtype())?; // (B, M)
            let keep_x = length_mask(xl, n, x.device())?.to_dtype(b.dtype())?; // (B, N)
            return kernel_product(kind, sigma, x, y, &(b * keep_y)?)? * keep_x;
        }
    }
    x.contiguous()?.apply_op3(
        &y.contiguous()?,
        &b.contiguous()?,
        KernelProductOp {
            kind,
            sigma,
            lens: lens.cloned(),
        },
    )
}

/// Packed kernel sums `[Σ_c w_c ∇₁k(p_r, q_c), Σ_c w_c k(p_r, q_c)]`.
#[derive(Clone, Debug)]
struct KernelSumsOp {
    kind: KernelKind,
    sigma: f64,
    grad: bool,
    /// Ragged rows and columns (CPU only; the GPU kernel product runs masked).
    lens: Option<Ragged>,
}

impl CustomOp2 for KernelSumsOp {
    fn name(&self) -> &'static str {
        "candle-ot-kernel-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = dims3(l1, "rows")?;
        let (_, m, _) = dims3(l2, "cols")?;
        let od = if self.grad { d + 1 } else { 1 };
        let lens = ragged_slices(self.lens.as_ref(), b, n, m)?;
        let out = with_float!(s1.dtype(), self.name(), |T| {
            let mut out = vec![T::ZERO; b * n * od];
            let (rows, cols) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            cpu::kernel_sums(
                self.kind,
                self.sigma,
                rows,
                cols,
                (n, m, d),
                self.grad,
                lens,
                &mut out,
            );
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
        if self.lens.is_some() {
            candle_core::bail!("candle-ot: ragged kernel sums run masked on CUDA")
        }
        cuda::kernel_sums_fwd(self.kind, self.sigma, self.grad, (s1, l1), (s2, l2))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        if self.lens.is_some() {
            candle_core::bail!("candle-ot: ragged kernel sums run masked on Metal")
        }
        metal::kernel_sums_fwd(self.kind, self.sigma, self.grad, (s1, l1), (s2, l2))
    }
}

fn kernel_sums(
    kind: KernelKind,
    sigma: f64,
    rows: &Tensor,
    cols: &Tensor,
    grad: bool,
    lens: Option<&Ragged>,
) -> Result<Tensor> {
    let op = KernelSumsOp {
        kind,
        sigma,
        grad,
        lens: lens.cloned(),
    };
    rows.contiguous()?
        .apply_op2_no_bwd(&cols.contiguous()?, &op)
}
