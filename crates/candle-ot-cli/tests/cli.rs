//! The `candle-ot` binary: `eval` writes every output in f64, fails cleanly (non-zero exit,
//! a message on stderr, no output file) on bad inputs, and `distance` reads .csv and .npy.

use candle_core::{DType, Device, Tensor};
use candle_ot::{Loss, SamplesLoss};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Agreement of the CLI's f64 outputs with the library / the references.
const TOL_F64: f64 = 1e-10;
/// The README's f64 tolerance against GeomLoss's reference values.
const TOL_REFERENCE: f64 = 1e-6;

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_candle-ot")
}

fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/reference")
        .join(format!("{name}.safetensors"))
}

/// A fresh, unique scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "candle-ot-cli-test-{}-{tag}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .output()
        .expect("the binary runs")
}

fn eval(case: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        case.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The command failed with a message holding every needle, and wrote no output file.
fn assert_failed(o: &Output, out: &Path, needles: &[&str]) {
    assert!(!o.status.success(), "expected a failure, got success");
    let err = stderr(o);
    assert!(!err.trim().is_empty(), "no message on stderr");
    for n in needles {
        assert!(err.contains(n), "stderr {err:?} does not mention {n:?}");
    }
    assert!(!out.exists(), "an output file was created");
    assert!(
        !out.with_extension("partial.safetensors").exists(),
        "a partial output file was left behind"
    );
}

fn write_case(path: &Path, tensors: &[(&str, Tensor)], params: Option<&str>) {
    let data: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    let meta = params.map(|p| HashMap::from([("params".to_string(), p.to_string())]));
    safetensors::serialize_to_file(data, meta, path).expect("write the case");
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("a readable output")
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let d = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    let s = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    if s == 0.0 {
        d
    } else {
        d / s
    }
}

fn points(n: usize, d: usize, shift: f64) -> Tensor {
    // Deterministic, irregular points (exact in f32).
    let v: Vec<f64> = (0..n * d)
        .map(|k| ((k * 37 % 101) as f64) / 128.0 + shift)
        .collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------

/// `eval` on reference cases writes loss, grad_*, F, G (and labels_i) in f64 with the right
/// shapes, and in f64 matches the reference loss.
#[test]
fn eval_reference_writes_every_output() {
    let s = Scratch::new("eval-ok");
    for (name, dtype, labels) in [
        ("sk_p2_b0.05_s0.5_deb_D2_50x70", "f64", false),
        ("sk_batch3_p2_b0.05_s0.5_deb_D2_50x70_w", "f64", false),
        ("k_energy_D2_50x70_w", "f32", false),
        ("labels_balanced_500x500", "f64", true),
    ] {
        let case = reference(name);
        let out = s.path(&format!("{name}.out.safetensors"));
        let o = eval(&case, &out, &["--dtype", dtype]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let got = load(&out);
        let input = load(&case);
        let x = &input["x"];
        let y = &input["y"];
        let lead = |t: &Tensor| t.dims()[..t.rank() - 1].to_vec();
        let mut keys = vec!["loss", "grad_x", "grad_y", "grad_a", "grad_b", "F", "G"];
        if labels {
            keys.push("labels_i");
        }
        for k in &keys {
            let t = got
                .get(*k)
                .unwrap_or_else(|| panic!("{name}: no output {k}"));
            assert_eq!(t.dtype(), DType::F64, "{name} {k}");
            assert!(
                flat(t).iter().all(|v| v.is_finite()),
                "{name} {k}: non-finite"
            );
        }
        if !labels {
            assert_eq!(
                got.len(),
                keys.len(),
                "{name}: unexpected outputs {:?}",
                got.keys()
            );
        } else {
            assert_eq!(got["labels_i"].dims(), &[x.dim(0).unwrap(), 3]);
        }
        assert_eq!(got["grad_x"].dims(), x.dims(), "{name}");
        assert_eq!(got["grad_y"].dims(), y.dims(), "{name}");
        assert_eq!(got["grad_a"].dims(), lead(x).as_slice(), "{name}");
        assert_eq!(got["grad_b"].dims(), lead(y).as_slice(), "{name}");
        assert_eq!(got["F"].dims(), lead(x).as_slice(), "{name}");
        assert_eq!(got["G"].dims(), lead(y).as_slice(), "{name}");
        let want_loss = input
            .get("loss_exactcost")
            .unwrap_or(&input["loss"])
            .clone();
        assert_eq!(got["loss"].dims(), want_loss.dims(), "{name}");
        let tol = if dtype == "f64" { TOL_REFERENCE } else { 1e-3 };
        let e = rel_err(&flat(&got["loss"]), &flat(&want_loss));
        assert!(e <= tol, "{name}: loss rel err {e:.3e}");
    }
}

#[test]
fn eval_missing_file_fails_cleanly() {
    let s = Scratch::new("missing");
    let out = s.path("out.safetensors");
    let o = eval(&s.path("does-not-exist.safetensors"), &out, &[]);
    assert_failed(&o, &out, &["does-not-exist.safetensors"]);
}

#[test]
fn eval_truncated_file_fails_cleanly() {
    let s = Scratch::new("truncated");
    let bytes = std::fs::read(reference("sk_p2_b0.05_s0.5_deb_D2_50x70")).unwrap();
    let case = s.path("truncated.safetensors");
    std::fs::write(&case, &bytes[..100]).unwrap();
    let out = s.path("out.safetensors");
    let o = eval(&case, &out, &[]);
    assert_failed(&o, &out, &["truncated.safetensors"]);
    // An empty file too.
    std::fs::write(&case, b"").unwrap();
    assert_failed(&eval(&case, &out, &[]), &out, &["truncated.safetensors"]);
}

#[test]
fn eval_without_x_fails_cleanly() {
    let s = Scratch::new("no-x");
    let case = s.path("case.safetensors");
    write_case(
        &case,
        &[("y", points(9, 2, 0.0)), ("z", points(5, 2, 0.0))],
        Some(r#"{"loss": "sinkhorn"}"#),
    );
    let out = s.path("out.safetensors");
    assert_failed(&eval(&case, &out, &[]), &out, &["`x`"]);
    // And without y.
    write_case(&case, &[("x", points(9, 2, 0.0))], None);
    assert_failed(&eval(&case, &out, &[]), &out, &["`y`"]);
}

#[test]
fn eval_bad_params_fail_cleanly() {
    let s = Scratch::new("bad-params");
    let case = s.path("case.safetensors");
    let out = s.path("out.safetensors");
    for (params, needles) in [
        (r#"{"p": 3}"#, vec!["p", "3"]),
        (r#"{"loss": "foo"}"#, vec!["loss", "foo"]),
        ("not json", vec!["params", "JSON"]),
        (r#"[1, 2]"#, vec!["params", "object"]),
        (r#"{"blur": -1}"#, vec!["blur"]),
        (r#"{"blur": "big"}"#, vec!["blur"]),
        (r#"{"scaling": 1.0}"#, vec!["scaling"]),
        (r#"{"debias": "yes"}"#, vec!["debias"]),
    ] {
        write_case(
            &case,
            &[("x", points(7, 2, 0.0)), ("y", points(9, 2, 0.5))],
            Some(params),
        );
        let o = eval(&case, &out, &[]);
        assert_failed(&o, &out, &needles);
    }
}

#[test]
fn eval_bad_tensors_fail_cleanly() {
    let s = Scratch::new("bad-tensors");
    let case = s.path("case.safetensors");
    let out = s.path("out.safetensors");
    // Mismatched dimensions, and unequal masses in balanced Sinkhorn.
    write_case(
        &case,
        &[("x", points(7, 2, 0.0)), ("y", points(9, 3, 0.5))],
        None,
    );
    assert_failed(&eval(&case, &out, &[]), &out, &["dimension"]);
    let b = Tensor::full(0.25f64, 9, &Device::Cpu).unwrap();
    write_case(
        &case,
        &[("x", points(7, 2, 0.0)), ("y", points(9, 2, 0.5)), ("b", b)],
        None,
    );
    assert_failed(&eval(&case, &out, &[]), &out, &["mass"]);
    // NaN in x.
    let mut v = flat(&points(7, 2, 0.0));
    v[3] = f64::NAN;
    let x = Tensor::from_vec(v, (7, 2), &Device::Cpu).unwrap();
    write_case(&case, &[("x", x), ("y", points(9, 2, 0.5))], None);
    assert_failed(&eval(&case, &out, &[]), &out, &["non-finite"]);
}

/// No `params`: GeomLoss's defaults (debiased Sinkhorn, p = 2, blur 0.05, scaling 0.5).
#[test]
fn eval_without_params_uses_defaults() {
    let s = Scratch::new("defaults");
    let case = s.path("case.safetensors");
    let out = s.path("out.safetensors");
    let (x, y) = (points(13, 2, 0.0), points(11, 2, 0.3));
    write_case(&case, &[("x", x.clone()), ("y", y.clone())], None);
    let o = eval(&case, &out, &["--dtype", "f64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = SamplesLoss::new(Loss::Sinkhorn).forward(&x, &y).unwrap();
    let got = load(&out);
    assert_eq!(got["loss"].dims(), &[1]);
    let e = rel_err(&flat(&got["loss"]), &flat(&want));
    assert!(e <= TOL_F64, "{e:.3e}");
}

/// Unknown params keys and unknown tensors are ignored.
#[test]
fn eval_ignores_unknown_keys() {
    let s = Scratch::new("unknown");
    let case = s.path("case.safetensors");
    let out = s.path("out.safetensors");
    let (x, y) = (points(13, 3, 0.0), points(11, 3, 0.3));
    write_case(
        &case,
        &[
            ("x", x.clone()),
            ("y", y.clone()),
            ("something_else", points(2, 2, 0.0)),
        ],
        Some(r#"{"loss": "energy", "colour": "blue", "N": 13, "p": null, "nested": {"a": 1}}"#),
    );
    let o = eval(&case, &out, &["--dtype", "f64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = SamplesLoss::new(Loss::Energy).forward(&x, &y).unwrap();
    let e = rel_err(&flat(&load(&out)["loss"]), &flat(&want));
    assert!(e <= TOL_F64, "{e:.3e}");
}

/// `distance` reads .csv (with a header) and .npy and prints the library's value.
#[test]
fn distance_reads_csv_and_npy() {
    let s = Scratch::new("distance");
    let (x, y) = (points(13, 2, 0.0), points(11, 2, 0.3));
    let csv = s.path("x.csv");
    let mut text = String::from("u,v\n");
    for row in x.to_vec2::<f64>().unwrap() {
        text.push_str(&format!("{:?},{:?}\n", row[0], row[1]));
    }
    std::fs::write(&csv, text).unwrap();
    let npy = s.path("y.npy");
    y.write_npy(&npy).unwrap();
    for (loss, extra) in [
        (Loss::Sinkhorn, vec![]),
        (Loss::Energy, vec!["--loss", "energy"]),
    ] {
        let mut args = vec!["distance", csv.to_str().unwrap(), npy.to_str().unwrap()];
        args.extend_from_slice(&extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let got: f64 = stdout
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("not a number: {stdout:?} ({e})"));
        let want = SamplesLoss::new(loss)
            .forward(&x, &y)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-10,
            "{loss:?}: {got} vs {want}"
        );
    }
    // A bad file is a clean error.
    let bad = s.path("bad.csv");
    std::fs::write(&bad, "1,2\n3,oops\n").unwrap();
    let o = run(&["distance", bad.to_str().unwrap(), npy.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.csv"), "{}", stderr(&o));
}
