//! Metal path of the grid softmin (`metal_fwd`): one dispatch of `grid_lse_axis_f32` (from
//! `candle-ot-kernels`) per grid axis, last axis first, encoded on Candle's command encoder,
//! ping-ponging two buffers; the last pass multiplies by `−ε`. f32 only, as the online ops:
//! f16 / bf16 inputs are computed in f32 and converted back, f64 is an error. The library and
//! pipeline come from the online backend's cache ([`pipeline`], see `online/metal.rs`).
//!
//! Nothing here has been run on a Mac: see `docs/metal.md` for what the Linux CI checks.

use super::GridSoftminOp;
use crate::softmin::online::metal::{finish, pipeline, F32Input, Source};
use crate::softmin::online::{entry, u32_of};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::ComputeCommandEncoder;
use candle_ot_kernels::{abi, grid_launch_config, metal as src};
use objc2_metal::MTLSize;

/// `h` `(B, n_1, …, n_D)` (contiguous; f32, or f16 / bf16 computed in f32) ↦ the grid softmin,
/// same shape and dtype.
pub(super) fn grid_softmin_fwd(
    op: &GridSoftminOp,
    s: &MetalStorage,
    l: &Layout,
) -> Result<(MetalStorage, Shape)> {
    if l.contiguous_offsets().is_none() {
        candle_core::bail!("candle-ot grid softmin: h must be contiguous on Metal, got {l:?}")
    }
    let dev = s.device();
    let dtype = s.dtype();
    let input = F32Input::new(s, l, "h")?;
    let len = l.shape().elem_count();
    let shape = l.shape().clone();
    let entry = entry(src::GRID_KERNELS, "grid_lse_axis", "", "f32")?;
    let passes = op.passes(l.dims());
    let out_a = dev
        .new_buffer_builder()
        .with_size_for(len.max(1), DType::F32)
        .with_label(entry)
        .build()?;
    if len == 0 || passes.is_empty() {
        return finish(dev, out_a, len, shape, dtype); // nothing to compute
    }
    let out_b = if passes.len() > 1 {
        Some(
            dev.new_buffer_builder()
                .with_size_for(len, DType::F32)
                .with_label(entry)
                .build()?,
        )
    } else {
        None
    };
    let pipeline = pipeline(dev, Source::Grid, entry)?;
    let max = pipeline.max_total_threads_per_threadgroup().max(1);
    // Sizes, kernel tables and dispatch sizes of every pass, before the encoder is taken.
    let mut plan = Vec::with_capacity(passes.len());
    let last = passes.len() - 1;
    for (t, p) in passes.iter().enumerate() {
        let sizes = [
            u32_of(p.outer, "the grid pass' outer size")?,
            u32_of(p.n, "the grid axis size")?,
            u32_of(p.inner, "the grid pass' inner size")?,
        ];
        let Some(c) = grid_launch_config(sizes[0], sizes[1], sizes[2]) else {
            candle_core::bail!(
                "candle-ot grid softmin: a pass of ({}, {}, {}) exceeds the grid limits",
                p.outer,
                p.n,
                p.inner
            )
        };
        // Fewer outputs i per threadgroup (then fewer lines) if the pipeline allows fewer than
        // LX·LY threads: the kernel accepts any LX (a power of two) and LY with LX·LY <= 256.
        let (mut lx, mut ly) = (c.block.0 as usize, c.block.1 as usize);
        while lx * ly > max {
            if ly > 1 {
                ly /= 2;
            } else {
                lx /= 2;
            }
        }
        let groups = MTLSize {
            width: (p.outer * p.inner).div_ceil(lx),
            height: p.n.div_ceil(ly),
            depth: 1,
        };
        let threads = MTLSize {
            width: lx,
            height: ly,
            depth: 1,
        };
        let kern: Vec<f32> = p.kernel.iter().map(|&v| v as f32).collect();
        let kern = dev.new_buffer_with_data(&kern)?;
        let scale = if t == last { -op.eps as f32 } else { 1.0f32 };
        plan.push((sizes, kern, scale, groups, threads));
    }
    {
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_compute_pipeline_state(&pipeline);
        debug_assert_eq!(abi::GRID_LSE_AXIS_ARGS.len(), 7);
        for (t, (sizes, kern, scale, groups, threads)) in plan.iter().enumerate() {
            // Pass t reads the input (t = 0) or the previous pass' buffer, and writes out_a
            // (t even) or out_b (t odd).
            let two = || out_b.as_ref().expect("two buffers for two passes or more");
            let dst = if t.is_multiple_of(2) { &out_a } else { two() };
            if t == 0 {
                enc.set_input_buffer(0, Some(input.storage.buffer()), input.offset_bytes);
            } else {
                let prev = if t.is_multiple_of(2) { two() } else { &out_a };
                enc.set_input_buffer(0, Some(prev), 0);
            }
            enc.set_input_buffer(1, Some(kern), 0);
            enc.set_output_buffer(2, Some(dst), 0);
            for (i, v) in sizes.iter().enumerate() {
                enc.set_bytes(3 + i, v);
            }
            enc.set_bytes(6, scale);
            // (Candle's encoder inserts a memory barrier when a dispatch reads what the
            // previous one wrote: set_input_buffer / set_output_buffer record the hazards.)
            enc.dispatch_thread_groups(*groups, *threads);
        }
        // Release Candle's command-queue lock before any other op (the cast in `finish`) runs.
        drop(guard);
    }
    let out = if last.is_multiple_of(2) {
        out_a
    } else {
        out_b.expect("two buffers for two passes or more")
    };
    finish(dev, out, len, shape, dtype)
}
