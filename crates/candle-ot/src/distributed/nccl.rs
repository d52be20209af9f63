//! [`Collective`] over NCCL through cudarc (candle-core's `nccl` feature): one process per
//! GPU, as candle's `llama_multiprocess` example runs, CUDA tensors, the data never leaves
//! the devices.
//!
//! ```no_run
//! use candle_core::Device;
//! use candle_core::cuda::cudarc::nccl::Id;
//! use candle_ot::distributed::Nccl;
//! # fn main() -> candle_core::Result<()> {
//! # let (rank, world) = (0usize, 1usize);
//! // Rank 0 creates the id and hands its 128 bytes to the others (a file, MPI, a TCP store).
//! let id = Id::new().map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
//! let device = Device::new_cuda(rank)?;
//! let comm = Nccl::from_rank(&device, rank, world, id)?;
//! # Ok(()) }
//! ```
//!
//! NCCL refuses two ranks on one GPU: a machine with G GPUs runs at most G ranks.
//!
//! NCCL has no all-gather of variable counts: [`Collective::all_gather`] pads every shard to
//! the largest count and runs `ncclAllGather` (one ring pass, `P·max_r K_r` values per rank),
//! then drops the padding on the device. The all-reduces of a few host values (bounding boxes,
//! partial sums) go through one small device buffer.

use super::{check_gather, Collective, ReduceOp};
use crate::error::OtError;
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp as NcclOp};
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// The ranks of an NCCL communicator, one CUDA device each.
pub struct Nccl {
    comm: Comm,
    device: Device,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Nccl(rank {} of {} on {:?})",
            self.comm.rank(),
            self.comm.world_size(),
            self.device.location()
        )
    }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("candle-ot: NCCL {what} failed: {e:?}"))
}

impl Nccl {
    /// Joins the communicator `id` as rank `rank` of `world_size` on the CUDA `device`, on the
    /// device's own stream (candle's kernels and NCCL's transfers are then ordered). Every
    /// rank calls it with the same `id` (rank 0's `Id::new()`), each on its own GPU.
    ///
    /// Errors: a device that is not CUDA, NCCL's own (e.g. two ranks on one GPU).
    pub fn from_rank(device: &Device, rank: usize, world_size: usize, id: Id) -> Result<Self> {
        let cuda = device.as_cuda_device().map_err(|_| {
            OtError::Unsupported(format!(
                "NCCL runs on CUDA devices, got {:?}",
                device.location()
            ))
        })?;
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world_size, id)
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(Self {
            comm,
            device: device.clone(),
        })
    }

    /// The collectives of an existing communicator `comm`, whose stream must be `device`'s
    /// (`CudaDevice::cuda_stream`).
    pub fn new(comm: Comm, device: &Device) -> Result<Self> {
        if !device.is_cuda() {
            return Err(OtError::Unsupported(format!(
                "NCCL runs on CUDA devices, got {:?}",
                device.location()
            ))
            .into());
        }
        Ok(Self {
            comm,
            device: device.clone(),
        })
    }

    /// The communicator.
    pub fn communicator(&self) -> &Comm {
        &self.comm
    }
}

/// `ncclAllGather` of equal counts: (K,) on every rank → (P·K,), rank-major.
struct AllGather<'a> {
    comm: &'a Comm,
}

/// `ncclAllReduce`: (K,) → (K,).
struct AllReduce<'a> {
    comm: &'a Comm,
    op: ReduceOp,
}

impl CustomOp1 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "candle-ot-nccl-all-gather"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("candle-ot: the NCCL all-gather takes CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("candle-ot: the NCCL all-gather takes a contiguous tensor")
        };
        let dev = s.device().clone();
        let total = (o2 - o1) * self.comm.world_size();
        macro_rules! gather {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(o1..o2);
                // SAFETY: every element is written by the all-gather before it is read.
                let mut dst = unsafe { dev.alloc::<$t>(total) }?;
                self.comm
                    .all_gather(&src, &mut dst)
                    .map_err(|e| nccl_err("ncclAllGather", e))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => gather!(f32),
            DType::F64 => gather!(f64),
            dt => candle_core::bail!("candle-ot: NCCL all-gather of {dt:?} (f32 or f64)"),
        };
        Ok((out, Shape::from(total)))
    }
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "candle-ot-nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("candle-ot: the NCCL all-reduce takes CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("candle-ot: the NCCL all-reduce takes a contiguous tensor")
        };
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<f64>()?.slice(o1..o2);
        // SAFETY: every element is written by the all-reduce before it is read.
        let mut dst = unsafe { dev.alloc::<f64>(o2 - o1) }?;
        let op = match self.op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Min => NcclOp::Min,
            ReduceOp::Max => NcclOp::Max,
        };
        self.comm
            .all_reduce(&src, &mut dst, &op)
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(o2 - o1)))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
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
        if !local.device().same_device(&self.device) {
            return Err(OtError::Mismatch(format!(
                "the NCCL all-gather takes tensors on its device {:?}, got {:?}",
                self.device.location(),
                local.device().location()
            ))
            .into());
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return Tensor::zeros(0, local.dtype(), &self.device);
        }
        let me = counts[self.rank()];
        let padded = if me < max {
            let pad = Tensor::zeros(max - me, local.dtype(), &self.device)?;
            Tensor::cat(&[local, &pad], 0)?
        } else {
            local.contiguous()?
        }; // (max,)
        let all = padded.apply_op1_no_bwd(&AllGather { comm: &self.comm })?; // (P·max,)
        let parts = counts
            .iter()
            .enumerate()
            .filter(|(_, &k)| k > 0)
            .map(|(r, &k)| all.narrow(0, r * max, k))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0) // (Σ counts,)
    }

    fn all_reduce(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        if values.is_empty() {
            return Ok(vec![]);
        }
        let t = Tensor::new(values, &self.device)?; // (K,)
        t.apply_op1_no_bwd(&AllReduce {
            comm: &self.comm,
            op,
        })?
        .to_vec1::<f64>()
    }
}
