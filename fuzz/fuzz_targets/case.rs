//! Case files (safetensors + `params`): any bytes give a `Case` or a clean `Err`; small cases
//! are then evaluated, which must give `Ok` or a clean `Err`, never a panic.
#![no_main]

use candle_core::DType;
use candle_ot::Backend;
use candle_ot_cli::eval::{evaluate, read_case_bytes};
use libfuzzer_sys::fuzz_target;

/// Caps on the work of one input (the fuzzer looks for crashes, not for slow inputs that the
/// caller asked for): small point clouds and a bounded number of Sinkhorn iterations.
fn small_enough(case: &candle_ot_cli::eval::Case) -> bool {
    let (Some(x), Some(y)) = (case.tensors.get("x"), case.tensors.get("y")) else {
        return true; // evaluate fails early
    };
    let (xd, yd) = (x.dims(), y.dims());
    let n_d = |d: &[usize]| -> Option<(usize, usize, usize)> {
        match *d {
            [n, dd] => Some((1, n, dd)),
            [b, n, dd] => Some((b, n, dd)),
            _ => None,
        }
    };
    let (Some((bx, n, dx)), Some((by, m, dy))) = (n_d(xd), n_d(yd)) else {
        return true; // rank errors are cheap
    };
    if n.saturating_mul(m) > 4096 || dx > 16 || dy > 16 || bx > 4 || by > 4 {
        return false;
    }
    // Other tensors (a, b, l) are converted whole: keep them small too.
    if case.tensors.values().any(|t| t.elem_count() > 1 << 16) {
        return false;
    }
    let o = &case.options;
    // Long ε-schedules and `tol` loops are slow, not wrong: keep them short here.
    if o.tol.is_some() && o.max_iter > 200 {
        return false;
    }
    if o.scaling > 0.95 {
        return false;
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let Ok(case) = read_case_bytes(data) else {
        return;
    };
    if !small_enough(&case) {
        return;
    }
    let _ = evaluate(&case, DType::F64, Backend::Auto);
});
