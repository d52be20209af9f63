//! The symmetric, ε-scaling Sinkhorn loop of GeomLoss over a list of levels (GeomLoss's
//! `sinkhorn_loop`, Algorithms 3.5 and 3.6 of J. Feydy's thesis).
//!
//! This file contains no device code and names no backend: a [`Level`] supplies the softmins
//! of one resolution (its four costs) and its log-weights, and a [`Multilevel`] supplies the
//! levels, the iterations after which the loop jumps to the next finer one, and the jump itself
//! (kernel truncation, extrapolation of the potentials). Point clouds run on one level
//! ([`sinkhorn_loop`]), the multiscale backend on two (clusters, points), images on a pyramid.
//! With `λ(ε) = 1/(1 + ε/ρ)` (1 when balanced) and ε₀ the first value of the schedule:
//!
//! 1. init: `f_ba = λ softmin(ε₀, C_xy, log b)`, `g_ab = λ softmin(ε₀, C_yx, log a)` and,
//!    debiased, `f_aa = λ softmin(ε₀, C_xx, log a)`, `g_bb = λ softmin(ε₀, C_yy, log b)`;
//! 2. for each ε of the schedule, all updates from the current values, then averaged:
//!    `f̃_ba = λ softmin(ε, C_xy, log b + g_ab/ε)`, `g̃_ab = λ softmin(ε, C_yx, log a + f_ba/ε)`,
//!    `f̃_aa = λ softmin(ε, C_xx, log a + f_aa/ε)`, `g̃_bb = λ softmin(ε, C_yy, log b + g_bb/ε)`,
//!    `f ← ½(f + f̃)` for each;
//! 3. optionally (`tol`), more iterations at the last ε until `max_i |f̃_i − f_i| / ε < tol`
//!    over every potential updated (f̃ the next non-averaged update; f_ba, g_ab alternate,
//!    Anderson-accelerated by default ([`Acceleration`]), f_aa, g_bb stay averaged);
//! 4. one last non-averaged update at the last ε, the only differentiable step: its costs are
//!    `C(x, y.detach())`, `C(y, x.detach())`, `C(x, x.detach())`, `C(y, y.detach())` and its
//!    right-hand sides `log b + g_ab/ε` etc. are detached, as in GeomLoss.
//!
//! After the update at ε_i, for every jump at `i`, the [`Multilevel`] builds the next level
//! from the current potentials and extrapolates them there; steps 3 and 4 run on the finest
//! level. When the last iteration is a jump and [`Multilevel::extrapolation_ends_loop`] says
//! so, the loop returns the extrapolated potentials without step 4 (GeomLoss's
//! `last_extrapolation = False`; not with `tol`).
//!
//! Zero weights enter as `log a = −∞` and are masked out of every softmin.

use crate::schedule::dampening;
use crate::softmin::{Lengths, PointSoftmin, Softmin};
use candle_core::{Result, Tensor};

/// Parameters of one run of the loop.
#[derive(Clone, Debug)]
pub struct LoopParams {
    /// The ε schedule (last value = blur^p).
    pub eps_list: Vec<f64>,
    /// ρ = reach^p for unbalanced OT, `None` for balanced.
    pub rho: Option<f64>,
    /// Also compute the symmetric potentials f_aa, g_bb.
    pub debias: bool,
    /// Keep iterating at the last ε until the update is below `tol` (in units of ε).
    pub tol: Option<f64>,
    /// The most extra iterations `tol` may take.
    pub max_iter: usize,
    /// How the `tol` iterations run (Anderson-accelerated by default).
    pub acceleration: Acceleration,
    /// Called after every update (see [`Observer`]).
    pub observer: Option<Observer>,
}

/// Which part of the loop a [`Progress`] report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// GeomLoss's ε schedule: update `step` (from 1) of `steps`.
    Schedule {
        /// The update just done, from 1.
        step: usize,
        /// The length of the schedule.
        steps: usize,
    },
    /// The `tol` iterations at the last ε: iteration `iteration` (from 1) of at most
    /// `max_iter`.
    Tol {
        /// The iteration just done, from 1.
        iteration: usize,
        /// The most iterations `tol` may take.
        max_iter: usize,
    },
}

/// What an [`Observer`] sees after every update of the loop: typed, like the final
/// [`SinkhornDiagnostics`].
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Where the loop is.
    pub phase: Phase,
    /// The ε of this update.
    pub eps: f64,
    /// `tol` iterations: `max_i |f̃_i − f_i| / ε` of this iteration over the potentials still
    /// updated (the quantity compared with `tol`); `None` during the schedule.
    pub update_error: Option<f64>,
    /// The `tol` the loop stops at, if any.
    pub tol: Option<f64>,
    /// Softmin passes over all pairs so far.
    pub softmin_passes: usize,
}

/// A callback the loop calls after every update with its [`Progress`]: for progress bars,
/// logs, or to stop a long solve. Returning [`ControlFlow::Break`](std::ops::ControlFlow)
/// stops the `tol` iterations there (the last, differentiable update still runs, and the
/// diagnostics say `converged: Some(false)`, `stopped: true`); a break during the schedule
/// skips the `tol` iterations (the schedule itself, GeomLoss's fixed number of updates, always
/// completes). Two observers compare equal when they share the same closure.
///
/// ```
/// use candle_ot::sinkhorn::{Observer, Phase};
/// use std::ops::ControlFlow;
/// // Stop after 50 tol iterations, whatever the update error.
/// let stop_at_50 = Observer::new(|p| match p.phase {
///     Phase::Tol { iteration, .. } if iteration >= 50 => ControlFlow::Break(()),
///     _ => ControlFlow::Continue(()),
/// });
/// # let _ = stop_at_50;
/// ```
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct Observer(std::sync::Arc<dyn Fn(&Progress) -> std::ops::ControlFlow<()> + Send + Sync>);

impl Observer {
    /// An observer from a closure.
    pub fn new(f: impl Fn(&Progress) -> std::ops::ControlFlow<()> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }

    /// Calls it: whether the loop should go on.
    pub fn proceed(&self, p: &Progress) -> bool {
        (self.0)(p).is_continue()
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer(..)")
    }
}

impl PartialEq for Observer {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The dual potentials of the last (differentiable) update. All (B, N) or (B, M) (grids:
/// `(B, n_1, …, n_D)`).
#[derive(Clone, Debug)]
pub struct DualPotentials {
    /// f_ba, the potential on x of OT_ε(α, β).
    pub f_ba: Tensor,
    /// g_ab, the potential on y of OT_ε(α, β).
    pub g_ab: Tensor,
    /// f_aa, the potential of OT_ε(α, α) (debiased only).
    pub f_aa: Option<Tensor>,
    /// g_bb, the potential of OT_ε(β, β) (debiased only).
    pub g_bb: Option<Tensor>,
}

impl DualPotentials {
    /// The same potentials, detached from the graph.
    pub fn detached(&self) -> DualPotentials {
        DualPotentials {
            f_ba: self.f_ba.detach(),
            g_ab: self.g_ab.detach(),
            f_aa: self.f_aa.as_ref().map(|t| t.detach()),
            g_bb: self.g_bb.as_ref().map(|t| t.detach()),
        }
    }
}

/// What the loop did.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkhornDiagnostics {
    /// The ε schedule that was run (GeomLoss's list; the last value is used again by the extra
    /// `tol` iterations and by the final update).
    pub eps_list: Vec<f64>,
    /// Softmin passes over all pairs (one per potential per update, extrapolations included).
    pub softmin_passes: usize,
    /// Iterations at the last ε beyond the schedule (only with `tol`).
    pub extra_iterations: usize,
    /// `max_i |f̃_i − f_i| / ε` of the final update against the values it started from, over
    /// every potential: for balanced problems the log marginal error of the returned plan.
    /// NaN when the loop ended on an extrapolation (no update ran on the finest level).
    pub update_error: f64,
    /// With `tol`: whether `update_error < tol` was reached before `max_iter`.
    /// Without `tol`: `None` (GeomLoss's fixed schedule makes no claim).
    pub converged: Option<bool>,
    /// The levels the loop ran on (1 for a single-scale solve).
    pub levels: usize,
    /// The iterations (indices into `eps_list`) after which the loop jumped to the next level.
    pub jumps: Vec<usize>,
    /// With `tol`: a certified bound on the distance from the returned value to the converged
    /// one (balanced Sinkhorn; `None` otherwise, and without `tol`, where
    /// [`crate::Solution::value_error_bound`] computes it on demand). See [`ValueErrorBound`].
    pub value_error_bound: Option<ValueErrorBound>,
    /// With `tol` (balanced Sinkhorn): the L1 marginal error of the returned plan
    /// `π_ij = a_i b_j exp((f_ba,i + g_ab,j − C_ij)/ε)`,
    /// `‖π 1 − a‖₁ + ‖πᵀ 1 − b‖₁`, in units of mass (a fraction of the total mass for weights
    /// that sum to 1), the largest over the batch. Two more passes; `None` without `tol`
    /// (where [`crate::Solution::marginal_error`] computes it on demand) and for unbalanced
    /// problems, whose plans do not have the marginals a, b.
    pub marginal_error: Option<f64>,
    /// Whether an [`Observer`] stopped the loop.
    pub stopped: bool,
}

/// How far the returned value may be from the converged divergence (the fixed point of the
/// loop at the last ε), certified from the returned potentials by two exact softmin passes per
/// OT term: the converged value lies in `[lo, hi]`, and this bound is
/// `max(|loss − lo|, |hi − loss|)`.
///
/// For one term `OT_ε(α, β)` with column potential `g` (`g_ab`, or `f_aa` for `OT_ε(α, α)`),
/// the semi-dual $\Phi(g) = \langle a, \tilde f \rangle + \langle b, g \rangle$ with
/// $\tilde f = \mathrm{softmin}_\varepsilon(C_{xy}, \log b + g/\varepsilon)$ is concave, its
/// maximum is the converged value $V^\*$ and its gradient is $b - c$, where
/// $c_j = b_j \exp((g_j - \tilde g_j)/\varepsilon)$ is the column marginal of the plan of
/// $(\tilde f, g)$. Concavity, $\sum_j (b - c)_j = 0$ and the oscillation of a converged
/// potential (a c-transform: at most $C_{\max} = \mathrm{diameter}^p / p$ on the support)
/// give $\Phi(g) \le V^\* \le \Phi(g) + \tfrac12 \lVert b - c \rVert_1 (C_{\max} + \operatorname{osc} g)$;
/// the debiased value `V_ab − ½V_aa − ½V_bb` sums the intervals.
///
/// The bound is rigorous (up to floating-point rounding) but not tight: it grows with the
/// L1 marginal error of the returned plan times the cost's range `diameter^p / p`, so a value
/// that happens to be accurate may still have a large bound. With `tol` small enough it goes
/// to 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValueErrorBound {
    /// The largest bound over the batch items, in the loss's units.
    pub absolute: f64,
    /// The largest `bound / |loss|` over the batch items (∞ for a loss of 0 with a positive
    /// bound, 0 when both are 0).
    pub relative: f64,
}

/// The relative error above which [`SinkhornDiagnostics::accuracy_warning`] speaks: 2 %.
pub const ACCURACY_WARNING_THRESHOLD: f64 = 0.02;

impl SinkhornDiagnostics {
    /// A warning when the returned value may be more than [`ACCURACY_WARNING_THRESHOLD`] (2 %)
    /// from the converged divergence, else `None`:
    ///
    /// - without `tol`: always. GeomLoss's fixed ε schedule makes no claim; measured, it is
    ///   commonly 10–50 % from the converged value (docs/guide.md, "When to set `tol`"), and
    ///   the certified bound ([`crate::Solution::value_error_bound`], six more softmin passes,
    ///   not spent by default) exceeded 2 % on every such solve tried but well-separated
    ///   clouds at a large blur, including solves that were in fact accurate;
    /// - with `tol`: when it was not reached in `max_iter` iterations, or when the certified
    ///   [`ValueErrorBound`] (computed with `tol`) exceeds 2 %.
    ///
    /// [`crate::SamplesLoss`] emits it as a `tracing` warning (target `candle_ot`; the first of
    /// the process at `WARN`, later ones at `DEBUG`); the CLI prints it on stderr after
    /// `warning: `.
    pub fn accuracy_warning(&self) -> Option<String> {
        match self.converged {
            None => Some(
                "the value comes from GeomLoss's fixed ε schedule, which is often 10-50 % from the converged divergence; set tol (e.g. 1e-6) for the converged value, or check Solution::value_error_bound".into(),
            ),
            Some(false) => Some(format!(
                "not converged after {} extra iterations (update error {:.3e} ≥ tol); raise max_iter or tol",
                self.extra_iterations, self.update_error
            )),
            Some(true) => match self.value_error_bound {
                Some(b) if b.relative > ACCURACY_WARNING_THRESHOLD => Some(format!(
                    "the value may be up to {} from the converged divergence (certified bound {:.3e}); lower tol",
                    percent(b.relative),
                    b.absolute
                )),
                _ => None,
            },
        }
    }
}

fn percent(r: f64) -> String {
    if r.is_finite() {
        format!("{:.0} %", 100.0 * r)
    } else {
        "any amount (the value is 0 but the bound is not)".into()
    }
}

#[doc(hidden)]
/// Which of a level's four costs a softmin runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pair {
    /// C(x_i, y_j): gives f_ba.
    Xy,
    /// C(y_j, x_i): gives g_ab.
    Yx,
    /// C(x_i, x_k): gives f_aa (debiased only).
    Xx,
    /// C(y_j, y_l): gives g_bb (debiased only).
    Yy,
}

#[doc(hidden)]
/// One resolution of the loop: the softmins of its costs and its log-weights.
pub trait Level {
    /// log a, detached, −∞ for zero weights: (B, N) (grids: `(B, n_1, …, n_D)`).
    fn log_a(&self) -> &Tensor;
    /// log b, detached, −∞ for zero weights.
    fn log_b(&self) -> &Tensor;
    /// Whether the symmetric costs C_xx, C_yy exist (debiased).
    fn debiased(&self) -> bool;
    /// softmin_ε(C_pair, h) of the loop's iterations (no gradient).
    fn softmin(&self, eps: f64, pair: Pair, h: &Tensor) -> Result<Tensor>;
    /// softmin_ε(C_pair, h) of the last, differentiable update (see the module docs).
    fn softmin_last(&self, eps: f64, pair: Pair, h: &Tensor) -> Result<Tensor>;
}

#[doc(hidden)]
/// The four costs of one level: `C_xy`, `C_yx` and, debiased, `C_xx`, `C_yy`.
#[derive(Clone, Debug)]
pub struct CostSet<C> {
    /// C(x_i, y_j).
    pub xy: C,
    /// C(y_j, x_i).
    pub yx: C,
    /// C(x_i, x_k) (debiased only).
    pub xx: Option<C>,
    /// C(y_j, y_l) (debiased only).
    pub yy: Option<C>,
}

impl<C> CostSet<C> {
    /// The cost of `pair` (panics on a symmetric pair of a set without one: the loop asks for
    /// those only when [`Level::debiased`]).
    pub fn get(&self, pair: Pair) -> &C {
        match pair {
            Pair::Xy => &self.xy,
            Pair::Yx => &self.yx,
            Pair::Xx => self.xx.as_ref().expect("C_xx of a debiased level"),
            Pair::Yy => self.yy.as_ref().expect("C_yy of a debiased level"),
        }
    }
}

#[doc(hidden)]
/// The costs of the last update whose first argument is tracked by autograd: given the pair
/// and the loop's (detached) cost, `Some(tracked cost)`, or `None` to use the loop's own.
pub type TrackFn<'a, C> = Box<dyn Fn(Pair, &C) -> Result<Option<C>> + 'a>;

#[doc(hidden)]
/// A [`Level`] from any [`Softmin`]: its costs, log-weights and, for the last update, the
/// tracked costs.
pub struct SoftminLevel<'a, S: Softmin> {
    /// The softmin.
    pub softmin: &'a S,
    /// The costs of this level.
    pub costs: CostSet<S::Cost>,
    /// log a, detached.
    pub log_a: Tensor,
    /// log b, detached.
    pub log_b: Tensor,
    /// The tracked costs of the last update.
    pub track: TrackFn<'a, S::Cost>,
}

impl<S: Softmin> Level for SoftminLevel<'_, S> {
    fn log_a(&self) -> &Tensor {
        &self.log_a
    }
    fn log_b(&self) -> &Tensor {
        &self.log_b
    }
    fn debiased(&self) -> bool {
        self.costs.xx.is_some() && self.costs.yy.is_some()
    }
    fn softmin(&self, eps: f64, pair: Pair, h: &Tensor) -> Result<Tensor> {
        self.softmin.softmin_no_grad(eps, self.costs.get(pair), h)
    }
    fn softmin_last(&self, eps: f64, pair: Pair, h: &Tensor) -> Result<Tensor> {
        let c = self.costs.get(pair);
        let tracked = (self.track)(pair, c)?;
        self.softmin.softmin(eps, tracked.as_ref().unwrap_or(c), h)
    }
}

#[doc(hidden)]
/// The result of a jump: the next finer level, the potentials extrapolated to it, and the
/// softmin passes the extrapolation took.
pub struct Refined<'a> {
    /// The finer level.
    pub level: Box<dyn Level + 'a>,
    /// The potentials on it.
    pub potentials: DualPotentials,
    /// Softmin passes spent (kernel truncation and extrapolation).
    pub passes: usize,
}

#[doc(hidden)]
/// The levels of a multi-level solve (GeomLoss's `a_logs`, `C_xys`, …, `jumps`,
/// `kernel_truncation` and `extrapolate` arguments).
pub trait Multilevel<'a> {
    /// Indices `i` into `eps_list` after whose update the loop jumps to the next finer level,
    /// non-decreasing (an index may repeat: several jumps after one update); one per level
    /// below the coarsest.
    fn jumps(&self, eps_list: &[f64]) -> Vec<usize>;
    /// The coarsest level.
    fn first(&mut self) -> Result<Box<dyn Level + 'a>>;
    /// The jump from level `k` (`coarse`, its detached potentials `pot`) to level `k + 1`, at ε.
    fn refine(
        &mut self,
        k: usize,
        coarse: &dyn Level,
        pot: &DualPotentials,
        eps: f64,
    ) -> Result<Refined<'a>>;
    /// Whether a jump after the last ε ends the loop with the extrapolated potentials, without
    /// the last update (GeomLoss's grid code). The default runs the last update.
    fn extrapolation_ends_loop(&self) -> bool {
        false
    }
}

/// The loop's state between updates: the four potentials, as returned.
type State = DualPotentials;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.elem_count() == 0 {
        return Ok(0.0); // an empty shard of a distributed solve: nothing was updated
    }
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}

fn average(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a + b)? * 0.5
}

fn average_opt(a: &Option<Tensor>, b: &Option<Tensor>) -> Result<Option<Tensor>> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some(average(a, b)?)),
        _ => Ok(None),
    }
}

/// How the `tol` iterations at the last ε are run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Acceleration {
    /// Anderson acceleration (type II, memory [`ANDERSON_MEMORY`]) of the alternating cross
    /// update `g ↦ T(g)`: the next `g` extrapolates the last iterates so that a combination of
    /// their residuals `T(g) − g` is smallest (Walker & Ni 2011; OTT-JAX's
    /// `AndersonAcceleration`). The default: measured fastest to a given accuracy of the value
    /// and the gradient (docs/performance.md, "Converged values").
    #[default]
    Anderson,
    /// Over-relaxed alternating updates of the cross potentials, ω from the measured rate of
    /// the plain iteration (Young's SOR rule).
    Overrelaxation,
    /// Plain alternating updates (ω = 1), as before the acceleration.
    Plain,
}

impl std::fmt::Display for Acceleration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Acceleration::Overrelaxation => "overrelaxation",
            Acceleration::Anderson => "anderson",
            Acceleration::Plain => "plain",
        })
    }
}

impl std::str::FromStr for Acceleration {
    type Err = crate::OtError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "overrelaxation" | "sor" => Ok(Acceleration::Overrelaxation),
            "anderson" => Ok(Acceleration::Anderson),
            "plain" | "none" => Ok(Acceleration::Plain),
            _ => Err(crate::OtError::Option {
                name: "acceleration",
                reason: format!("expected overrelaxation, anderson or plain, got {s:?}"),
            }),
        }
    }
}

/// The over-relaxation parameter ω of the `tol` iterations and its safeguards.
struct Sor {
    enabled: bool,
    omega: f64,
    /// Cross residuals of the plain iterations so far (while measuring the rate).
    history: Vec<f64>,
    /// Smallest residual since ω last changed.
    best: f64,
    /// The plain iteration's measured rate θ.
    theta: f64,
}

/// Plain iterations over which the linear rate θ is measured (after as many first ones).
const SOR_WINDOW: usize = 4;
/// The largest ω used (Young's rule tends to 2 as θ → 1).
const SOR_MAX_OMEGA: f64 = 1.95;

impl Sor {
    fn new(acceleration: Acceleration) -> Self {
        Self {
            enabled: acceleration == Acceleration::Overrelaxation,
            omega: 1.0,
            history: vec![],
            best: f64::INFINITY,
            theta: 1.0,
        }
    }

    /// Back to plain iterations, measuring the rate again.
    fn reset(&mut self) {
        self.omega = 1.0;
        self.history.clear();
        self.best = f64::INFINITY;
    }

    /// Sees the cross residual of the iteration just done; returns whether the state is a
    /// good one to restart from.
    fn observe(&mut self, residual: f64) -> bool {
        if !self.enabled {
            return true;
        }
        if self.omega == 1.0 {
            self.history.push(residual);
            let k = self.history.len();
            if k >= 2 * SOR_WINDOW {
                let theta = (self.history[k - 1] / self.history[k - 1 - SOR_WINDOW])
                    .powf(1.0 / SOR_WINDOW as f64);
                if theta < 1.0 {
                    self.theta = theta;
                    // Young: the optimal ω of SOR from the Gauss–Seidel rate θ = μ².
                    self.omega = (2.0 / (1.0 + (1.0 - theta).sqrt())).min(SOR_MAX_OMEGA);
                    self.best = residual;
                    // The relaxed rate is measured on relaxed iterations only.
                    self.history.clear();
                } else {
                    // Not contracting yet: measure again over the next iterations.
                    self.history.drain(..SOR_WINDOW);
                }
            }
            return true;
        }
        if residual > 4.0 * self.best {
            // Diverging: halve the over-relaxation.
            self.omega = 1.0 + (self.omega - 1.0) / 2.0;
            if self.omega < 1.05 {
                self.reset();
            }
            self.history.clear();
            self.best = residual;
            return false;
        }
        // Refine θ from the over-relaxed rate r: Young's relation (r + ω − 1)² = r ω² θ
        // (the early plain iterations underestimate the asymptotic rate). ω only grows here.
        self.history.push(residual);
        let k = self.history.len();
        if k >= 2 * SOR_WINDOW {
            let r = (self.history[k - 1] / self.history[k - 1 - SOR_WINDOW])
                .powf(1.0 / SOR_WINDOW as f64);
            let w = self.omega;
            if r >= self.theta && k >= 3 * SOR_WINDOW {
                // Over-relaxation does no better than the plain iteration here (far from the
                // asymptotic regime, e.g. tiny ε on sparse clouds): stop using it.
                self.omega = 1.0;
                self.enabled = false;
                return true;
            }
            let theta = (r + w - 1.0).powi(2) / (r * w * w);
            if r < 1.0 && theta < 1.0 {
                let better = (2.0 / (1.0 + (1.0 - theta).sqrt())).min(SOR_MAX_OMEGA);
                if better > w + 0.01 {
                    self.omega = better;
                    self.history.clear();
                }
            }
            if self.history.len() > 3 * SOR_WINDOW {
                self.history.remove(0);
            }
        }
        if residual < self.best {
            self.best = residual;
            return true;
        }
        false
    }
}

/// The iterates Anderson acceleration combines (beyond the current one).
pub const ANDERSON_MEMORY: usize = 10;
/// Anderson restarts (forgets its iterates) when the residual grows past this multiple of
/// its smallest value.
const ANDERSON_RESTART: f64 = 10.0;

/// Anderson acceleration (type II) of a fixed-point map `g ↦ T(g)` on (B, …) tensors, with
/// one set of coefficients per batch item.
///
/// With the last `m + 1` iterates `g_k` and residuals `r_k = T(g_k) − g_k`, and the
/// differences `ΔG = [g_{k+1} − g_k]`, `ΔR = [r_{k+1} − r_k]` as (B, K, m) columns,
/// `γ = argmin ‖r − ΔR γ‖²` (regularized normal equations) and the next iterate is
/// `g + r − (ΔG + ΔR) γ` (Walker & Ni 2011, "Anderson acceleration for fixed-point
/// iterations"). With no history it is the plain step `T(g)`.
struct Anderson {
    gs: std::collections::VecDeque<Tensor>,
    rs: std::collections::VecDeque<Tensor>,
}

impl Anderson {
    fn new() -> Self {
        Self {
            gs: Default::default(),
            rs: Default::default(),
        }
    }

    fn reset(&mut self) {
        self.gs.clear();
        self.rs.clear();
    }

    /// The next iterate from `g` and `g_t = T(g)` (same shape, (B, …)).
    fn step(&mut self, g: &Tensor, g_t: &Tensor) -> Result<Tensor> {
        let shape = g.shape().clone();
        let b = g.dim(0)?;
        let gf = g.flatten_from(1)?; // (B, K)
        let r = (g_t.flatten_from(1)? - &gf)?; // (B, K)
        self.gs.push_back(gf.clone());
        self.rs.push_back(r.clone());
        if self.gs.len() > ANDERSON_MEMORY + 1 {
            self.gs.pop_front();
            self.rs.pop_front();
        }
        let m = self.gs.len() - 1;
        if m == 0 {
            return Ok(g_t.clone());
        }
        let diffs = |v: &std::collections::VecDeque<Tensor>| -> Result<Tensor> {
            let d = (0..m)
                .map(|i| &v[i + 1] - &v[i])
                .collect::<Result<Vec<_>>>()?;
            Tensor::stack(&d, 2) // (B, K, m)
        };
        let (d_g, d_r) = (diffs(&self.gs)?, diffs(&self.rs)?);
        let d_r_t = d_r.transpose(1, 2)?.contiguous()?; // (B, m, K)
        let gram = d_r_t.matmul(&d_r)?; // (B, m, m)
        let rhs = d_r_t.matmul(&r.unsqueeze(2)?)?; // (B, m, 1)
        let gram = gram.to_dtype(candle_core::DType::F64)?.to_vec3::<f64>()?;
        let rhs = rhs.to_dtype(candle_core::DType::F64)?.to_vec3::<f64>()?;
        // The rounding of the Gram matrix in the working precision sets the regularization.
        let rel = if g.dtype() == candle_core::DType::F64 {
            1e-12
        } else {
            1e-6
        };
        let mut gamma = Vec::with_capacity(b * m);
        for (a, v) in gram.iter().zip(&rhs) {
            let v: Vec<f64> = v.iter().map(|c| c[0]).collect();
            gamma.extend(solve_regularized(a, &v, rel));
        }
        let gamma = Tensor::from_vec(gamma, (b, m, 1), g.device())?.to_dtype(g.dtype())?;
        let next = ((&gf + &r)? - (d_g + d_r)?.matmul(&gamma)?.squeeze(2)?)?; // (B, K)
        next.reshape(shape)
    }
}

/// Solves `(A + λ I) γ = v` for a small symmetric positive semi-definite `A` (m ≤
/// [`ANDERSON_MEMORY`]) with `λ = rel · max_i A_ii`, by Cholesky; `γ = 0` (the plain step)
/// when `A` is zero or not finite. Written here because Candle has no linear solve and this
/// m × m host solve per iteration does not justify a linear-algebra dependency.
fn solve_regularized(a: &[Vec<f64>], v: &[f64], rel: f64) -> Vec<f64> {
    let m = v.len();
    let zero = vec![0.0; m];
    let scale = (0..m).map(|i| a[i][i]).fold(0.0f64, f64::max);
    if !(scale > 0.0 && scale.is_finite()) || v.iter().any(|x| !x.is_finite()) {
        return zero;
    }
    let lambda = rel * scale;
    // Cholesky: A + λI = L Lᵀ.
    let mut l = vec![vec![0.0; m]; m];
    for i in 0..m {
        for j in 0..=i {
            let dot: f64 = l[i][..j].iter().zip(&l[j][..j]).map(|(p, q)| p * q).sum();
            let sum = a[i][j] + if i == j { lambda } else { 0.0 } - dot;
            if i == j {
                if sum.is_nan() || sum <= 0.0 {
                    return zero;
                }
                l[i][i] = sum.sqrt();
            } else {
                l[i][j] = sum / l[j][j];
            }
        }
    }
    let mut z = vec![0.0; m];
    for i in 0..m {
        z[i] = (v[i] - (0..i).map(|k| l[i][k] * z[k]).sum::<f64>()) / l[i][i];
    }
    let mut x = vec![0.0; m];
    for i in (0..m).rev() {
        x[i] = (z[i] - (i + 1..m).map(|k| l[k][i] * x[k]).sum::<f64>()) / l[i][i];
    }
    if x.iter().all(|g| g.is_finite()) {
        x
    } else {
        zero
    }
}

/// The updates on one level, counting passes.
struct Updates<'l> {
    level: &'l dyn Level,
    rho: Option<f64>,
    passes: &'l std::cell::Cell<usize>,
}

impl Updates<'_> {
    fn sm(&self, eps: f64, pair: Pair, h: &Tensor) -> Result<Tensor> {
        self.passes.set(self.passes.get() + 1);
        self.level.softmin(eps, pair, h)
    }

    /// Step 1: the initialisation at ε₀.
    fn init(&self, eps0: f64) -> Result<State> {
        let lam = dampening(eps0, self.rho);
        let (log_a, log_b) = (self.level.log_a(), self.level.log_b());
        let deb = self.level.debiased();
        Ok(State {
            f_ba: (self.sm(eps0, Pair::Xy, log_b)? * lam)?,
            g_ab: (self.sm(eps0, Pair::Yx, log_a)? * lam)?,
            f_aa: if deb {
                Some((self.sm(eps0, Pair::Xx, log_a)? * lam)?)
            } else {
                None
            },
            g_bb: if deb {
                Some((self.sm(eps0, Pair::Yy, log_b)? * lam)?)
            } else {
                None
            },
        })
    }

    /// One symmetric update from the current values: the four f̃ of the module docs.
    fn update(&self, st: &State, eps: f64) -> Result<State> {
        let lam = dampening(eps, self.rho);
        let (log_a, log_b) = (self.level.log_a(), self.level.log_b());
        let h_b = (log_b + (&st.g_ab / eps)?)?;
        let h_a = (log_a + (&st.f_ba / eps)?)?;
        Ok(State {
            f_ba: (self.sm(eps, Pair::Xy, &h_b)? * lam)?,
            g_ab: (self.sm(eps, Pair::Yx, &h_a)? * lam)?,
            f_aa: match &st.f_aa {
                Some(f) => Some((self.sm(eps, Pair::Xx, &(log_a + (f / eps)?)?)? * lam)?),
                None => None,
            },
            g_bb: match &st.g_bb {
                Some(g) => Some((self.sm(eps, Pair::Yy, &(log_b + (g / eps)?)?)? * lam)?),
                None => None,
            },
        })
    }

    /// Step 2, one ε: the averaged update, exactly as GeomLoss.
    fn anneal_step(&self, st: State, eps: f64) -> Result<State> {
        let new = self.update(&st, eps)?;
        Ok(State {
            f_ba: average(&st.f_ba, &new.f_ba)?,
            g_ab: average(&st.g_ab, &new.g_ab)?,
            f_aa: average_opt(&st.f_aa, &new.f_aa)?,
            g_bb: average_opt(&st.g_bb, &new.g_bb)?,
        })
    }

    /// Step 3: extra iterations at `eps` until every update is below `tol` (in units of ε).
    ///
    /// The cross potentials alternate (Gauss–Seidel: g̃_ab uses the new f̃_ba), which converges
    /// about four times faster than the averaged parallel update. With
    /// [`Acceleration::Anderson`] (the default) the sweep `g_ab ↦ T(g_ab)` is Anderson
    /// accelerated ([`Anderson`]); its safeguards: the memory is dropped when the residual grows
    /// past [`ANDERSON_RESTART`]× its smallest value, a non-finite residual restarts from the
    /// best state so far with an empty memory, and the state returned at convergence is the
    /// plain sweep's (f̃_ba, g̃_ab), not an extrapolation. With
    /// [`Acceleration::Overrelaxation`] they are over-relaxed, `f ← f + ω (f̃ − f)`
    /// (successive over-relaxation in the log domain: Thibault, Chizat, Dossal & Papadakis
    /// 2021; Lehmann, von Renesse, Sambale & Uschmajew 2022). ω comes from Young's SOR rule
    /// `ω = 2 / (1 + √(1 − θ))`, with θ the linear rate of the plain alternating iteration
    /// measured on its first iterations. Safeguards: ω is halved towards 1 whenever the
    /// residual grows past 4× its smallest value, and a non-finite residual restarts from the
    /// last finite state with ω = 1.
    ///
    /// The symmetric potentials keep GeomLoss's averaged update (plain updates of a symmetric
    /// problem oscillate) and stop being updated once their own update is below `tol`: their
    /// fixed point does not depend on the cross potentials. Returns (state, extra iterations,
    /// converged).
    fn converge(
        &self,
        mut st: State,
        eps: f64,
        params: &LoopParams,
    ) -> Result<(State, usize, Option<bool>, bool)> {
        let Some(tol) = params.tol else {
            return Ok((st, 0, None, false));
        };
        let (max_iter, acceleration) = (params.max_iter, params.acceleration);
        let (log_a, log_b) = (self.level.log_a(), self.level.log_b());
        let lam = dampening(eps, self.rho);
        let relax = |old: &Tensor, new: &Tensor, omega: f64| -> Result<Tensor> {
            if omega == 1.0 {
                Ok(new.clone())
            } else {
                old + ((new - old)? * omega)?
            }
        };
        let mut sor = Sor::new(acceleration);
        let mut anderson = (acceleration == Acceleration::Anderson).then(Anderson::new);
        let mut best = f64::INFINITY;
        let mut last_good = st.clone();
        let (mut f_aa_done, mut g_bb_done) = (false, false);
        let mut extra = 0usize;
        while extra < max_iter {
            extra += 1;
            let omega = sor.omega;
            let f_t = (self.sm(eps, Pair::Xy, &(log_b + (&st.g_ab / eps)?)?)? * lam)?;
            let r_f = max_abs_diff(&f_t, &st.f_ba)?;
            let f_ba = relax(&st.f_ba, &f_t, omega)?;
            let g_t = (self.sm(eps, Pair::Yx, &(log_a + (&f_ba / eps)?)?)? * lam)?;
            let r_g = max_abs_diff(&g_t, &st.g_ab)?;
            let cross = r_f.max(r_g) / eps;
            let extrapolated = anderson.as_ref().is_some_and(|a| !a.gs.is_empty());
            if !cross.is_finite() {
                // Only an acceleration can get here from finite values: restart plainly.
                if omega == 1.0 && !extrapolated {
                    candle_core::bail!(
                        "sinkhorn: non-finite potentials at ε = {eps:e} (update error {cross})"
                    );
                }
                st = last_good.clone();
                sor.reset();
                if let Some(a) = anderson.as_mut() {
                    a.reset();
                }
                continue;
            }
            let g_ab = match anderson.as_mut() {
                Some(a) => {
                    if cross > ANDERSON_RESTART * best {
                        a.reset();
                    }
                    best = best.min(cross);
                    a.step(&st.g_ab, &g_t)?
                }
                None => relax(&st.g_ab, &g_t, omega)?,
            };
            st.f_ba = f_ba;
            st.g_ab = g_ab;
            let mut err = cross;
            if let (Some(f), false) = (&st.f_aa, f_aa_done) {
                let ft = (self.sm(eps, Pair::Xx, &(log_a + (f / eps)?)?)? * lam)?;
                let e = max_abs_diff(&ft, f)? / eps;
                err = err.max(e);
                f_aa_done = e < tol;
                st.f_aa = Some(average(f, &ft)?);
            }
            if let (Some(g), false) = (&st.g_bb, g_bb_done) {
                let gt = (self.sm(eps, Pair::Yy, &(log_b + (g / eps)?)?)? * lam)?;
                let e = max_abs_diff(&gt, g)? / eps;
                err = err.max(e);
                g_bb_done = e < tol;
                st.g_bb = Some(average(g, &gt)?);
            }
            let proceed = params.observer.as_ref().is_none_or(|o| {
                o.proceed(&Progress {
                    phase: Phase::Tol {
                        iteration: extra,
                        max_iter,
                    },
                    eps,
                    update_error: Some(err),
                    tol: Some(tol),
                    softmin_passes: self.passes.get(),
                })
            });
            if err < tol || !proceed {
                // The plain update, consistent with f_ba, rather than the last extrapolation.
                if anderson.is_some() {
                    st.g_ab = g_t;
                }
                return Ok((st, extra, Some(err < tol), !proceed));
            }
            if sor.observe(cross) && cross <= best {
                last_good = st.clone();
            }
        }
        Ok((st, extra, Some(false), false))
    }

    /// Step 4: the last, non-averaged and differentiable update at `eps`
    /// ([`Level::softmin_last`]). Returns the potentials and the update error
    /// `max_i |f̃_i − f_i| / ε`.
    fn last(&self, st: &State, eps: f64) -> Result<(DualPotentials, f64)> {
        let lam = dampening(eps, self.rho);
        let (log_a, log_b) = (self.level.log_a(), self.level.log_b());
        let h_b = (log_b + (&st.g_ab / eps)?)?.detach();
        let h_a = (log_a + (&st.f_ba / eps)?)?.detach();
        let final_sm = |pair: Pair, h: &Tensor| -> Result<Tensor> {
            self.passes.set(self.passes.get() + 1);
            self.level.softmin_last(eps, pair, h)? * lam
        };
        let f_ba = final_sm(Pair::Xy, &h_b)?;
        let g_ab = final_sm(Pair::Yx, &h_a)?;
        let (f_aa, g_bb) = match (&st.f_aa, &st.g_bb) {
            (Some(f_aa), Some(g_bb)) => {
                let h_aa = (log_a + (f_aa / eps)?)?.detach();
                let h_bb = (log_b + (g_bb / eps)?)?.detach();
                (
                    Some(final_sm(Pair::Xx, &h_aa)?),
                    Some(final_sm(Pair::Yy, &h_bb)?),
                )
            }
            _ => (None, None),
        };
        let mut err = max_abs_diff(&f_ba, &st.f_ba)?.max(max_abs_diff(&g_ab, &st.g_ab)?);
        if let (Some(a), Some(b)) = (&f_aa, &st.f_aa) {
            err = err.max(max_abs_diff(a, b)?);
        }
        if let (Some(a), Some(b)) = (&g_bb, &st.g_bb) {
            err = err.max(max_abs_diff(a, b)?);
        }
        Ok((
            DualPotentials {
                f_ba,
                g_ab,
                f_aa,
                g_bb,
            },
            err / eps,
        ))
    }
}

#[doc(hidden)]
/// Runs the multi-level loop of the module docs over `levels`.
pub fn sinkhorn_multilevel<'a>(
    levels: &mut dyn Multilevel<'a>,
    params: &LoopParams,
) -> Result<(DualPotentials, SinkhornDiagnostics)> {
    let eps_list = &params.eps_list;
    let jumps = levels.jumps(eps_list);
    let passes = std::cell::Cell::new(0);
    let mut level = levels.first()?;
    let mut st = Updates {
        level: &*level,
        rho: params.rho,
        passes: &passes,
    }
    .init(eps_list[0])?;
    let (mut k, mut ended_on_jump, mut proceed) = (0usize, false, true);
    for (i, &eps) in eps_list.iter().enumerate() {
        st = Updates {
            level: &*level,
            rho: params.rho,
            passes: &passes,
        }
        .anneal_step(st, eps)?;
        if let Some(o) = &params.observer {
            proceed &= o.proceed(&Progress {
                phase: Phase::Schedule {
                    step: i + 1,
                    steps: eps_list.len(),
                },
                eps,
                update_error: None,
                tol: params.tol,
                softmin_passes: passes.get(),
            });
        }
        for _ in jumps.iter().filter(|&&j| j == i) {
            let r = levels.refine(k, &*level, &st.detached(), eps)?;
            passes.set(passes.get() + r.passes);
            st = r.potentials;
            level = r.level;
            k += 1;
            ended_on_jump = i + 1 == eps_list.len();
        }
    }
    let eps = *eps_list.last().expect("non-empty schedule");
    let diagnostics =
        |passes: usize, extra, update_error, converged, stopped| SinkhornDiagnostics {
            eps_list: eps_list.clone(),
            softmin_passes: passes,
            extra_iterations: extra,
            update_error,
            converged,
            levels: k + 1,
            jumps: jumps.clone(),
            value_error_bound: None,
            marginal_error: None,
            stopped,
        };
    if ended_on_jump && params.tol.is_none() && levels.extrapolation_ends_loop() {
        return Ok((
            st.detached(),
            diagnostics(passes.get(), 0, f64::NAN, None, !proceed),
        ));
    }
    let up = Updates {
        level: &*level,
        rho: params.rho,
        passes: &passes,
    };
    let (st, extra, converged, stopped) = if proceed {
        up.converge(st, eps, params)?
    } else {
        (st, 0, params.tol.map(|_| false), true)
    };
    let (pot, update_error) = up.last(&st, eps)?;
    Ok((
        pot,
        diagnostics(passes.get(), extra, update_error, converged, stopped),
    ))
}

/// One level, no jump.
struct SingleLevel<'a> {
    level: Option<Box<dyn Level + 'a>>,
}

impl<'a> Multilevel<'a> for SingleLevel<'a> {
    fn jumps(&self, _: &[f64]) -> Vec<usize> {
        Vec::new()
    }
    fn first(&mut self) -> Result<Box<dyn Level + 'a>> {
        Ok(self.level.take().expect("one level"))
    }
    fn refine(
        &mut self,
        _: usize,
        _: &dyn Level,
        _: &DualPotentials,
        _: f64,
    ) -> Result<Refined<'a>> {
        candle_core::bail!("candle-ot: a single-level solve has no jump")
    }
}

/// Runs the loop on one level of point clouds. x (B, N, D), y (B, M, D), log_a (B, N),
/// log_b (B, M), detached log-weights (−∞ for zero weights). The returned potentials depend
/// on `x` and `y` through the last update only (its costs `C(x, y.detach())` etc., see the
/// module docs), and are detached from `log_a`, `log_b`.
pub fn sinkhorn_loop<S: PointSoftmin>(
    softmin: &S,
    x: &Tensor,
    y: &Tensor,
    log_a: &Tensor,
    log_b: &Tensor,
    params: &LoopParams,
) -> Result<(DualPotentials, SinkhornDiagnostics)> {
    point_loop(softmin, (x, None), (y, None), log_a, log_b, params)
}

/// [`sinkhorn_loop`] on a **ragged batch** stored padded: item b of x (B, N, D) owns rows
/// `0..x_len[b]`, item b of y (B, M, D) rows `0..y_len[b]`; the padding must carry zero weight
/// (`log_a`, `log_b` = −∞ there). The costs come from [`PointSoftmin::cost_ragged`], so a
/// backend that knows lengths never visits a padding pair; the potentials are then 0 on the
/// padding rows (any backend: finite there, and never used, as their weights are 0).
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_loop_ragged<S: PointSoftmin>(
    softmin: &S,
    x: &Tensor,
    x_len: &Lengths,
    y: &Tensor,
    y_len: &Lengths,
    log_a: &Tensor,
    log_b: &Tensor,
    params: &LoopParams,
) -> Result<(DualPotentials, SinkhornDiagnostics)> {
    point_loop(
        softmin,
        (x, Some(x_len)),
        (y, Some(y_len)),
        log_a,
        log_b,
        params,
    )
}

fn point_loop<S: PointSoftmin>(
    softmin: &S,
    (x, x_len): (&Tensor, Option<&Lengths>),
    (y, y_len): (&Tensor, Option<&Lengths>),
    log_a: &Tensor,
    log_b: &Tensor,
    params: &LoopParams,
) -> Result<(DualPotentials, SinkhornDiagnostics)> {
    // The cost between two clouds, with their lengths when the batch is ragged.
    let cost =
        move |p: &Tensor, pl: Option<&Lengths>, q: &Tensor, ql: Option<&Lengths>| match (pl, ql) {
            (Some(pl), Some(ql)) => softmin.cost_ragged(p, pl, q, ql),
            _ => softmin.cost(p, q),
        };
    let (xd, yd) = (x.detach(), y.detach());
    let costs = CostSet {
        xy: cost(&xd, x_len, &yd, y_len)?,
        yx: cost(&yd, y_len, &xd, x_len)?,
        xx: params
            .debias
            .then(|| cost(&xd, x_len, &xd, x_len))
            .transpose()?,
        yy: params
            .debias
            .then(|| cost(&yd, y_len, &yd, y_len))
            .transpose()?,
    };
    // The last update's costs C(x, y.detach()) etc. differ from the loop's only when their
    // first argument is tracked by autograd; otherwise the loop's detached costs serve.
    let (xt, yt) = (x.clone(), y.clone());
    let (xl, yl) = (x_len.cloned(), y_len.cloned());
    let track = move |pair: Pair, _: &S::Cost| -> Result<Option<S::Cost>> {
        let (a, al, b, bl) = match pair {
            Pair::Xy => (&xt, &xl, &yd, &yl),
            Pair::Yx => (&yt, &yl, &xd, &xl),
            Pair::Xx => (&xt, &xl, &xd, &xl),
            Pair::Yy => (&yt, &yl, &yd, &yl),
        };
        if a.track_op() {
            Ok(Some(cost(a, al.as_ref(), b, bl.as_ref())?))
        } else {
            Ok(None)
        }
    };
    let level = SoftminLevel {
        softmin,
        costs,
        log_a: log_a.detach(),
        log_b: log_b.detach(),
        track: Box::new(track),
    };
    sinkhorn_multilevel(
        &mut SingleLevel {
            level: Some(Box::new(level)),
        },
        params,
    )
}

#[cfg(test)]
mod tests {
    use super::solve_regularized;

    /// The Cholesky solve of Anderson's normal equations: exact on a well-conditioned system,
    /// the plain step (γ = 0) on a zero or non-finite one, finite on a singular one.
    #[test]
    fn regularized_solve() {
        let a = vec![
            vec![4.0, 1.0, 0.5],
            vec![1.0, 3.0, 0.2],
            vec![0.5, 0.2, 2.0],
        ];
        let x = [1.0, -2.0, 0.5];
        let v: Vec<f64> = a
            .iter()
            .map(|r| r.iter().zip(&x).map(|(p, q)| p * q).sum())
            .collect();
        let got = solve_regularized(&a, &v, 1e-14);
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert_eq!(solve_regularized(&[vec![0.0]], &[1.0], 1e-12), vec![0.0]);
        assert_eq!(
            solve_regularized(&[vec![f64::NAN]], &[1.0], 1e-12),
            vec![0.0]
        );
        // Rank one: the regularization keeps the solve finite.
        let s = solve_regularized(&[vec![1.0, 1.0], vec![1.0, 1.0]], &[1.0, 1.0], 1e-12);
        assert!(s.iter().all(|g| g.is_finite()), "{s:?}");
        assert!((s[0] + s[1] - 1.0).abs() < 1e-6, "{s:?}");
    }
}
