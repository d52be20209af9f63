//! [`Collective`] over MPI with the `mpi` crate (rsmpi): one process per rank, CPU tensors (any
//! other device is staged through the host).
//!
//! ```no_run
//! use candle_ot::distributed::{rsmpi, Mpi};
//! # fn main() -> candle_core::Result<()> {
//! let universe = rsmpi::initialize().expect("MPI initialised once");
//! let comm = Mpi::new(universe.world());
//! # Ok(()) }
//! ```
//!
//! Launch with `mpirun -n P program …`. Only the calling thread uses MPI (`Threading::Single`
//! suffices; candle-ot's CPU threads never call it).

use super::{check_gather, Collective, ReduceOp};
use crate::error::OtError;
use candle_core::{DType, Result, Tensor};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Equivalence};
use mpi::Count;

/// The ranks of an MPI communicator (usually `universe.world()`).
pub struct Mpi {
    comm: SimpleCommunicator,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mpi(rank {} of {})", self.comm.rank(), self.comm.size())
    }
}

impl Mpi {
    /// The collectives of `comm`.
    pub fn new(comm: SimpleCommunicator) -> Self {
        Self { comm }
    }

    /// The communicator.
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// MPI's all-gather-v of host values.
    fn gather_host<T: Equivalence + Copy + Default>(
        &self,
        local: &[T],
        counts: &[usize],
    ) -> Result<Vec<T>> {
        let count = |c: usize| -> Result<Count> {
            Count::try_from(c).map_err(|_| {
                OtError::Unsupported(format!(
                    "MPI counts are 32-bit: a shard of {c} values exceeds {}",
                    Count::MAX
                ))
                .into()
            })
        };
        let total: usize = counts.iter().sum();
        let c: Vec<Count> = counts.iter().map(|&c| count(c)).collect::<Result<_>>()?;
        let mut displs = Vec::with_capacity(counts.len());
        let mut off = 0usize;
        for &k in counts {
            displs.push(count(off)?);
            off += k;
        }
        let mut out = vec![T::default(); total];
        let mut part = PartitionMut::new(&mut out[..], c, displs);
        self.comm.all_gather_varcount_into(local, &mut part);
        Ok(out)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_gather(&self, local: &Tensor, counts: &[usize]) -> Result<Tensor> {
        check_gather(local, counts, self.rank())?;
        if counts.len() != self.size() {
            return Err(OtError::Mismatch(format!(
                "all_gather: {} counts for {} ranks",
                counts.len(),
                self.size()
            ))
            .into());
        }
        let total: usize = counts.iter().sum();
        let host = local.to_device(&candle_core::Device::Cpu)?;
        let all = match local.dtype() {
            DType::F64 => {
                let v = self.gather_host(&host.to_vec1::<f64>()?, counts)?;
                Tensor::from_vec(v, total, &candle_core::Device::Cpu)?
            }
            _ => {
                let v = self.gather_host(&host.to_vec1::<f32>()?, counts)?;
                Tensor::from_vec(v, total, &candle_core::Device::Cpu)?
            }
        };
        all.to_device(local.device())
    }

    fn all_reduce(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        let mut out = vec![0.0f64; values.len()];
        match op {
            ReduceOp::Sum => {
                self.comm
                    .all_reduce_into(values, &mut out[..], SystemOperation::sum())
            }
            ReduceOp::Min => {
                self.comm
                    .all_reduce_into(values, &mut out[..], SystemOperation::min())
            }
            ReduceOp::Max => {
                self.comm
                    .all_reduce_into(values, &mut out[..], SystemOperation::max())
            }
        }
        Ok(out)
    }
}
