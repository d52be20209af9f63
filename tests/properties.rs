//! Property tests on random small clouds (proptest, deterministic: fixed seed, no failure
//! persistence, a bounded number of cases): symmetry, zero self-distance, non-negativity of
//! the converged debiased Sinkhorn divergence, permutation invariance, online == tensorized,
//! f32 against f64. CPU only (the online backend is CPU only; other devices are covered by
//! the `test_device!` suites).

#[allow(unused_macros)]
#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_ot::{Backend, Loss, SamplesLoss};
use common::ALL_LOSSES;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};

/// Cases per property.
const CASES: u32 = 48;
/// Symmetry and permutation invariance: the sums run in another order.
const TOL_REL: f64 = 1e-9;
const TOL_ABS: f64 = 1e-12;
/// S(α, α) of every debiased loss.
const TOL_SELF: f64 = 1e-10;
/// The converged debiased balanced Sinkhorn divergence is ≥ −TOL_NEG (it is ≥ 0 in exact
/// arithmetic; `tol = 1e-12` leaves a marginal error of ~1e-12 in units of ε, and the
/// value is a difference of terms of size ~diameter^p ≤ 12).
const TOL_NEG: f64 = 1e-10;
/// f32 against f64 (blur ≥ 0.1): relative error, plus an absolute floor of this factor
/// times the size of the potentials (diameter^p / p ≤ 6), for values that cancel to ~0.
const TOL_F32_P1: f64 = 1e-3;
const TOL_F32_P2: f64 = 1e-4;
const TOL_F32_ABS: f64 = 1e-5;

fn config() -> Config {
    Config {
        cases: CASES,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x0c0f_fee0),
        ..Config::default()
    }
}

/// A weighted pair of clouds: x (n, d), y (m, d), coordinates in [−1, 1), positive weights
/// summing to 1 each.
#[derive(Clone, Debug)]
struct Case {
    n: usize,
    m: usize,
    d: usize,
    x: Vec<f64>,
    y: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
}

fn normalise(w: Vec<f64>) -> Vec<f64> {
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..12, 1usize..12, 1usize..4).prop_flat_map(|(n, m, d)| {
        (
            prop::collection::vec(-1.0f64..1.0, n * d),
            prop::collection::vec(-1.0f64..1.0, m * d),
            prop::collection::vec(0.1f64..1.0, n),
            prop::collection::vec(0.1f64..1.0, m),
        )
            .prop_map(move |(x, y, a, b)| Case {
                n,
                m,
                d,
                x,
                y,
                a: normalise(a),
                b: normalise(b),
            })
    })
}

/// A case and a permutation of each cloud.
fn case_and_perms() -> impl Strategy<Value = (Case, Vec<usize>, Vec<usize>)> {
    case().prop_flat_map(|c| {
        let (n, m) = (c.n, c.m);
        (
            Just(c),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            Just((0..m).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
}

struct Tensors {
    a: Tensor,
    x: Tensor,
    b: Tensor,
    y: Tensor,
}

impl Case {
    fn tensors(&self, dtype: DType) -> Result<Tensors> {
        let dev = Device::Cpu;
        let t = |v: &[f64], dims: &[usize]| -> Result<Tensor> {
            Tensor::from_vec(v.to_vec(), dims, &dev)?.to_dtype(dtype)
        };
        Ok(Tensors {
            a: t(&self.a, &[self.n])?,
            x: t(&self.x, &[self.n, self.d])?,
            b: t(&self.b, &[self.m])?,
            y: t(&self.y, &[self.m, self.d])?,
        })
    }

    fn swapped(&self) -> Case {
        Case {
            n: self.m,
            m: self.n,
            d: self.d,
            x: self.y.clone(),
            y: self.x.clone(),
            a: self.b.clone(),
            b: self.a.clone(),
        }
    }

    fn permuted(&self, px: &[usize], py: &[usize]) -> Case {
        let rows = |v: &[f64], p: &[usize]| -> Vec<f64> {
            p.iter()
                .flat_map(|&i| v[i * self.d..(i + 1) * self.d].iter().copied())
                .collect()
        };
        Case {
            n: self.n,
            m: self.m,
            d: self.d,
            x: rows(&self.x, px),
            y: rows(&self.y, py),
            a: px.iter().map(|&i| self.a[i]).collect(),
            b: py.iter().map(|&i| self.b[i]).collect(),
        }
    }

    /// α against itself.
    fn self_pair(&self) -> Case {
        Case {
            n: self.n,
            m: self.n,
            d: self.d,
            x: self.x.clone(),
            y: self.x.clone(),
            a: self.a.clone(),
            b: self.a.clone(),
        }
    }
}

fn value(loss: &SamplesLoss, c: &Case, dtype: DType) -> Result<f64> {
    let t = c.tensors(dtype)?;
    let v = loss.forward_weighted(&t.a, &t.x, &t.b, &t.y)?;
    assert_eq!(v.dtype(), dtype);
    Ok(common::scalar(&v))
}

fn loss(kind: Loss, p: u32, blur: f64, backend: Backend) -> SamplesLoss {
    SamplesLoss::builder(kind)
        .p(p)
        .blur(blur)
        .backend(backend)
        .build()
        .expect("valid options")
}

fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    got.is_finite()
        && want.is_finite()
        && (got - want).abs() <= rel * want.abs().max(got.abs()) + abs
}

/// The losses whose symmetry is claimed: debiased Sinkhorn and the kernel norms.
/// (The Hausdorff divergence is symmetric too, and is included.)
fn symmetric_losses() -> Vec<(Loss, u32)> {
    let mut v = Vec::new();
    for kind in ALL_LOSSES {
        for p in [1, 2] {
            if kind.is_kernel() && p == 1 {
                continue; // p does not enter the kernel losses
            }
            v.push((kind, p));
        }
    }
    v
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn symmetry(c in case(), blur in 0.05f64..0.5) {
        let s = c.swapped();
        for (kind, p) in symmetric_losses() {
            for backend in [Backend::Online, Backend::Tensorized] {
                let l = loss(kind, p, blur, backend);
                let (v1, v2) = (value(&l, &c, DType::F64)?, value(&l, &s, DType::F64)?);
                prop_assert!(
                    close(v1, v2, TOL_REL, TOL_ABS),
                    "{kind:?} p={p} {backend:?}: S(a,b) = {v1:e}, S(b,a) = {v2:e}"
                );
            }
        }
    }

    #[test]
    fn self_distance_is_zero(c in case(), blur in 0.05f64..0.5) {
        let s = c.self_pair();
        for (kind, p) in symmetric_losses() {
            for backend in [Backend::Online, Backend::Tensorized] {
                let v = value(&loss(kind, p, blur, backend), &s, DType::F64)?;
                prop_assert!(
                    v.abs() <= TOL_SELF,
                    "{kind:?} p={p} {backend:?}: S(a,a) = {v:e}"
                );
            }
        }
    }

    #[test]
    fn converged_sinkhorn_divergence_is_nonnegative(c in case(), p in 1u32..3, blur in 0.1f64..0.5) {
        for backend in [Backend::Online, Backend::Tensorized] {
            let l = SamplesLoss::builder(Loss::Sinkhorn)
                .p(p)
                .blur(blur)
                .backend(backend)
                .tol(1e-12)
                .max_iter(100_000)
                .build()?;
            let t = c.tensors(DType::F64)?;
            let sol = l.solve(Some(&t.a), &t.x, Some(&t.b), &t.y)?;
            let diag = sol.diagnostics.expect("sinkhorn diagnostics");
            prop_assert_eq!(diag.converged, Some(true), "{:?}", diag);
            let v = common::scalar(&sol.loss);
            prop_assert!(v >= -TOL_NEG, "p={} {:?}: S = {:e}", p, backend, v);
        }
    }

    #[test]
    fn permutation_invariance((c, px, py) in case_and_perms(), blur in 0.05f64..0.5) {
        let q = c.permuted(&px, &py);
        for (kind, p) in symmetric_losses() {
            for backend in [Backend::Online, Backend::Tensorized] {
                let l = loss(kind, p, blur, backend);
                let (v1, v2) = (value(&l, &c, DType::F64)?, value(&l, &q, DType::F64)?);
                prop_assert!(
                    close(v1, v2, TOL_REL, TOL_ABS),
                    "{kind:?} p={p} {backend:?}: {v1:e} vs permuted {v2:e}"
                );
            }
        }
        // The raw OT_ε and the unbalanced divergence too.
        for (debias, reach) in [(false, None), (true, Some(0.5))] {
            let l = SamplesLoss::builder(Loss::Sinkhorn)
                .blur(blur)
                .debias(debias)
                .reach(reach)
                .backend(Backend::Online)
                .build()?;
            let (v1, v2) = (value(&l, &c, DType::F64)?, value(&l, &q, DType::F64)?);
            prop_assert!(
                close(v1, v2, TOL_REL, TOL_ABS),
                "debias={debias} reach={reach:?}: {v1:e} vs permuted {v2:e}"
            );
        }
    }

    #[test]
    fn tensorized_matches_online(c in case(), blur in 0.05f64..0.5, reach in prop::option::of(0.1f64..2.0)) {
        for (kind, p) in symmetric_losses() {
            for debias in [true, false] {
                if !debias && kind != Loss::Sinkhorn {
                    continue;
                }
                let mk = |backend| {
                    SamplesLoss::builder(kind)
                        .p(p)
                        .blur(blur)
                        .reach(if kind.is_kernel() { None } else { reach })
                        .debias(debias)
                        .backend(backend)
                        .build()
                };
                let on = value(&mk(Backend::Online)?, &c, DType::F64)?;
                let te = value(&mk(Backend::Tensorized)?, &c, DType::F64)?;
                prop_assert!(
                    close(on, te, TOL_REL, TOL_ABS),
                    "{kind:?} p={p} debias={debias} reach={reach:?}: online {on:e}, tensorized {te:e}"
                );
            }
        }
    }

    #[test]
    fn f32_matches_f64(c in case(), blur in 0.1f64..0.5) {
        for (kind, p) in symmetric_losses() {
            let rel = if p == 1 { TOL_F32_P1 } else { TOL_F32_P2 };
            for backend in [Backend::Online, Backend::Tensorized] {
                let l = loss(kind, p, blur, backend);
                let (v32, v64) = (value(&l, &c, DType::F32)?, value(&l, &c, DType::F64)?);
                prop_assert!(
                    close(v32, v64, rel, TOL_F32_ABS),
                    "{kind:?} p={p} {backend:?}: f32 {v32:e}, f64 {v64:e}"
                );
            }
        }
    }
}
