//! The conformance cases of the sharded solve, shared by `tests/distributed.rs` (ranks as
//! threads of one process) and `tests/mpi_sharded.rs` (ranks as MPI processes): every rank
//! rebuilds the full clouds from a seed, solves its shard with `solve_sharded`, solves the
//! full problem with `SamplesLoss::solve`, and compares its rows.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::distributed::{shard_range, Collective};
use candle_ot::{Backend, Loss, SamplesLoss};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the rows are split over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// As evenly as possible ([`shard_range`]).
    Even,
    /// Odd shards: with P ≥ 2 one rank holds a single point of x and one holds no point of y;
    /// with P ≥ 3 another rank holds no point of x.
    Odd,
}

/// The rows `rank` owns of a cloud of `n` points split `split` over `size` ranks, and whether
/// it is the x cloud.
pub fn rows(
    n: usize,
    rank: usize,
    size: usize,
    split: Split,
    is_x: bool,
) -> std::ops::Range<usize> {
    let counts: Vec<usize> = match (split, size) {
        (Split::Even, _) | (Split::Odd, 1) => {
            return shard_range(n, rank, size);
        }
        // x: [1, n − 1]; y: [m, 0].
        (Split::Odd, 2) if is_x => vec![1, n - 1],
        (Split::Odd, 2) => vec![n, 0],
        // x: [0, 1, …, rest]; y: [2, 0, …, rest].
        (Split::Odd, p) => {
            let mut c = vec![0usize; p];
            if is_x {
                c[1] = 1;
                let rest = n - 1;
                for (k, r) in (2..p).enumerate() {
                    c[r] = shard_range(rest, k, p - 2).len();
                }
            } else {
                c[0] = 2;
                let rest = n - 2;
                for (k, r) in (2..p).enumerate() {
                    c[r] = shard_range(rest, k, p - 2).len();
                }
            }
            c
        }
    };
    let start: usize = counts[..rank].iter().sum();
    start..start + counts[rank]
}

/// One configuration of the conformance matrix.
#[derive(Clone, Debug)]
pub struct Case {
    pub loss: Loss,
    pub p: u32,
    pub debias: bool,
    pub reach: Option<f64>,
    pub dtype: DType,
    pub blur: f64,
    /// Random weights with a zero (else uniform, not passed).
    pub weights: bool,
    /// A batch of 2 (else no batch axis).
    pub batched: bool,
    pub split: Split,
}

impl Case {
    pub fn name(&self) -> String {
        format!(
            "{} p={} debias={} reach={:?} {:?} blur={} weights={} batched={} {:?}",
            self.loss,
            self.p,
            self.debias,
            self.reach,
            self.dtype,
            self.blur,
            self.weights,
            self.batched,
            self.split
        )
    }

    fn loss(&self) -> Result<SamplesLoss> {
        SamplesLoss::builder(self.loss)
            .p(self.p)
            .blur(self.blur)
            .reach(self.reach)
            .debias(self.debias)
            .backend(Backend::Online)
            .build()
    }
}

/// The conformance matrix: every loss, p ∈ {1, 2}, debias, reach, f32 / f64, both splits; a
/// batched case, weighted cases, and an f32 case solved in f64 (large blur).
pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for split in [Split::Even, Split::Odd] {
        for dtype in [DType::F64, DType::F32] {
            for p in [1u32, 2] {
                for debias in [true, false] {
                    for reach in [None, Some(0.7)] {
                        v.push(Case {
                            loss: Loss::Sinkhorn,
                            p,
                            debias,
                            reach,
                            dtype,
                            blur: 0.1,
                            weights: reach.is_some() && debias,
                            batched: false,
                            split,
                        });
                    }
                }
                for reach in [None, Some(0.7)] {
                    v.push(Case {
                        loss: Loss::Hausdorff,
                        p,
                        debias: true,
                        reach,
                        dtype,
                        blur: 0.1,
                        weights: reach.is_none(),
                        batched: false,
                        split,
                    });
                }
            }
            for loss in [Loss::Energy, Loss::Gaussian, Loss::Laplacian] {
                v.push(Case {
                    loss,
                    p: 2,
                    debias: true,
                    reach: None,
                    dtype,
                    blur: 0.3,
                    weights: loss != Loss::Energy,
                    batched: false,
                    split,
                });
            }
        }
        v.push(Case {
            loss: Loss::Sinkhorn,
            p: 2,
            debias: true,
            reach: None,
            dtype: DType::F64,
            blur: 0.1,
            weights: true,
            batched: true,
            split,
        });
        // ε-scaling from a large blur: f32 promoted to f64 (largest exponent < 1).
        v.push(Case {
            loss: Loss::Sinkhorn,
            p: 2,
            debias: true,
            reach: None,
            dtype: DType::F32,
            blur: 3.0,
            weights: false,
            batched: false,
            split,
        });
    }
    v
}

/// Points N = 23 in x, M = 17 in y, D = 2 (y shifted), and weights, f64 on the CPU, from a
/// fixed seed: (a (B, N), x (B, N, D), b (B, M), y (B, M, D)) with B = 2 when `batched`, else 1.
fn data(case: &Case) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (n, m, d) = (23usize, 17usize, 2usize);
    let bsz = if case.batched { 2 } else { 1 };
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut draw = |k: usize, lo: f64, hi: f64| -> Vec<f64> {
        (0..k)
            .map(|_| lo + (hi - lo) * rng.random::<f64>())
            .collect()
    };
    let x = Tensor::from_vec(draw(bsz * n * d, 0.0, 1.0), (bsz, n, d), &Device::Cpu)?;
    let y = Tensor::from_vec(draw(bsz * m * d, 0.2, 1.3), (bsz, m, d), &Device::Cpu)?;
    let mut w = |k: usize, zero: usize| -> Result<Tensor> {
        let mut v = draw(bsz * k, 0.5, 1.5);
        for item in v.chunks_mut(k) {
            item[zero] = 0.0;
            let s: f64 = item.iter().sum();
            item.iter_mut().for_each(|x| *x /= s);
        }
        Tensor::from_vec(v, (bsz, k), &Device::Cpu)
    };
    let a = w(n, 3)?;
    let b = w(m, 0)?;
    Ok((a, x, b, y))
}

/// `max |got − want| / max |want|` (the absolute error when want is 0); NaN on NaN.
pub fn rel(got: &Tensor, want: &Tensor) -> Result<f64> {
    let f = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let (g, w) = (f(got)?, f(want)?);
    if g.len() != w.len() {
        return Ok(f64::INFINITY);
    }
    let (mut d, mut s) = (0f64, 0f64);
    for (g, w) in g.iter().zip(&w) {
        if g.is_nan() != w.is_nan() {
            return Ok(f64::NAN);
        }
        if !g.is_nan() {
            d = d.max((g - w).abs());
            s = s.max(w.abs());
        }
    }
    Ok(if s == 0.0 { d } else { d / s })
}

/// `max |t|` (NaN when t holds one), 0 for an empty tensor.
fn abs_max(t: &Tensor) -> Result<f64> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(v.iter().fold(0f64, |m, x| {
        if x.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(x.abs())
        }
    }))
}

/// The relative tolerances, measured (see docs/distributed.md): f64 values and gradients to
/// 1e-12; f32 to its rounding of sums over ~40 terms.
fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        2e-6
    }
}

/// What one rank found for one case: (what, relative error) pairs above the tolerance, and the
/// largest relative error seen.
pub struct Outcome {
    pub failures: Vec<String>,
    pub worst: f64,
    /// The relative tolerance of the case's dtype.
    pub tol: f64,
}

impl Outcome {
    /// Records the relative error `e` of `what`. The plan operators get 10× the tolerance:
    /// `exp((f + g − C)/ε)` turns a rounding δ·|f| of a potential into a relative δ·|f|/ε of
    /// the plan (|f|/ε ≤ 10 on these clouds); the errors of the other outputs are the
    /// potentials' own.
    fn note(&mut self, what: &str, e: f64) {
        let tol = if what.starts_with("plan.") {
            10.0 * self.tol
        } else {
            self.tol
        };
        self.worst = self.worst.max(if e.is_nan() { f64::INFINITY } else { e });
        if e.is_nan() || e > tol {
            self.failures
                .push(format!("{what}: relative error {e:.3e} > {tol:.0e}"));
        }
    }

    /// `max |got − want| / max |whole|`: `want` is some rows of `whole`, whose scale measures
    /// the rounding (one rank's rows may be small differences of large terms).
    fn cmp_rows(&mut self, what: &str, got: &Tensor, want: &Tensor, whole: &Tensor) -> Result<()> {
        let scale = abs_max(whole)?;
        let d = abs_max(&(got.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?)?;
        self.note(what, if scale > 0.0 { d / scale } else { d });
        Ok(())
    }

    /// Compares `got` with `want` ([`rel`]).
    fn cmp(&mut self, what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
        let e = rel(got, want)?;
        self.note(what, e);
        Ok(())
    }
}

/// Solves `case` sharded on this rank and in one process, and compares this rank's rows.
pub fn check(comm: &dyn Collective, case: &Case) -> Result<Outcome> {
    let (rank, size) = (comm.rank(), comm.size());
    let (a, x, b, y) = data(case)?;
    let loss = case.loss()?;
    let cast = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(case.dtype)?;
        if case.batched {
            Ok(t)
        } else {
            t.squeeze(0)
        }
    };
    let (n, m) = (x.dim(1)?, y.dim(1)?);
    let (xr, yr) = (
        rows(n, rank, size, case.split, true),
        rows(m, rank, size, case.split, false),
    );
    // Full problem, one process.
    let vars = |a: &Tensor, x: &Tensor, b: &Tensor, y: &Tensor| -> Result<[Var; 4]> {
        Ok([
            Var::from_tensor(&cast(a)?)?,
            Var::from_tensor(&cast(x)?)?,
            Var::from_tensor(&cast(b)?)?,
            Var::from_tensor(&cast(y)?)?,
        ])
    };
    let [fa, fx, fb, fy] = vars(&a, &x, &b, &y)?;
    let (wa, wb) = if case.weights {
        (Some(fa.as_tensor()), Some(fb.as_tensor()))
    } else {
        (None, None)
    };
    let full = loss.solve(wa, fx.as_tensor(), wb, fy.as_tensor())?;
    let full_grads = full.loss.sum_all()?.backward()?;
    // This rank's shard.
    let shard = |t: &Tensor, r: &std::ops::Range<usize>| t.narrow(1, r.start, r.len());
    let [sa, sx, sb, sy] = vars(
        &shard(&a, &xr)?,
        &shard(&x, &xr)?,
        &shard(&b, &yr)?,
        &shard(&y, &yr)?,
    )?;
    let (va, vb) = if case.weights {
        (Some(sa.as_tensor()), Some(sb.as_tensor()))
    } else {
        (None, None)
    };
    let sh = loss.solve_sharded(comm, va, sx.as_tensor(), vb, sy.as_tensor())?;
    let sh_grads = sh.loss.sum_all()?.backward()?;

    let mut r = Outcome {
        failures: Vec::new(),
        worst: 0.0,
        tol: tolerance(case.dtype),
    };
    // Rows of a (…, K, …) full result along the points axis.
    let ax = usize::from(case.batched);
    let rows_of = |t: &Tensor, r: &std::ops::Range<usize>| t.narrow(ax, r.start, r.len());
    r.cmp("loss", &sh.loss, &full.loss)?;
    r.cmp_rows("F", &sh.f, &rows_of(&full.f, &xr)?, &full.f)?;
    r.cmp_rows("G", &sh.g, &rows_of(&full.g, &yr)?, &full.g)?;
    for (what, s, f, range) in [
        ("f_ba", &sh.f_ba, &full.f_ba, &xr),
        ("g_ab", &sh.g_ab, &full.g_ab, &yr),
        ("f_aa", &sh.f_aa, &full.f_aa, &xr),
        ("g_bb", &sh.g_bb, &full.g_bb, &yr),
    ] {
        match (s, f) {
            (Some(s), Some(f)) => r.cmp_rows(what, s, &rows_of(f, range)?, f)?,
            (None, None) => {}
            _ => r.failures.push(format!("{what}: present on one side only")),
        }
    }
    // Gradients: every variable the full solve differentiates.
    for (what, sv, fv, range) in [
        ("grad x", &sx, &fx, &xr),
        ("grad y", &sy, &fy, &yr),
        ("grad a", &sa, &fa, &xr),
        ("grad b", &sb, &fb, &yr),
    ] {
        let Some(full_g) = full_grads.get(fv) else {
            continue;
        };
        let want = rows_of(full_g, range)?;
        let got = match sh_grads.get(sv) {
            Some(g) => g.clone(),
            None => want.zeros_like()?,
        };
        // Relative to the whole gradient's scale: a rank's rows may all be tiny.
        r.cmp_rows(what, &got, &want, full_g)?;
    }
    match (&sh.diagnostics, &full.diagnostics) {
        (Some(s), Some(f)) => {
            if s.eps_list != f.eps_list {
                r.failures
                    .push(format!("eps_list {:?} != {:?}", s.eps_list, f.eps_list));
            }
            if s.softmin_passes != f.softmin_passes {
                r.failures.push(format!(
                    "softmin_passes {} != {}",
                    s.softmin_passes, f.softmin_passes
                ));
            }
            let e = (s.update_error - f.update_error).abs() / f.update_error.abs().max(1e-300);
            if e.is_nan() || e > 1e3 * r.tol {
                r.failures.push(format!(
                    "update_error {:e} != {:e}",
                    s.update_error, f.update_error
                ));
            }
            if (s.converged, s.extra_iterations, s.levels)
                != (f.converged, f.extra_iterations, f.levels)
            {
                r.failures
                    .push("converged / extra_iterations / levels differ".into());
            }
        }
        (None, None) => {}
        _ => r.failures.push("diagnostics on one side only".into()),
    }
    if let (Ok(sp), Ok(fp)) = (sh.plan(), full.plan()) {
        // The plan operators on this rank's rows; values on y: a smooth function of y.
        let vfull = (fy.as_tensor().detach().sin()? * 2.0)?; // (.., M, D)
        let ufull = fx.as_tensor().detach().cos()?; // (.., N, D)
        let v = rows_of(&vfull, &yr)?;
        let u = rows_of(&ufull, &xr)?;
        let whole = [
            (fp.apply(&vfull)?, &xr),
            (fp.apply_transpose(&ufull)?, &yr),
            (fp.transfer(&vfull)?, &xr),
            (fp.barycentric_map()?, &xr),
            (fp.row_marginal()?, &xr),
            (fp.col_marginal()?, &yr),
        ];
        let got = [
            ("plan.apply", sp.apply(comm, &v)?),
            ("plan.apply_transpose", sp.apply_transpose(comm, &u)?),
            ("plan.transfer", sp.transfer(comm, &v)?),
            ("plan.barycentric_map", sp.barycentric_map()?),
            ("plan.row_marginal", sp.row_marginal()?),
            ("plan.col_marginal", sp.col_marginal()?),
        ];
        for ((what, got), (whole, range)) in got.iter().zip(&whole) {
            r.cmp_rows(what, got, &rows_of(whole, range)?, whole)?;
        }
        let (me, fe) = (sp.marginal_error(comm)?, fp.marginal_error()?);
        // A sum of |mass − weight| over all points: rounding of its terms, relative to the mass.
        if (me - fe).is_nan() || (me - fe).abs() > 1e2 * r.tol {
            r.failures
                .push(format!("plan.marginal_error {me:e} != {fe:e}"));
        }
    }
    Ok(r)
}
