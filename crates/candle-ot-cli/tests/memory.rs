//! The online path allocates no N×M buffer, forward or backward: loss plus gradient at
//! N = M = 20,000 (a dense f32 matrix alone would need 1.6 GB) in a child process whose data
//! segment is limited to 1 GiB (RLIMIT_DATA, so that CUDA libraries linked into a `cuda` build
//! do not count). The tensorized backend under the same limit fails, which shows the limit bites.

use std::process::Command;

const LIMIT_KIB: u64 = 1024 * 1024;

fn bench_under_limit(backend: &str) -> std::process::Output {
    let exe = env!("CARGO_BIN_EXE_candle-ot");
    let cmd = format!(
        "ulimit -d {LIMIT_KIB} && exec '{exe}' bench --n 20000 --m 20000 --d 3 --no-debias \
         --blur 1.0 --grad --reps 1 --warmup 0 --backend {backend} --device cpu --dtype f32 --json"
    );
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh runs")
}

#[test]
fn online_loss_and_gradient_at_20k_fit_in_1_gib() {
    let out = bench_under_limit("online");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "online bench failed under a 1 GiB data limit: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let rss = v["peak_rss_bytes"].as_f64().unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert!(rss < (1u64 << 30) as f64, "peak RSS {rss} bytes");
    println!(
        "online 20k x 20k loss+grad: peak RSS {:.1} MiB, {v}",
        rss / 1048576.0
    );
}

#[test]
fn tensorized_at_20k_does_not_fit_in_1_gib() {
    let out = bench_under_limit("tensorized");
    assert!(
        !out.status.success(),
        "the dense backend should not fit in 1 GiB at 20k x 20k: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
