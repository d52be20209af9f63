//! Metal paths of the online ops (`metal_fwd`): one compute dispatch per reduction, encoded on
//! Candle's own command encoder.
//!
//! # How the kernels are compiled and bound
//!
//! * The sources of `candle-ot-kernels` (`kernels/metal/*.metal`, self-contained) are compiled
//!   **at run time** with `newLibraryWithSource` and **fast math disabled**
//!   (`fastMathEnabled = NO`, i.e. `MTLMathModeSafe`): the kernels mask points with `-inf` and
//!   rely on IEEE infinities surviving compilation. The shifted exponentials inside the loops
//!   still use `metal::fast::exp` explicitly, as the CUDA kernels use `__expf`.
//! * Libraries and pipelines live in a process-wide cache of our own, keyed by Candle's
//!   `DeviceId` and the source / entry-point name (Candle's kernel cache is keyed by a closed
//!   enum of its own sources). Compilation happens once per device, on the first call.
//! * Buffers are bound with Candle's `set_input_buffer` / `set_output_buffer`, which record the
//!   hazards Candle needs to insert its memory barriers (its buffers are untracked), and scalars
//!   with `set_bytes`, at the `[[buffer(i)]]` indices of `candle_ot_kernels::abi`.
//! * The command-encoder guard holds Candle's command-queue lock: it is dropped before any other
//!   Candle op runs (the dtype conversions happen before it is taken and after it is released).
//!
//! # Dtypes
//!
//! The Metal kernels are f32 only. f16 / bf16 inputs are converted to f32 with Candle's cast
//! kernels and the result converted back, so the op keeps its input dtype; f64 is an error
//! (Metal has no double precision).
//!
//! Nothing in this file has been run on a Mac by the project's CI, which is Linux only: see
//! `docs/metal.md` for what is checked there (the Rust code type-checks against Candle's Metal
//! backend, the kernels run in a CPU emulation) and how to run the tests on Apple hardware.

use super::cpu::Weighted;
use super::{dims3, entry, u32_of, Tiles};
use crate::cost::{CostKind, KernelKind};
use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, Layout, MetalDevice, MetalError, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::{ComputeCommandEncoder, ComputePipeline, Library};
use candle_ot_kernels::{
    abi, block_sparse_block, launch_config, metal as src, MAX_D, MAX_LANES, TASK_WORDS,
};
use objc2_metal::{MTLCompileOptions, MTLSize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The Metal sources (each with the shared core prepended).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Softmin,
    KernelSums,
    /// The grid softmin's axis pass (`softmin::grid`).
    Grid,
}

impl Source {
    fn text(self) -> &'static str {
        match self {
            Source::Softmin => src::SOFTMIN,
            Source::KernelSums => src::KERNEL_SUMS,
            Source::Grid => src::GRID,
        }
    }
}

#[derive(Default)]
struct Cache {
    libraries: HashMap<(DeviceId, Source), Library>,
    pipelines: HashMap<(DeviceId, &'static str), ComputePipeline>,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Cache::default()))
}

fn kernel_err(e: candle_metal_kernels::MetalKernelError) -> candle_core::Error {
    MetalError::from(e).into()
}

/// The compute pipeline of `entry` (defined in `source`) on `dev`, compiled on first use.
pub(crate) fn pipeline(
    dev: &MetalDevice,
    source: Source,
    entry: &'static str,
) -> Result<ComputePipeline> {
    let id = dev.id();
    // The lock is held while compiling, so that concurrent first calls compile once.
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.pipelines.get(&(id, entry)) {
        return Ok(p.clone());
    }
    let library = match cache.libraries.get(&(id, source)) {
        Some(l) => l.clone(),
        None => {
            let options = MTLCompileOptions::new();
            // Fast math off (= MTLMathModeSafe): the `-inf` masks must survive compilation.
            // `setFastMathEnabled` is deprecated since macOS 15 in favour of `mathMode`, but it
            // exists on every macOS version Candle supports, and NO maps to the safe mode.
            #[allow(deprecated)]
            options.setFastMathEnabled(false);
            let l = dev
                .device()
                .new_library_with_source(source.text(), Some(&options))
                .map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "candle-ot: the Metal compiler rejected the {source:?} kernels: {e}"
                    ))
                })?;
            cache.libraries.insert((id, source), l.clone());
            l
        }
    };
    let function = library.get_function(entry, None).map_err(kernel_err)?;
    let p = dev
        .device()
        .new_compute_pipeline_state_with_function(&function)
        .map_err(kernel_err)?;
    cache.pipelines.insert((id, entry), p.clone());
    Ok(p)
}

/// An input as a contiguous f32 buffer: the storage itself (f32) or an f32 copy (f16 / bf16),
/// with the byte offset of its first element.
pub(crate) struct F32Input<'a> {
    pub(crate) storage: Cow<'a, MetalStorage>,
    pub(crate) offset_bytes: usize,
}

impl<'a> F32Input<'a> {
    pub(crate) fn new(s: &'a MetalStorage, l: &Layout, name: &str) -> Result<Self> {
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("candle-ot: online op input {name} must be contiguous on Metal")
        };
        match s.dtype() {
            DType::F32 => Ok(Self {
                storage: Cow::Borrowed(s),
                offset_bytes: start * DType::F32.size_in_bytes(),
            }),
            // (Candle's cast honours the layout's offset; the copy starts at 0.)
            DType::F16 | DType::BF16 => Ok(Self {
                storage: Cow::Owned(if l.shape().elem_count() == 0 {
                    empty(s.device(), DType::F32)? // (a cast of 0 elements divides by 0)
                } else {
                    s.to_dtype(l, DType::F32)?
                }),
                offset_bytes: 0,
            }),
            DType::F64 => candle_core::bail!(
                "candle-ot: f64 is not supported on Metal (Apple GPUs have no double precision); \
                 use f32 (f16 / bf16 are computed in f32), or run on the CPU"
            ),
            dt => candle_core::bail!(
                "candle-ot: unsupported dtype {dt:?} for {name} on Metal (f32, f16 or bf16)"
            ),
        }
    }
}

/// A storage of 0 elements of `dtype` (over a 1-element buffer: Metal has no empty buffers).
pub(crate) fn empty(dev: &MetalDevice, dtype: DType) -> Result<MetalStorage> {
    let buffer = dev.new_buffer_builder().with_size_for(1, dtype).build()?;
    Ok(MetalStorage::new(buffer, dev.clone(), 0, dtype))
}

/// The common input dtype of an op (all inputs must agree).
pub(crate) fn common_dtype(inputs: &[(&MetalStorage, &str)]) -> Result<DType> {
    let dt = inputs[0].0.dtype();
    for (s, name) in inputs {
        if s.dtype() != dt {
            candle_core::bail!(
                "candle-ot: {name} has dtype {:?}, {} has {dt:?}",
                s.dtype(),
                inputs[0].1
            )
        }
    }
    Ok(dt)
}

/// Threads per threadgroup and threadgroups for `rows` output rows in a batch of `batch`:
/// [`launch_config`], with fewer rows per threadgroup if the pipeline allows fewer than
/// `LANES * ROWS` threads (the lanes must stay a power of two for the lane merge).
fn dispatch_sizes(pipeline: &ComputePipeline, rows: u32, batch: u32) -> (MTLSize, MTLSize) {
    let c = launch_config(rows, batch);
    let max = pipeline.max_total_threads_per_threadgroup().max(1);
    let mut lanes = c.block.0 as usize;
    while lanes > max {
        lanes /= 2;
    }
    debug_assert!(lanes.is_power_of_two() && lanes <= MAX_LANES as usize);
    let per_group = (c.block.1 as usize).min(max / lanes).max(1);
    let groups = (rows as usize).div_ceil(per_group);
    (
        MTLSize {
            width: groups,
            height: batch as usize,
            depth: 1,
        },
        MTLSize {
            width: lanes,
            height: per_group,
            depth: 1,
        },
    )
}

/// The scalar arguments after `out`: `B, N, M, D, [K,] par`.
struct Scalars {
    b: u32,
    n: u32,
    m: u32,
    d: u32,
    k: Option<u32>,
    par: f32,
}

/// The one Metal launcher of the online and multiscale ops: encodes `entry(inputs…, out, B,
/// N, M, D, [K,] par)`, followed by `tasks, spans, ntasks` for [`Tiles::Tasks`] (the argument
/// order of `candle_ot_kernels::abi`), and returns `out` as a storage of `out_len` elements in
/// `dtype` (converted back from f32 when the inputs were f16 / bf16), zero where no
/// threadgroup writes.
#[allow(clippy::too_many_arguments)]
fn launch(
    dev: &MetalDevice,
    source: Source,
    entry: &'static str,
    args: &[&str],
    inputs: &[F32Input<'_>],
    out_len: usize,
    out_shape: Shape,
    s: Scalars,
    tiles: Tiles<'_>,
    dtype: DType,
) -> Result<(MetalStorage, Shape)> {
    if s.d as usize > MAX_D as usize {
        candle_core::bail!(
            "candle-ot: the Metal kernels support D <= {MAX_D} dimensions, got {}",
            s.d
        )
    }
    let table_args = if matches!(tiles, Tiles::Tasks(_)) {
        3
    } else {
        0
    };
    let nargs = inputs.len() + 5 + s.k.is_some() as usize + 1 + table_args;
    debug_assert_eq!(
        args.len(),
        nargs,
        "{entry}: argument list differs from the ABI"
    );
    let pipeline = pipeline(dev, source, entry)?;
    let out = dev
        .new_buffer_builder()
        .with_size_for(out_len.max(1), DType::F32)
        .with_label(entry)
        .build()?;
    // The threadgroups, and for a block-sparse launch its task table; `None`: nothing to do.
    let dispatch = match tiles {
        Tiles::Rows if s.b == 0 || s.n == 0 => None,
        Tiles::Rows => {
            let (groups, threads) = dispatch_sizes(&pipeline, s.n, s.b);
            Some((groups, threads, None))
        }
        Tiles::Tasks(pattern) => {
            // As `dispatch_sizes`: fewer rows per threadgroup if the pipeline allows fewer
            // threads (lanes stay a power of two for the lane merge).
            let (mut lanes, rows, _) = block_sparse_block(s.n, s.b, pattern.mean_cluster_rows());
            let max = pipeline.max_total_threads_per_threadgroup().max(1);
            while lanes as usize > max {
                lanes /= 2;
            }
            let per_group = (rows as usize).min(max / lanes as usize).max(1);
            // Built and uploaded on the first launch of this pattern on this device, then
            // reused by every iteration (`Pattern::table`).
            let key = format!("metal {:?}", dev.id());
            let table = pattern.table(per_group as u32, &key, |tasks, mut spans| {
                let ntasks = u32_of(tasks.len() / TASK_WORDS, "the number of block-sparse tasks")?;
                if spans.is_empty() {
                    spans.extend_from_slice(&[0, 0]); // (Metal has no empty buffers)
                }
                let tasks = if tasks.is_empty() {
                    vec![0; TASK_WORDS]
                } else {
                    tasks
                };
                Ok((
                    dev.new_buffer_with_data(&tasks)?,
                    dev.new_buffer_with_data(&spans)?,
                    ntasks,
                ))
            })?;
            let ntasks = table.2;
            if ntasks == 0 {
                None
            } else {
                let groups = MTLSize {
                    width: ntasks as usize,
                    height: 1,
                    depth: 1,
                };
                let threads = MTLSize {
                    width: lanes as usize,
                    height: per_group,
                    depth: 1,
                };
                Some((groups, threads, Some(table)))
            }
        }
    };
    if let Some((groups, threads, table)) = dispatch {
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
            for v in [s.b, s.n, s.m, s.d].into_iter().chain(s.k) {
                enc.set_bytes(i, &v);
                i += 1;
            }
            enc.set_bytes(i, &s.par);
            i += 1;
            if let Some(table) = table.as_ref() {
                let (tasks, spans, ntasks) = &**table;
                enc.set_input_buffer(i, Some(tasks), 0);
                enc.set_input_buffer(i + 1, Some(spans), 0);
                enc.set_bytes(i + 2, ntasks);
                i += 3;
            }
            debug_assert_eq!(i, nargs);
            enc.dispatch_thread_groups(groups, threads);
        }
        // Release Candle's command-queue lock before any other op (the cast below) runs.
        drop(guard);
    }
    finish(dev, out, out_len, out_shape, dtype)
}

/// The f32 output buffer `out` (`out_len` elements) as a storage of `dtype` (converted back from
/// f32 when the inputs were f16 / bf16). Call after the command-encoder guard is dropped.
pub(crate) fn finish(
    dev: &MetalDevice,
    out: std::sync::Arc<candle_metal_kernels::metal::Buffer>,
    out_len: usize,
    out_shape: Shape,
    dtype: DType,
) -> Result<(MetalStorage, Shape)> {
    let storage = MetalStorage::new(out, dev.clone(), out_len, DType::F32);
    let storage = if dtype == DType::F32 {
        storage
    } else if out_len == 0 {
        empty(dev, dtype)?
    } else {
        storage.to_dtype(&Layout::contiguous(out_shape.clone()), dtype)?
    };
    Ok((storage, out_shape))
}

/// `softmin_{cost}_f32(x, y, h, out, B, N, M, D, eps)`, or with [`Tiles::Tasks`]
/// `block_softmin_{cost}_f32(…, tasks, spans, ntasks)`: x (B, N, D), y (B, M, D), h (B, M) →
/// (B, N).
pub(crate) fn softmin_fwd(
    cost: CostKind,
    eps: f64,
    (sx, lx): (&MetalStorage, &Layout),
    (sy, ly): (&MetalStorage, &Layout),
    (sh, lh): (&MetalStorage, &Layout),
    tiles: Tiles<'_>,
) -> Result<(MetalStorage, Shape)> {
    let (b, n, d) = dims3(lx, "x")?;
    let (by, m, dy) = dims3(ly, "y")?;
    if (by, dy) != (b, d) {
        candle_core::bail!(
            "candle-ot softmin: x is {:?} but y is {:?}",
            lx.dims(),
            ly.dims()
        )
    }
    if lh.shape().dims() != [b, m] {
        candle_core::bail!("candle-ot softmin: h must be (B, M) = ({b}, {m}), got {lh:?}")
    }
    let dtype = common_dtype(&[(sx, "x"), (sy, "y"), (sh, "h")])?;
    let inputs = [
        F32Input::new(sx, lx, "x")?,
        F32Input::new(sy, ly, "y")?,
        F32Input::new(sh, lh, "h")?,
    ];
    let s = Scalars {
        b: u32_of(b, "B")?,
        n: u32_of(n, "N")?,
        m: u32_of(m, "M")?,
        d: u32_of(d, "D")?,
        k: None,
        par: eps as f32,
    };
    let (family, args) = match tiles {
        Tiles::Rows => ("softmin", abi::SOFTMIN_ARGS),
        Tiles::Tasks(_) => ("block_softmin", abi::BLOCK_SOFTMIN_ARGS),
    };
    let name = entry(src::SOFTMIN_KERNELS, family, cost.kernel_name(), "f32")?;
    let shape = Shape::from((b, n));
    launch(
        sx.device(),
        Source::Softmin,
        name,
        args,
        &inputs,
        b * n,
        shape,
        s,
        tiles,
        dtype,
    )
}

/// Packed softmax-weighted sums: `lse_grad` (rows [p, α] (B, N, D+1), cols [q, h, w]
/// (B, M, D+2) → (B, N, D+1); with [`Tiles::Tasks`] `block_lse_grad`) or `lse_values` (cols
/// [q, h, v] (B, M, D+1+K) → (B, N, K); dense only).
pub(crate) fn lse_weighted_fwd(
    cost: CostKind,
    eps: f64,
    mode: Weighted,
    (sr, lr): (&MetalStorage, &Layout),
    (sc, lc): (&MetalStorage, &Layout),
    tiles: Tiles<'_>,
) -> Result<(MetalStorage, Shape)> {
    let (b, n, d1) = dims3(lr, "rows")?;
    let (bc, m, cd) = dims3(lc, "cols")?;
    if d1 == 0 || bc != b {
        candle_core::bail!(
            "candle-ot: packed rows (B, N, D+1) and cols (B, M, ·) expected, got {:?} and {:?}",
            lr.dims(),
            lc.dims()
        )
    }
    let d = d1 - 1;
    if cd != mode.col_dim(d) {
        candle_core::bail!(
            "candle-ot: packed columns must have {} values, got {cd}",
            mode.col_dim(d)
        )
    }
    let (family, args, k) = match (mode, tiles) {
        (Weighted::Grad { with_mass: true }, Tiles::Rows) => ("lse_grad", abi::LSE_GRAD_ARGS, None),
        (Weighted::Grad { with_mass: true }, Tiles::Tasks(_)) => {
            ("block_lse_grad", abi::BLOCK_LSE_GRAD_ARGS, None)
        }
        (Weighted::Values { k }, Tiles::Rows) => {
            ("lse_values", abi::LSE_VALUES_ARGS, Some(u32_of(k, "K")?))
        }
        (Weighted::Values { .. }, Tiles::Tasks(_)) => {
            candle_core::bail!("candle-ot: the Metal value sums have no block-sparse kernel")
        }
        (Weighted::Grad { with_mass: false }, _) => {
            candle_core::bail!("candle-ot: the Metal gradient reduction always returns the mass")
        }
    };
    let name = entry(src::SOFTMIN_KERNELS, family, cost.kernel_name(), "f32")?;
    let od = mode.out_dim(d);
    let dtype = common_dtype(&[(sr, "rows"), (sc, "cols")])?;
    let inputs = [
        F32Input::new(sr, lr, "rows")?,
        F32Input::new(sc, lc, "cols")?,
    ];
    let s = Scalars {
        b: u32_of(b, "B")?,
        n: u32_of(n, "N")?,
        m: u32_of(m, "M")?,
        d: u32_of(d, "D")?,
        k,
        par: eps as f32,
    };
    launch(
        sr.device(),
        Source::Softmin,
        name,
        args,
        &inputs,
        b * n * od,
        Shape::from((b, n, od)),
        s,
        tiles,
        dtype,
    )
}

/// `kernel_product_{k}_f32(x, y, b, out, B, N, M, D, sigma)`: x (B, N, D), y (B, M, D), b (B, M)
/// → (B, N).
pub(super) fn kernel_product_fwd(
    kind: KernelKind,
    sigma: f64,
    (sx, lx): (&MetalStorage, &Layout),
    (sy, ly): (&MetalStorage, &Layout),
    (sb, lb): (&MetalStorage, &Layout),
) -> Result<(MetalStorage, Shape)> {
    let (b, n, d) = dims3(lx, "x")?;
    let (by, m, dy) = dims3(ly, "y")?;
    if (by, dy) != (b, d) {
        candle_core::bail!(
            "candle-ot kernel product: x is {:?} but y is {:?}",
            lx.dims(),
            ly.dims()
        )
    }
    if lb.shape().dims() != [b, m] {
        candle_core::bail!("candle-ot kernel product: b must be (B, M) = ({b}, {m}), got {lb:?}")
    }
    let dtype = common_dtype(&[(sx, "x"), (sy, "y"), (sb, "b")])?;
    let inputs = [
        F32Input::new(sx, lx, "x")?,
        F32Input::new(sy, ly, "y")?,
        F32Input::new(sb, lb, "b")?,
    ];
    let s = Scalars {
        b: u32_of(b, "B")?,
        n: u32_of(n, "N")?,
        m: u32_of(m, "M")?,
        d: u32_of(d, "D")?,
        k: None,
        par: sigma as f32,
    };
    let name = entry(
        src::KERNEL_SUM_KERNELS,
        "kernel_product",
        kind.kernel_name(),
        "f32",
    )?;
    launch(
        sx.device(),
        Source::KernelSums,
        name,
        abi::KERNEL_PRODUCT_ARGS,
        &inputs,
        b * n,
        Shape::from((b, n)),
        s,
        Tiles::Rows,
        dtype,
    )
}

/// `kernel_sums_grad_{k}_f32(rows, cols, out, B, N, M, D, sigma)`: rows (B, N, D), cols
/// [q, w] (B, M, D+1) → (B, N, D+1).
pub(super) fn kernel_sums_fwd(
    kind: KernelKind,
    sigma: f64,
    grad: bool,
    (sr, lr): (&MetalStorage, &Layout),
    (sc, lc): (&MetalStorage, &Layout),
) -> Result<(MetalStorage, Shape)> {
    if !grad {
        candle_core::bail!("candle-ot: the Metal kernel sums are the gradient form (grad = true)")
    }
    let (b, n, d) = dims3(lr, "rows")?;
    let (bc, m, cd) = dims3(lc, "cols")?;
    if bc != b || cd != d + 1 {
        candle_core::bail!(
            "candle-ot: kernel-sum rows (B, N, D) and cols [y, w] (B, M, D+1) expected, \
             got {:?} and {:?}",
            lr.dims(),
            lc.dims()
        )
    }
    let dtype = common_dtype(&[(sr, "rows"), (sc, "cols")])?;
    let inputs = [
        F32Input::new(sr, lr, "rows")?,
        F32Input::new(sc, lc, "cols")?,
    ];
    let s = Scalars {
        b: u32_of(b, "B")?,
        n: u32_of(n, "N")?,
        m: u32_of(m, "M")?,
        d: u32_of(d, "D")?,
        k: None,
        par: sigma as f32,
    };
    let name = entry(
        src::KERNEL_SUM_KERNELS,
        "kernel_sums_grad",
        kind.kernel_name(),
        "f32",
    )?;
    launch(
        sr.device(),
        Source::KernelSums,
        name,
        abi::KERNEL_SUMS_GRAD_ARGS,
        &inputs,
        b * n * (d + 1),
        Shape::from((b, n, d + 1)),
        s,
        Tiles::Rows,
        dtype,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the Metal glue asks the name builder for exists in the Metal sources.
    #[test]
    fn entry_points_exist_in_the_sources() {
        for c in [CostKind::SqEuclidean, CostKind::Euclidean] {
            for family in [
                "softmin",
                "lse_grad",
                "lse_values",
                "block_softmin",
                "block_lse_grad",
            ] {
                let e = entry(src::SOFTMIN_KERNELS, family, c.kernel_name(), "f32").unwrap();
                assert!(src::SOFTMIN_KERNELS.contains(&e), "{e}");
            }
        }
        for k in [
            KernelKind::Gaussian,
            KernelKind::Laplacian,
            KernelKind::Energy,
        ] {
            for family in ["kernel_product", "kernel_sums_grad"] {
                let e = entry(src::KERNEL_SUM_KERNELS, family, k.kernel_name(), "f32").unwrap();
                assert!(src::KERNEL_SUM_KERNELS.contains(&e), "{e}");
            }
        }
        assert!(entry(src::GRID_KERNELS, "grid_lse_axis", "", "f32").is_ok());
    }
}
