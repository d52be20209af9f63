//! CUDA paths of the multiscale fine-level ops: the block-sparse kernels `block_softmin_*` and
//! `block_lse_grad_*` of `candle-ot-kernels`, compiled and cached with the online kernels (same
//! NVRTC module), launched on Candle's stream with one block per task of the pattern's task
//! table ([`super::cluster::task_table`], uploaded per call).

use super::cluster::{mean_cluster_rows, task_table, Blocks};
use crate::cost::CostKind;
use crate::softmin::online::cuda::{contiguous, cost_name, function, Float};
use crate::softmin::online::{dims3, u32_of};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{backend::BackendStorage, CudaDevice, CudaStorage, Layout, Result, Shape};
use candle_ot_kernels::{block_sparse_block, cuda as src, TASK_WORDS};

/// Launches `entry(inputs..., out, B, N, M, D, eps, tasks, spans, ntasks)` over `pattern` and
/// returns `out` (`out_len` elements, zero where no task writes).
#[allow(clippy::too_many_arguments)]
fn launch<T: Float>(
    dev: &CudaDevice,
    entry: &str,
    inputs: &[CudaView<'_, T>],
    out_len: usize,
    (b, n, m, d): (usize, usize, usize, usize),
    eps: f64,
    pattern: &[Blocks],
) -> Result<CudaSlice<T>> {
    let func = function(dev, "candle_ot_softmin", src::SOFTMIN, entry)?;
    let out = dev.alloc_zeros::<T>(out_len.max(1))?;
    let (bb, nn, mm, dd) = (
        u32_of(b, "B")?,
        u32_of(n, "N")?,
        u32_of(m, "M")?,
        u32_of(d, "D")?,
    );
    let block = block_sparse_block(nn, bb, mean_cluster_rows(pattern));
    let (tasks, mut spans) = task_table(pattern, block.1);
    let ntasks = u32_of(tasks.len() / TASK_WORDS, "the number of block-sparse tasks")?;
    if ntasks == 0 {
        return Ok(out);
    }
    if ntasks > i32::MAX as u32 {
        candle_core::bail!("candle-ot: {ntasks} block-sparse tasks exceed the CUDA grid limit")
    }
    if spans.is_empty() {
        spans.extend_from_slice(&[0, 0]); // (no zero-length device buffers)
    }
    let tasks_d = dev.clone_htod(&tasks)?;
    let spans_d = dev.clone_htod(&spans)?;
    let par = T::of(eps);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    for i in inputs {
        builder.arg(i);
    }
    builder.arg(&out);
    builder.arg(&bb);
    builder.arg(&nn);
    builder.arg(&mm);
    builder.arg(&dd);
    builder.arg(&par);
    builder.arg(&tasks_d);
    builder.arg(&spans_d);
    builder.arg(&ntasks);
    let cfg = LaunchConfig {
        grid_dim: (ntasks, 1, 1),
        block_dim: block,
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches the kernel's signature
    // (candle_ot_kernels::abi::BLOCK_*_ARGS); the task table only names rows < N of batch items
    // < B and spans within [0, M) (checked by the caller against the pattern), and every buffer
    // holds the sizes the kernel reads and writes.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}

/// `block_softmin_{cost}_{t}`: x (B, N, D), y (B, M, D), h (B, M) → (B, N).
pub(crate) fn block_softmin_fwd(
    cost: CostKind,
    eps: f64,
    (sx, lx): (&CudaStorage, &Layout),
    (sy, ly): (&CudaStorage, &Layout),
    (sh, lh): (&CudaStorage, &Layout),
    pattern: &[Blocks],
) -> Result<(CudaStorage, Shape)> {
    let (b, n, d) = dims3(lx, "x")?;
    let (_, m, _) = dims3(ly, "y")?;
    let dev = sx.device();
    let storage = with_float!(sx.dtype(), "candle-ot block softmin", " on CUDA", |T| {
        let entry = format!("block_softmin_{}_{}", cost_name(cost), T::SUFFIX);
        let ins = [
            contiguous::<T>(sx, lx)?,
            contiguous::<T>(sy, ly)?,
            contiguous::<T>(sh, lh)?,
        ];
        let out = launch::<T>(dev, &entry, &ins, b * n, (b, n, m, d), eps, pattern)?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, Shape::from((b, n))))
}

/// `block_lse_grad_{cost}_{t}`: rows [p, α] (B, N, D+1), cols [q, h, w] (B, M, D+2) →
/// (B, N, D+1).
pub(crate) fn block_grad_fwd(
    cost: CostKind,
    eps: f64,
    (sr, lr): (&CudaStorage, &Layout),
    (sc, lc): (&CudaStorage, &Layout),
    pattern: &[Blocks],
) -> Result<(CudaStorage, Shape)> {
    let (b, n, d1) = dims3(lr, "rows")?;
    let (_, m, cd) = dims3(lc, "cols")?;
    if d1 == 0 || cd != d1 + 1 {
        candle_core::bail!(
            "candle-ot block grad: rows (B, N, D+1) and cols (B, M, D+2) expected, got {:?} and {:?}",
            lr.dims(),
            lc.dims()
        )
    }
    let d = d1 - 1;
    let dev = sr.device();
    let storage = with_float!(sr.dtype(), "candle-ot block grad", " on CUDA", |T| {
        let entry = format!("block_lse_grad_{}_{}", cost_name(cost), T::SUFFIX);
        let ins = [contiguous::<T>(sr, lr)?, contiguous::<T>(sc, lc)?];
        let out = launch::<T>(dev, &entry, &ins, b * n * d1, (b, n, m, d), eps, pattern)?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, Shape::from((b, n, d1))))
}
