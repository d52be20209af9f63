//! The online solve sharded across processes: MPI ranks on CPUs, or one process per GPU with
//! NCCL.
//!
//! Each of the P ranks owns a contiguous shard of the rows of x (with a, f) and of y (with b,
//! g); rank r holds rows `N_0 + … + N_{r−1}` to `N_0 + … + N_r − 1` of x (any `N_r ≥ 0`, every
//! rank may differ) and likewise of y. The solve is GeomLoss's ε-scaling loop of
//! [`crate::sinkhorn`] unchanged, run by every rank on its own rows with the [`Sharded`]
//! softmin:
//!
//! - the points never change: the first softmin over a cloud all-gathers it (`(N + M)·D` values
//!   over the whole solve), and every later cost over that cloud reuses the gathered copy;
//! - a softmin `f_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)` all-gathers the right-hand side
//!   `h = log b + g/ε` (the other side's potential with its log-weights, M values) and runs the
//!   existing softmin of the rank's own rows against all the columns: every rank sends its
//!   `M_r` values, so an update of the four potentials of the debiased loss moves
//!   `2(N + M)` values into every rank and sends `2(N_r + M_r)` from it;
//! - the ε schedule's diameter is an all-reduce (min, max) of bounding boxes of the points of
//!   positive weight, exactly the single-process rule, so the ε list is the same to the bit;
//! - the value is an all-reduce sum of each rank's partial `⟨a, F⟩ + ⟨b, G⟩` (or the terms of
//!   the unbalanced or kernel formulas); gradients with respect to the rank's own x, y, a, b
//!   stay local (the last update differentiates through its rows only, as GeomLoss's
//!   `C(x, y.detach())` does), and so do the potentials and the plan operators
//!   ([`ShardedSolution`], [`ShardedPlan`]).
//!
//! Every row's softmin visits the same columns in the same order as the single-process solve,
//! so the potentials are the single-process ones and the values differ only by the order of
//! the final sums (1e-12 relative in f64, measured in `tests/distributed.rs` and the MPI check
//! of `.ci/check-mpi.sh`). The loop's `tol` iterations need global reductions inside the loop
//! (the update error, Anderson's inner products, the certificate) and are refused: sharded
//! solves run GeomLoss's fixed schedule.
//!
//! Engines ([`Collective`]): [`Single`] (one process, no feature: the algorithm's own tests),
//! `Mpi` (feature `mpi`, the `mpi` crate rsmpi over the system's MPI library) and `Nccl`
//! (feature `nccl`, NCCL through cudarc, candle-core's `nccl` feature; CUDA tensors, one
//! process per GPU). See docs/distributed.md for launching and the traffic.
//!
//! Every rank must make the same calls in the same order (collectives are matched by order).
//! Inputs are checked collectively: when one rank's input is refused, every rank returns an
//! error (the others name the first refusing rank), so no rank waits forever in a collective.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
mod solve;

#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
#[cfg(feature = "nccl")]
pub use self::nccl::Nccl;
/// The `mpi` crate (rsmpi) this module is built against, for `mpi::initialize()`.
#[cfg(feature = "mpi")]
pub use ::mpi as rsmpi;
pub use solve::{ShardedPlan, ShardedSolution};

use crate::cost::KernelKind;
use crate::error::OtError;
use crate::softmin::{PointSoftmin, Softmin};
use candle_core::{DType, Result, Tensor};
use std::cell::RefCell;

/// An element-wise reduction of [`Collective::all_reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The minimum over ranks.
    Min,
    /// The maximum over ranks.
    Max,
}

/// The collectives a sharded solve needs, over a fixed group of `size()` ranks. Every rank
/// calls the same collectives in the same order (MPI's and NCCL's rule).
pub trait Collective {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;

    /// The number of ranks P.
    fn size(&self) -> usize;

    /// All-gather of variable-sized shards: rank r passes `local` (counts\[r\],), f32 or f64,
    /// and every rank gets (Σ counts,) with rank r's values at offset `counts[0] + … +
    /// counts[r−1]`, in `local`'s dtype and on its device. `counts` is the same on every rank.
    ///
    /// Errors: `local` not 1-D of `counts[rank]` values, a dtype other than f32 / f64, a device
    /// the engine cannot reach, a failed transfer.
    fn all_gather(&self, local: &Tensor, counts: &[usize]) -> Result<Tensor>;

    /// Element-wise reduction of `values` over the ranks (every rank passes as many values).
    fn all_reduce(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>>;
}

/// World size 1: every collective is the identity. Runs the sharded code paths in one process
/// (no feature needed), where they must equal the plain solve.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &Tensor, counts: &[usize]) -> Result<Tensor> {
        check_gather(local, counts, 0)?;
        Ok(local.clone())
    }
    fn all_reduce(&self, values: &[f64], _op: ReduceOp) -> Result<Vec<f64>> {
        Ok(values.to_vec())
    }
}

/// The checks every [`Collective::all_gather`] starts with: `local` is (counts\[rank\],), f32
/// or f64.
pub(crate) fn check_gather(local: &Tensor, counts: &[usize], rank: usize) -> Result<()> {
    if counts.len() <= rank {
        return Err(OtError::Mismatch(format!(
            "all_gather: counts has {} entries, fewer than rank {rank} + 1",
            counts.len()
        ))
        .into());
    }
    if local.dims() != [counts[rank]] {
        return Err(OtError::Shape {
            name: "local",
            expected: format!("({},), the count of rank {rank}", counts[rank]),
            got: local.dims().to_vec(),
        }
        .into());
    }
    if !matches!(local.dtype(), DType::F32 | DType::F64) {
        return Err(OtError::Unsupported(format!(
            "all_gather of {:?} values (f32 or f64)",
            local.dtype()
        ))
        .into());
    }
    Ok(())
}

/// The contiguous shard of `n` rows that rank `rank` of `size` owns when they are split as
/// evenly as possible: the first `n % size` ranks get one more row.
pub fn shard_range(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (q, r) = (n / size.max(1), n % size.max(1));
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

/// Every rank's `n_local` (its shard size), in rank order: one all-reduce sum of P values
/// (exact in f64 below 2⁵³).
pub fn shard_counts(comm: &dyn Collective, n_local: usize) -> Result<Vec<usize>> {
    let mut one_hot = vec![0.0; comm.size()];
    one_hot[comm.rank()] = n_local as f64;
    Ok(comm
        .all_reduce(&one_hot, ReduceOp::Sum)?
        .into_iter()
        .map(|c| c as usize)
        .collect())
}

/// All-gathers a (B, K_r, …) tensor along axis 1, rank r holding `counts[r]` rows of every
/// batch item: returns (B, ΣK_r, …), detached, the rows in rank order.
pub fn gather_rows(comm: &dyn Collective, t: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    if dims.len() < 2 || counts.len() != comm.size() || dims[1] != counts[comm.rank()] {
        return Err(OtError::Shape {
            name: "shard",
            expected: format!(
                "(B, {}, …): the rows of rank {} among counts {counts:?}",
                counts.get(comm.rank()).copied().unwrap_or(0),
                comm.rank()
            ),
            got: dims,
        }
        .into());
    }
    let (b, inner) = (dims[0], dims[2..].iter().product::<usize>());
    let elems: Vec<usize> = counts.iter().map(|&k| b * k * inner).collect();
    let flat = t.detach().contiguous()?.flatten_all()?; // (B·K_r·inner,)
    let all = comm.all_gather(&flat, &elems)?; // (Σ B·K_r·inner,), rank-major
    let mut out_dims = dims.clone();
    out_dims[1] = counts.iter().sum();
    if b == 1 || comm.size() == 1 {
        return all.reshape(out_dims);
    }
    // Rank-major blocks (B, K_r, …) → batch-major rows.
    let (mut parts, mut off) = (Vec::new(), 0usize);
    for (&k, &e) in counts.iter().zip(&elems) {
        if k > 0 {
            let mut d = dims.clone();
            d[1] = k;
            parts.push(all.narrow(0, off, e)?.reshape(d)?);
        }
        off += e;
    }
    Tensor::cat(&parts, 1)
}

/// A cloud gathered once: the local tensor it came from (kept alive, so that its storage
/// cannot be reused by another tensor while cached), every rank's row count, all the rows.
struct Gathered {
    local: Tensor,
    counts: Vec<usize>,
    all: Tensor,
}

/// Whether two tensors are the same view of the same storage.
fn same_view(a: &Tensor, b: &Tensor) -> bool {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    std::ptr::eq(&*sa, &*sb) && la == lb && a.dtype() == b.dtype()
}

/// A softmin whose rows are this rank's points and whose columns are the points of every rank:
/// the [`PointSoftmin`] that runs the Sinkhorn loop of [`crate::sinkhorn`] on shards.
///
/// - `cost(x_r, y_r)`: the inner backend's cost of the rank's rows `x_r` (B, N_r, D) against
///   every rank's `y` (B, M, D), all-gathered at the first use of `y_r` and reused after
///   (the gathered columns are detached; gradients flow into the rows);
/// - `softmin(ε, C, h_r)`: all-gathers `h_r` (B, M_r) into h (B, M) and returns the inner
///   softmin of the rank's rows, (B, N_r) (0 rows: an empty tensor, after the collective);
/// - `kernel_product(x_r, y_r, b_r)`: `Σ_j k(x_i, y_j) b_j` over every rank's columns for the
///   rank's rows, differentiable in `x_r` only;
/// - `plan_apply(ε, x_r, f_r, y_r, h_r, v_r)`: the plan applied to values sharded like y,
///   for the rank's rows.
///
/// Each call is collective: every rank makes it, in the same order.
pub struct Sharded<'c, S> {
    /// The softmin of one process (online or tensorized).
    pub inner: S,
    comm: &'c dyn Collective,
    gathered: RefCell<Vec<Gathered>>,
}

/// The cost of a [`Sharded`] softmin: the inner cost of the rank's rows against all columns,
/// and every rank's column count.
#[derive(Clone, Debug)]
pub struct ShardedCost<C> {
    /// The inner backend's cost, (B, N_r) rows × (B, M) columns.
    pub inner: C,
    /// The rank's rows N_r.
    pub rows: usize,
    /// The batch size B.
    pub batch: usize,
    /// Every rank's column count M_r, in rank order.
    pub col_counts: Vec<usize>,
}

impl<'c, S> Sharded<'c, S> {
    /// The softmin `inner` over the shards of the ranks of `comm`.
    pub fn new(inner: S, comm: &'c dyn Collective) -> Self {
        Self {
            inner,
            comm,
            gathered: RefCell::new(Vec::new()),
        }
    }

    /// The collectives.
    pub fn comm(&self) -> &'c dyn Collective {
        self.comm
    }

    /// The rows of every rank for the local cloud `q` (B, K_r, D) and every rank's K_r: gathered
    /// at the first call, reused by later calls for the same tensor (or a detached copy). The
    /// reuse is agreed collectively (one small all-reduce), so ranks whose tensors alias
    /// differently still make the same collectives.
    pub fn gather_cloud(&self, q: &Tensor) -> Result<(Vec<usize>, Tensor)> {
        let cache = self.gathered.borrow();
        let none = cache.len() as f64;
        let hit = cache
            .iter()
            .position(|g| same_view(&g.local, q))
            .map_or(none, |i| i as f64);
        drop(cache);
        let v = self.comm.all_reduce(&[hit, -hit], ReduceOp::Max)?;
        if v[0] == -v[1] && hit < none {
            let g = &self.gathered.borrow()[hit as usize];
            return Ok((g.counts.clone(), g.all.clone()));
        }
        let counts = shard_counts(self.comm, q.dim(1)?)?;
        let all = gather_rows(self.comm, q, &counts)?; // (B, K, D)
        self.gathered.borrow_mut().push(Gathered {
            local: q.clone(),
            counts: counts.clone(),
            all: all.clone(),
        });
        Ok((counts, all))
    }

    /// A (B, 0) tensor like `like`: the output of a reduction over no row.
    fn no_rows(like: &Tensor, batch: usize, trailing: Option<usize>) -> Result<Tensor> {
        match trailing {
            None => Tensor::zeros((batch, 0), like.dtype(), like.device()),
            Some(k) => Tensor::zeros((batch, 0, k), like.dtype(), like.device()),
        }
    }
}

impl<S: PointSoftmin> Softmin for Sharded<'_, S> {
    type Cost = ShardedCost<S::Cost>;

    fn softmin(&self, eps: f64, c: &Self::Cost, h: &Tensor) -> Result<Tensor> {
        let h_all = gather_rows(self.comm, h, &c.col_counts)?; // (B, M)
        if c.rows == 0 {
            return Self::no_rows(h, c.batch, None);
        }
        self.inner.softmin(eps, &c.inner, &h_all) // (B, N_r)
    }

    fn softmin_no_grad(&self, eps: f64, c: &Self::Cost, h: &Tensor) -> Result<Tensor> {
        let h_all = gather_rows(self.comm, h, &c.col_counts)?; // (B, M)
        if c.rows == 0 {
            return Self::no_rows(h, c.batch, None);
        }
        self.inner.softmin_no_grad(eps, &c.inner, &h_all) // (B, N_r)
    }
}

impl<S: PointSoftmin> PointSoftmin for Sharded<'_, S> {
    fn cost(&self, x: &Tensor, y: &Tensor) -> Result<Self::Cost> {
        let (col_counts, y_all) = self.gather_cloud(y)?; // (B, M, D)
        Ok(ShardedCost {
            inner: self.inner.cost(x, &y_all)?,
            rows: x.dim(1)?,
            batch: x.dim(0)?,
            col_counts,
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
        let (counts, y_all) = self.gather_cloud(y)?; // (B, M, D)
        let b_all = gather_rows(self.comm, b, &counts)?; // (B, M)
        if x.dim(1)? == 0 {
            return Self::no_rows(b, x.dim(0)?, None);
        }
        self.inner.kernel_product(kind, sigma, x, &y_all, &b_all) // (B, N_r)
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
        let (counts, y_all) = self.gather_cloud(y)?; // (B, M, D)
        let h_all = gather_rows(self.comm, h, &counts)?; // (B, M)
        let v_all = gather_rows(self.comm, v, &counts)?; // (B, M, K)
        if x.dim(1)? == 0 {
            return Self::no_rows(v, x.dim(0)?, Some(v.dim(2)?));
        }
        self.inner.plan_apply(eps, x, f, &y_all, &h_all, &v_all) // (B, N_r, K)
    }
}
