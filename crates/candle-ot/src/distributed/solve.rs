//! The sharded front: [`SamplesLoss::solve_sharded`] and [`SamplesLoss::forward_sharded`].
//!
//! The same checks, weights, ε schedule and values as [`SamplesLoss::solve`], computed from
//! shards with the collectives of [`Collective`]: the global counts, weight sums and bounding
//! boxes are all-reduced, every decision (errors included) is taken from global values, so
//! every rank takes it.

use super::{gather_rows, shard_counts, Collective, ReduceOp, Sharded};
use crate::cost::{CostKind, KernelKind};
use crate::divergence::{scal, sinkhorn_cost, sinkhorn_potentials};
use crate::error::OtError;
use crate::kernel_loss::hausdorff_loss;
use crate::options::{Backend, Loss};
use crate::plan::TransportPlan;
use crate::samples_loss::{check_points, check_weights, unit_roundoff, F32_PROMOTION_EXPONENT};
use crate::schedule::{epsilon_schedule, schedule_len, MAX_SCHEDULE_LEN};
use crate::sinkhorn::{sinkhorn_loop, LoopParams, SinkhornDiagnostics};
use crate::softmin::{Online, PointSoftmin, Tensorized};
use crate::SamplesLoss;
use candle_core::{DType, Result, Tensor};

/// What [`SamplesLoss::solve_sharded`] returns on each rank: the global loss and this rank's
/// shards of everything else. Tensors have no batch axis when the inputs had none.
#[derive(Clone, Debug)]
pub struct ShardedSolution {
    /// The loss over all ranks (the same value on every rank): a scalar, or (B,).
    /// Differentiable with respect to this rank's x, y, a and b, with the single-process
    /// gradients of those rows.
    pub loss: Tensor,
    /// This rank's rows of the potential F on x (detached): (N_r,) or (B, N_r).
    pub f: Tensor,
    /// This rank's rows of the potential G on y (detached): (M_r,) or (B, M_r).
    pub g: Tensor,
    /// This rank's rows of f_ba (Sinkhorn only), detached.
    pub f_ba: Option<Tensor>,
    /// This rank's rows of g_ab (Sinkhorn only), detached.
    pub g_ab: Option<Tensor>,
    /// This rank's rows of f_aa (debiased Sinkhorn only), detached.
    pub f_aa: Option<Tensor>,
    /// This rank's rows of g_bb (debiased Sinkhorn only), detached.
    pub g_bb: Option<Tensor>,
    /// ε = blur^p (Sinkhorn and Hausdorff).
    pub eps: Option<f64>,
    /// The backend that ran on each rank (online or tensorized).
    pub backend: Backend,
    /// What the loop did (Sinkhorn only): the single-process diagnostics (the update error is
    /// the maximum over the ranks).
    pub diagnostics: Option<SinkhornDiagnostics>,
    /// The dtype the solve ran in (see [`crate::Solution::compute_dtype`]).
    pub compute_dtype: DType,
    /// The number of ranks P.
    pub ranks: usize,
    /// The rows of x this rank owns, as indices into the concatenation of every rank's x.
    pub x_rows: std::ops::Range<usize>,
    /// The rows of y this rank owns.
    pub y_rows: std::ops::Range<usize>,
    plan: Option<ShardedPlan>,
}

impl ShardedSolution {
    /// The entropic transport plan of `OT_ε(α, β)` (Sinkhorn only), sharded: see
    /// [`ShardedPlan`].
    pub fn plan(&self) -> Result<&ShardedPlan> {
        self.plan.as_ref().ok_or_else(|| {
            OtError::Unsupported("a transport plan exists for the sinkhorn loss only".into()).into()
        })
    }
}

/// The plan `π_ij = a_i b_j exp((f_ba,i + g_ab,j − C(x_i, y_j))/ε)` of a sharded solve as
/// streaming operators on sharded values: [`TransportPlan`]'s operators where every rank owns
/// the rows of x and y it solved for. Operators that take values on the other cloud all-gather
/// them first (collective: every rank calls them in the same order); the others are local.
#[derive(Clone, Debug)]
pub struct ShardedPlan {
    /// The rank's rows of x against every y (columns gathered at the solve).
    rows: TransportPlan,
    /// The rank's rows of y against every x: the transposed plan.
    cols: TransportPlan,
    /// Every rank's rows of x and of y.
    x_counts: Vec<usize>,
    y_counts: Vec<usize>,
}

impl ShardedPlan {
    /// ε of the plan.
    pub fn eps(&self) -> f64 {
        self.rows.eps()
    }

    /// Applies `plan` to values sharded like its columns: `v` this rank's (K_r, C) or
    /// (B, K_r, C), gathered over `counts`. Rows: 0 on this rank gives (…, 0, C).
    fn through(
        plan: &TransportPlan,
        comm: &dyn Collective,
        v: &Tensor,
        counts: &[usize],
        name: &'static str,
        op: impl Fn(&TransportPlan, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let me = counts[comm.rank()];
        let shaped = |t: Tensor| if plan.batched { Ok(t) } else { t.squeeze(0) };
        let vb = match plan.batched {
            false if v.rank() == 2 => v.unsqueeze(0)?,
            true if v.rank() == 3 => v.clone(),
            _ => {
                return Err(OtError::Shape {
                    name,
                    expected: format!("({me}, K) or (B, {me}, K), this rank's rows"),
                    got: v.dims().to_vec(),
                }
                .into())
            }
        };
        let v_all = gather_rows(comm, &vb.to_dtype(plan.x.dtype())?, counts)?; // (B, K, C)
        let (b, n, _) = plan.x.dims3()?;
        if n == 0 {
            let c = v_all.dim(2)?;
            return shaped(Tensor::zeros((b, 0, c), plan.out_dtype, plan.x.device())?);
        }
        op(plan, &shaped(v_all)?)
    }

    /// `(π v)_i = Σ_j π_ij v_j` for this rank's rows i: v this rank's rows of values on y,
    /// (M_r, K) or (B, M_r, K) → (N_r, K) or (B, N_r, K). Collective.
    pub fn apply(&self, comm: &dyn Collective, v: &Tensor) -> Result<Tensor> {
        Self::through(&self.rows, comm, v, &self.y_counts, "v", |p, v| p.apply(v))
    }

    /// `(πᵀ u)_j = Σ_i π_ij u_i` for this rank's rows j of y: u (N_r, K) or (B, N_r, K) →
    /// (M_r, K) or (B, M_r, K). Collective.
    pub fn apply_transpose(&self, comm: &dyn Collective, u: &Tensor) -> Result<Tensor> {
        Self::through(&self.cols, comm, u, &self.x_counts, "u", |p, u| p.apply(u))
    }

    /// Soft transfer `Σ_j π_ij v_j / a_i` for this rank's rows: v (M_r, K) or (B, M_r, K) →
    /// (N_r, K) or (B, N_r, K). Collective.
    pub fn transfer(&self, comm: &dyn Collective, v: &Tensor) -> Result<Tensor> {
        Self::through(&self.rows, comm, v, &self.y_counts, "v", |p, v| {
            p.transfer(v)
        })
    }

    /// The barycentric map of this rank's points of x, (N_r, D) or (B, N_r, D). Local.
    pub fn barycentric_map(&self) -> Result<Tensor> {
        let (b, n, d) = self.rows.x.dims3()?;
        if n == 0 {
            let t = Tensor::zeros((b, 0, d), self.rows.out_dtype, self.rows.x.device())?;
            return if self.rows.batched {
                Ok(t)
            } else {
                t.squeeze(0)
            };
        }
        self.rows.barycentric_map()
    }

    /// Row masses `Σ_j π_ij` of this rank's rows, (N_r,) or (B, N_r). Local.
    pub fn row_marginal(&self) -> Result<Tensor> {
        Self::marginal(&self.rows)
    }

    /// Column masses `Σ_i π_ij` of this rank's rows of y, (M_r,) or (B, M_r). Local.
    pub fn col_marginal(&self) -> Result<Tensor> {
        Self::marginal(&self.cols)
    }

    fn marginal(plan: &TransportPlan) -> Result<Tensor> {
        let (b, n, _) = plan.x.dims3()?;
        if n == 0 {
            let t = Tensor::zeros((b, 0), plan.out_dtype, plan.x.device())?;
            return if plan.batched { Ok(t) } else { t.squeeze(0) };
        }
        plan.row_marginal()
    }

    /// `‖π 1 − a‖₁ + ‖πᵀ 1 − b‖₁` over all ranks, the largest over the batch (units of mass):
    /// [`TransportPlan::marginal_error`] of the whole plan. Collective (one all-reduce).
    pub fn marginal_error(&self, comm: &dyn Collective) -> Result<f64> {
        let l1 = |plan: &TransportPlan| -> Result<Vec<f64>> {
            let (b, n, _) = plan.x.dims3()?;
            if n == 0 {
                return Ok(vec![0.0; b]);
            }
            let m = Self::marginal(plan)?.to_dtype(DType::F64)?;
            let m = if plan.batched { m } else { m.unsqueeze(0)? }; // (B, N_r)
            let w = plan.log_a.exp()?.to_dtype(DType::F64)?; // (B, N_r)
            (m - w)?.abs()?.sum(1)?.to_vec1::<f64>()
        };
        let (r, c) = (l1(&self.rows)?, l1(&self.cols)?);
        let local: Vec<f64> = r.iter().zip(&c).map(|(r, c)| r + c).collect();
        let all = comm.all_reduce(&local, ReduceOp::Sum)?;
        Ok(all.into_iter().fold(0.0, f64::max))
    }
}

/// The inputs after the collective checks: batched, in the compute dtype.
struct Prepared {
    a: Tensor, // (B, N_r)
    x: Tensor, // (B, N_r, D)
    b: Tensor, // (B, M_r)
    y: Tensor, // (B, M_r, D)
    batched: bool,
    in_dtype: DType,
    out_dtype: DType,
    /// The diameter of the points of positive weight over every rank.
    diameter: f64,
    x_counts: Vec<usize>,
    y_counts: Vec<usize>,
}

/// What one rank checks alone: shapes, dtypes, finiteness, signs.
struct Local {
    a: Option<Tensor>, // (B, N_r)
    x: Tensor,         // (B, N_r, D)
    b: Option<Tensor>, // (B, M_r)
    y: Tensor,         // (B, M_r, D)
    batched: bool,
    in_dtype: DType,
    dtype: DType,
}

/// Every rank learns whether any rank's `local` is an error; if one is, every rank returns an
/// error (its own, or one naming the first refusing rank), so none waits in a collective.
fn agree<T>(comm: &dyn Collective, local: Result<T>) -> Result<T> {
    let p = comm.size();
    let code = if local.is_err() { comm.rank() } else { p };
    let first = comm.all_reduce(&[code as f64], ReduceOp::Min)?[0] as usize;
    match local {
        Err(e) => Err(e),
        Ok(_) if first < p => Err(OtError::Mismatch(format!(
            "rank {first} of {p} refused its input (its error says why); every rank stops"
        ))
        .into()),
        Ok(v) => Ok(v),
    }
}

/// Checks that `values` (named) are equal on every rank: one all-reduce max of ±values.
fn same_everywhere(comm: &dyn Collective, names: &[&str], values: &[f64]) -> Result<()> {
    let mut v = values.to_vec();
    v.extend(values.iter().map(|x| -x));
    let r = comm.all_reduce(&v, ReduceOp::Max)?;
    let k = values.len();
    for (i, name) in names.iter().enumerate() {
        let (hi, lo) = (r[i], -r[k + i]);
        if hi != lo {
            return Err(OtError::Mismatch(format!(
                "every rank must pass the same {name}: it ranges over [{lo}, {hi}] across the {} ranks",
                comm.size()
            ))
            .into());
        }
    }
    Ok(())
}

/// The bounding box (lo, hi) per coordinate of the rows of `pts` (B, K, D) where `w` (B, K) is
/// positive (every row without `w`), in f64; (+∞, −∞) with no such row.
fn local_box(pts: &Tensor, w: Option<&Tensor>) -> Result<(Vec<f64>, Vec<f64>)> {
    let d = pts.dim(2)?;
    let flat = pts.detach().to_dtype(DType::F64)?.reshape(((), d))?; // (B·K, D)
    let (lo, hi) = (vec![f64::INFINITY; d], vec![f64::NEG_INFINITY; d]);
    if flat.dim(0)? == 0 {
        return Ok((lo, hi));
    }
    let rows = flat.to_vec2::<f64>()?;
    let keep = match w {
        Some(w) => w
            .detach()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|v| v > 0.0)
            .collect(),
        None => vec![true; rows.len()],
    };
    let (mut lo, mut hi) = (lo, hi);
    for (r, k) in rows.iter().zip(keep) {
        if k {
            for ((l, h), v) in lo.iter_mut().zip(hi.iter_mut()).zip(r) {
                *l = l.min(*v);
                *h = h.max(*v);
            }
        }
    }
    Ok((lo, hi))
}

/// The diagonal of the bounding box of every rank's rows of x ∪ y (of positive weight when the
/// weights are given): two all-reduces (min, max) of D values. The single-process rule of
/// [`crate::schedule::estimate_diameter_weighted`], to the bit (min and max are exact).
fn global_diameter(
    comm: &dyn Collective,
    (x, a): (&Tensor, Option<&Tensor>),
    (y, b): (&Tensor, Option<&Tensor>),
) -> Result<f64> {
    let (lx, hx) = local_box(x, a)?;
    let (ly, hy) = local_box(y, b)?;
    let lo: Vec<f64> = lx.iter().zip(&ly).map(|(p, q)| p.min(*q)).collect();
    let hi: Vec<f64> = hx.iter().zip(&hy).map(|(p, q)| p.max(*q)).collect();
    let lo = comm.all_reduce(&lo, ReduceOp::Min)?;
    let hi = comm.all_reduce(&hi, ReduceOp::Max)?;
    Ok(lo
        .iter()
        .zip(&hi)
        .map(|(l, h)| (h - l) * (h - l))
        .sum::<f64>()
        .sqrt())
}

/// Per-item sums (B,) of weights (B, K) in f64 (zeros for K = 0).
fn item_sums(w: &Tensor) -> Result<Vec<f64>> {
    w.detach().to_dtype(DType::F64)?.sum(1)?.to_vec1::<f64>()
}

fn loss_code(l: Loss) -> f64 {
    match l {
        Loss::Sinkhorn => 0.0,
        Loss::Hausdorff => 1.0,
        Loss::Energy => 2.0,
        Loss::Gaussian => 3.0,
        Loss::Laplacian => 4.0,
    }
}

/// Emits the fixed-schedule accuracy warning on rank 0, once per process at `WARN` (later ones
/// at `DEBUG`), as [`SamplesLoss`] does.
fn warn_rank0(comm: &dyn Collective, msg: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if comm.rank() != 0 {
        return;
    }
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!(target: "candle_ot", "{msg}");
    } else {
        tracing::warn!(target: "candle_ot", "{msg} (later warnings of this kind are logged at DEBUG level)");
    }
}

impl SamplesLoss {
    /// The loss between clouds sharded over the ranks of `comm`, with uniform weights:
    /// see [`SamplesLoss::solve_sharded`]. Returns the global loss on every rank.
    pub fn forward_sharded(&self, comm: &dyn Collective, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.solve_sharded(comm, None, x, None, y)?.loss)
    }

    /// [`SamplesLoss::solve`] of the clouds whose rows are split over the ranks of `comm`
    /// (MPI processes, or one process per GPU): rank r passes its contiguous shard of the rows,
    /// x (N_r, D) or (B, N_r, D), y (M_r, D) or (B, M_r, D), and optionally its weights a
    /// (N_r,) or (B, N_r), b alike (default uniform over all ranks' points, `1/N`). Any
    /// `N_r ≥ 0`, `M_r ≥ 0` as long as N, M ≥ 1 in all. Every rank calls it with the same
    /// options (checked), in the same order as its other collectives.
    ///
    /// Returns the global loss on every rank, differentiable in that rank's x, y, a and b
    /// (the single-process gradients of its rows), and that rank's rows of the potentials and
    /// of the plan ([`ShardedSolution`]). It equals the single-process solve of the
    /// concatenated clouds: the same ε list, the same potentials, the value up to the order of
    /// its final sums (1e-12 relative in f64), the same diagnostics.
    ///
    /// The loop runs on the [`Sharded`] softmin over the online backend (`Auto`, `Online`) or
    /// the tensorized one (`Tensorized`, N_r × M per rank). Communication: the points once,
    /// `(N + M)·D` values into every rank; per ε step of the debiased loss, four all-gathers
    /// receiving `2(N + M)` values per rank and sending `2(N_r + M_r)` (half without
    /// `debias`); a few all-reduces of O(B + D) values at the start and the end.
    ///
    /// Errors (on every rank): what [`SamplesLoss::solve`] refuses; `tol` with the Sinkhorn
    /// loss (the sharded loop runs GeomLoss's fixed schedule: its `tol` iterations need
    /// reductions inside the loop), the multiscale backend, `exact_hausdorff_gradient`
    /// (its column gradients are not local); options, batch size, dimension or dtype that
    /// differ between ranks; another rank's refused input.
    pub fn solve_sharded(
        &self,
        comm: &dyn Collective,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<ShardedSolution> {
        let o = self.options();
        let refused = match (o.loss, o.backend) {
            (Loss::Sinkhorn, _) if o.tol.is_some() => Some(OtError::Option {
                name: "tol",
                reason: "a sharded solve runs GeomLoss's fixed ε schedule: the tol iterations need global reductions inside the loop (docs/distributed.md); unset tol".into(),
            }),
            (Loss::Hausdorff, _) if o.exact_hausdorff_gradient => Some(OtError::Option {
                name: "exact_hausdorff_gradient",
                reason: "the exact Hausdorff gradient flows through every softmin's columns, which are not local in a sharded solve; unset it".into(),
            }),
            (_, Backend::Multiscale) => Some(OtError::Option {
                name: "backend",
                reason: "the multiscale backend is not sharded; use Backend::Online".into(),
            }),
            _ => None,
        };
        if let Some(e) = refused {
            // Every rank has the same options (checked below), so every rank stops here.
            return Err(e.into());
        }
        let p = self.prepare_sharded(comm, a, x, b, y)?;
        let backend = self.resolve_backend(p.x.device())?;
        let cost = CostKind::from_p(o.p).expect("validated p");
        let mut sol = match backend {
            Backend::Tensorized => self.run_sharded(&Sharded::new(Tensorized { cost }, comm), &p),
            _ => self.run_sharded(&Sharded::new(Online { cost }, comm), &p),
        }?;
        sol.backend = match backend {
            Backend::Tensorized => Backend::Tensorized,
            _ => Backend::Online,
        };
        if !p.batched {
            sol.loss = sol.loss.squeeze(0)?;
            for t in [&mut sol.f, &mut sol.g].into_iter().chain(
                [&mut sol.f_ba, &mut sol.g_ab, &mut sol.f_aa, &mut sol.g_bb]
                    .into_iter()
                    .flatten(),
            ) {
                *t = t.squeeze(0)?;
            }
        }
        if sol.loss.dtype() != p.in_dtype {
            sol.loss = sol.loss.to_dtype(p.in_dtype)?;
        }
        for t in [&mut sol.f, &mut sol.g].into_iter().chain(
            [&mut sol.f_ba, &mut sol.g_ab, &mut sol.f_aa, &mut sol.g_bb]
                .into_iter()
                .flatten(),
        ) {
            *t = t.to_dtype(p.out_dtype)?;
        }
        Ok(sol)
    }

    /// The local checks, then the collective ones (see [`SamplesLoss::solve`]'s rules).
    fn prepare_sharded(
        &self,
        comm: &dyn Collective,
        a: Option<&Tensor>,
        x: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Prepared> {
        let l = agree(comm, check_local(a, x, b, y))?;
        let o = self.options();
        let (bsz, _, d) = l.x.dims3()?;
        let opt = |v: Option<f64>| v.unwrap_or(-1.0);
        same_everywhere(
            comm,
            &[
                "batch size B",
                "dimension D",
                "rank of x (2 or 3)",
                "compute dtype",
                "loss",
                "p",
                "blur",
                "reach",
                "diameter",
                "scaling",
                "debias",
                "backend",
                "x tracked by autograd",
                "y tracked by autograd",
            ],
            &[
                bsz as f64,
                d as f64,
                if l.batched { 3.0 } else { 2.0 },
                if l.dtype == DType::F64 { 64.0 } else { 32.0 },
                loss_code(o.loss),
                o.p as f64,
                o.blur,
                opt(o.reach),
                opt(o.diameter),
                o.scaling,
                f64::from(u8::from(o.debias)),
                match o.backend {
                    Backend::Auto => 0.0,
                    Backend::Tensorized => 1.0,
                    Backend::Online => 2.0,
                    Backend::Multiscale => 3.0,
                },
                f64::from(u8::from(l.x.track_op())),
                f64::from(u8::from(l.y.track_op())),
            ],
        )?;
        let (nr, mr) = (l.x.dim(1)?, l.y.dim(1)?);
        let p = comm.size();
        let mut both = shard_counts(comm, nr)?;
        both.extend(shard_counts(comm, mr)?);
        let (x_counts, y_counts) = (both[..p].to_vec(), both[p..].to_vec());
        let (n, m) = (
            x_counts.iter().sum::<usize>(),
            y_counts.iter().sum::<usize>(),
        );
        let dims = |t: &Tensor, k: usize| {
            let mut v = t.dims().to_vec();
            v[if l.batched { 1 } else { 0 }] = k;
            v
        };
        if n == 0 {
            return Err(OtError::Empty {
                name: "x",
                got: dims(x, 0),
            }
            .into());
        }
        if m == 0 {
            return Err(OtError::Empty {
                name: "y",
                got: dims(y, 0),
            }
            .into());
        }
        let dtype = l.dtype;
        // The range check of the single-process solve, on every point.
        let diameter = global_diameter(comm, (&l.x, None), (&l.y, None))?;
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
        let dev = l.x.device().clone();
        let uniform = |k: usize, kr: usize, dt: DType| -> Result<Tensor> {
            Tensor::full(1.0 / k as f64, (bsz, kr), &dev)?.to_dtype(dt)
        };
        let (a_given, b_given) = (l.a.is_some(), l.b.is_some());
        let aw = match &l.a {
            Some(a) => a.clone(),
            None => uniform(n, nr, dtype)?,
        };
        let bw = match &l.b {
            Some(b) => b.clone(),
            None => uniform(m, mr, dtype)?,
        };
        // Global masses per item: [Σa (B), Σb (B)].
        let mut sums = item_sums(&aw)?;
        sums.extend(item_sums(&bw)?);
        let sums = comm.all_reduce(&sums, ReduceOp::Sum)?;
        let (sa, sb) = sums.split_at(bsz);
        for (name, s) in [("a", sa), ("b", sb)] {
            if let Some(i) = s.iter().position(|s| *s <= 0.0) {
                return Err(OtError::Weights {
                    name,
                    reason: format!(
                        "weights of batch item {i} sum to 0: at least one must be positive"
                    ),
                }
                .into());
            }
        }
        let diameter = global_diameter(comm, (&l.x, Some(&aw)), (&l.y, Some(&bw)))?;
        if o.loss == Loss::Sinkhorn && o.reach.is_none() {
            let tol = 1e-5 + n.max(m) as f64 * unit_roundoff(l.in_dtype);
            for (i, (sa, sb)) in sa.iter().zip(sb).enumerate() {
                if (sa - sb).abs() > tol * sa.max(*sb) {
                    return Err(OtError::Weights {
                        name: "a, b",
                        reason: format!(
                            "balanced OT needs equal total masses (to a relative {tol:.1e}: 1e-5 plus the rounding of {} weights in {:?}), got {sa} and {sb} (batch item {i}); normalise the weights or set a reach", n.max(m), l.in_dtype
                        ),
                    }
                    .into());
                }
            }
        }
        let promote = dtype == DType::F32
            && !dev.is_metal()
            && o.largest_exponent(diameter) < F32_PROMOTION_EXPONENT;
        let (a, x, b, y) = if promote {
            let f = |t: &Tensor| t.to_dtype(DType::F64);
            let a64 = if a_given {
                f(&aw)?
            } else {
                uniform(n, nr, DType::F64)?
            };
            let mut b64 = if b_given {
                f(&bw)?
            } else {
                uniform(m, mr, DType::F64)?
            };
            if o.loss == Loss::Sinkhorn && o.reach.is_none() {
                let mut s = item_sums(&a64)?;
                s.extend(item_sums(&b64)?);
                let s = comm.all_reduce(&s, ReduceOp::Sum)?;
                let ratio: Vec<f64> = (0..bsz).map(|i| s[i] / s[bsz + i]).collect();
                let ratio = Tensor::from_vec(ratio, (bsz, 1), &dev)?; // (B, 1)
                b64 = b64.broadcast_mul(&ratio)?;
            }
            (a64, f(&l.x)?, b64, f(&l.y)?)
        } else {
            (aw, l.x, bw, l.y)
        };
        Ok(Prepared {
            a,
            x,
            b,
            y,
            batched: l.batched,
            in_dtype: l.in_dtype,
            out_dtype: dtype,
            diameter,
            x_counts,
            y_counts,
        })
    }

    fn run_sharded<S: PointSoftmin>(
        &self,
        sh: &Sharded<'_, S>,
        p: &Prepared,
    ) -> Result<ShardedSolution> {
        let o = self.options();
        let comm = sh.comm();
        let pf = o.p as f64;
        let eps = o.blur.powf(pf);
        let rho = o.reach.map(|r| r.powf(pf));
        let log = |w: &Tensor| w.detach().log(); // log 0 = −∞: zero weights are masked.
        let (rank, size) = (comm.rank(), comm.size());
        let offset = |c: &[usize]| c[..rank].iter().sum::<usize>();
        let (xo, yo) = (offset(&p.x_counts), offset(&p.y_counts));
        let solution = |loss, f, g, eps| ShardedSolution {
            loss,
            f,
            g,
            f_ba: None,
            g_ab: None,
            f_aa: None,
            g_bb: None,
            eps,
            backend: Backend::Online,
            diagnostics: None,
            compute_dtype: p.x.dtype(),
            ranks: size,
            x_rows: xo..xo + p.x_counts[rank],
            y_rows: yo..yo + p.y_counts[rank],
            plan: None,
        };
        // The global value from this rank's partial `local` (B,), differentiable through the
        // partial: value + (local − local.detach()), exactly the all-reduced value.
        let global = |local: &Tensor| -> Result<Tensor> {
            let v = local.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let v = comm.all_reduce(&v, ReduceOp::Sum)?;
            let v = Tensor::from_vec(v, local.dims(), local.device())?.to_dtype(local.dtype())?;
            v + (local - local.detach())?
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
                    tol: None,
                    max_iter: o.max_iter,
                    acceleration: o.acceleration,
                    observer: o.observer.clone(),
                };
                let (log_a, log_b) = (log(&p.a)?, log(&p.b)?);
                let (pot, mut diag) = sinkhorn_loop(sh, &p.x, &p.y, &log_a, &log_b, &params)?;
                diag.update_error = comm.all_reduce(&[diag.update_error], ReduceOp::Max)?[0];
                let loss = global(&sinkhorn_cost(&p.a, &p.b, &pot, eps, rho)?)?;
                let (f, g) = sinkhorn_potentials(&pot)?;
                let mut sol = solution(loss, f.detach(), g.detach(), Some(eps));
                // The plan: this rank's rows against every column, both ways.
                let (f_ba, g_ab) = (pot.f_ba.detach(), pot.g_ab.detach());
                let (_, x_all) = sh.gather_cloud(&p.x.detach())?; // (B, N, D)
                let (_, y_all) = sh.gather_cloud(&p.y.detach())?; // (B, M, D)
                let plan = |x: &Tensor, la: &Tensor, f: &Tensor, y: &Tensor, lb: &Tensor, g| {
                    TransportPlan {
                        cost: CostKind::from_p(o.p).expect("validated p"),
                        eps,
                        backend: match o.backend {
                            Backend::Tensorized => Backend::Tensorized,
                            _ => Backend::Online,
                        },
                        x: x.clone(),
                        y: y.clone(),
                        log_a: la.clone(),
                        log_b: lb.clone(),
                        f_ba: f.clone(),
                        g_ab: g,
                        batched: p.batched,
                        lengths: None,
                        out_dtype: p.out_dtype,
                    }
                };
                let log_a_all = gather_rows(comm, &log_a, &p.x_counts)?; // (B, N)
                let log_b_all = gather_rows(comm, &log_b, &p.y_counts)?; // (B, M)
                let f_all = gather_rows(comm, &f_ba, &p.x_counts)?; // (B, N)
                let g_all = gather_rows(comm, &g_ab, &p.y_counts)?; // (B, M)
                sol.plan = Some(ShardedPlan {
                    rows: plan(&p.x.detach(), &log_a, &f_ba, &y_all, &log_b_all, g_all),
                    cols: plan(&p.y.detach(), &log_b, &g_ab, &x_all, &log_a_all, f_all),
                    x_counts: p.x_counts.clone(),
                    y_counts: p.y_counts.clone(),
                });
                sol.f_ba = Some(f_ba);
                sol.g_ab = Some(g_ab);
                sol.f_aa = pot.f_aa.map(|t| t.detach());
                sol.g_bb = pot.g_bb.map(|t| t.detach());
                if let Some(w) = diag.accuracy_warning() {
                    warn_rank0(comm, &w);
                }
                sol.diagnostics = Some(diag);
                Ok(sol)
            }
            Loss::Hausdorff => {
                let (local, f, g) = hausdorff_loss(
                    sh,
                    eps,
                    rho,
                    false,
                    (&p.a, &p.x, &log(&p.a)?),
                    (&p.b, &p.y, &log(&p.b)?),
                    None,
                )?;
                Ok(solution(global(&local)?, f, g, Some(eps)))
            }
            Loss::Energy | Loss::Gaussian | Loss::Laplacian => {
                let kind = match o.loss {
                    Loss::Energy => KernelKind::Energy,
                    Loss::Gaussian => KernelKind::Gaussian,
                    _ => KernelKind::Laplacian,
                };
                let (loss, f, g) = sharded_kernel_loss(sh, kind, o.blur, p)?;
                Ok(solution(loss, f, g, None))
            }
        }
    }
}

/// The kernel norm `½ aᵀK_xx a + ½ bᵀK_yy b − aᵀK_xy b` from shards: the three terms are
/// all-reduced sums of each rank's `⟨a_r, K_xx a⟩`, `⟨b_r, K_yy b⟩`, `⟨a_r, K_xy b⟩` and
/// combined as the single-process value is. Its gradient is local: with the potentials
/// `F = K_xx a − K_xy b` (rows x_r, columns detached) and `G = K_yy b − K_yx a`, the
/// surrogate `T = ⟨a_r, F⟩ + ⟨b_r, G⟩` has the gradient of the value in x_r, y_r, a_r, b_r
/// (the kernel is symmetric: a point's row and column contributions are equal), and the loss is
/// `value + (T − T.detach())`. Returns (loss (B,), F (B, N_r), G (B, M_r)).
fn sharded_kernel_loss<S: PointSoftmin>(
    sh: &Sharded<'_, S>,
    kind: KernelKind,
    sigma: f64,
    p: &Prepared,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (a, x, b, y) = (&p.a, &p.x, &p.b, &p.y);
    let a_x = sh.kernel_product(kind, sigma, x, &x.detach(), &a.detach())?; // K_xx a, (B, N_r)
    let b_x = sh.kernel_product(kind, sigma, x, &y.detach(), &b.detach())?; // K_xy b, (B, N_r)
    let b_y = sh.kernel_product(kind, sigma, y, &y.detach(), &b.detach())?; // K_yy b, (B, M_r)
    let a_y = sh.kernel_product(kind, sigma, y, &x.detach(), &a.detach())?; // K_yx a, (B, M_r)
    let bsz = a.dim(0)?;
    let host = |t: Tensor| t.detach().to_dtype(DType::F64)?.to_vec1::<f64>();
    let mut terms = host(scal(&a.detach(), &a_x)?)?;
    terms.extend(host(scal(&b.detach(), &b_y)?)?);
    terms.extend(host(scal(&a.detach(), &b_x)?)?);
    let terms = sh.comm().all_reduce(&terms, ReduceOp::Sum)?;
    let term = |k: usize| -> Result<Tensor> {
        Tensor::from_vec(terms[k * bsz..(k + 1) * bsz].to_vec(), bsz, a.device())?
            .to_dtype(a.dtype())
    };
    // The single-process expression: (⟨a, K_xx a⟩·½ + ⟨b, K_yy b⟩·½) − ⟨a, K_xy b⟩.
    let value = (((term(0)? * 0.5)? + (term(1)? * 0.5)?)? - term(2)?)?; // (B,)
    let f = (&a_x - &b_x)?; // (B, N_r), through the rows x_r
    let g = (&b_y - &a_y)?; // (B, M_r), through the rows y_r
    let t = (scal(a, &f)? + scal(b, &g)?)?; // (B,)
    let loss = (value + (&t - t.detach())?)?;
    Ok((loss, f.detach(), g.detach()))
}

/// One rank's own checks, in the order of [`SamplesLoss::solve`]'s.
fn check_local(a: Option<&Tensor>, x: &Tensor, b: Option<&Tensor>, y: &Tensor) -> Result<Local> {
    let pts = check_points(x, y, ("N_r", "M_r"))?;
    let (bx, nr, _) = pts.x.dims3()?;
    let mr = pts.y.dim(1)?;
    if bx == 0 {
        return Err(OtError::Shape {
            name: "x, y",
            expected: "points in B >= 1 batch items".into(),
            got: pts.x_dims,
        }
        .into());
    }
    let weights = |w: Option<&Tensor>, name: &'static str, k: usize| -> Result<Option<Tensor>> {
        w.map(|w| check_weights(w, name, &pts, k, "this rank's points"))
            .transpose()
    };
    let a = weights(a, "a", nr)?;
    let b = weights(b, "b", mr)?;
    Ok(Local {
        a,
        x: pts.x,
        b,
        y: pts.y,
        batched: pts.batched,
        in_dtype: pts.in_dtype,
        dtype: pts.dtype,
    })
}
