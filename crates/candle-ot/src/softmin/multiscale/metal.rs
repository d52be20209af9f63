//! Metal paths of the multiscale fine-level ops: the block-sparse kernels `block_softmin_*` and
//! `block_lse_grad_*` (f32; f16 / bf16 computed in f32, f64 an error, as for the online ops),
//! from the online kernels' library and pipeline cache, one threadgroup per task of the
//! pattern's task table ([`super::cluster::task_table`], uploaded per call).

use super::cluster::{mean_cluster_rows, task_table, Blocks};
use crate::cost::CostKind;
use crate::softmin::online::metal::{common_dtype, finish, pipeline, F32Input, Source};
use crate::softmin::online::{dims3, u32_of};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::ComputeCommandEncoder;
use candle_ot_kernels::{abi, block_sparse_block, metal as src, MAX_D, TASK_WORDS};
use objc2_metal::MTLSize;

/// Encodes `entry(inputs..., out, B, N, M, D, eps, tasks, spans, ntasks)` over `pattern`.
#[allow(clippy::too_many_arguments)]
fn launch(
    dev: &MetalDevice,
    entry: &'static str,
    args: &[&str],
    inputs: &[F32Input<'_>],
    out_len: usize,
    out_shape: Shape,
    (b, n, m, d): (usize, usize, usize, usize),
    eps: f64,
    pattern: &[Blocks],
    dtype: DType,
) -> Result<(MetalStorage, Shape)> {
    if d > MAX_D as usize {
        candle_core::bail!("candle-ot: the Metal kernels support D <= {MAX_D} dimensions, got {d}")
    }
    debug_assert_eq!(
        args.len(),
        inputs.len() + 9,
        "{entry}: argument list differs from the ABI"
    );
    let pipeline = pipeline(dev, Source::Softmin, entry)?;
    let (bb, nn, mm, dd) = (
        u32_of(b, "B")?,
        u32_of(n, "N")?,
        u32_of(m, "M")?,
        u32_of(d, "D")?,
    );
    // As `dispatch_sizes` of the online ops: fewer rows per threadgroup if the pipeline allows
    // fewer threads (lanes stay a power of two for the lane merge).
    let (mut lanes, rows, _) = block_sparse_block(nn, bb, mean_cluster_rows(pattern));
    let max = pipeline.max_total_threads_per_threadgroup().max(1);
    while lanes as usize > max {
        lanes /= 2;
    }
    let per_group = (rows as usize).min(max / lanes as usize).max(1);
    let (tasks, mut spans) = task_table(pattern, per_group as u32);
    let ntasks = u32_of(tasks.len() / TASK_WORDS, "the number of block-sparse tasks")?;
    let out = dev
        .new_buffer_builder()
        .with_size_for(out_len.max(1), DType::F32)
        .with_label(entry)
        .build()?;
    if ntasks > 0 {
        if spans.is_empty() {
            spans.extend_from_slice(&[0, 0]); // (Metal has no empty buffers)
        }
        let tasks_b = dev.new_buffer_with_data(&tasks)?;
        let spans_b = dev.new_buffer_with_data(&spans)?;
        let eps = eps as f32;
        let guard = dev.command_encoder()?;
        {
            let enc: &ComputeCommandEncoder = guard.as_ref();
            enc.set_compute_pipeline_state(&pipeline);
            let mut i = 0usize;
            for inp in inputs {
                enc.set_input_buffer(i, Some(inp.storage.buffer()), inp.offset_bytes);
                i += 1;
            }
            enc.set_output_buffer(i, Some(&out), 0);
            i += 1;
            for v in [bb, nn, mm, dd] {
                enc.set_bytes(i, &v);
                i += 1;
            }
            enc.set_bytes(i, &eps);
            enc.set_input_buffer(i + 1, Some(&tasks_b), 0);
            enc.set_input_buffer(i + 2, Some(&spans_b), 0);
            enc.set_bytes(i + 3, &ntasks);
            debug_assert_eq!(i + 4, args.len());
            enc.dispatch_thread_groups(
                MTLSize {
                    width: ntasks as usize,
                    height: 1,
                    depth: 1,
                },
                MTLSize {
                    width: lanes as usize,
                    height: per_group,
                    depth: 1,
                },
            );
        }
        // Release Candle's command-queue lock before any other op (the cast in `finish`) runs.
        drop(guard);
    }
    finish(dev, out, out_len, out_shape, dtype)
}

fn block_softmin_entry(cost: CostKind) -> &'static str {
    match cost {
        CostKind::SqEuclidean => src::BLOCK_SOFTMIN_SQEUCLIDEAN_F32,
        CostKind::Euclidean => src::BLOCK_SOFTMIN_EUCLIDEAN_F32,
    }
}

fn block_lse_grad_entry(cost: CostKind) -> &'static str {
    match cost {
        CostKind::SqEuclidean => src::BLOCK_LSE_GRAD_SQEUCLIDEAN_F32,
        CostKind::Euclidean => src::BLOCK_LSE_GRAD_EUCLIDEAN_F32,
    }
}

/// `block_softmin_{cost}_f32`: x (B, N, D), y (B, M, D), h (B, M) → (B, N).
pub(crate) fn block_softmin_fwd(
    cost: CostKind,
    eps: f64,
    (sx, lx): (&MetalStorage, &Layout),
    (sy, ly): (&MetalStorage, &Layout),
    (sh, lh): (&MetalStorage, &Layout),
    pattern: &[Blocks],
) -> Result<(MetalStorage, Shape)> {
    let (b, n, d) = dims3(lx, "x")?;
    let (by, m, dy) = dims3(ly, "y")?;
    if (by, dy) != (b, d) {
        candle_core::bail!(
            "candle-ot block softmin: x is {:?} but y is {:?}",
            lx.dims(),
            ly.dims()
        )
    }
    let dtype = common_dtype(&[(sx, "x"), (sy, "y"), (sh, "h")])?;
    let inputs = [
        F32Input::new(sx, lx, "x")?,
        F32Input::new(sy, ly, "y")?,
        F32Input::new(sh, lh, "h")?,
    ];
    launch(
        sx.device(),
        block_softmin_entry(cost),
        abi::BLOCK_SOFTMIN_ARGS,
        &inputs,
        b * n,
        Shape::from((b, n)),
        (b, n, m, d),
        eps,
        pattern,
        dtype,
    )
}

/// `block_lse_grad_{cost}_f32`: rows [p, α] (B, N, D+1), cols [q, h, w] (B, M, D+2) →
/// (B, N, D+1).
pub(crate) fn block_grad_fwd(
    cost: CostKind,
    eps: f64,
    (sr, lr): (&MetalStorage, &Layout),
    (sc, lc): (&MetalStorage, &Layout),
    pattern: &[Blocks],
) -> Result<(MetalStorage, Shape)> {
    let (b, n, d1) = dims3(lr, "rows")?;
    let (bc, m, cd) = dims3(lc, "cols")?;
    if d1 == 0 || bc != b || cd != d1 + 1 {
        candle_core::bail!(
            "candle-ot block grad: rows (B, N, D+1) and cols (B, M, D+2) expected, got {:?} and {:?}",
            lr.dims(),
            lc.dims()
        )
    }
    let dtype = common_dtype(&[(sr, "rows"), (sc, "cols")])?;
    let inputs = [
        F32Input::new(sr, lr, "rows")?,
        F32Input::new(sc, lc, "cols")?,
    ];
    launch(
        sr.device(),
        block_lse_grad_entry(cost),
        abi::BLOCK_LSE_GRAD_ARGS,
        &inputs,
        b * n * d1,
        Shape::from((b, n, d1)),
        (b, n, m, d1 - 1),
        eps,
        pattern,
        dtype,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_exist_in_the_sources() {
        for c in [CostKind::SqEuclidean, CostKind::Euclidean] {
            for e in [block_softmin_entry(c), block_lse_grad_entry(c)] {
                assert!(src::SOFTMIN_KERNELS.contains(&e), "{e}");
            }
        }
    }
}
