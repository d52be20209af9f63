//! The converged Sinkhorn divergence (`tol`) against POT 0.9.7's log-domain Sinkhorn
//! (`ot.bregman.sinkhorn_log`) run to a marginal error below 1e-13, in f64:
//! `tests/data/pot/`, written by `scripts/geomloss-bench/pot_converged_reference.py`.
//!
//! Each case holds x, y, a, b (balanced, p = 2, blur 0.1 / 0.3 / 1, N, M ∈ {1, 17, 50, 200},
//! D ∈ {1, 2, 3}, uniform or random weights), POT's S_ε (`pot_s`) and OT_ε(a, b) (`pot_ot`), the
//! entropic dual value ⟨π, C⟩ + ε KL(π | a ⊗ b) at the optimum. Both are checked, whatever the
//! case's `debias`, on the tensorized and online backends. `diameter` and `scaling` only shape
//! the ε schedule before the `tol` iterations, not the fixed point, so the defaults are used.

#[allow(unused_macros)]
#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_ot::softmin::online;
use candle_ot::{Backend, Loss, SamplesLoss};
use candle_ot_cli::eval::{read_case, Case};
use common::*;
use std::path::PathBuf;

/// Both solvers at their fixed point in f64 (POT to a marginal error < 1e-13, candle-ot to an
/// update below 1e-12·ε): the values differ by rounding only. Observed on the CPU, both
/// backends: ≤ 2e-15 relative, 4.4e-14 on S_ε of the blur-1 case (S ≈ 0.03 from terms ≈ 0.19).
const TOL_VALUE: f64 = 1e-11;
/// candle-ot's `tol`: max_i |f̃_i − f_i| / ε.
const ITER_TOL: f64 = 1e-12;
const MAX_ITER: usize = 1_000_000;

fn cases() -> Vec<(String, Case)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/pot");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/data/pot exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 6,
        "expected the POT cases, found {}",
        paths.len()
    );
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            let case = read_case(&p).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            (name, case)
        })
        .collect()
}

fn rel(got: f64, want: f64) -> f64 {
    ((got - want) / want).abs()
}

/// S_ε and OT_ε(a, b) of every case, converged with `backend` on `dev`, against POT's.
fn pot_values(dev: &Device, backend: Backend) -> Result<()> {
    if !dtype_supported(DType::F64, dev) {
        eprintln!("skipping: no f64 on {dev:?}");
        return Ok(());
    }
    if backend == Backend::Online && !online::supports(dev) {
        eprintln!("skipping: the online kernels for {dev:?} are not compiled in");
        return Ok(());
    }
    let mut failures = vec![];
    let mut checked = 0;
    for (name, case) in cases() {
        let o = &case.options;
        assert_eq!(o.loss, Loss::Sinkhorn, "{name}");
        assert!(o.reach.is_none(), "{name}: balanced cases only");
        let t = |k: &str| -> Result<Tensor> {
            case.tensors
                .get(k)
                .unwrap_or_else(|| panic!("{name}: no tensor {k}"))
                .to_dtype(DType::F64)?
                .to_device(dev)
        };
        let (x, y, a, b) = (t("x")?, t("y")?, t("a")?, t("b")?);
        for (debias, key) in [(true, "pot_s"), (false, "pot_ot")] {
            let loss = SamplesLoss::builder(Loss::Sinkhorn)
                .p(o.p)
                .blur(o.blur)
                .debias(debias)
                .backend(backend)
                .tol(ITER_TOL)
                .max_iter(MAX_ITER)
                .build()?;
            let sol = loss.solve(Some(&a), &x, Some(&b), &y)?;
            let diag = sol.diagnostics.as_ref().expect("sinkhorn diagnostics");
            let got = scalar(&sol.loss);
            let want = scalar(&t(key)?);
            let err = rel(got, want);
            println!(
                "{name} {backend:?} {key}: got {got:.17e}, POT {want:.17e}, rel err {err:.1e}, \
                 {} extra iterations, update error {:.1e}",
                diag.extra_iterations, diag.update_error
            );
            if diag.converged != Some(true) {
                failures.push(format!(
                    "{name} {key}: tol {ITER_TOL:e} not reached in {MAX_ITER} iterations \
                     (update error {:.1e})",
                    diag.update_error
                ));
            }
            if err.is_nan() || err > TOL_VALUE {
                failures.push(format!(
                    "{name} {backend:?} {key}: {got:.17e} vs POT {want:.17e}, rel err {err:.3e} \
                     > {TOL_VALUE:e}"
                ));
            }
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} values checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn pot_tensorized(dev: &Device) -> Result<()> {
    pot_values(dev, Backend::Tensorized)
}

fn pot_online(dev: &Device) -> Result<()> {
    pot_values(dev, Backend::Online)
}

test_device!(
    pot_tensorized,
    pot_tensorized_cpu,
    pot_tensorized_cuda,
    pot_tensorized_metal
);
test_device!(
    pot_online,
    pot_online_cpu,
    pot_online_cuda,
    pot_online_metal
);
