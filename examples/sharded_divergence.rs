//! The Sinkhorn divergence of two clouds whose points are split over several processes: MPI
//! ranks on CPUs (`--features mpi`), or one process per GPU with NCCL (`--features nccl`).
//! Without either feature it runs in one process (world size 1).
//!
//! Every rank draws only its own rows of x and y (a counter-based generator: point i is the
//! same whatever the number of ranks), solves with `SamplesLoss::solve_sharded`, and
//! differentiates the loss with respect to its rows of x. Rank 0 prints the divergence, the
//! time of one solve plus gradient, and the global gradient norm; with `--check` (N ≤ 20 000)
//! it also solves the whole problem in one process and prints the relative difference.
//!
//! ```text
//! # One process:
//! cargo run --release --example sharded_divergence -- --n 20000
//! # P MPI ranks on CPUs, one thread each:
//! cargo build --release -p candle-ot-examples --features mpi --example sharded_divergence
//! mpirun -n 2 -x RAYON_NUM_THREADS=1 target/release/examples/sharded_divergence --n 32768 --threads 1
//! # One process per GPU (G GPUs), NCCL; rank 0 writes the NCCL id to a fresh file:
//! cargo build --release -p candle-ot-examples --features nccl --example sharded_divergence
//! ID=/tmp/nccl-id-$$; for r in $(seq 0 $((G-1))); do
//!   RANK=$r WORLD_SIZE=$G target/release/examples/sharded_divergence --n 1000000 --nccl-id $ID &
//! done; wait
//! ```

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_ot::distributed::{shard_range, Collective, ReduceOp};
use candle_ot::{Backend, Loss, SamplesLoss};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The command line.
struct Args {
    n: usize,
    d: usize,
    blur: f64,
    threads: usize,
    reps: usize,
    check: bool,
    dtype: DType,
    /// NCCL only: the file through which rank 0 hands its NCCL id to the others.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    nccl_id: std::path::PathBuf,
}

fn parse() -> Result<Args> {
    parse_from(std::env::args().skip(1))
}

fn parse_from(argv: impl IntoIterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        n: 20_000,
        d: 3,
        blur: 0.05,
        threads: 0,
        reps: 1,
        check: false,
        dtype: DType::F32,
        nccl_id: std::env::temp_dir().join("candle-ot-nccl-id"),
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => a.n = 600,
            "--n" => a.n = val("--n")?.parse()?,
            "--d" => a.d = val("--d")?.parse()?,
            "--blur" => a.blur = val("--blur")?.parse()?,
            "--threads" => a.threads = val("--threads")?.parse()?,
            "--reps" => a.reps = val("--reps")?.parse::<usize>()?.max(1),
            "--check" => a.check = true,
            "--f64" => a.dtype = DType::F64,
            "--nccl-id" => a.nccl_id = val("--nccl-id")?.into(),
            "--help" | "-h" => {
                println!(
                    "usage: [mpirun -n P] sharded_divergence [--n N] [--d D] [--blur B] [--threads T] [--reps R] [--check] [--f64] [--nccl-id FILE] [--quick]"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {arg:?} (try --help)"),
        }
    }
    Ok(a)
}

/// Rows `rows` of a cloud of uniform points in `[shift, shift + 1]^D`: point i comes from
/// words `2·D·i…` of ChaCha8 stream `stream` (each f64 takes two 32-bit words), so it does not
/// depend on how the rows are split. (K, D) f64 on the CPU.
fn cloud(stream: u64, rows: std::ops::Range<usize>, d: usize, shift: f64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    rng.set_stream(stream);
    rng.set_word_pos((2 * d * rows.start) as u128);
    let v: Vec<f64> = (0..rows.len() * d)
        .map(|_| shift + rng.random::<f64>())
        .collect();
    Ok(Tensor::from_vec(v, (rows.len(), d), &Device::Cpu)?)
}

/// The collectives, the device the ranks compute on, and what must outlive the collectives
/// (the MPI universe: dropped after them). Fields drop in this order.
struct Engine {
    comm: Box<dyn Collective>,
    device: Device,
    _guard: Box<dyn std::any::Any>,
}

/// The engine: NCCL (one process per GPU), MPI, or one process.
#[cfg(feature = "nccl")]
fn engine(args: &Args) -> Result<Engine> {
    use candle_core::cuda::cudarc::nccl::Id;
    let env = |k: &str| -> Result<usize> {
        std::env::var(k)
            .with_context(|| format!("{k} is not set (one process per GPU: RANK, WORLD_SIZE)"))?
            .parse()
            .with_context(|| format!("{k} must be an integer"))
    };
    let (rank, world) = (env("RANK")?, env("WORLD_SIZE")?);
    let id = if rank == 0 {
        let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let tmp = args.nccl_id.with_extension("tmp");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &args.nccl_id)?;
        id
    } else {
        let t0 = std::time::Instant::now();
        loop {
            match std::fs::read(&args.nccl_id) {
                Ok(b) if b.len() == 128 => {
                    let mut internal = [0 as std::ffi::c_char; 128];
                    for (d, s) in internal.iter_mut().zip(&b) {
                        *d = *s as std::ffi::c_char;
                    }
                    break Id::uninit(internal);
                }
                _ if t0.elapsed().as_secs() > 120 => {
                    bail!("no NCCL id in {} after 120 s", args.nccl_id.display())
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    };
    let device = Device::new_cuda(rank)?;
    let comm = candle_ot::distributed::Nccl::from_rank(&device, rank, world, id)?;
    Ok(Engine {
        comm: Box::new(comm),
        device,
        _guard: Box::new(()),
    })
}

#[cfg(all(feature = "mpi", not(feature = "nccl")))]
fn engine(_: &Args) -> Result<Engine> {
    use candle_ot::distributed::{rsmpi, Mpi};
    let universe = rsmpi::initialize().context("MPI was already initialised")?;
    Ok(Engine {
        comm: Box::new(Mpi::new(universe.world())),
        device: Device::Cpu,
        // MPI_Finalize when the engine is dropped, after the communicator.
        _guard: Box::new(universe),
    })
}

#[cfg(not(any(feature = "mpi", feature = "nccl")))]
fn engine(_: &Args) -> Result<Engine> {
    Ok(Engine {
        comm: Box::new(candle_ot::distributed::Single),
        device: Device::Cpu,
        _guard: Box::new(()),
    })
}

fn main() -> Result<()> {
    run(&parse()?)?;
    Ok(())
}

/// Solves, prints on rank 0, and returns the divergence and, with `--check` on rank 0, the
/// one-process value.
fn run(args: &Args) -> Result<(f64, Option<f64>)> {
    candle_ot::set_num_threads(args.threads)?;
    let engine = engine(args)?;
    let (comm, device) = (&engine.comm, &engine.device);
    let (rank, size) = (comm.rank(), comm.size());
    let (n, d) = (args.n, args.d);
    let (xr, yr) = (shard_range(n, rank, size), shard_range(n, rank, size));
    let to = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(args.dtype)?.to_device(device)?) };
    let x = Var::from_tensor(&to(cloud(0, xr.clone(), d, 0.0)?)?)?; // (N_r, D)
    let y = to(cloud(1, yr.clone(), d, 0.3)?)?; // (M_r, D)
    let loss = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(args.blur)
        .backend(Backend::Online)
        .build()?;

    let (mut times, mut value, mut grad_sq, mut passes) = (Vec::new(), 0.0, 0.0, 0);
    for _ in 0..args.reps {
        device.synchronize()?;
        let t0 = std::time::Instant::now();
        let sol = loss.solve_sharded(comm.as_ref(), None, x.as_tensor(), None, &y)?;
        let grads = sol.loss.backward()?;
        let gx = grads.get(x.as_tensor()).context("x is a variable")?; // (N_r, D)
        grad_sq = gx
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        value = sol.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        passes = sol.diagnostics.map_or(0, |dg| dg.softmin_passes);
    }
    let grad_norm = comm.all_reduce(&[grad_sq], ReduceOp::Sum)?[0].sqrt();
    // The slowest rank sets the pace.
    let slowest = comm.all_reduce(&times, ReduceOp::Max)?;
    let best = slowest.iter().copied().fold(f64::INFINITY, f64::min);
    if rank == 0 {
        println!(
            "{size} rank(s), N = M = {n}, D = {d}, {:?} on {:?}, {} thread(s) per rank: S_eps = {value:.9e}, |grad_x| = {grad_norm:.6e}, {passes} softmin passes, solve + gradient {best:.3} s (best of {:?})",
            args.dtype,
            device.location(),
            candle_ot::num_threads(),
            slowest
        );
    }
    let mut whole = None;
    if args.check {
        if n > 20_000 {
            bail!("--check solves the whole problem in one process: N ≤ 20000");
        }
        if rank == 0 {
            let xf = to(cloud(0, 0..n, d, 0.0)?)?;
            let yf = to(cloud(1, 0..n, d, 0.3)?)?;
            let w = loss
                .forward(&xf, &yf)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            println!(
                "one process: S_eps = {w:.9e} (relative difference {:.1e})",
                (value - w).abs() / w.abs()
            );
            whole = Some(w);
        }
    }
    Ok((value, whole))
}

#[cfg(all(test, not(feature = "nccl")))]
mod tests {
    /// The quick run in this process (world size 1, or an MPI singleton) equals the
    /// one-process solve.
    #[test]
    fn quick_run_equals_one_process() -> anyhow::Result<()> {
        let mut args = super::parse_from(["--quick", "--check", "--f64"].map(String::from))?;
        args.reps = 1;
        let (sharded, whole) = super::run(&args)?;
        let whole = whole.expect("rank 0 checks");
        assert!(
            (sharded - whole).abs() <= 1e-12 * whole.abs(),
            "{sharded} vs {whole}"
        );
        Ok(())
    }
}
