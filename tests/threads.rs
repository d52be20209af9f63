//! The online CPU kernels give bit-identical results whatever the number of threads: each
//! output row is reduced by one thread in a fixed order. `set_num_threads` is global, so this
//! lives in its own test binary, and its tests hold a lock and restore the default pool.

#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::{Backend, Loss, SamplesLoss};
use common::*;
use std::sync::Mutex;

/// Large enough for several parallel tasks (64 rows each) and several column tiles.
const N: usize = 301;
const M: usize = 203;
const D: usize = 3;
const THREAD_COUNTS: [usize; 3] = [1, 2, 3];

static POOL_LOCK: Mutex<()> = Mutex::new(());

/// Restores rayon's global pool when dropped (also on panic).
struct RestorePool;

impl Drop for RestorePool {
    fn drop(&mut self) {
        candle_ot::set_num_threads(0).expect("restore the default pool");
    }
}

/// Loss, potentials and gradients wrt x, y, a, b as raw bit patterns.
fn run_bits(loss: &SamplesLoss, inp: &[Tensor; 4]) -> Result<Vec<Vec<u64>>> {
    let vars: Vec<Var> = inp.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let s = loss.solve(Some(&vars[0]), &vars[1], Some(&vars[2]), &vars[3])?;
    let grads = s.loss.sum_all()?.backward()?;
    let mut out = vec![flat(&s.loss), flat(&s.f), flat(&s.g)];
    for v in &vars {
        out.push(flat(grads.get(v).expect("a gradient")));
    }
    if let Some(l) = &s.f_ba {
        out.push(flat(l));
    }
    Ok(out
        .into_iter()
        .map(|v| v.into_iter().map(f64::to_bits).collect())
        .collect())
}

fn thread_count_invariance(dev: &Device) -> Result<()> {
    if !dev.is_cpu() {
        eprintln!("skipping: the online backend runs on the CPU only");
        return Ok(());
    }
    let _lock = POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _restore = RestorePool;
    let mut r = rng(21);
    for dtype in [DType::F64, DType::F32] {
        let inp = [
            weights(&mut r, None, N, &[7], 1.0)?.to_dtype(dtype)?,
            uniform(&mut r, &[N, D], 0.0, 1.0, dtype, dev)?,
            weights(&mut r, None, M, &[0, 100], 1.0)?.to_dtype(dtype)?,
            uniform(&mut r, &[M, D], 0.2, 1.2, dtype, dev)?,
        ];
        for loss_kind in [
            Loss::Sinkhorn,
            Loss::Hausdorff,
            Loss::Energy,
            Loss::Gaussian,
            Loss::Laplacian,
        ] {
            for p in [1, 2] {
                let loss = SamplesLoss::builder(loss_kind)
                    .p(p)
                    .blur(0.05)
                    .backend(Backend::Online)
                    .build()?;
                let mut first: Option<Vec<Vec<u64>>> = None;
                for t in THREAD_COUNTS {
                    candle_ot::set_num_threads(t)?;
                    assert_eq!(candle_ot::num_threads(), t);
                    let bits = run_bits(&loss, &inp)?;
                    match &first {
                        None => first = Some(bits),
                        Some(f) => assert!(
                            *f == bits,
                            "{loss_kind:?} p={p} {dtype:?}: results with {t} threads differ from 1 thread"
                        ),
                    }
                }
                // And the default pool gives the same bits again.
                candle_ot::set_num_threads(0)?;
                assert!(first.unwrap() == run_bits(&loss, &inp)?);
            }
        }
    }
    Ok(())
}

test_device!(
    thread_count_invariance,
    thread_count_invariance_cpu,
    thread_count_invariance_cuda,
    thread_count_invariance_metal
);

#[test]
fn set_num_threads_zero_returns_to_the_global_pool() -> Result<()> {
    let _lock = POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _restore = RestorePool;
    candle_ot::set_num_threads(1)?;
    assert_eq!(candle_ot::num_threads(), 1);
    candle_ot::set_num_threads(0)?;
    assert!(candle_ot::num_threads() >= 1);
    // The kernels keep working after any number of pool changes.
    let x = Tensor::ones((5, 2), DType::F32, &Device::Cpu)?;
    let y = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
    let v = SamplesLoss::new(Loss::Sinkhorn).forward(&x, &y)?;
    assert!(all_finite(&v));
    Ok(())
}
