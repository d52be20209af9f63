//! The CPU roofline of the streaming softmin, and the fraction of it the kernel reaches.
//!
//! ```text
//! cargo run --release -p candle-ot --example roofline -- [N] [M] [D] [f32|f64] [REPS] [THREADS]
//! ```
//! (defaults 4096 4096 3 f32 7 1).
//!
//! Three timings of N·M pairs on the same thread count:
//! - `roofline (dot)`: the per-pair instruction mix of the kernel's squared-Euclidean path
//!   (exponent `z = H + X·Y`: D FMAs; running max; `exp2` polynomial; accumulate), with the rows
//!   in registers and 64 columns in L1: no stores, no tiles, no rescales (see
//!   `candle_ot::softmin::online::roofline`);
//! - `roofline (distance)`: the same with the distance form of the exponent (D subtractions,
//!   D FMAs for |x − y|², one FMA for `h − C/ε`), the mix the CPU-speed issue names;
//! - `softmin kernel`: one pass of the online softmin op (p = 2, ε = 0.0025) on uniform points.
//!
//! Time is the process's CPU time (the sum of its threads' run times from
//! `/proc/self/task/*/schedstat`, Linux), not wall time, so that other processes sharing the
//! cores do not inflate it; cycles are that CPU time at the TSC rate (calibrated against the
//! wall clock; the TSC runs at the nominal frequency, whatever the core clock does). Each figure
//! is the minimum over REPS runs (a lower envelope: a run is only ever slowed by interference).

use candle_core::{DType, Device, Tensor};
use candle_ot::internals::{roofline, RooflineMix};
use candle_ot::softmin::online::{simd_level, softmin};
use candle_ot::CostKind;
use std::time::{Duration, Instant};

/// CPU time of this process in nanoseconds (all threads), or `None` off Linux.
fn cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Ticks per second of the time-stamp counter (x86-64), or `None`.
fn tsc_hz() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86-64.
        let (c0, t0) = (unsafe { core::arch::x86_64::_rdtsc() }, Instant::now());
        std::thread::sleep(Duration::from_millis(200));
        let (c1, t1) = (unsafe { core::arch::x86_64::_rdtsc() }, Instant::now());
        Some((c1 - c0) as f64 / (t1 - t0).as_secs_f64())
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Minimum and median CPU seconds (wall seconds where CPU time is unavailable) of `reps` runs
/// of `f`, after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let (c0, t0) = (cpu_ns(), Instant::now());
            f();
            match (c0, cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 * 1e-9,
                _ => t0.elapsed().as_secs_f64(),
            }
        })
        .collect();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, def: usize| args.get(i).map_or(def, |s| s.parse().expect("a number"));
    let (n, m, d) = (arg(0, 4096), arg(1, 4096), arg(2, 3));
    let dtype = match args.get(3).map(String::as_str) {
        None | Some("f32") => DType::F32,
        Some("f64") => DType::F64,
        Some(o) => panic!("dtype f32 or f64, not {o}"),
    };
    let (reps, threads) = (arg(4, 7), arg(5, 1));
    candle_ot::set_num_threads(threads)?;
    let hz = tsc_hz();
    println!(
        "N {n}, M {m}, D {d}, {dtype:?}, {threads} thread(s), {:?}, TSC {}",
        simd_level(),
        hz.map_or("n/a".into(), |h| format!("{:.3} GHz", h * 1e-9))
    );

    // Uniform points from a fixed LCG, h = −log M (uniform weights).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = |k: usize| -> Vec<f64> {
        (0..k)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    };
    let dev = Device::Cpu;
    let x = Tensor::from_vec(uniform(n * d), (1, n, d), &dev)?.to_dtype(dtype)?;
    let y = Tensor::from_vec(uniform(m * d), (1, m, d), &dev)?.to_dtype(dtype)?;
    let h = Tensor::full(-(m as f64).ln(), (1, m), &dev)?.to_dtype(dtype)?;

    let report = |name: &str, pairs: f64, (best, med): (f64, f64)| {
        let cyc = hz.map_or(String::new(), |h| {
            format!(", {:.3} cycles/pair", best * h / pairs)
        });
        println!(
            "{name:22} {:.3e} pairs per CPU-second (median {:.3e}){cyc}",
            pairs / best,
            pairs / med
        );
        pairs / best
    };
    let mut roof = [0.0; 2];
    for (i, (name, mix)) in [
        ("roofline (dot)", RooflineMix::Dot),
        ("roofline (distance)", RooflineMix::Distance),
    ]
    .into_iter()
    .enumerate()
    {
        let pairs = roofline(mix, dtype, (n, m, d))?.0 as f64;
        let t = time(reps, || {
            std::hint::black_box(roofline(mix, dtype, (n, m, d)).unwrap());
        });
        roof[i] = report(name, pairs, t);
    }
    let t = time(reps, || {
        std::hint::black_box(softmin(CostKind::SqEuclidean, 0.0025, &x, &y, &h).unwrap());
    });
    let kernel = report("softmin kernel", (n * m) as f64, t);
    println!(
        "kernel / roofline: {:.0} % of the dot mix, {:.0} % of the distance mix",
        100.0 * kernel / roof[0],
        100.0 * kernel / roof[1]
    );
    Ok(())
}
