//! Inputs found (or anticipated) by fuzzing (`fuzz/`, see docs/fuzzing.md): each must give a
//! clean error, never a panic, an abort or a hang. The files live in `tests/fuzz_regressions/`
//! and are named `<target>-<what>.<ext>`: `case-*` go through `read_case_bytes` + `evaluate`,
//! `csv-*` through `parse_csv`, `params-*` through `parse_params`, `npy-*` through `read_points`.

use candle_core::DType;
use candle_ot::Backend;
use candle_ot_cli::eval::{evaluate, parse_params, read_case_bytes};
use candle_ot_cli::io::parse_csv;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions")
}

/// Runs one saved input through its target; returns the error message, if any.
fn run(name: &str) -> Option<String> {
    let bytes = std::fs::read(dir().join(name)).expect("regression input");
    let target = name.split('-').next().unwrap_or_default();
    let res: anyhow::Result<()> = match target {
        "case" => read_case_bytes(&bytes).and_then(|c| {
            for dtype in [DType::F64, DType::F32] {
                evaluate(&c, dtype, Backend::Auto)?;
            }
            Ok(())
        }),
        "csv" => std::str::from_utf8(&bytes)
            .map_err(anyhow::Error::from)
            .and_then(|s| parse_csv(s).map(|_| ())),
        "npy" => candle_ot_cli::io::read_points(&dir().join(name), None).map(|_| ()),
        "params" => std::str::from_utf8(&bytes)
            .map_err(anyhow::Error::from)
            .and_then(|s| parse_params(Some(s)).map(|_| ())),
        other => panic!("{name}: unknown target {other:?}"),
    };
    res.err().map(|e| format!("{e:#}"))
}

#[test]
fn every_saved_input_runs_without_a_panic() {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .expect("tests/fuzz_regressions")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for name in names {
        let _ = run(&name);
    }
}

/// `scaling` close to 1 with a tiny `blur` and a huge `diameter` asked for an ε-schedule of
/// ~1.4e10 values: the allocation aborted the process (or the loop ran for hours).
#[test]
fn a_huge_epsilon_schedule_is_refused() {
    let err = run("case-schedule-oom.safetensors").expect("must fail");
    assert!(err.contains("schedule"), "{err}");
}

/// A 144-byte `.npy` whose header declares 10¹² × 2 f64 values: candle allocated 16 TB before
/// reading and the process aborted. The header is now checked against the file size.
#[test]
fn an_npy_header_larger_than_its_file_is_refused() {
    let err = run("npy-huge-shape.npy").expect("must fail");
    assert!(err.contains("declares shape"), "{err}");
}
