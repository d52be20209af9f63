//! `tol` / `max_iter`: iterating to convergence reproduces the references' `converged_*`
//! tensors (POT's log-domain Sinkhorn run to a marginal error < 1e-12), in f64.
//!
//! Potentials are compared free of their additive constant: F − ⟨a, F⟩ and G − ⟨b, G⟩.

use candle_core::{DType, Tensor};
use candle_ot::{Backend, Loss};
use candle_ot_cli::eval::{evaluate, read_case};
use std::path::PathBuf;

/// README tolerances for an implementation that converges (f64).
const TOL_LOSS: f64 = 1e-7;
const TOL_GRAD_POT: f64 = 1e-6;

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let s = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap()
}

/// t − ⟨w, t⟩ per batch item (the last axis).
fn gauge_free(t: &Tensor, w: &Tensor) -> Tensor {
    let s = (t * w).unwrap().sum_keepdim(t.rank() - 1).unwrap();
    t.broadcast_sub(&s).unwrap()
}

fn uniform_like(t: &Tensor) -> Tensor {
    let dims = &t.dims()[..t.rank() - 1];
    let k = *dims.last().unwrap();
    Tensor::full(1.0 / k as f64, dims, t.device()).unwrap()
}

#[test]
fn converged_references_f64() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/reference");
    let mut checked = 0;
    let mut failures = vec![];
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut case = read_case(&path).unwrap();
        if case.options.loss != Loss::Sinkhorn || !case.tensors.contains_key("converged_loss") {
            continue;
        }
        // The reference itself is not converged where POT ran out of time (README: one case).
        let info = case.metadata.get("info").map(String::as_str).unwrap_or("");
        if info.contains("\"converged\": false") {
            println!("{name}: skipped, the reference is not converged");
            continue;
        }
        case.options.tol = Some(1e-10);
        case.options.max_iter = 100_000;
        let ev = evaluate(&case, DType::F64, Backend::Online).unwrap();
        let diag = ev.diagnostics.as_ref().unwrap();
        let t = |k: &str| case.tensors.get(k).unwrap().clone();
        let a = case
            .tensors
            .get("a")
            .cloned()
            .unwrap_or_else(|| uniform_like(&t("x")));
        let b = case
            .tensors
            .get("b")
            .cloned()
            .unwrap_or_else(|| uniform_like(&t("y")));
        let o = |k: &str| ev.outputs.get(k).unwrap().clone();
        let errs = [
            ("loss", rel_err(&o("loss"), &t("converged_loss")), TOL_LOSS),
            (
                "grad_x",
                rel_err(&o("grad_x"), &t("converged_grad_x")),
                TOL_GRAD_POT,
            ),
            (
                "grad_y",
                rel_err(&o("grad_y"), &t("converged_grad_y")),
                TOL_GRAD_POT,
            ),
            (
                "F",
                rel_err(&gauge_free(&o("F"), &a), &gauge_free(&t("converged_F"), &a)),
                TOL_GRAD_POT,
            ),
            (
                "G",
                rel_err(&gauge_free(&o("G"), &b), &gauge_free(&t("converged_G"), &b)),
                TOL_GRAD_POT,
            ),
        ];
        println!(
            "{name}: {} extra iterations, converged {:?}, errors {:?}",
            diag.extra_iterations,
            diag.converged,
            errs.iter()
                .map(|(k, e, _)| format!("{k} {e:.1e}"))
                .collect::<Vec<_>>()
        );
        for (k, e, tol) in errs {
            if e.is_nan() || e > tol {
                failures.push(format!("{name} {k}: {e:.3e} > {tol:.0e}"));
            }
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} converged cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
