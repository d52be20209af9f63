//! The `candle-ot` binary: `eval` writes every output in f64, fails cleanly (non-zero exit,
//! a message on stderr, no output file) on bad inputs, and `distance` reads .csv and .npy.
//! Grids: `eval` on grid reference cases, `distance` on PNG images and `bench --grid`.

use candle_core::{DType, Device, Tensor};
use candle_ot::{ImagesLoss, Loss, SamplesLoss};
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

fn grid_reference(name: &str) -> PathBuf {
    reference(&format!("grid/{name}"))
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
        let want = SamplesLoss::new(loss)
            .forward(&x, &y)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // The default dtype is f32, as for `eval` (#17, item 9): within f32's tolerance.
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let got = stdout_number(&o);
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "{loss:?} f32: {got} vs {want}"
        );
        args.extend_from_slice(&["--dtype", "f64"]);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let got: f64 = stdout
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("not a number: {stdout:?} ({e})"));
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

/// Numeric text files (#17, item 2): a first line with a number in it is data, never a header
/// (it used to be dropped silently: `1,2x` then `3,4`, `5,6` against `3,4`, `5,6` printed 0);
/// whitespace- (numpy's `savetxt`) and semicolon-separated files are read like comma-separated
/// ones; a header (no field a number) is skipped with a note on stderr.
#[test]
fn csv_first_lines_whitespace_and_semicolons() {
    let s = Scratch::new("csv-kinds");
    let write = |name: &str, text: &str| {
        let p = s.path(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let a = write("a.csv", "1,2x\n3,4\n5,6\n");
    let b = write("b.csv", "3,4\n5,6\n");
    let o = run(&["distance", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(!o.status.success(), "a first line with a number is data");
    let e = stderr(&o);
    assert!(
        e.contains("a.csv") && e.contains("line 1") && e.contains("2x"),
        "{e}"
    );
    let value = |x: &std::path::Path, y: &std::path::Path| -> (f64, String) {
        let o = run(&["distance", x.to_str().unwrap(), y.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        (v, stderr(&o))
    };
    let y = write("y.csv", "0.5,0.5\n1.5,0.25\n");
    let (want, _) = value(&write("x.csv", "1,2\n3,4\n5,6\n"), &y);
    assert!(want > 0.0);
    for (name, text) in [
        ("ws.txt", "1.0  2.0\n3\t4\n\n# comment\n  5 6  \n"),
        ("semi.csv", "1;2\n3;4\n5;6\n"),
        ("savetxt.txt", "1.000000000000000000e+00 2.000000000000000000e+00\n3.000000000000000000e+00 4.000000000000000000e+00\n5.000000000000000000e+00 6.000000000000000000e+00\n"),
    ] {
        let (got, _) = value(&write(name, text), &y);
        assert!((got - want).abs() <= 1e-12 * want, "{name}: {got} vs {want}");
    }
    let (got, err) = value(&write("hdr.csv", "u,v\n1,2\n3,4\n5,6\n"), &y);
    assert!((got - want).abs() <= 1e-12 * want);
    assert!(err.contains("header") && err.contains("u,v"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Grids.

/// `t` (B, grid…) with its mean per batch item removed (balanced potentials and gradients are
/// defined up to a constant, as the grid reference README compares them).
fn centered(t: &Tensor) -> Vec<f64> {
    let b = t.dim(0).unwrap();
    let v = flat(t);
    let n = v.len() / b;
    v.chunks(n)
        .flat_map(|c| {
            let m = c.iter().sum::<f64>() / n as f64;
            c.iter().map(move |x| x - m).collect::<Vec<_>>()
        })
        .collect()
}

/// `eval` on grid reference cases (ImagesLoss): loss, grad_a, grad_b, F, G in f64, shaped
/// like a and b; f64 within the README's 1e-6 of GeomLoss, f32 within its f32 tolerances.
#[test]
fn eval_grid_reference_cases() {
    let s = Scratch::new("eval-grid");
    for (name, dtype, tol_loss, tol_pot) in [
        (
            "img_p2_default_s0.9_32x32",
            "f64",
            TOL_REFERENCE,
            TOL_REFERENCE,
        ),
        ("img_p2_b0.05_s0.5_32x32_batch2", "f32", 1e-5, 1e-4),
    ] {
        let case = grid_reference(name);
        let out = s.path(&format!("{name}.out.safetensors"));
        let o = eval(&case, &out, &["--dtype", dtype]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let got = load(&out);
        let want = load(&case);
        let mut keys: Vec<&String> = got.keys().collect();
        keys.sort();
        assert_eq!(keys, ["F", "G", "grad_a", "grad_b", "loss"], "{name}");
        for k in ["F", "G", "grad_a", "grad_b"] {
            assert_eq!(got[k].dtype(), DType::F64, "{name} {k}");
            assert_eq!(got[k].dims(), want["a"].dims(), "{name} {k}");
        }
        assert_eq!(got["loss"].dims(), want["loss"].dims(), "{name}");
        let e = rel_err(&flat(&got["loss"]), &flat(&want["loss"]));
        assert!(e <= tol_loss, "{name} ({dtype}): loss rel err {e:.3e}");
        for k in ["F", "G", "grad_a", "grad_b"] {
            let e = rel_err(&centered(&got[k]), &centered(&want[k]));
            assert!(e <= tol_pot, "{name} ({dtype}): {k} rel err {e:.3e}");
        }
    }
}

/// A barycenter case runs ImagesBarycenter and writes `barycenter` (f64), GeomLoss's reference
/// to 1e-6; a grid case refuses a point-cloud backend, and so does a barycenter case.
#[test]
fn eval_grid_unsupported_fails_cleanly() {
    let s = Scratch::new("eval-bary");
    let out = s.path("out.safetensors");
    let case = grid_reference("bary_K3_32x32");
    let o = eval(&case, &out, &["--dtype", "f64"]);
    assert!(o.status.success(), "bary_K3_32x32: {}", stderr(&o));
    let got = load(&out);
    let want = load(&case);
    let keys: Vec<&String> = got.keys().collect();
    assert_eq!(keys, ["barycenter"]);
    assert_eq!(got["barycenter"].dtype(), DType::F64);
    assert_eq!(got["barycenter"].dims(), want["barycenter"].dims());
    let e = rel_err(&flat(&got["barycenter"]), &flat(&want["barycenter"]));
    assert!(e <= TOL_REFERENCE, "barycenter rel err {e:.3e}");
    std::fs::remove_file(&out).unwrap();
    let o = eval(&case, &out, &["--backend", "online"]);
    assert_failed(&o, &out, &["--backend", "barycenter"]);
    let o = eval(
        &grid_reference("img_p2_default_16x16"),
        &out,
        &["--backend", "tensorized"],
    );
    assert_failed(&o, &out, &["--backend", "grid"]);
}

/// Writes an 8-bit grayscale PNG of `h` rows and `w` columns with pixel (i, j) = `f(i, j)`;
/// returns its masses (h, w) normalised to 1, from `f` or from `255 − f` (`invert`).
fn write_png(path: &Path, h: u32, w: u32, f: impl Fn(u32, u32) -> u8, invert: bool) -> Tensor {
    let img = image::GrayImage::from_fn(w, h, |j, i| image::Luma([f(i, j)]));
    img.save(path).unwrap();
    masses(h, w, |i, j| {
        let v = f(i, j) as f64;
        if invert {
            255.0 - v
        } else {
            v
        }
    })
}

fn masses(h: u32, w: u32, f: impl Fn(u32, u32) -> f64) -> Tensor {
    let v: Vec<f64> = (0..h)
        .flat_map(|i| (0..w).map(move |j| (i, j)))
        .map(|(i, j)| f(i, j))
        .collect();
    let s: f64 = v.iter().sum();
    let v: Vec<f64> = v.iter().map(|x| x / s).collect();
    Tensor::from_vec(v, (h as usize, w as usize), &Device::Cpu).unwrap()
}

fn stdout_number(o: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&o.stdout);
    stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("not a number: {stdout:?} ({e})"))
}

/// `distance` on two PNG images (a non-square grid) prints ImagesLoss's value, with and
/// without `--invert`; an RGB PNG is read as its luma; an .npy grid with `--grid 2` matches
/// the PNG; `--json` reports the grid and the pixel pairs.
#[test]
fn distance_on_png_images() {
    let s = Scratch::new("distance-png");
    let (h, w) = (20u32, 24u32);
    // Two blobs at different places on a grey background (every value in 10..=240).
    let blob = |ci: f64, cj: f64| {
        move |i: u32, j: u32| {
            let r2 = (i as f64 - ci).powi(2) + (j as f64 - cj).powi(2);
            (10.0 + 230.0 * (-r2 / 18.0).exp()).round() as u8
        }
    };
    let (fa, fb) = (blob(6.0, 7.0), blob(13.0, 16.0));
    let (pa, pb) = (s.path("a.png"), s.path("b.png"));
    let a = write_png(&pa, h, w, fa, false);
    let b = write_png(&pb, h, w, fb, false);
    let a_inv = write_png(&pa, h, w, fa, true);
    let b_inv = write_png(&pb, h, w, fb, true);
    let want = |a: &Tensor, b: &Tensor| -> f64 {
        ImagesLoss::builder(2)
            .build()
            .unwrap()
            .forward(a, b)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (pa_s, pb_s) = (pa.to_str().unwrap(), pb.to_str().unwrap());
    for (extra, want) in [
        (vec![], want(&a, &b)),
        (vec!["--invert"], want(&a_inv, &b_inv)),
    ] {
        let mut args = vec!["distance", pa_s, pb_s, "--dtype", "f64"];
        args.extend_from_slice(&extra);
        let o = run(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        let got = stdout_number(&o);
        assert!(
            ((got - want) / want).abs() < 1e-10,
            "{extra:?}: {got} vs {want}"
        );
    }
    let plain = want(&a, &b);
    assert!(
        (plain - want(&a_inv, &b_inv)).abs() > 1e-3 * plain,
        "--invert changes the masses"
    );

    // An RGB image with equal channels has the same luma: the same loss, and a note.
    let rgb = s.path("a_rgb.png");
    image::RgbImage::from_fn(w, h, |j, i| {
        let v = fa(i, j);
        image::Rgb([v, v, v])
    })
    .save(&rgb)
    .unwrap();
    let o = run(&["distance", rgb.to_str().unwrap(), pb_s, "--dtype", "f64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("grayscale"), "{}", stderr(&o));
    let got = stdout_number(&o);
    assert!(
        ((got - plain) / plain).abs() < 1e-10,
        "rgb: {got} vs {plain}"
    );

    // The same density as an .npy grid (float gray levels in [0, 1]).
    let npy = s.path("b.npy");
    (b.clone() * 7.0).unwrap().write_npy(&npy).unwrap();
    let o = run(&[
        "distance",
        pa_s,
        npy.to_str().unwrap(),
        "--grid",
        "2",
        "--dtype",
        "f64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = stdout_number(&o);
    assert!(
        ((got - plain) / plain).abs() < 1e-10,
        "npy: {got} vs {plain}"
    );

    // --json: the loss, the grid and the work.
    let o = run(&[
        "distance",
        pa_s,
        pb_s,
        "--json",
        "--scaling",
        "0.9",
        "--dtype",
        "f64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).expect("one JSON line");
    let sol = ImagesLoss::builder(2)
        .scaling(0.9)
        .build()
        .unwrap()
        .solve(&a, &b)
        .unwrap();
    assert_eq!(v["grid"], serde_json::json!([20, 24]));
    assert_eq!(v["pixel_pairs"].as_u64(), Some(sol.pixel_pairs));
    assert_eq!(v["levels"].as_u64(), Some(sol.diagnostics.levels as u64));
    let got = v["loss"][0].as_f64().unwrap();
    let want = sol.loss.to_scalar::<f64>().unwrap();
    assert!(((got - want) / want).abs() < 1e-10, "json: {got} vs {want}");
}

/// Densities on different grids: a clear error naming both shapes.
#[test]
fn distance_on_mismatched_grids_fails_cleanly() {
    let s = Scratch::new("distance-mismatch");
    let (pa, pb) = (s.path("a.png"), s.path("b.png"));
    write_png(&pa, 16, 16, |i, j| (i * 7 + j * 3) as u8 + 1, false);
    write_png(&pb, 12, 16, |i, j| (i * 5 + j) as u8 + 1, false);
    let o = run(&["distance", pa.to_str().unwrap(), pb.to_str().unwrap()]);
    assert!(!o.status.success(), "expected a failure");
    assert!(
        o.stdout.is_empty(),
        "printed {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = stderr(&o);
    for n in ["16×16", "12×16", "one grid", "resize"] {
        assert!(err.contains(n), "stderr {err:?} does not mention {n:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// `bench --grid 16x16 --repeat 1 --json`: one JSON line with ImagesLoss's pixel pairs.
#[test]
fn bench_grid_reports_pixel_pairs() {
    let o = run(&["bench", "--grid", "16x16", "--repeat", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).expect("one JSON line");
    // The work depends on the grid and the schedule only (scaling 0.9, blur one pixel).
    let a = Tensor::full(1.0f32 / 256.0, (1, 16, 16), &Device::Cpu).unwrap();
    let sol = ImagesLoss::builder(2)
        .scaling(0.9)
        .build()
        .unwrap()
        .solve(&a, &a)
        .unwrap();
    assert_eq!(v["pixel_pairs"].as_u64(), Some(sol.pixel_pairs), "{v}");
    assert_eq!(v["grid"], serde_json::json!([16, 16]), "{v}");
    for k in ["median_s", "pixel_pairs_per_s", "loss"] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
        assert!(x.is_finite() && x >= 0.0, "{k} = {x}");
    }
    assert!(v["peak_rss_bytes"].as_u64().is_some(), "{v}");
}

/// `distance` names the files in the library's errors (which say x and y), and warns on stderr
/// about options the loss ignores (#17, item 7).
#[test]
fn distance_names_files_and_warns_about_ignored_options() {
    let s = Scratch::new("distance-names");
    let p2 = s.path("two.csv");
    let p3 = s.path("three.csv");
    std::fs::write(&p2, "1,2\n3,4\n").unwrap();
    std::fs::write(&p3, "1,2,3\n3,4,5\n").unwrap();
    let o = run(&["distance", p2.to_str().unwrap(), p3.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("two.csv") && e.contains("three.csv") && e.contains("dimension"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    let o = run(&[
        "distance",
        p2.to_str().unwrap(),
        p2.to_str().unwrap(),
        "--loss",
        "energy",
        "--reach",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.starts_with("warning: reach = 1 is ignored"), "{e}");
}

/// `distance` takes weights (`--a`, `--b`: one-column text or (N,) arrays) and `--max-iter`,
/// and warns when `--tol` is not met (#17, item 9).
#[test]
fn distance_takes_weights_and_max_iter() {
    let s = Scratch::new("distance-weights");
    let write = |name: &str, text: &str| {
        let p = s.path(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let x = write("x.csv", "0\n1\n3\n");
    let y = write("y.csv", "0.5\n2\n");
    let a = write("a.csv", "0.2\n0.3\n0.5\n");
    let b = write("b.csv", "0.6\n0.4\n");
    let o = run(&[
        "distance",
        x.to_str().unwrap(),
        y.to_str().unwrap(),
        "--a",
        a.to_str().unwrap(),
        "--b",
        b.to_str().unwrap(),
        "--dtype",
        "f64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let t = |v: &[f64], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
    let want = SamplesLoss::new(Loss::Sinkhorn)
        .forward_weighted(
            &t(&[0.2, 0.3, 0.5], &[3]),
            &t(&[0.0, 1.0, 3.0], &[3, 1]),
            &t(&[0.6, 0.4], &[2]),
            &t(&[0.5, 2.0], &[2, 1]),
        )
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((got - want).abs() <= 1e-10 * want.abs(), "{got} vs {want}");
    let o = run(&[
        "distance",
        x.to_str().unwrap(),
        y.to_str().unwrap(),
        "--tol",
        "1e-12",
        "--max-iter",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("warning: not converged after 3"),
        "{}",
        stderr(&o)
    );
}

/// GeomLoss's fixed schedule says on stderr that its value may be far from the converged one;
/// a converged `--tol` run says nothing (#17, item 3).
#[test]
fn distance_warns_about_the_fixed_schedule() {
    let s = Scratch::new("distance-accuracy");
    let px = s.path("x.csv");
    let py = s.path("y.csv");
    std::fs::write(&px, "0\n1\n3\n").unwrap();
    std::fs::write(&py, "0.5\n2\n").unwrap();
    let (x, y) = (px.to_str().unwrap(), py.to_str().unwrap());
    let o = run(&["distance", x, y, "--blur", "0.1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.starts_with("warning: the value comes from GeomLoss's fixed ε schedule"),
        "{e}"
    );
    let o = run(&[
        "distance",
        x,
        y,
        "--blur",
        "0.1",
        "--tol",
        "1e-9",
        "--max-iter",
        "100000",
        "--dtype",
        "f64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "a converged run is silent");
}

/// #19: `tol` never fails silently. When `--max-iter` comes first, `distance` and `bench`
/// print a line starting `warning: not converged`, and `--require-convergence` makes it an
/// error (exit status 1).
#[test]
fn not_converged_warns_or_fails() {
    let s = Scratch::new("not-converged");
    let px = s.path("x.csv");
    let py = s.path("y.csv");
    std::fs::write(&px, "0\n1\n3\n0.2\n2.5\n").unwrap();
    std::fs::write(&py, "0.5\n2\n1.1\n").unwrap();
    let (x, y) = (px.to_str().unwrap(), py.to_str().unwrap());
    let args = [
        "distance",
        x,
        y,
        "--blur",
        "0.05",
        "--tol",
        "1e-12",
        "--max-iter",
        "2",
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("warning: not converged"),
        "{}",
        stderr(&o)
    );
    let mut strict = args.to_vec();
    strict.push("--require-convergence");
    let o = run(&strict);
    assert!(!o.status.success(), "an unconverged run fails on request");
    assert!(stderr(&o).contains("not converged"), "{}", stderr(&o));
    let o = run(&[
        "bench",
        "--n",
        "40",
        "--m",
        "30",
        "--d",
        "2",
        "--blur",
        "0.02",
        "--tol",
        "1e-12",
        "--max-iter",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("warning: not converged"),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------
// Ragged (packed) batches, #16.

/// Positive weights summing to 1 within each item of a packed cloud (f64, deterministic).
fn packed_weights(lengths: &[usize], salt: usize) -> Tensor {
    let mut w = Vec::new();
    for &n in lengths {
        let item: Vec<f64> = (0..n)
            .map(|k| 1.0 + ((k * 29 + salt * 13) % 17) as f64 / 8.0)
            .collect();
        let s: f64 = item.iter().sum();
        w.extend(item.iter().map(|v| v / s));
    }
    let k = w.len();
    Tensor::from_vec(w, k, &Device::Cpu).unwrap()
}

/// Per-item library calls (f64, online backend, the options given): the loss of every item
/// and the gradients of their sum, packed like the inputs.
fn per_item_reference(
    opts: &candle_ot::SamplesLossOptions,
    (a, x, xl): (Option<&Tensor>, &Tensor, &[usize]),
    (b, y, yl): (Option<&Tensor>, &Tensor, &[usize]),
) -> HashMap<&'static str, Vec<f64>> {
    let loss = SamplesLoss::from_options(candle_ot::SamplesLossOptions {
        backend: candle_ot::Backend::Online,
        ..opts.clone()
    })
    .unwrap();
    let mut out: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let (mut ox, mut oy) = (0, 0);
    for (&n, &m) in xl.iter().zip(yl) {
        let item_w = |w: Option<&Tensor>, off: usize, k: usize| match w {
            Some(w) => w.narrow(0, off, k).unwrap(),
            None => Tensor::full(1.0 / k as f64, k, &Device::Cpu).unwrap(),
        };
        let var = |t: Tensor| candle_core::Var::from_tensor(&t).unwrap();
        let va = var(item_w(a, ox, n));
        let vb = var(item_w(b, oy, m));
        let vx = var(x.narrow(0, ox, n).unwrap());
        let vy = var(y.narrow(0, oy, m).unwrap());
        let sol = loss
            .solve(
                Some(va.as_tensor()),
                vx.as_tensor(),
                Some(vb.as_tensor()),
                vy.as_tensor(),
            )
            .unwrap();
        let l = &sol.loss;
        let g = l.sum_all().unwrap().backward().unwrap();
        out.entry("loss").or_default().extend(flat(l));
        out.entry("F").or_default().extend(flat(&sol.f));
        out.entry("G").or_default().extend(flat(&sol.g));
        if opts.loss == Loss::Sinkhorn {
            // Labels: the item's own points' coordinates, transferred.
            let labels = sol.transfer(&y.narrow(0, oy, m).unwrap()).unwrap();
            out.entry("labels_i").or_default().extend(flat(&labels));
        }
        for (k, v) in [
            ("grad_x", &vx),
            ("grad_y", &vy),
            ("grad_a", &va),
            ("grad_b", &vb),
        ] {
            out.entry(k)
                .or_default()
                .extend(flat(g.get(v.as_tensor()).unwrap()));
        }
        ox += n;
        oy += m;
    }
    out
}

/// `eval` on a ragged case (`x_lengths`, `y_lengths` of several integer dtypes) writes the
/// loss per item (B,), the packed gradients, the packed potentials F, G and (Sinkhorn, packed
/// labels `l`) the packed `labels_i`, equal in f64 to per-item library calls given the same
/// diameter: debiased Sinkhorn with uniform weights, unbalanced Sinkhorn and the energy
/// kernel with given weights.
#[test]
fn eval_ragged_case_matches_per_item_calls() {
    let s = Scratch::new("ragged");
    let case = s.path("case.safetensors");
    let out = s.path("out.safetensors");
    let (xl, yl) = ([7usize, 12, 1, 5], [9usize, 4, 11, 2]);
    let (sn, sm) = (xl.iter().sum::<usize>(), yl.iter().sum::<usize>());
    let (x, y) = (points(sn, 2, 0.0), points(sm, 2, 0.3));
    let (a, b) = (packed_weights(&xl, 1), packed_weights(&yl, 2));
    let lengths = |l: &[usize], dtype: DType| -> Tensor {
        let v: Vec<i64> = l.iter().map(|&n| n as i64).collect();
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        match dtype {
            // Candle casts i64 to u8 / u32 on the CPU.
            DType::I64 => t,
            d => t.to_dtype(d).unwrap(),
        }
    };
    let sinkhorn = candle_ot::SamplesLossOptions {
        blur: 0.1,
        diameter: Some(2.0),
        ..Default::default()
    };
    for (params, opts, weighted, (dx, dy)) in [
        (
            r#"{"loss": "sinkhorn", "blur": 0.1, "diameter": 2.0}"#,
            sinkhorn.clone(),
            false,
            (DType::I64, DType::U32),
        ),
        (
            r#"{"loss": "sinkhorn", "blur": 0.1, "diameter": 2.0, "reach": 0.5}"#,
            candle_ot::SamplesLossOptions {
                reach: Some(0.5),
                ..sinkhorn.clone()
            },
            true,
            (DType::U8, DType::I64),
        ),
        (
            r#"{"loss": "energy"}"#,
            candle_ot::SamplesLossOptions {
                loss: Loss::Energy,
                ..Default::default()
            },
            true,
            (DType::U32, DType::U8),
        ),
    ] {
        let mut tensors = vec![
            ("x", x.clone()),
            ("y", y.clone()),
            ("x_lengths", lengths(&xl, dx)),
            ("y_lengths", lengths(&yl, dy)),
        ];
        if weighted {
            tensors.push(("a", a.clone()));
            tensors.push(("b", b.clone()));
        }
        let sinkhorn_case = opts.loss == Loss::Sinkhorn;
        if sinkhorn_case {
            tensors.push(("l", y.clone())); // packed labels (ΣM_b, K = 2)
        }
        write_case(&case, &tensors, Some(params));
        let o = eval(&case, &out, &["--dtype", "f64"]);
        assert!(o.status.success(), "{params}: {}", stderr(&o));
        let got = load(&out);
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        let mut expected = vec!["F", "G", "grad_a", "grad_b", "grad_x", "grad_y", "loss"];
        if sinkhorn_case {
            expected.push("labels_i");
        }
        expected.sort();
        assert_eq!(names, expected, "{params}");
        assert_eq!(got["F"].dims(), &[sn], "{params}");
        assert_eq!(got["G"].dims(), &[sm], "{params}");
        assert_eq!(got["loss"].dims(), &[xl.len()], "{params}");
        assert_eq!(got["grad_x"].dims(), &[sn, 2], "{params}");
        assert_eq!(got["grad_y"].dims(), &[sm, 2], "{params}");
        assert_eq!(got["grad_a"].dims(), &[sn], "{params}");
        assert_eq!(got["grad_b"].dims(), &[sm], "{params}");
        let (wa, wb) = if weighted {
            (Some(&a), Some(&b))
        } else {
            (None, None)
        };
        let want = per_item_reference(&opts, (wa, &x, &xl), (wb, &y, &yl));
        let mut keys = vec!["loss", "grad_x", "grad_y", "grad_a", "grad_b", "F", "G"];
        if sinkhorn_case {
            assert_eq!(got["labels_i"].dims(), &[sn, 2], "{params}");
            keys.push("labels_i");
        }
        for k in keys {
            assert_eq!(got[k].dtype(), DType::F64, "{params} {k}");
            let e = rel_err(&flat(&got[k]), &want[k]);
            assert!(e <= TOL_F64, "{params} {k}: rel err {e:.3e}");
        }
        // The values are not trivially zero.
        assert!(want["loss"].iter().all(|v| v.abs() > 1e-6), "{params}");
    }
}

/// A named tensor of a case file.
type Named = (&'static str, Tensor);

/// Malformed ragged cases fail cleanly, naming the tensor at fault.
#[test]
fn eval_ragged_bad_cases_fail_cleanly() {
    let s = Scratch::new("ragged-bad");
    let case = s.path("case.safetensors");
    let out = s.path("out.safetensors");
    let l = |v: &[i64]| Tensor::new(v, &Device::Cpu).unwrap();
    let (x, y) = (points(10, 2, 0.0), points(8, 2, 0.3));
    let cases: Vec<(Vec<Named>, Vec<&str>)> = vec![
        // Only one of the two.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("x_lengths", l(&[4, 6])),
            ],
            vec!["`x_lengths`", "`y_lengths`"],
        ),
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("y_lengths", l(&[3, 5])),
            ],
            vec!["`y_lengths`", "`x_lengths`"],
        ),
        // Not integers.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                (
                    "x_lengths",
                    Tensor::new(&[4.0f32, 6.0], &Device::Cpu).unwrap(),
                ),
                ("y_lengths", l(&[3, 5])),
            ],
            vec!["`x_lengths`", "integers", "f32"],
        ),
        // Not 1-D.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("x_lengths", l(&[4, 6])),
                ("y_lengths", l(&[3, 5]).reshape((1, 2)).unwrap()),
            ],
            vec!["`y_lengths`", "1-D", "[1, 2]"],
        ),
        // Not summing to the rows.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("x_lengths", l(&[4, 5])),
                ("y_lengths", l(&[3, 5])),
            ],
            vec!["`x_lengths`", "sums to 9", "10 rows"],
        ),
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("x_lengths", l(&[4, 6])),
                ("y_lengths", l(&[3, 6])),
            ],
            vec!["`y_lengths`", "sums to 9", "8 rows"],
        ),
        // A zero and a negative size.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("x_lengths", l(&[4, 6])),
                ("y_lengths", l(&[8, 0])),
            ],
            vec!["`y_lengths`[1] is 0"],
        ),
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("x_lengths", l(&[12, -2])),
                ("y_lengths", l(&[3, 5])),
            ],
            vec!["`x_lengths`[1] is -2"],
        ),
        // Different item counts.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("x_lengths", l(&[4, 6])),
                ("y_lengths", l(&[3, 4, 1])),
            ],
            vec!["`x_lengths` has 2 items", "`y_lengths` has 3"],
        ),
        // Batched x.
        (
            vec![
                ("x", x.reshape((2, 5, 2)).unwrap()),
                ("y", y.clone()),
                ("x_lengths", l(&[5, 5])),
                ("y_lengths", l(&[3, 5])),
            ],
            vec!["`x`", "(ΣN_b, D)"],
        ),
        // Weights of the wrong length.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                ("b", Tensor::full(0.25f64, 4, &Device::Cpu).unwrap()),
                ("x_lengths", l(&[4, 6])),
                ("y_lengths", l(&[3, 5])),
            ],
            vec!["`b`", "(8,)"],
        ),
        // Labels not packed like y.
        (
            vec![
                ("x", x.clone()),
                ("y", y.clone()),
                (
                    "l",
                    Tensor::zeros((7, 2), DType::F64, &Device::Cpu).unwrap(),
                ),
                ("x_lengths", l(&[4, 6])),
                ("y_lengths", l(&[3, 5])),
            ],
            vec!["`l`", "(8, K)"],
        ),
    ];
    for (tensors, needles) in cases {
        write_case(&case, &tensors, None);
        assert_failed(&eval(&case, &out, &["--dtype", "f64"]), &out, &needles);
    }
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).expect("one JSON line")
}

/// `bench --ragged 4 --min-size 5 --max-size 40`: one JSON line with the sizes, the pair
/// counts (checked against the sizes and the schedule), finite timings and ratios, and the
/// loss of the library's packed call on the same clouds.
#[test]
fn bench_ragged_reports_pairs_speedup_and_single_rate() {
    let args = [
        "bench",
        "--ragged",
        "4",
        "--min-size",
        "5",
        "--max-size",
        "40",
        "--seed",
        "7",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--json",
    ];
    let v = bench_json(&args);
    assert_eq!(v["mode"], "ragged", "{v}");
    assert_eq!(v["items"], 4, "{v}");
    let sizes = |k: &str| -> Vec<usize> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
            .iter()
            .map(|n| n.as_u64().unwrap() as usize)
            .collect()
    };
    let (xl, yl) = (sizes("x_lengths"), sizes("y_lengths"));
    assert_eq!((xl.len(), yl.len()), (4, 4), "{v}");
    assert!(xl.iter().chain(&yl).all(|n| (5..=40).contains(n)), "{v}");
    let clouds = candle_ot_cli::bench::random_ragged_clouds(7, 4, 5, 40, 3).unwrap();
    assert_eq!((&clouds.x_lengths, &clouds.y_lengths), (&xl, &yl));
    let num = |k: &str| -> f64 {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
        assert!(x.is_finite() && x > 0.0, "{k} = {x}");
        x
    };
    let nm: f64 = xl.iter().zip(&yl).map(|(&n, &m)| (n * m) as f64).sum();
    assert_eq!(num("total_pairs"), nm, "{v}");
    let (n_max, m_max) = (*xl.iter().max().unwrap(), *yl.iter().max().unwrap());
    assert_eq!(num("padded_pairs"), (4 * n_max * m_max) as f64, "{v}");
    // K: the ε schedule of GeomLoss's defaults at diameter √3.
    let k = v["schedule_steps"].as_u64().expect("schedule_steps") as usize;
    let lib = SamplesLoss::from_options(candle_ot::SamplesLossOptions {
        diameter: Some(3f64.sqrt()),
        ..Default::default()
    })
    .unwrap();
    let (px, py) = (points(5, 3, 0.0), points(6, 3, 0.1));
    let sol = lib.solve(None, &px, None, &py).unwrap();
    assert_eq!(k, sol.diagnostics.unwrap().eps_list.len(), "{v}");
    let work: f64 = xl
        .iter()
        .zip(&yl)
        .map(|(&n, &m)| {
            let (n, m) = (n as f64, m as f64);
            (k + 2) as f64 * (2.0 * n * m + n * n + m * m) + n * m + n * n
        })
        .sum();
    assert!((num("pairs") - work).abs() <= 1e-9 * work, "{v}");
    let ragged_s = num("ragged_s");
    assert_eq!(num("median_s"), ragged_s);
    assert!((num("ragged_pairs_per_s") - work / ragged_s).abs() <= 1e-9 * work / ragged_s);
    let speedup = num("speedup_vs_padded");
    assert!(
        (speedup - num("padded_s") / ragged_s).abs() <= 1e-9 * speedup,
        "{v}"
    );
    assert_eq!(v["single_size"], 40, "{v}");
    let want_ratio = ragged_s / (work / num("single_pairs_per_s"));
    let ratio = num("vs_single_cloud_rate");
    assert!((ratio - want_ratio).abs() <= 1e-9 * ratio, "{v}");
    num("single_s");
    assert!(
        v["padded_loss_rel_diff"]
            .as_f64()
            .expect("padded_loss_rel_diff")
            <= 1e-4,
        "{v}"
    );
    // The summed loss is the library's packed call on the same clouds (f32).
    let (sx, sy) = (clouds.x.len() / 3, clouds.y.len() / 3);
    let x = Tensor::from_vec(clouds.x, (sx, 3), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(clouds.y, (sy, 3), &Device::Cpu).unwrap();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let want: f64 = flat(
        &lib.forward_packed(None, &f32(&x), &xl, None, &f32(&y), &yl)
            .unwrap(),
    )
    .iter()
    .sum();
    let e = (num("loss") - want).abs() / want.abs();
    assert!(e <= 1e-5, "loss {} vs {want}: {e:.2e}", num("loss"));

    // The same seed draws the same clouds; --no-padded skips the padded batch.
    let mut no_padded = args.to_vec();
    no_padded.push("--no-padded");
    let w = bench_json(&no_padded);
    assert_eq!(w["x_lengths"], v["x_lengths"]);
    assert_eq!(w["y_lengths"], v["y_lengths"]);
    for k in ["padded_s", "speedup_vs_padded", "padded_loss_rel_diff"] {
        assert!(w[k].is_null(), "{k} in {w}");
    }
    assert!(w["vs_single_cloud_rate"].as_f64().unwrap().is_finite());
}

/// The sizes are log-uniform: half of them below the geometric mean of the bounds.
#[test]
fn ragged_sizes_are_log_uniform() {
    let c = candle_ot_cli::bench::random_ragged_clouds(1, 400, 100, 10_000, 1).unwrap();
    let all: Vec<usize> = c.x_lengths.iter().chain(&c.y_lengths).copied().collect();
    assert!(all.iter().all(|n| (100..=10_000).contains(n)));
    for (cut, want) in [(1000, 0.5), (316, 0.25), (3162, 0.75)] {
        let frac = all.iter().filter(|&&n| n < cut).count() as f64 / all.len() as f64;
        assert!(
            (frac - want).abs() < 0.07,
            "P(N < {cut}) = {frac}, want {want}"
        );
    }
    // x and y sizes are drawn independently.
    assert_ne!(c.x_lengths, c.y_lengths);
    assert_eq!(c.x.len(), c.x_lengths.iter().sum::<usize>());
}

/// Bad ragged bench arguments fail with a message.
#[test]
fn bench_ragged_bad_arguments_fail() {
    for (args, needle) in [
        (vec!["--ragged", "0"], "at least one item"),
        (
            vec!["--ragged", "2", "--min-size", "50", "--max-size", "10"],
            "--min-size",
        ),
        (vec!["--ragged", "2", "--tol", "1e-3"], "--tol"),
        (vec!["--min-size", "5"], "--ragged"),
        (vec!["--ragged", "2", "--grid", "8x8"], "--grid"),
    ] {
        let mut all = vec!["bench", "--reps", "1", "--warmup", "0", "--max-size", "20"];
        if args.contains(&"--max-size") {
            all.truncate(5);
        }
        all.extend_from_slice(&args);
        let o = run(&all);
        assert!(!o.status.success(), "{all:?} succeeded");
        assert!(stderr(&o).contains(needle), "{all:?}: {}", stderr(&o));
    }
}
