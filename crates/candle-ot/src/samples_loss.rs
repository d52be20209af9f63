//! The public front: shapes, weights, dtypes, batches, backend choice.

use crate::cost::{CostKind, KernelKind};
use crate::divergence::{converged_value_interval, sinkhorn_cost, sinkhorn_potentials};
use crate::error::OtError;
use crate::kernel_loss::{hausdorff_loss, kernel_loss};
use crate::options::{Backend, Loss, SamplesLossBuilder, SamplesLossOptions};
use crate::packed::PackedSolution;
use crate::plan::TransportPlan;
use crate::schedule::{
    epsilon_schedule, estimate_diameter, estimate_diameter_weighted, schedule_len, MAX_SCHEDULE_LEN,
};
use crate::sinkhorn::{
    sinkhorn_loop, sinkhorn_loop_ragged, LoopParams, SinkhornDiagnostics, ValueErrorBound,
};
use crate::softmin::multiscale::{
    self, cluster::default_cluster_scale, MultiscaleDiagnostics, MultiscaleParams,
};
use crate::softmin::{Lengths, Online, PointSoftmin, Tensorized};
use candle_core::{DType, Device, Result, Tensor};

/// Losses between weighted point clouds `α = Σ_i a_i δ_{x_i}` and `β = Σ_j b_j δ_{y_j}`,
/// with GeomLoss's options and numbers.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_ot::{Loss, SamplesLoss};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[0.0f64, 0.0], [1.0, 0.0], [0.0, 1.0]], &dev)?; // (N, D)
/// let y = (&x + 0.25)?; // a translated copy
/// let loss = SamplesLoss::builder(Loss::Sinkhorn).blur(0.01).build()?;
/// let s = loss.forward(&x, &y)?.to_scalar::<f64>()?;
/// // For a translation by t and a small blur, S_ε ≈ ½|t|² (p = 2).
/// assert!((s - 0.0625).abs() < 1e-3);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SamplesLoss {
    opts: SamplesLossOptions,
}

impl Default for SamplesLoss {
    /// GeomLoss's `SamplesLoss()`: the debiased Sinkhorn divergence, p = 2, blur 0.05,
    /// scaling 0.5, backend `Auto`.
    fn default() -> Self {
        Self::from_options_unchecked(SamplesLossOptions::default())
    }
}

/// A [`SamplesLoss`] against a fixed target cloud, as a Candle [`Module`](candle_core::Module):
/// see [`SamplesLoss::with_target`].
#[derive(Clone, Debug)]
pub struct TargetLoss {
    loss: SamplesLoss,
    y: Tensor,         // (M, D) or (B, M, D), detached
    b: Option<Tensor>, // (M,) or (B, M), detached
}

impl candle_core::Module for TargetLoss {
    /// The loss between uniform weights on x (N, D) or (B, N, D) and the target: a scalar or
    /// (B,), differentiable in x.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.loss.run(None, x, self.b.as_ref(), &self.y)?.loss)
    }
}

/// Everything [`SamplesLoss::solve`] computes. Tensors have no batch axis when the inputs
/// had none.
#[derive(Clone, Debug)]
pub struct Solution {
    /// The loss: a scalar, or (B,) for batched inputs. Differentiable.
    pub loss: Tensor,
    /// The potential F on x (detached): `f_ba − f_aa` (debiased) or `f_ba`; for kernel losses
    /// `K_xx a − K_xy b`. (N,) or (B, N).
    pub f: Tensor,
    /// The potential G on y (detached). (M,) or (B, M).
    pub g: Tensor,
    /// Raw potential f_ba of OT_ε(α, β) (Sinkhorn only), detached.
    pub f_ba: Option<Tensor>,
    /// Raw potential g_ab of OT_ε(α, β) (Sinkhorn only), detached.
    pub g_ab: Option<Tensor>,
    /// Symmetric potential f_aa of OT_ε(α, α) (debiased Sinkhorn only), detached.
    pub f_aa: Option<Tensor>,
    /// Symmetric potential g_bb of OT_ε(β, β) (debiased Sinkhorn only), detached.
    pub g_bb: Option<Tensor>,
    /// ε = blur^p (Sinkhorn and Hausdorff).
    pub eps: Option<f64>,
    /// The backend that ran (never `Auto`).
    pub backend: Backend,
    /// What the Sinkhorn loop did (Sinkhorn only).
    pub diagnostics: Option<SinkhornDiagnostics>,
    /// What the multiscale backend did (clusters, the jump, the kept blocks); `None` on the
    /// other backends.
    pub multiscale: Option<MultiscaleDiagnostics>,
    /// The dtype the solve ran in: the inputs' (f32 for f16 / bf16), or f64 for an f32 problem
    /// too ill-conditioned for f32 ([`F32_PROMOTION_EXPONENT`]; outputs are f32 all the same).
    pub compute_dtype: DType,
    plan: Option<TransportPlan>,
    /// `C_max = diameter^p / p` over the points of positive weight, for the value certificate
    /// (balanced Sinkhorn only).
    c_max: Option<f64>,
}

/// The size `B·N·M` from which `Backend::Auto` takes the multiscale backend on the CPU (with
/// the other conditions of the auto rule): measured on this project's 2-core machine
/// (docs/performance.md), multiscale at `cluster_scale = blur` is 3× faster than online at
/// N = M = 32k with a loss within 1e-3 of it, and only 1.2× faster (1 % off) at 16k.
pub const AUTO_MULTISCALE_PAIRS: f64 = 1.0e9;

/// The size `B·N·M` from which `Backend::Auto` takes the multiscale backend on a CUDA device:
/// measured on an H100 (docs/performance.md, loss + gradient, f32, D = 3), multiscale at
/// `cluster_scale = blur` is 1.4× faster than online at N = M = 200k (4·10¹⁰ pairs), 2.4× at
/// 300k, 4.8× at 500k and 10.5× at 1M, and 2.3× slower at 100k (its host-side clustering and
/// truncation do not pay there).
pub const AUTO_MULTISCALE_PAIRS_CUDA: f64 = 4.0e10;

/// Where `Backend::Auto` may take the multiscale backend, the size `B·N·M` from which it does:
/// [`AUTO_MULTISCALE_PAIRS`] on the CPU, [`AUTO_MULTISCALE_PAIRS_CUDA`] on CUDA, and `None`
/// on Metal (no crossover measured: `Auto` stays online there).
pub fn auto_multiscale_pairs(device: &Device) -> Option<f64> {
    match device {
        Device::Cpu => Some(AUTO_MULTISCALE_PAIRS),
        Device::Cuda(_) => Some(AUTO_MULTISCALE_PAIRS_CUDA),
        Device::Metal(_) => None,
    }
}

/// Inputs after validation: batched, in the compute dtype.
struct Prepared {
    a: Tensor, // (B, N)
    x: Tensor, // (B, N, D)
    b: Tensor, // (B, M)
    y: Tensor, // (B, M, D)
    batched: bool,
    in_dtype: DType,
    /// The dtype of the outputs (f32 for f16 / bf16 / f32 inputs): the solve runs in f64 when
    /// an f32 problem is promoted ([`F32_PROMOTION_EXPONENT`]).
    out_dtype: DType,
    /// The diameter of the points of x ∪ y with positive weight, over all batch items
    /// (estimated even when one is given).
    diameter: f64,
}

fn shape_err(name: &'static str, expected: impl Into<String>, t: &Tensor) -> candle_core::Error {
    OtError::Shape {
        name,
        expected: expected.into(),
        got: t.dims().to_vec(),
    }
    .into()
}

/// The points after the checks that [`SamplesLoss::solve`] and the sharded solve share.
pub(crate) struct CheckedPoints {
    /// The inputs were (B, N, D) (else (N, D), given a batch axis here).
    pub batched: bool,
    /// x as (B, N, D) in the compute dtype.
    pub x: Tensor,
    /// y as (B, M, D) in the compute dtype.
    pub y: Tensor,
    /// The caller's shapes, for messages.
    pub x_dims: Vec<usize>,
    /// The caller's shape of y.
    pub y_dims: Vec<usize>,
    /// The input dtype.
    pub in_dtype: DType,
    /// The compute dtype: f64, or f32 for f32 / f16 / bf16 inputs.
    pub dtype: DType,
}

/// The checks of x and y shared by [`SamplesLoss::solve`] and the sharded solve: ranks 2 or 3
/// alike, one device, equal batch sizes and dimensions D ≥ 1, float dtypes of one precision
/// (no f64 on Metal), finite coordinates. `rows` names the row counts in messages (`("N",
/// "M")`, or `("N_r", "M_r")` for a rank's shard). Empty clouds pass: the callers decide.
pub(crate) fn check_points(x: &Tensor, y: &Tensor, rows: (&str, &str)) -> Result<CheckedPoints> {
    let (rn, rm) = rows;
    let batched = match (x.rank(), y.rank()) {
        (2, 2) => false,
        (3, 3) => true,
        (2 | 3, _) => {
            return Err(shape_err(
                "y",
                format!("({rm}, D) or (B, {rm}, D) like x {:?}", x.dims()),
                y,
            ))
        }
        _ => return Err(shape_err("x", format!("({rn}, D) or (B, {rn}, D)"), x)),
    };
    if !x.device().same_device(y.device()) {
        return Err(OtError::Mismatch(format!(
            "x and y must be on the same device, got {:?} and {:?}",
            x.device().location(),
            y.device().location()
        ))
        .into());
    }
    // Shapes in messages are the caller's own (no batch axis added for (N, D) inputs).
    let (x_dims, y_dims) = (x.dims().to_vec(), y.dims().to_vec());
    let (x, y) = if batched {
        (x.clone(), y.clone())
    } else {
        (x.unsqueeze(0)?, y.unsqueeze(0)?)
    };
    let (bx, _, d) = x.dims3()?;
    let (by, _, dy) = y.dims3()?;
    if bx != by {
        return Err(OtError::Mismatch(format!(
            "x and y must have the same batch size, got x {x_dims:?} and y {y_dims:?}"
        ))
        .into());
    }
    if d != dy {
        return Err(OtError::Mismatch(format!(
            "x and y must have the same dimension D, got x {x_dims:?} and y {y_dims:?}"
        ))
        .into());
    }
    if d == 0 {
        return Err(OtError::Shape {
            name: "x, y",
            expected: "points of dimension D >= 1".into(),
            got: x_dims,
        }
        .into());
    }
    let in_dtype = x.dtype();
    let dtype = match (x.dtype(), y.dtype()) {
        (DType::F64, DType::F64) => DType::F64,
        (DType::F32 | DType::F16 | DType::BF16, DType::F32 | DType::F16 | DType::BF16) => {
            DType::F32
        }
        (dx, dy) => {
            return Err(OtError::Unsupported(format!(
                "x and y must be floating point of the same precision (f64, or f32/f16/bf16), got {dx:?} and {dy:?}"
            ))
            .into())
        }
    };
    if dtype == DType::F64 && x.device().is_metal() {
        return Err(OtError::Unsupported("f64 on a Metal device (Metal has no f64)".into()).into());
    }
    let x = x.to_dtype(dtype)?;
    let y = y.to_dtype(dtype)?;
    if x.elem_count() > 0 && !all_finite(&x)? {
        return Err(OtError::NonFinite { name: "x" }.into());
    }
    if y.elem_count() > 0 && !all_finite(&y)? {
        return Err(OtError::NonFinite { name: "y" }.into());
    }
    Ok(CheckedPoints {
        batched,
        x,
        y,
        x_dims,
        y_dims,
        in_dtype,
        dtype,
    })
}

/// One weight tensor `w` for `k` points of `pts` (`whose` names them in messages): (k,), or
/// (B, k) for a batch; on the points' device; finite and ≥ 0. Returns (B, k) in the compute
/// dtype.
pub(crate) fn check_weights(
    w: &Tensor,
    name: &'static str,
    pts: &CheckedPoints,
    k: usize,
    whose: &str,
) -> Result<Tensor> {
    let bx = pts.x.dim(0)?;
    let expected = if pts.batched {
        format!("({bx}, {k}) to match {whose}")
    } else {
        format!("({k},) to match {whose}")
    };
    let w = match (pts.batched, w.dims()) {
        (false, [kk]) if *kk == k => w.unsqueeze(0)?,
        (true, [bb, kk]) if *bb == bx && *kk == k => w.clone(),
        _ => return Err(shape_err(name, expected, w)),
    };
    if !w.device().same_device(pts.x.device()) {
        return Err(OtError::Mismatch(format!(
            "{name} must be on the device of the points, got {:?}",
            w.device().location()
        ))
        .into());
    }
    let w = w.to_dtype(pts.dtype)?;
    if w.elem_count() == 0 {
        return Ok(w);
    }
    if !all_finite(&w)? {
        return Err(OtError::NonFinite { name }.into());
    }
    let min = w
        .detach()
        .flatten_all()?
        .min(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if min < 0.0 {
        return Err(OtError::Weights {
            name,
            reason: format!("weights must be >= 0, got a minimum of {min}"),
        }
        .into());
    }
    Ok(w)
}

/// Sum of `t * 0`: NaN when `t` holds a NaN or an infinity. One reduction, one scalar read.
/// The unit roundoff `u` of a float dtype (half an ulp at 1): a sum of `n` values rounded to
/// it is off by up to `n·u` relative.
pub(crate) fn unit_roundoff(dt: DType) -> f64 {
    match dt {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => f64::from(f32::EPSILON) / 2.0,
    }
}

pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    let s = (t.detach() * 0.0)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(s == 0.0)
}

impl SamplesLoss {
    /// The loss with all of GeomLoss's defaults.
    pub fn new(loss: Loss) -> Self {
        Self {
            opts: SamplesLossOptions {
                loss,
                ..Default::default()
            },
        }
    }

    /// A builder for the options.
    pub fn builder(loss: Loss) -> SamplesLossBuilder {
        SamplesLossBuilder::new(loss)
    }

    /// From options, validated.
    pub fn from_options(opts: SamplesLossOptions) -> Result<Self> {
        opts.validate()?;
        opts.warn_ignored();
        Ok(Self { opts })
    }

    pub(crate) fn from_options_unchecked(opts: SamplesLossOptions) -> Self {
        Self { opts }
    }

    /// The options.
    pub fn options(&self) -> &SamplesLossOptions {
        &self.opts
    }

    /// The loss between uniformly weighted clouds: x (N, D) or (B, N, D), y (M, D) or (B, M, D).
    /// Returns a scalar, or (B,).
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.run(None, x, None, y)?.loss)
    }

    /// The loss between weighted clouds: a (N,) or (B, N), x (N, D) or (B, N, D), b and y alike.
    pub fn forward_weighted(
        &self,
        a: &Tensor,
        x: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.run(Some(a), x, Some(b), y)?.loss)
    }

    /// The potentials (F, G), as GeomLoss's `potentials=True` returns them. Weights default to
    /// uniform.
    pub fn potentials(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let s = self.run(a, x, b, y)?;
        Ok((s.f, s.g))
    }

    /// Loss, potentials and diagnostics in one run. Weights default to uniform.
    pub fn solve(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Solution> {
        self.run(a, x, b, y)
    }

    /// The loss of every item of a **packed (ragged) batch**: clouds of different sizes in one
    /// call, as PyTorch's packed sequences. `x` (ΣN_b, D) holds the items' points one after
    /// the other, `x_lengths` their sizes N_b (each ≥ 1); likewise `y` (ΣM_b, D) and
    /// `y_lengths`; `a` (ΣN_b,) and `b` (ΣM_b,) are optional packed weights (default uniform
    /// within each item, `1/N_b`). Returns the loss per item, (B,); gradients flow to the packed
    /// x, y, a and b through Candle's autograd.
    ///
    /// It equals the padded batch call with zero weights on the padding, wherever the padding
    /// points sit, and the per-item calls when they are given the same `diameter` (the ε
    /// schedule follows GeomLoss's batched rule: one diameter over all items, from the points
    /// of positive weight, unless `diameter` is set).
    ///
    /// How it runs: the items are laid out padded, (B, N_max, D), with the per-item lengths
    /// ([`crate::softmin::Lengths`]) handed to the backend. The online backend never visits a
    /// padding pair: on the CPU each item's rows stream over that item's columns only (rayon
    /// balances items of very different sizes), on CUDA and Metal one launch of the
    /// block-sparse kernels covers the batch with one task table of per-item tiles (the kernel
    /// losses run masked there). The tensorized and multiscale backends run the padded batch
    /// with zero weights on the padding (the padding repeats each item's first point, so the
    /// bounding boxes do not change), which gives the same values.
    ///
    /// Errors: `x must be (ΣN_b, D)` when x is not 2-D, `x_lengths` not summing to x's rows or
    /// holding a 0, a different number of items on the two sides, weights of the wrong length.
    pub fn forward_packed(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        x_lengths: &[usize],
        b: Option<&Tensor>,
        y: &Tensor,
        y_lengths: &[usize],
    ) -> Result<Tensor> {
        Ok(self.run_packed(a, x, x_lengths, b, y, y_lengths)?.loss)
    }

    /// [`SamplesLoss::forward_packed`] with everything else the solve computes, packed like the
    /// inputs: the potentials F (ΣN_b,) and G (ΣM_b,), the raw Sinkhorn potentials, the plans
    /// as operators on packed values ([`PackedPlan`](crate::packed::PackedPlan)), and the
    /// padded solution with its diagnostics. Errors as `forward_packed`.
    pub fn solve_packed(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        x_lengths: &[usize],
        b: Option<&Tensor>,
        y: &Tensor,
        y_lengths: &[usize],
    ) -> Result<PackedSolution> {
        let padded = self.run_packed(a, x, x_lengths, b, y, y_lengths)?;
        Ok(PackedSolution {
            loss: padded.loss.clone(),
            f: crate::packed::pack(&padded.f, x_lengths)?,
            g: crate::packed::pack(&padded.g, y_lengths)?,
            x_lengths: x_lengths.to_vec(),
            y_lengths: y_lengths.to_vec(),
            padded,
        })
    }

    /// The padded solve of a packed batch (zero weights on the padding, lengths to the
    /// backend).
    fn run_packed(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        x_lengths: &[usize],
        b: Option<&Tensor>,
        y: &Tensor,
        y_lengths: &[usize],
    ) -> Result<Solution> {
        if x_lengths.len() != y_lengths.len() {
            return Err(OtError::Mismatch(format!(
                "x_lengths has {} items but y_lengths has {}: a packed batch pairs item b of x with item b of y",
                x_lengths.len(),
                y_lengths.len()
            ))
            .into());
        }
        let (a_pad, x_pad) = pad_packed(x, x_lengths, a, ("x", "x_lengths", "a"))?;
        let (b_pad, y_pad) = pad_packed(y, y_lengths, b, ("y", "y_lengths", "b"))?;
        let lens = (Lengths::new(x_lengths), Lengths::new(y_lengths));
        self.run_lens(Some(&a_pad), &x_pad, Some(&b_pad), &y_pad, Some(&lens))
    }

    /// This loss against a fixed target `β = Σ_j b_j δ_{y_j}` (y (M, D) or (B, M, D), b (M,) or
    /// (B, M), default uniform), as a Candle [`Module`](candle_core::Module):
    /// `forward(x)` is `self.forward_weighted(uniform, x, b, y)`. For fitting a cloud to a
    /// target inside a model (`candle_nn`'s `Module`-based layers compose with it); the target
    /// is detached from the graph.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use candle_ot::SamplesLoss;
    /// # fn main() -> candle_core::Result<()> {
    /// let y = Tensor::new(&[[0.0f64, 0.0], [1.0, 0.0]], &Device::Cpu)?; // (M, D)
    /// let fit = SamplesLoss::default().with_target(&y, None);
    /// assert!(fit.forward(&y)?.to_scalar::<f64>()?.abs() < 1e-12);
    /// # Ok(()) }
    /// ```
    pub fn with_target(&self, y: &Tensor, b: Option<&Tensor>) -> TargetLoss {
        TargetLoss {
            loss: self.clone(),
            y: y.detach(),
            b: b.map(Tensor::detach),
        }
    }

    /// The backend `Auto` resolves to on `device` (an error for unavailable combinations).
    pub fn resolve_backend(&self, device: &Device) -> Result<Backend> {
        match self.opts.backend {
            Backend::Auto => Ok(if crate::softmin::online::supports(device) {
                Backend::Online
            } else {
                Backend::Tensorized
            }),
            Backend::Online | Backend::Multiscale if !crate::softmin::online::supports(device) => {
                Err(OtError::Unsupported(format!(
                    "the {} backend's kernels for {:?} are not compiled in: enable candle-ot's \
                     `cuda` / `metal` feature, or use Backend::Tensorized",
                    if self.opts.backend == Backend::Online {
                        "online"
                    } else {
                        "multiscale"
                    },
                    device.location()
                ))
                .into())
            }
            b => Ok(b),
        }
    }

    /// Whether `Auto` takes the multiscale backend: only where it was measured to win and its
    /// accuracy suits the request, i.e. the Sinkhorn loss in f32 (f16/bf16) with GeomLoss's
    /// fixed schedule (no `tol`), D ≤ 3, and `B·N·M` at least the device's measured crossover
    /// ([`auto_multiscale_pairs`]; see docs/performance.md). `Auto` then clusters at
    /// `cluster_scale = blur` unless one is set.
    fn auto_multiscale(&self, p: &Prepared, lens: Option<&(Lengths, Lengths)>) -> Result<bool> {
        let (bsz, n, d) = p.x.dims3()?;
        let m = p.y.dim(1)?;
        // A ragged batch does Σ_b N_b·M_b pairs of work, not B·N_max·M_max.
        let pairs = match lens {
            Some((xl, yl)) => xl
                .as_slice()
                .iter()
                .zip(yl.as_slice())
                .map(|(&n, &m)| n as f64 * m as f64)
                .sum::<f64>(),
            None => (bsz * n) as f64 * m as f64,
        };
        let Some(threshold) = auto_multiscale_pairs(p.x.device()) else {
            return Ok(false);
        };
        Ok(crate::softmin::online::supports(p.x.device())
            && self.opts.loss == Loss::Sinkhorn
            && self.opts.tol.is_none()
            && p.x.dtype() == DType::F32
            && d <= multiscale::MAX_DIM
            && pairs >= threshold)
    }

    fn prepare(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Prepared> {
        let pts = check_points(x, y, ("N", "M"))?;
        let (x, y) = (pts.x.clone(), pts.y.clone());
        let (batched, in_dtype, dtype) = (pts.batched, pts.in_dtype, pts.dtype);
        let (bx, n, _) = x.dims3()?;
        let m = y.dim(1)?;
        if n == 0 || bx == 0 {
            return Err(OtError::Empty {
                name: "x",
                got: pts.x_dims.clone(),
            }
            .into());
        }
        if m == 0 {
            return Err(OtError::Empty {
                name: "y",
                got: pts.y_dims.clone(),
            }
            .into());
        }
        let weights = |w: Option<&Tensor>, name: &'static str, k: usize| -> Result<Tensor> {
            let w = match w {
                None => return Tensor::full(1.0 / k as f64, (bx, k), x.device())?.to_dtype(dtype),
                Some(w) => check_weights(w, name, &pts, k, "the points")?,
            };
            let sums = w.detach().to_dtype(DType::F64)?.sum(1)?.to_vec1::<f64>()?;
            if let Some(i) = sums.iter().position(|s| *s <= 0.0) {
                return Err(OtError::Weights {
                    name,
                    reason: format!(
                        "weights of batch item {i} sum to 0: at least one must be positive"
                    ),
                }
                .into());
            }
            Ok(w)
        };
        // Finite coordinates can still overflow the dtype once squared or divided by ε: the
        // largest cost the loss forms is diameter^p / p (over ε for the softmin losses).
        let diameter = estimate_diameter(&x, &y)?;
        let o = &self.opts;
        let largest = match o.loss {
            Loss::Sinkhorn | Loss::Hausdorff => {
                let pf = o.p as f64;
                (diameter.powf(pf) / pf / o.blur.powf(pf)).max(diameter * diameter)
            }
            _ => diameter * diameter,
        };
        let limit = match dtype {
            DType::F64 => f64::MAX,
            _ => f32::MAX as f64,
        } / 16.0;
        if largest.is_nan() || largest >= limit {
            return Err(OtError::Range(format!(
                "x, y: the clouds span {diameter:e}, so costs reach {largest:e}, beyond what {dtype:?} holds (~{limit:e}); rescale the points (and blur, reach, diameter) or use f64"
            ))
            .into());
        }
        let (a_given, b_given) = (a.is_some(), b.is_some());
        let a = weights(a, "a", n)?;
        let b = weights(b, "b", m)?;
        // The ε schedule and the cluster scale see the points of positive weight only: a
        // zero-weight point changes nothing (GeomLoss counts it, docs/geomloss-differences.md).
        let diameter = estimate_diameter_weighted(&x, &a, &y, &b)?;
        if self.opts.loss == Loss::Sinkhorn && self.opts.reach.is_none() {
            // Masses summed in f64; weights normalised in their own dtype carry its rounding, up
            // to k·u relative for k values (u the unit roundoff), hence 1e-5 + max(N, M)·u.
            let sa = a.detach().to_dtype(DType::F64)?.sum(1)?.to_vec1::<f64>()?;
            let sb = b.detach().to_dtype(DType::F64)?.sum(1)?.to_vec1::<f64>()?;
            let tol = 1e-5 + n.max(m) as f64 * unit_roundoff(in_dtype);
            for (i, (sa, sb)) in sa.iter().zip(&sb).enumerate() {
                if (sa - sb).abs() > tol * sa.max(*sb) {
                    return Err(OtError::Weights {
                        name: "a, b",
                        reason: format!(
                            "balanced OT needs equal total masses (to a relative {tol:.1e}: 1e-5 plus the rounding of {} weights in {in_dtype:?}), got {sa} and {sb} (batch item {i}); normalise the weights or set a reach", n.max(m)
                        ),
                    }
                    .into());
                }
            }
        }
        // An f32 problem whose largest exponent (cost / ε, or the kernel's) is below 1 loses
        // its digits in f32 (exp(−C/ε) ≈ 1 − tiny): solve it in f64 (#17, item 11).
        let promote = dtype == DType::F32
            && !x.device().is_metal()
            && self.opts.largest_exponent(diameter) < F32_PROMOTION_EXPONENT;
        let (a, x, b, y) = if promote {
            // In this regime a mass error δ moves the value by ~εδ, far more than the value
            // itself: uniform weights are rebuilt in f64, and for balanced Sinkhorn b is
            // rescaled to a's mass (they agree within the rounding the mass check allows).
            let f = |t: &Tensor| t.to_dtype(DType::F64);
            let uniform = |k: usize| Tensor::full(1.0 / k as f64, (bx, k), x.device());
            let a64 = if a_given { f(&a)? } else { uniform(n)? };
            let mut b64 = if b_given { f(&b)? } else { uniform(m)? };
            if self.opts.loss == Loss::Sinkhorn && self.opts.reach.is_none() {
                let ratio = (a64.sum_keepdim(1)? / b64.sum_keepdim(1)?)?; // (B, 1)
                b64 = b64.broadcast_mul(&ratio)?;
            }
            (a64, f(&x)?, b64, f(&y)?)
        } else {
            (a, x, b, y)
        };
        Ok(Prepared {
            a,
            x,
            b,
            y,
            batched,
            in_dtype,
            out_dtype: dtype,
            diameter,
        })
    }

    fn run(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Solution> {
        self.run_lens(a, x, b, y, None)
    }

    /// [`Self::run`], for a ragged batch stored padded when `lens` is given (zero weights on the
    /// padding; the backends that know lengths skip it).
    fn run_lens(
        &self,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
        lens: Option<&(Lengths, Lengths)>,
    ) -> Result<Solution> {
        let prep = self.prepare(a, x, b, y)?;
        let mut backend = self.resolve_backend(prep.x.device())?;
        if self.opts.backend == Backend::Auto && self.auto_multiscale(&prep, lens)? {
            backend = Backend::Multiscale;
        }
        let cost = CostKind::from_p(self.opts.p).expect("validated p");
        let mut sol = match backend {
            Backend::Tensorized => self.run_with(&Tensorized { cost }, backend, &prep, lens)?,
            Backend::Online => self.run_with(&Online { cost }, backend, &prep, lens)?,
            // Multiscale solves the Sinkhorn loss (see `run_with`); the other losses are
            // computed exactly by the online backend, and say so in `Solution::backend`.
            Backend::Multiscale if self.opts.loss == Loss::Sinkhorn => {
                self.run_with(&Online { cost }, backend, &prep, lens)?
            }
            Backend::Multiscale => self.run_with(&Online { cost }, Backend::Online, &prep, lens)?,
            Backend::Auto => unreachable!("resolved above"),
        };
        if !prep.batched {
            sol.loss = sol.loss.squeeze(0)?;
            sol.f = sol.f.squeeze(0)?;
            sol.g = sol.g.squeeze(0)?;
            for t in [&mut sol.f_ba, &mut sol.g_ab, &mut sol.f_aa, &mut sol.g_bb]
                .into_iter()
                .flatten()
            {
                *t = t.squeeze(0)?;
            }
        }
        if sol.loss.dtype() != prep.in_dtype {
            sol.loss = sol.loss.to_dtype(prep.in_dtype)?;
        }
        for t in [&mut sol.f, &mut sol.g].into_iter().chain(
            [&mut sol.f_ba, &mut sol.g_ab, &mut sol.f_aa, &mut sol.g_bb]
                .into_iter()
                .flatten(),
        ) {
            *t = t.to_dtype(prep.out_dtype)?;
        }
        Ok(sol)
    }

    fn run_with<S: PointSoftmin>(
        &self,
        backend: &S,
        resolved: Backend,
        p: &Prepared,
        lens: Option<&(Lengths, Lengths)>,
    ) -> Result<Solution> {
        let o = &self.opts;
        let lens_ref = lens.map(|(xl, yl)| (xl, yl));
        let pf = o.p as f64;
        let eps = o.blur.powf(pf);
        let rho = o.reach.map(|r| r.powf(pf));
        let log = |w: &Tensor| w.detach().log(); // log 0 = −∞: zero weights are masked.
        let solution = |loss, f: Tensor, g: Tensor, eps, diagnostics| Solution {
            loss,
            f,
            g,
            f_ba: None,
            g_ab: None,
            f_aa: None,
            g_bb: None,
            eps,
            backend: resolved,
            diagnostics,
            multiscale: None,
            compute_dtype: p.x.dtype(),
            plan: None,
            c_max: None,
        };
        match o.loss {
            Loss::Sinkhorn => {
                let diameter = o.diameter.unwrap_or(p.diameter);
                let len = schedule_len(o.p, diameter, o.blur, o.scaling);
                if len > MAX_SCHEDULE_LEN as f64 {
                    return Err(OtError::Option {
                        name: "scaling",
                        reason: format!(
                            "the ε schedule from diameter {diameter:e} down to blur {:e} with scaling {} would take {len:e} steps (at most {MAX_SCHEDULE_LEN}); raise blur or lower scaling",
                            o.blur, o.scaling
                        ),
                    }
                    .into());
                }
                let params = LoopParams {
                    eps_list: epsilon_schedule(o.p, diameter, o.blur, o.scaling),
                    rho,
                    debias: o.debias,
                    tol: o.tol,
                    max_iter: o.max_iter,
                    acceleration: o.acceleration,
                    observer: o.observer.clone(),
                };
                let (log_a, log_b) = (log(&p.a)?, log(&p.b)?);
                let mut ms_diag = None;
                let mut fell_back = false;
                let (pot, diag) = if resolved == Backend::Multiscale {
                    let ms = MultiscaleParams {
                        cost: CostKind::from_p(o.p).expect("validated p"),
                        truncate: o.truncate,
                        // `Auto` clusters at the blur (measured faster and closer to the
                        // online value than GeomLoss's 2000 cells, docs/performance.md).
                        cluster_scale: o.cluster_scale.unwrap_or_else(|| {
                            if o.backend == Backend::Auto {
                                o.blur
                            } else {
                                default_cluster_scale(diameter, p.x.dim(2).unwrap_or(1))
                            }
                        }),
                        setup_on_device: false,
                    };
                    let (pot, diag, mut msd) =
                        crate::multiscale::solve(ms, &p.x, &p.a, &p.y, &p.b, &params)?;
                    match o.tol {
                        // With `tol` the caller asks for the converged value: check the
                        // truncated solve against one exact update, and fall back to the online
                        // backend when the truncation kept the wrong pairs (#17, item 10).
                        Some(tol) => {
                            let online = Online {
                                cost: CostKind::from_p(o.p).expect("validated p"),
                            };
                            let err = exact_update_error(
                                &online, eps, &p.x, &p.y, &log_a, &log_b, &pot, rho,
                            )?;
                            msd.exact_update_error = Some(err);
                            if diag.converged == Some(true)
                                && err <= (10.0 * tol).max(MULTISCALE_EXACT_CHECK)
                            {
                                ms_diag = Some(msd);
                                (pot, diag)
                            } else {
                                tracing::warn!(
                                    target: "candle_ot",
                                    "multiscale with tol: exact update error {err:.3e} after the truncated solve (converged: {:?}); solving on the online backend instead",
                                    diag.converged
                                );
                                msd.fell_back_to_online = true;
                                ms_diag = Some(msd);
                                fell_back = true;
                                sinkhorn_loop(&online, &p.x, &p.y, &log_a, &log_b, &params)?
                            }
                        }
                        None => {
                            ms_diag = Some(msd);
                            (pot, diag)
                        }
                    }
                } else if let Some((xl, yl)) = lens {
                    sinkhorn_loop_ragged(backend, &p.x, xl, &p.y, yl, &log_a, &log_b, &params)?
                } else {
                    sinkhorn_loop(backend, &p.x, &p.y, &log_a, &log_b, &params)?
                };
                let loss = sinkhorn_cost(&p.a, &p.b, &pot, eps, rho)?;
                let (f, g) = sinkhorn_potentials(&pot)?;
                let mut sol = solution(loss, f.detach(), g.detach(), Some(eps), Some(diag));
                sol.multiscale = ms_diag;
                if fell_back {
                    sol.backend = Backend::Online;
                }
                sol.f_ba = Some(pot.f_ba.detach());
                sol.g_ab = Some(pot.g_ab.detach());
                sol.f_aa = pot.f_aa.map(|t| t.detach());
                sol.g_bb = pot.g_bb.map(|t| t.detach());
                sol.plan = Some(TransportPlan {
                    cost: CostKind::from_p(o.p).expect("validated p"),
                    eps,
                    backend: resolved,
                    x: p.x.detach(),
                    y: p.y.detach(),
                    log_a,
                    log_b,
                    f_ba: pot.f_ba.detach(),
                    g_ab: pot.g_ab.detach(),
                    batched: p.batched,
                    lengths: lens.cloned(),
                    out_dtype: p.out_dtype,
                });
                if rho.is_none() {
                    sol.c_max = Some(p.diameter.powf(o.p as f64) / o.p as f64);
                }
                if let (Some(tol), Some(d)) = (o.tol, sol.diagnostics.as_ref()) {
                    if o.require_convergence && d.converged == Some(false) {
                        return Err(OtError::NotConverged {
                            iterations: d.extra_iterations,
                            update_error: d.update_error,
                            tol,
                            stopped: d.stopped,
                        }
                        .into());
                    }
                    // With tol the certifying passes (six for the bound, two for the marginal
                    // error) are cheap next to the iterations.
                    let bound = sol.value_error_bound_batched(true)?;
                    let marginal = sol.marginal_error_batched()?;
                    if let Some(d) = sol.diagnostics.as_mut() {
                        d.value_error_bound = bound;
                        d.marginal_error = marginal;
                    }
                }
                if let Some(w) = sol.diagnostics.as_ref().and_then(|d| d.accuracy_warning()) {
                    warn_rate_limited(&w);
                }
                Ok(sol)
            }
            Loss::Hausdorff => {
                let (loss, f, g) = hausdorff_loss(
                    backend,
                    eps,
                    rho,
                    o.exact_hausdorff_gradient,
                    (&p.a, &p.x, &log(&p.a)?),
                    (&p.b, &p.y, &log(&p.b)?),
                    lens_ref,
                )?;
                Ok(solution(loss, f, g, Some(eps), None))
            }
            Loss::Energy | Loss::Gaussian | Loss::Laplacian => {
                let kind = match o.loss {
                    Loss::Energy => KernelKind::Energy,
                    Loss::Gaussian => KernelKind::Gaussian,
                    _ => KernelKind::Laplacian,
                };
                let (loss, f, g) =
                    kernel_loss(backend, kind, o.blur, &p.a, &p.x, &p.b, &p.y, lens_ref)?;
                Ok(solution(loss, f, g, None, None))
            }
        }
    }
}

/// A packed cloud `p` (ΣN_b, D) with `lengths` and optional packed weights `w` (ΣN_b,) as a
/// padded batch: weights (B, N_max) with zeros on the padding, points (B, N_max, D) padded
/// with each item's first point. Differentiable in `p` and `w`. `names`: (points, lengths,
/// weights) for the errors.
fn pad_packed(
    p: &Tensor,
    lengths: &[usize],
    w: Option<&Tensor>,
    names: (&'static str, &'static str, &'static str),
) -> Result<(Tensor, Tensor)> {
    let (pn, ln, wn) = names;
    if p.rank() != 2 {
        return Err(OtError::Shape {
            name: pn,
            expected: "(ΣN_b, D), the items' points one after the other".into(),
            got: p.dims().to_vec(),
        }
        .into());
    }
    let total: usize = lengths.iter().sum();
    if lengths.is_empty() || lengths.contains(&0) || total != p.dim(0)? {
        return Err(OtError::Mismatch(format!(
            "{ln} must hold one size ≥ 1 per item, summing to the {} rows of {pn}; got {lengths:?} (sum {total})",
            p.dim(0)?
        ))
        .into());
    }
    if let Some(w) = w {
        if w.dims() != [total] {
            return Err(OtError::Shape {
                name: wn,
                expected: format!("({total},), one weight per packed point of {pn}"),
                got: w.dims().to_vec(),
            }
            .into());
        }
    }
    let n_max = *lengths.iter().max().expect("non-empty");
    let (mut points, mut weights, mut off) = (Vec::new(), Vec::new(), 0usize);
    for &n in lengths {
        let item = p.narrow(0, off, n)?; // (N_b, D)
        let wi = match w {
            Some(w) => w.narrow(0, off, n)?,
            None => Tensor::full(1.0 / n as f64, n, p.device())?.to_dtype(p.dtype())?,
        }; // (N_b,)
        let (item, wi) = if n < n_max {
            let pad = item.narrow(0, 0, 1)?.repeat((n_max - n, 1))?; // (N_max − N_b, D)
            let zeros = Tensor::zeros(n_max - n, wi.dtype(), p.device())?;
            (
                Tensor::cat(&[&item, &pad], 0)?,
                Tensor::cat(&[&wi, &zeros], 0)?,
            )
        } else {
            (item, wi)
        };
        points.push(item);
        weights.push(wi);
        off += n;
    }
    Ok((Tensor::stack(&weights, 0)?, Tensor::stack(&points, 0)?)) // (B, N_max), (B, N_max, D)
}

/// f32 problems are solved in f64 when the largest exponent the loss forms is below this
/// value: `diameter^p / (p ε)` for Sinkhorn and Hausdorff, `diameter² / (2σ²)` for the gaussian
/// kernel, `diameter / σ` for the laplacian (the energy kernel has no scale). There every
/// `exp(−C/ε)` is within a factor e of 1, the value lives in its deviations from 1, and f32
/// keeps about `1e-7 / exponent` of it: measured 1e-5 to 1e-4 relative at an exponent of 0.06
/// and every digit lost at 1e-5 (docs/reliability.md). Above it f32 stays within 1e-5 of f64.
/// Not on Metal (no f64 there).
pub const F32_PROMOTION_EXPONENT: f64 = 1.0;

impl SamplesLossOptions {
    /// The largest exponent the loss forms on data of this diameter (see
    /// [`F32_PROMOTION_EXPONENT`]); ∞ for the energy kernel.
    pub(crate) fn largest_exponent(&self, diameter: f64) -> f64 {
        let pf = self.p as f64;
        match self.loss {
            Loss::Sinkhorn | Loss::Hausdorff => diameter.powf(pf) / pf / self.blur.powf(pf),
            Loss::Gaussian => diameter * diameter / (2.0 * self.blur * self.blur),
            Loss::Laplacian => diameter / self.blur,
            Loss::Energy => f64::INFINITY,
        }
    }
}

/// The bound of [`ValueErrorBound`] from the values (B,) and the certified intervals.
fn value_error_bound(values: &[f64], interval: &[(f64, f64)]) -> ValueErrorBound {
    let (mut absolute, mut relative) = (0.0f64, 0.0f64);
    for (v, (lo, hi)) in values.iter().zip(interval) {
        let e = (v - lo).abs().max((hi - v).abs());
        let e = if e.is_nan() { f64::INFINITY } else { e };
        absolute = absolute.max(e);
        relative = relative.max(if e == 0.0 { 0.0 } else { e / v.abs() });
    }
    ValueErrorBound { absolute, relative }
}

/// Emits an accuracy warning through `tracing`: the first one of the process at `WARN`, the
/// next ones at `DEBUG`, as Python's `warnings` shows a warning once per location (a training
/// loop would otherwise repeat it every step). [`SinkhornDiagnostics::accuracy_warning`] gives
/// it for every call.
fn warn_rate_limited(msg: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!(target: "candle_ot", "{msg}");
    } else {
        tracing::warn!(target: "candle_ot", "{msg} (later warnings of this kind are logged at DEBUG level)");
    }
}

/// The largest exact update error `max |f̃ − f|/ε` (about the largest relative marginal error
/// of one point) that a multiscale solve with `tol` may keep: above it the truncation dropped
/// pairs that carry more than ~1 % of some point's mass, and the online backend solves the
/// problem instead. Below it the value keeps the truncation's own error (≤ 3.3e-3 relative on
/// the test clouds; docs/guide.md, "The multiscale backend").
pub const MULTISCALE_EXACT_CHECK: f64 = 1e-2;

/// `max |f̃ − f| / ε` over the potentials of one exact update (the online softmin, every pair):
/// `f̃_ba = λ smin(C_xy, log b + g_ab/ε)`, `g̃_ab = λ smin(C_yx, log a + f_ba/ε)` and the symmetric
/// ones, `λ = 1/(1 + ε/ρ)`. Rows of zero weight are left out (their potentials do not enter the
/// value).
#[allow(clippy::too_many_arguments)]
fn exact_update_error(
    online: &Online,
    eps: f64,
    x: &Tensor,
    y: &Tensor,
    log_a: &Tensor,
    log_b: &Tensor,
    pot: &crate::sinkhorn::DualPotentials,
    rho: Option<f64>,
) -> Result<f64> {
    use crate::softmin::Softmin;
    let lam = crate::schedule::dampening(eps, rho);
    let err = |p: &Tensor, q: &Tensor, h: &Tensor, f: &Tensor, log_w: &Tensor| -> Result<f64> {
        let ft = (online.softmin_no_grad(eps, &online.cost(p, q)?, h)? * lam)?;
        // Masked rows (log weight −∞) are excluded.
        let keep = log_w.ne(f64::NEG_INFINITY)?;
        let d = ((ft - f)?.abs()? / eps)?;
        let d = keep.where_cond(&d, &d.zeros_like()?)?;
        d.flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    };
    let mut e = err(x, y, &(log_b + (&pot.g_ab / eps)?)?, &pot.f_ba, log_a)?;
    e = e.max(err(y, x, &(log_a + (&pot.f_ba / eps)?)?, &pot.g_ab, log_b)?);
    if let Some(f_aa) = &pot.f_aa {
        e = e.max(err(x, x, &(log_a + (f_aa / eps)?)?, f_aa, log_a)?);
    }
    if let Some(g_bb) = &pot.g_bb {
        e = e.max(err(y, y, &(log_b + (g_bb / eps)?)?, g_bb, log_b)?);
    }
    Ok(if e.is_nan() { f64::INFINITY } else { e })
}

impl Solution {
    /// The entropic transport plan of `OT_ε(α, β)` (Sinkhorn losses only), as streaming
    /// operators: see [`TransportPlan`].
    pub fn plan(&self) -> Result<&TransportPlan> {
        self.plan.as_ref().ok_or_else(|| {
            OtError::Unsupported("a transport plan exists for the sinkhorn loss only".into()).into()
        })
    }

    /// A certified bound on how far [`Solution::loss`] may be from the converged divergence
    /// (balanced Sinkhorn only; `None` otherwise): see [`ValueErrorBound`] for the interval and
    /// its proof. It costs six exact softmin passes over all pairs (two per OT term, on the
    /// online backend for a multiscale solve). With `tol`, [`SinkhornDiagnostics`] already
    /// holds it; with GeomLoss's fixed schedule it is computed only here, on demand.
    pub fn value_error_bound(&self) -> Result<Option<ValueErrorBound>> {
        if let Some(b) = self.diagnostics.as_ref().and_then(|d| d.value_error_bound) {
            return Ok(Some(b));
        }
        let batched = self.plan.as_ref().is_none_or(|p| p.batched);
        self.value_error_bound_batched(batched)
    }

    /// [`Solution::value_error_bound`]; `batched`: whether the loss and potentials have their
    /// batch axis (inside `run_with` they always do).
    fn value_error_bound_batched(&self, batched: bool) -> Result<Option<ValueErrorBound>> {
        let (Some(c_max), Some(plan)) = (self.c_max, self.plan.as_ref()) else {
            return Ok(None);
        };
        let batch = |t: &Tensor| {
            if batched {
                Ok(t.clone())
            } else {
                t.unsqueeze(0)
            }
        };
        let loss = batch(&self.loss)?;
        let batch = |t: &Option<Tensor>| t.as_ref().map(batch).transpose();
        let pot = crate::sinkhorn::DualPotentials {
            f_ba: plan.f_ba.clone(),
            g_ab: plan.g_ab.clone(),
            f_aa: batch(&self.f_aa)?,
            g_bb: batch(&self.g_bb)?,
        };
        let (xa, yb) = ((&plan.x, &plan.log_a), (&plan.y, &plan.log_b));
        let interval = match plan.backend {
            Backend::Tensorized => {
                let t = Tensorized { cost: plan.cost };
                converged_value_interval(&t, plan.eps, c_max, xa, yb, &pot, None)?
            }
            _ => {
                let t = Online { cost: plan.cost };
                let lens = plan.lengths.as_ref();
                converged_value_interval(&t, plan.eps, c_max, xa, yb, &pot, lens)?
            }
        };
        let values = loss.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(Some(value_error_bound(&values, &interval)))
    }

    /// The L1 marginal error of the returned plan, `‖π 1 − a‖₁ + ‖πᵀ 1 − b‖₁` (units of mass),
    /// the largest over the batch; balanced Sinkhorn only (`None` otherwise). Two passes over
    /// all pairs; with `tol`, [`SinkhornDiagnostics::marginal_error`] already holds it.
    ///
    /// At a stop with update error `u < tol`, the plan of the previous iterate had marginals
    /// within a factor `e^{±u}` of a and b, so each L1 error was at most `(e^u − 1)` times the
    /// mass; the returned plan is one update further (measured in docs/guide.md, "When to set
    /// `tol`").
    pub fn marginal_error(&self) -> Result<Option<f64>> {
        if let Some(m) = self.diagnostics.as_ref().and_then(|d| d.marginal_error) {
            return Ok(Some(m));
        }
        self.marginal_error_batched()
    }

    fn marginal_error_batched(&self) -> Result<Option<f64>> {
        let (Some(_), Some(plan)) = (self.c_max, self.plan.as_ref()) else {
            return Ok(None);
        };
        plan.marginal_error().map(Some)
    }

    /// Soft transfer of values through the plan:
    /// `out_i = Σ_j π_ij v_j / a_i = Σ_j b_j exp((f_ba,i + g_ab,j − C(x_i, y_j)) / ε) v_j`,
    /// from the raw potentials f_ba, g_ab (never the debiased F, G).
    /// v (M, K) or (B, M, K) → (N, K) or (B, N, K). See [`TransportPlan::transfer`].
    pub fn transfer(&self, v: &Tensor) -> Result<Tensor> {
        self.plan()?.transfer(v)
    }
}
