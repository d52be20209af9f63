//! The sharded solve (`candle_ot::distributed`) against the single-process solve, with the
//! ranks as threads of this process: a plain `cargo test` checks the algorithm for P = 1, 2, 3
//! (every loss, p, debias, reach, f32 / f64, odd shards with a one-point rank and empty ranks)
//! without MPI or NCCL. `tests/mpi_sharded.rs` runs the same cases on MPI processes.
//!
//! The threads exchange values through a shared slot table and a barrier: a test double of an
//! MPI communicator (rank-ordered sums, exact copies), not a collective engine of the library.

#[path = "common/sharded.rs"]
mod sharded;

use candle_core::{DType, Device, Result, Tensor};
use candle_ot::distributed::{gather_rows, shard_counts, Collective, ReduceOp, Single};
use candle_ot::{Loss, OtError, SamplesLoss};
use std::sync::{Arc, Barrier, Mutex};

/// P threads' shared exchange: each deposits its values, all read all of them.
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

/// One thread's rank in a [`Shared`] group.
struct ThreadComm {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    fn exchange(&self, v: Vec<f64>) -> Vec<Vec<f64>> {
        self.shared.slots.lock().unwrap()[self.rank] = v;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().clone();
        self.shared.barrier.wait();
        all
    }
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, local: &Tensor, counts: &[usize]) -> Result<Tensor> {
        assert_eq!(local.dims(), [counts[self.rank]], "the local shard");
        // f32 → f64 → f32 is exact.
        let v = local.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let all: Vec<f64> = self.exchange(v).concat();
        assert_eq!(all.len(), counts.iter().sum::<usize>(), "counts agree");
        let n = all.len();
        Tensor::from_vec(all, n, local.device())?.to_dtype(local.dtype())
    }
    fn all_reduce(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        let all = self.exchange(values.to_vec());
        Ok((0..values.len())
            .map(|i| {
                let it = all.iter().map(|v| v[i]);
                match op {
                    ReduceOp::Sum => it.sum(),
                    ReduceOp::Min => it.fold(f64::INFINITY, f64::min),
                    ReduceOp::Max => it.fold(f64::NEG_INFINITY, f64::max),
                }
            })
            .collect())
    }
}

/// Runs `f` on P threads, one rank each; returns the ranks' results in rank order.
fn on_ranks<T: Send>(p: usize, f: impl Fn(&dyn Collective) -> T + Sync) -> Vec<T> {
    let shared = Arc::new(Shared {
        barrier: Barrier::new(p),
        slots: Mutex::new(vec![Vec::new(); p]),
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..p)
            .map(|rank| {
                let comm = ThreadComm {
                    rank,
                    size: p,
                    shared: shared.clone(),
                };
                let f = &f;
                s.spawn(move || f(&comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Every case on P ranks: each rank's rows equal the single-process solve's.
fn conformance(p: usize) {
    let cases = sharded::cases();
    let mut worst = [0f64; 2];
    for case in &cases {
        let outcomes = on_ranks(p, |comm| sharded::check(comm, case));
        for (rank, o) in outcomes.into_iter().enumerate() {
            let o = o.unwrap_or_else(|e| panic!("{} on rank {rank} of {p}: {e}", case.name()));
            assert!(
                o.failures.is_empty(),
                "{} on rank {rank} of {p}: {:?}",
                case.name(),
                o.failures
            );
            let k = usize::from(case.dtype == DType::F32);
            worst[k] = worst[k].max(o.worst);
        }
    }
    eprintln!(
        "P = {p}: {} cases, worst relative error f64 {:.2e}, f32 {:.2e}",
        cases.len(),
        worst[0],
        worst[1]
    );
}

#[test]
fn equals_single_process_on_one_rank() {
    conformance(1);
}

#[test]
fn equals_single_process_on_two_ranks() {
    conformance(2);
}

#[test]
fn equals_single_process_on_three_ranks() {
    conformance(3);
}

/// `Single` is world size 1: the sharded front on it is the plain solve.
#[test]
fn single_is_the_plain_solve() -> Result<()> {
    let x = Tensor::rand(0f64, 1., (40, 3), &Device::Cpu)?;
    let y = (Tensor::rand(0f64, 1., (30, 3), &Device::Cpu)? + 0.3)?;
    let loss = SamplesLoss::builder(Loss::Sinkhorn).blur(0.05).build()?;
    let s = loss.forward_sharded(&Single, &x, &y)?.to_scalar::<f64>()?;
    let f = loss.forward(&x, &y)?.to_scalar::<f64>()?;
    assert!((s - f).abs() <= 1e-12 * f.abs(), "{s} vs {f}");
    Ok(())
}

/// The gather helpers: counts in rank order, batch-major rows from rank-major blocks.
#[test]
fn gather_rows_reorders_batches() -> Result<()> {
    let sizes = [2usize, 0, 3];
    let out = on_ranks(3, |comm| -> Result<(Vec<usize>, Vec<Vec<f64>>)> {
        let k = sizes[comm.rank()];
        let counts = shard_counts(comm, k)?;
        // Item b, global row i holds 100 b + i (rows of this rank start at its offset).
        let start: usize = sizes[..comm.rank()].iter().sum();
        let v: Vec<f64> = (0..2)
            .flat_map(|b| (0..k).map(move |i| (100 * b + start + i) as f64))
            .collect();
        let t = Tensor::from_vec(v, (2, k, 1), &Device::Cpu)?;
        let all = gather_rows(comm, &t, &counts)?.squeeze(2)?;
        Ok((counts, all.to_vec2::<f64>()?))
    });
    for r in out {
        let (counts, all) = r?;
        assert_eq!(counts, sizes);
        let want: Vec<Vec<f64>> = (0..2)
            .map(|b| (0..5).map(|i| (100 * b + i) as f64).collect())
            .collect();
        assert_eq!(all, want);
    }
    Ok(())
}

/// A refused input on one rank stops every rank with an error (none waits in a collective);
/// options that differ between ranks, `tol`, the multiscale backend are refused everywhere.
#[test]
fn errors_stop_every_rank() -> Result<()> {
    let loss = SamplesLoss::builder(Loss::Sinkhorn).blur(0.1).build()?;
    let out = on_ranks(3, |comm| {
        let x = Tensor::rand(0f64, 1., (5, 2), &Device::Cpu)?;
        let x = if comm.rank() == 1 {
            Tensor::full(f64::NAN, (5, 2), &Device::Cpu)?
        } else {
            x
        };
        let y = Tensor::rand(0f64, 1., (4, 2), &Device::Cpu)?;
        loss.forward_sharded(comm, &x, &y)
    });
    for (rank, r) in out.iter().enumerate() {
        let e = r.as_ref().expect_err("every rank fails");
        match OtError::from_candle(e) {
            Some(OtError::NonFinite { name }) if rank == 1 => assert_eq!(name, "x"),
            Some(OtError::Mismatch(m)) if rank != 1 => assert!(m.contains("rank 1"), "{m}"),
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    // Different blurs on different ranks.
    let out = on_ranks(2, |comm| {
        let l = SamplesLoss::builder(Loss::Sinkhorn)
            .blur(0.1 + comm.rank() as f64)
            .build()?;
        let x = Tensor::rand(0f64, 1., (5, 2), &Device::Cpu)?;
        l.forward_sharded(comm, &x, &x)
    });
    for r in &out {
        let m = r.as_ref().expect_err("refused").to_string();
        assert!(m.contains("blur"), "{m}");
    }
    // tol, multiscale, the exact Hausdorff gradient.
    let x = Tensor::rand(0f64, 1., (5, 2), &Device::Cpu)?;
    for (l, name) in [
        (
            SamplesLoss::builder(Loss::Sinkhorn).tol(1e-6).build()?,
            "tol",
        ),
        (
            SamplesLoss::builder(Loss::Sinkhorn)
                .backend(candle_ot::Backend::Multiscale)
                .build()?,
            "backend",
        ),
        (
            SamplesLoss::builder(Loss::Hausdorff)
                .exact_hausdorff_gradient(true)
                .build()?,
            "exact_hausdorff_gradient",
        ),
    ] {
        let e = l.forward_sharded(&Single, &x, &x).expect_err("refused");
        match OtError::from_candle(&e) {
            Some(OtError::Option { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    // N = 0 over all ranks.
    let empty = Tensor::zeros((0, 2), DType::F64, &Device::Cpu)?;
    let out = on_ranks(2, |comm| loss.forward_sharded(comm, &empty, &x));
    for r in &out {
        match OtError::from_candle(r.as_ref().expect_err("empty")) {
            Some(OtError::Empty { name, .. }) => assert_eq!(name, "x"),
            other => panic!("{other:?}"),
        }
    }
    Ok(())
}

/// `candle-ot bench --sharded`'s runner on 1 and 3 ranks times the same problem as `bench`:
/// the same loss (f64, 1e-12), pair count and softmin passes.
#[test]
fn cli_bench_sharded_equals_bench() -> Result<()> {
    use candle_ot_cli::bench::{run, run_sharded, BenchConfig, BenchOp};
    let cfg = BenchConfig {
        options: candle_ot::SamplesLossOptions {
            backend: candle_ot::Backend::Online,
            ..Default::default()
        },
        n: 70,
        m: 50,
        d: 3,
        device: Device::Cpu,
        dtype: DType::F64,
        grad: true,
        op: BenchOp::Loss,
        reps: 1,
        warmup: 0,
        seed: 3,
        input: None,
    };
    let one = run(&cfg).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    for p in [1usize, 3] {
        for r in on_ranks(p, |comm| run_sharded(&cfg, comm).map_err(|e| e.to_string())) {
            let r = r.map_err(candle_core::Error::Msg)?;
            assert!(
                (r.loss - one.loss).abs() <= 1e-12 * one.loss.abs(),
                "P = {p}: {} vs {}",
                r.loss,
                one.loss
            );
            assert_eq!(r.pairs, one.pairs);
            assert_eq!(r.softmin_passes, one.softmin_passes);
        }
    }
    Ok(())
}

/// The sharded solve over the tensorized backend (each rank a dense N_r × M cost) equals the
/// one-process tensorized solve (f64, 1e-12): Sinkhorn and the energy distance, on 2 ranks.
#[test]
fn tensorized_backend_sharded() -> Result<()> {
    let x = Tensor::rand(0f64, 1., (31, 2), &Device::Cpu)?;
    let y = (Tensor::rand(0f64, 1., (26, 2), &Device::Cpu)? + 0.2)?;
    for loss in [Loss::Sinkhorn, Loss::Energy] {
        let l = SamplesLoss::builder(loss)
            .blur(0.1)
            .backend(candle_ot::Backend::Tensorized)
            .build()?;
        let whole = l.solve(None, &x, None, &y)?;
        let want = whole.loss.to_scalar::<f64>()?;
        let out = on_ranks(2, |comm| {
            let (xr, yr) = (
                candle_ot::distributed::shard_range(31, comm.rank(), 2),
                candle_ot::distributed::shard_range(26, comm.rank(), 2),
            );
            let s = l.solve_sharded(
                comm,
                None,
                &x.narrow(0, xr.start, xr.len())?,
                None,
                &y.narrow(0, yr.start, yr.len())?,
            )?;
            let f_want = whole.f.narrow(0, xr.start, xr.len())?;
            let df = (&s.f - &f_want)?.abs()?.max(0)?.to_scalar::<f64>()?;
            Ok::<_, candle_core::Error>((s.backend, s.loss.to_scalar::<f64>()?, df))
        });
        for r in out {
            let (backend, got, df) = r?;
            assert_eq!(backend, candle_ot::Backend::Tensorized);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{loss}: {got} vs {want}"
            );
            assert!(df <= 1e-12, "{loss}: F differs by {df}");
        }
    }
    Ok(())
}
