//! CUDA path of the grid softmin (`cuda_fwd`): one launch of `grid_lse_axis_{f32,f64}` (from
//! `candle-ot-kernels`) per grid axis, last axis first, on Candle's own stream, ping-ponging two
//! device buffers; the last pass multiplies by `−ε`. The kernels are compiled with NVRTC and
//! cached by the online backend's module cache ([`function`], see `online/cuda.rs`).

use super::GridSoftminOp;
use crate::softmin::online::cuda::{function, Float};
use crate::softmin::online::{entry, u32_of};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{backend::BackendStorage, CudaDevice, CudaStorage, Layout, Result, Shape};
use candle_ot_kernels::{cuda as src, grid_launch_config};

/// The module name of the grid kernels in the online backend's module cache.
const MODULE: &str = "candle_ot_grid";

/// Runs every pass of `op` on `h` (`len` elements of the shape `dims`) and returns the result.
fn run<T: Float>(
    dev: &CudaDevice,
    op: &GridSoftminOp,
    h: CudaView<'_, T>,
    dims: &[usize],
    len: usize,
) -> Result<CudaSlice<T>> {
    let passes = op.passes(dims);
    let name = entry(src::GRID_KERNELS, "grid_lse_axis", "", T::SUFFIX)?;
    let func = function(dev, MODULE, src::GRID, name)?;
    let stream = dev.cuda_stream();
    // `cur`: the last pass's output (None: the input itself); `spare`: a buffer to reuse.
    let mut cur: Option<CudaSlice<T>> = None;
    let mut spare: Option<CudaSlice<T>> = None;
    let last = passes.len() - 1;
    for (t, p) in passes.iter().enumerate() {
        let (outer, n, inner) = (
            u32_of(p.outer, "the grid pass' outer size")?,
            u32_of(p.n, "the grid axis size")?,
            u32_of(p.inner, "the grid pass' inner size")?,
        );
        let Some(c) = grid_launch_config(outer, n, inner) else {
            candle_core::bail!(
                "candle-ot grid softmin: a pass of ({}, {}, {}) exceeds the CUDA grid limits",
                p.outer,
                p.n,
                p.inner
            )
        };
        let dst = match spare.take() {
            Some(b) => b,
            None => dev.alloc_zeros::<T>(len)?,
        };
        let kern: Vec<T> = p.kernel.iter().map(|&v| T::of(v)).collect();
        let kern = dev.clone_htod(&kern)?;
        let scale = T::of(if t == last { -op.eps } else { 1.0 });
        let mut builder = stream.launch_builder(&func);
        match &cur {
            Some(prev) => builder.arg(prev),
            None => builder.arg(&h),
        };
        builder.arg(&kern);
        builder.arg(&dst);
        builder.arg(&outer);
        builder.arg(&n);
        builder.arg(&inner);
        builder.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: c.grid,
            block_dim: c.block,
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature
        // (candle_ot_kernels::abi::GRID_LSE_AXIS_ARGS); `src` and `dst` hold outer·n·inner = len
        // elements and are distinct buffers, `kern` holds n.
        unsafe { builder.launch(cfg) }.w()?;
        spare = cur.replace(dst);
    }
    cur.ok_or_else(|| candle_core::Error::Msg("candle-ot grid softmin: no axis".into()))
}

/// `h` `(B, n_1, …, n_D)` (contiguous, f32 or f64) ↦ the grid softmin, same shape.
pub(super) fn grid_softmin_fwd(
    op: &GridSoftminOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("candle-ot grid softmin: h must be contiguous on CUDA, got {l:?}")
    };
    let dims = l.dims();
    let dev = s.device();
    let storage = with_float!(s.dtype(), "candle-ot grid softmin", " on CUDA", |T| {
        let out = if a == b || op.cost.spacing.is_empty() {
            dev.alloc_zeros::<T>((b - a).max(1))? // nothing to compute
        } else {
            let h = s.as_cuda_slice::<T>()?.slice(a..b);
            run::<T>(dev, op, h, dims, b - a)?
        };
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, l.shape().clone()))
}
