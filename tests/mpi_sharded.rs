//! The sharded solve over MPI processes against the single-process solve: launched as
//! `mpirun -n P target/…/mpi_sharded` (.ci/check-mpi.sh runs P = 1, 2, 3). Every rank rebuilds
//! the clouds from a seed, solves its shard over MPI and the whole problem alone, and compares
//! its rows (loss, potentials, gradients, diagnostics, plan operators) for every case of
//! `common/sharded.rs`. Exits non-zero on any rank when any rank finds a mismatch; rank 0
//! prints a summary line.

#[path = "common/sharded.rs"]
mod sharded;

use candle_core::DType;
use candle_ot::distributed::{rsmpi, Collective, Mpi, ReduceOp};

fn main() {
    let universe = rsmpi::initialize().expect("MPI initialises once");
    // One thread per rank: the ranks share the machine's cores.
    candle_ot::set_num_threads(1).expect("thread pool");
    let comm = Mpi::new(universe.world());
    let (rank, size) = (comm.rank(), comm.size());
    let cases = sharded::cases();
    let (mut failed, mut worst) = (0usize, [0f64; 2]);
    let t0 = std::time::Instant::now();
    for case in &cases {
        match sharded::check(&comm, case) {
            Ok(o) => {
                let k = usize::from(case.dtype == DType::F32);
                worst[k] = worst[k].max(o.worst);
                for f in &o.failures {
                    eprintln!("rank {rank}/{size}: {}: {f}", case.name());
                }
                failed += usize::from(!o.failures.is_empty());
            }
            Err(e) => {
                eprintln!("rank {rank}/{size}: {}: error {e}", case.name());
                failed += 1;
            }
        }
    }
    let total = comm
        .all_reduce(&[failed as f64, worst[0], worst[1]], ReduceOp::Max)
        .expect("all-reduce");
    if rank == 0 {
        println!(
            "mpi_sharded: {} ranks, {} cases, {} failing on some rank; worst relative error f64 {:.2e}, f32 {:.2e} ({:.1} s)",
            size,
            cases.len(),
            total[0],
            total[1],
            total[2],
            t0.elapsed().as_secs_f64()
        );
    }
    drop(comm);
    drop(universe);
    if total[0] > 0.0 {
        std::process::exit(1);
    }
}
