//! Every GeomLoss 0.3.1 reference case in `tests/data/reference/`, through `candle-ot eval`'s
//! code path, in f64 and f32, on the tensorized and online backends.
//!
//! Metric: max|got − ref| / max|ref| over the whole tensor (all batch items together).
//! `*_exactcost` tensors are the target where present. For balanced Sinkhorn, F, G, grad_a
//! and grad_b are compared after removing their unweighted mean per batch item (they are
//! defined up to a constant). Unbalanced gradients of GeomLoss are wrong (see docs/) and are
//! not a target; values and potentials are.

use candle_core::{DType, Tensor};
use candle_ot::{Backend, Loss};
use candle_ot_cli::eval::{evaluate, read_case, Case};
use std::path::PathBuf;

/// Tolerances of the Foundation issue: (loss, grad_x/grad_y, F/G/grad_a/grad_b/labels_i).
const TOL_F64: [f64; 3] = [1e-6, 1e-6, 1e-6];
const TOL_F32_SMOOTH: [f64; 3] = [1e-5, 1e-3, 1e-4];
const TOL_F32_ROUGH: [f64; 3] = [1e-3, 1e-2, 1e-2];

fn cases() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/reference");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/data/reference exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    assert!(
        v.len() >= 30,
        "expected the 30 public reference cases, found {}",
        v.len()
    );
    v
}

fn centered(t: &Tensor) -> Tensor {
    // Remove the unweighted mean along the last axis (per batch item).
    t.broadcast_sub(&t.mean_keepdim(t.rank() - 1).unwrap())
        .unwrap()
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let d = diff.to_scalar::<f64>().unwrap();
    let s = scale.to_scalar::<f64>().unwrap();
    if s == 0.0 {
        d
    } else {
        d / s
    }
}

struct Worst(std::collections::BTreeMap<String, (f64, String)>);

impl Worst {
    fn record(&mut self, key: String, err: f64, case: &str) {
        let e = self.0.entry(key).or_insert((0.0, String::new()));
        if err > e.0 {
            *e = (err, case.to_string());
        }
    }
}

fn check_case(
    case: &Case,
    name: &str,
    dtype: DType,
    backend: Backend,
    worst: &mut Worst,
) -> Vec<String> {
    let o = &case.options;
    let balanced_sinkhorn = o.loss == Loss::Sinkhorn && o.reach.is_none();
    let unbalanced = o.reach.is_some();
    let rough = o.p == 1 || matches!(o.loss, Loss::Energy | Loss::Laplacian);
    let tol = match (dtype, rough) {
        (DType::F64, _) => TOL_F64,
        (_, false) => TOL_F32_SMOOTH,
        (_, true) => TOL_F32_ROUGH,
    };
    let ev = evaluate(case, dtype, backend).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let mut failures = vec![];
    for (key, class) in [
        ("loss", 0),
        ("grad_x", 1),
        ("grad_y", 1),
        ("grad_a", 2),
        ("grad_b", 2),
        ("F", 2),
        ("G", 2),
        ("labels_i", 2),
    ] {
        if unbalanced && key.starts_with("grad_") {
            continue;
        }
        let exact = format!("{key}_exactcost");
        let Some(want) = case.tensors.get(&exact).or_else(|| case.tensors.get(key)) else {
            continue;
        };
        let got = ev
            .outputs
            .get(key)
            .unwrap_or_else(|| panic!("{name}: no output {key}"));
        let center = balanced_sinkhorn && matches!(key, "F" | "G" | "grad_a" | "grad_b");
        let (got, want) = if center {
            (centered(got), centered(want))
        } else {
            (got.clone(), want.clone())
        };
        let err = rel_err(&got, &want);
        let kind = format!("{dtype:?}/{}/{key}", if rough { "rough" } else { "smooth" });
        worst.record(kind, err, name);
        if err.is_nan() || err > tol[class] {
            failures.push(format!(
                "{name} {dtype:?} {backend:?} {key}: rel err {err:.3e} > {:.0e}",
                tol[class]
            ));
        }
    }
    failures
}

fn run_all(dtype: DType, backend: Backend) {
    let mut worst = Worst(Default::default());
    let mut failures = vec![];
    for path in cases() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let case = read_case(&path).unwrap();
        failures.extend(check_case(&case, &name, dtype, backend, &mut worst));
    }
    for (k, (e, c)) in &worst.0 {
        println!("worst {backend:?} {k}: {e:.3e} ({c})");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn references_f64_tensorized() {
    run_all(DType::F64, Backend::Tensorized);
}

#[test]
fn references_f64_online() {
    run_all(DType::F64, Backend::Online);
}

#[test]
fn references_f32_tensorized() {
    run_all(DType::F32, Backend::Tensorized);
}

#[test]
fn references_f32_online() {
    run_all(DType::F32, Backend::Online);
}
