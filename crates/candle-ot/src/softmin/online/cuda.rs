//! CUDA paths of the online ops (`cuda_fwd`): one kernel launch per reduction, on Candle's own
//! stream.
//!
//! # How the kernels are compiled and loaded
//!
//! The sources of `candle-ot-kernels` (`kernels/cuda/*.cu`, self-contained) are compiled **at run
//! time with NVRTC to a CUBIN for the device's own architecture** (`sm_XY` from its compute
//! capability), once per device and source, and the module is kept in a process-wide cache.
//!
//! Why a CUBIN from NVRTC rather than PTX shipped in the crate: PTX carries a version (`.version
//! 9.0` for CUDA 13.0) that the driver must know, so PTX from a newer toolkit than the driver is
//! rejected (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), and shipping PTX would tie every user to the
//! toolkit that built the crate. A CUBIN is machine code: CUDA's minor-version compatibility lets
//! a CUBIN from any CUDA 13.x NVRTC load on any CUDA 13 driver (≥ 580), and it needs no JIT at
//! load time. NVRTC is already a dependency of Candle's `cuda` feature (cudarc links
//! `libnvrtc`), so this adds no requirement. Compilation takes a fraction of a second per source
//! and happens on the first call; the kernels are checked in CI with the pinned CUDA 13.0
//! toolchain (`nvcc`, `ptxas` for sm_80 / sm_90, and NVRTC).

use super::cpu::Weighted;
use super::{dims3, entry, u32_of, Tiles};
use crate::cost::{CostKind, KernelKind};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{sys as nvrtc_sys, Ptx};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{backend::BackendStorage, CudaDevice, CudaStorage, Layout, Result, Shape};
use candle_ot_kernels::{block_sparse_block, cuda as src, launch_config, TASK_WORDS};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

type ModuleKey = (candle_core::cuda_backend::DeviceId, &'static str);

fn module_cache() -> &'static Mutex<HashMap<ModuleKey, Arc<CudaModule>>> {
    static CACHE: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn nvrtc_check(code: nvrtc_sys::nvrtcResult, what: &str) -> Result<()> {
    if code == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        candle_core::bail!("candle-ot: NVRTC {what} failed: {code:?}")
    }
}

/// Compiles `source` with NVRTC to a CUBIN for `sm_{major}{minor}`.
fn compile_cubin(source: &str, name: &str, (major, minor): (i32, i32)) -> Result<Vec<u8>> {
    use std::ffi::CString;
    let c_src = CString::new(source).map_err(candle_core::Error::wrap)?;
    let c_name = CString::new(format!("{name}.cu")).map_err(candle_core::Error::wrap)?;
    let opts: Vec<CString> = [
        format!("--gpu-architecture=sm_{major}{minor}"),
        "--std=c++17".to_string(),
    ]
    .into_iter()
    .map(|o| CString::new(o).expect("no NUL in options"))
    .collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nvrtc_sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the calls; the program is destroyed on
    // every path after creation.
    unsafe {
        nvrtc_check(
            nvrtc_sys::nvrtcCreateProgram(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ),
            "program creation",
        )?;
        let result = (|| {
            let code =
                nvrtc_sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
            if code != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetProgramLogSize(prog, &mut size);
                let mut log = vec![0u8; size.max(1)];
                nvrtc_sys::nvrtcGetProgramLog(prog, log.as_mut_ptr().cast());
                let log = String::from_utf8_lossy(&log);
                candle_core::bail!(
                    "candle-ot: NVRTC could not compile {name}.cu for sm_{major}{minor} \
                     ({code:?}):\n{}",
                    log.trim_end_matches('\0')
                );
            }
            let mut size = 0usize;
            nvrtc_check(
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size),
                "GetCUBINSize",
            )?;
            let mut cubin = vec![0u8; size];
            nvrtc_check(
                nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()),
                "GetCUBIN",
            )?;
            Ok(cubin)
        })();
        nvrtc_sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// The kernel `entry` of `source` (named `module`) on `dev`, compiled and loaded on first use.
pub(crate) fn function(
    dev: &CudaDevice,
    module: &'static str,
    source: &'static str,
    entry: &str,
) -> Result<CudaFunction> {
    let key = (dev.id(), module);
    let mut cache = module_cache().lock().unwrap_or_else(|e| e.into_inner());
    let m = match cache.get(&key) {
        Some(m) => m.clone(),
        None => {
            let stream = dev.cuda_stream();
            let ctx = stream.context();
            let cc = ctx.compute_capability().w()?;
            let cubin = compile_cubin(source, module, cc)?;
            let m = ctx.load_module(Ptx::from_binary(cubin)).w()?;
            cache.insert(key, m.clone());
            m
        }
    };
    m.load_function(entry).w()
}

fn launch_cfg(rows: usize, batch: usize) -> Result<LaunchConfig> {
    let (rows, batch) = match (u32::try_from(rows), u32::try_from(batch)) {
        (Ok(r), Ok(b)) if batch <= 65_535 => (r, b),
        _ => candle_core::bail!(
            "candle-ot: {rows} rows in a batch of {batch} exceed the CUDA grid limits"
        ),
    };
    let c = launch_config(rows, batch);
    Ok(LaunchConfig {
        grid_dim: c.grid,
        block_dim: c.block,
        shared_mem_bytes: 0,
    })
}

pub(crate) fn contiguous<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("candle-ot: online op inputs must be contiguous"),
    }
}

/// Float types the CUDA kernels exist for.
pub(crate) trait Float:
    CudaDType + DeviceRepr + ValidAsZeroBits + candle_core::WithDType
{
    const SUFFIX: &'static str;
    fn of(v: f64) -> Self;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
    fn of(v: f64) -> Self {
        v as f32
    }
}
impl Float for f64 {
    const SUFFIX: &'static str = "f64";
    fn of(v: f64) -> Self {
        v
    }
}

/// A kernel of `candle-ot-kernels`: the NVRTC module (name and source) and the entry point.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    module: &'static str,
    source: &'static str,
    entry: &'static str,
}

impl Kernel {
    /// `{family}_{variant}_{T}` of the softmin family's source (`softmin`, `lse_grad`,
    /// `lse_values`, `block_softmin`, `block_lse_grad`).
    pub(crate) fn softmin<T: Float>(family: &str, variant: &str) -> Result<Self> {
        Ok(Self {
            module: "candle_ot_softmin",
            source: src::SOFTMIN,
            entry: entry(src::SOFTMIN_KERNELS, family, variant, T::SUFFIX)?,
        })
    }

    /// `{family}_{variant}_{T}` of the kernel sums' source (`kernel_product`,
    /// `kernel_sums_grad`).
    fn kernel_sums<T: Float>(family: &str, variant: &str) -> Result<Self> {
        Ok(Self {
            module: "candle_ot_kernel_sums",
            source: src::KERNEL_SUMS,
            entry: entry(src::KERNEL_SUM_KERNELS, family, variant, T::SUFFIX)?,
        })
    }
}

/// The one CUDA launcher of the online and multiscale ops: `kernel(inputs…, out, B, N, M, D,
/// [K,] par)`, followed by `tasks, spans, ntasks` for [`Tiles::Tasks`] (the argument lists of
/// `candle_ot_kernels::abi`), on Candle's stream. Returns `out` (`out_len` elements, zero where
/// no block writes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch<T: Float>(
    dev: &CudaDevice,
    kernel: Kernel,
    inputs: &[CudaView<'_, T>],
    out_len: usize,
    (b, n, m, d): (usize, usize, usize, usize),
    k: Option<usize>,
    par: f64,
    tiles: Tiles<'_>,
) -> Result<CudaSlice<T>> {
    let func = function(dev, kernel.module, kernel.source, kernel.entry)?;
    let out = dev.alloc_zeros::<T>(out_len.max(1))?;
    let (bb, nn, mm, dd) = (
        u32_of(b, "B")?,
        u32_of(n, "N")?,
        u32_of(m, "M")?,
        u32_of(d, "D")?,
    );
    let kk = k.map(|k| u32_of(k, "K")).transpose()?;
    let par = T::of(par);
    // The grid, and for a block-sparse launch its task table on the device.
    let (cfg, table) = match tiles {
        Tiles::Rows => {
            if b == 0 || n == 0 {
                return Ok(out);
            }
            (launch_cfg(n, b)?, None)
        }
        Tiles::Tasks(pattern) => {
            let block = block_sparse_block(nn, bb, pattern.mean_cluster_rows());
            // Built and uploaded on the first launch of this pattern on this device, then
            // reused by every iteration (`Pattern::table`).
            let table = pattern.table(
                block.1,
                &format!("cuda {:?}", dev.id()),
                |tasks, mut spans| {
                    let ntasks =
                        u32_of(tasks.len() / TASK_WORDS, "the number of block-sparse tasks")?;
                    if ntasks > i32::MAX as u32 {
                        candle_core::bail!(
                            "candle-ot: {ntasks} block-sparse tasks exceed the CUDA grid limit"
                        )
                    }
                    if spans.is_empty() {
                        spans.extend_from_slice(&[0, 0]); // (no zero-length device buffers)
                    }
                    let tasks = if tasks.is_empty() {
                        vec![0; TASK_WORDS]
                    } else {
                        tasks
                    };
                    Ok((dev.clone_htod(&tasks)?, dev.clone_htod(&spans)?, ntasks))
                },
            )?;
            if table.2 == 0 {
                return Ok(out);
            }
            let cfg = LaunchConfig {
                grid_dim: (table.2, 1, 1),
                block_dim: block,
                shared_mem_bytes: 0,
            };
            (cfg, Some(table))
        }
    };
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
    if let Some(kk) = kk.as_ref() {
        builder.arg(kk);
    }
    builder.arg(&par);
    if let Some(table) = table.as_ref() {
        let (tasks, spans, ntasks) = &**table;
        builder.arg(tasks);
        builder.arg(spans);
        builder.arg(ntasks);
    }
    // SAFETY: the argument list matches the kernel's signature (candle_ot_kernels::abi); a task
    // table only names rows < N of batch items < B and spans within [0, M) (the patterns are
    // checked against the inputs by the ops), and every buffer holds the sizes the kernel
    // reads and writes.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}

/// `softmin_{cost}_{t}(x, y, h, out, B, N, M, D, eps)`, or with [`Tiles::Tasks`]
/// `block_softmin_{cost}_{t}(…, tasks, spans, ntasks)`: x (B, N, D), y (B, M, D), h (B, M) →
/// (B, N).
pub(crate) fn softmin_fwd(
    cost: CostKind,
    eps: f64,
    (sx, lx): (&CudaStorage, &Layout),
    (sy, ly): (&CudaStorage, &Layout),
    (sh, lh): (&CudaStorage, &Layout),
    tiles: Tiles<'_>,
) -> Result<(CudaStorage, Shape)> {
    let (b, n, d) = dims3(lx, "x")?;
    let (_, m, _) = dims3(ly, "y")?;
    if lh.shape().dims() != [b, m] {
        candle_core::bail!("candle-ot softmin: h must be (B, M) = ({b}, {m}), got {lh:?}")
    }
    let family = match tiles {
        Tiles::Rows => "softmin",
        Tiles::Tasks(_) => "block_softmin",
    };
    let dev = sx.device();
    let storage = with_float!(sx.dtype(), "candle-ot softmin", " on CUDA", |T| {
        let kernel = Kernel::softmin::<T>(family, cost.kernel_name())?;
        let ins = [
            contiguous::<T>(sx, lx)?,
            contiguous::<T>(sy, ly)?,
            contiguous::<T>(sh, lh)?,
        ];
        let out = launch::<T>(dev, kernel, &ins, b * n, (b, n, m, d), None, eps, tiles)?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, Shape::from((b, n))))
}

/// Packed softmax-weighted sums: `lse_grad` (rows [p, α], cols [q, h, w] → (B, N, D+1); with
/// [`Tiles::Tasks`] `block_lse_grad`) or `lse_values` (cols [q, h, v] → (B, N, K); dense only).
pub(crate) fn lse_weighted_fwd(
    cost: CostKind,
    eps: f64,
    mode: Weighted,
    (sr, lr): (&CudaStorage, &Layout),
    (sc, lc): (&CudaStorage, &Layout),
    tiles: Tiles<'_>,
) -> Result<(CudaStorage, Shape)> {
    let (b, n, d1) = dims3(lr, "rows")?;
    let (_, m, cd) = dims3(lc, "cols")?;
    if d1 == 0 {
        candle_core::bail!(
            "candle-ot: packed rows must have D + 1 values, got {:?}",
            lr.dims()
        )
    }
    let d = d1 - 1;
    if cd != mode.col_dim(d) {
        candle_core::bail!(
            "candle-ot: packed columns must have {} values, got {cd}",
            mode.col_dim(d)
        )
    }
    let (family, k) = match (mode, tiles) {
        (Weighted::Grad { with_mass: true }, Tiles::Rows) => ("lse_grad", None),
        (Weighted::Grad { with_mass: true }, Tiles::Tasks(_)) => ("block_lse_grad", None),
        (Weighted::Values { k }, Tiles::Rows) => ("lse_values", Some(k)),
        (Weighted::Values { .. }, Tiles::Tasks(_)) => {
            candle_core::bail!("candle-ot: the CUDA value sums have no block-sparse kernel")
        }
        (Weighted::Grad { with_mass: false }, _) => {
            candle_core::bail!("candle-ot: the CUDA gradient reduction always returns the mass")
        }
    };
    let od = mode.out_dim(d);
    let dev = sr.device();
    let storage = with_float!(sr.dtype(), "candle-ot lse-weighted", " on CUDA", |T| {
        let kernel = Kernel::softmin::<T>(family, cost.kernel_name())?;
        let ins = [contiguous::<T>(sr, lr)?, contiguous::<T>(sc, lc)?];
        let out = launch::<T>(dev, kernel, &ins, b * n * od, (b, n, m, d), k, eps, tiles)?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, Shape::from((b, n, od))))
}

/// `kernel_product_{k}_{t}(x, y, b, out, B, N, M, D, sigma)` → (B, N).
pub(super) fn kernel_product_fwd(
    kind: KernelKind,
    sigma: f64,
    (sx, lx): (&CudaStorage, &Layout),
    (sy, ly): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (b, n, d) = dims3(lx, "x")?;
    let (_, m, _) = dims3(ly, "y")?;
    if lb.shape().dims() != [b, m] {
        candle_core::bail!("candle-ot kernel product: b must be (B, M) = ({b}, {m}), got {lb:?}")
    }
    let dev = sx.device();
    let storage = with_float!(sx.dtype(), "candle-ot kernel product", " on CUDA", |T| {
        let kernel = Kernel::kernel_sums::<T>("kernel_product", kind.kernel_name())?;
        let ins = [
            contiguous::<T>(sx, lx)?,
            contiguous::<T>(sy, ly)?,
            contiguous::<T>(sb, lb)?,
        ];
        let dims = (b, n, m, d);
        let out = launch::<T>(dev, kernel, &ins, b * n, dims, None, sigma, Tiles::Rows)?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, Shape::from((b, n))))
}

/// `kernel_sums_grad_{k}_{t}(rows, cols, out, B, N, M, D, sigma)`: rows (B, N, D), cols
/// (B, M, D+1) → (B, N, D+1).
pub(super) fn kernel_sums_fwd(
    kind: KernelKind,
    sigma: f64,
    grad: bool,
    (sr, lr): (&CudaStorage, &Layout),
    (sc, lc): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    if !grad {
        candle_core::bail!("candle-ot: the CUDA kernel sums are the gradient form (grad = true)")
    }
    let (b, n, d) = dims3(lr, "rows")?;
    let (_, m, cd) = dims3(lc, "cols")?;
    if cd != d + 1 {
        candle_core::bail!(
            "candle-ot: kernel-sum columns must be [y, w] ({} values), got {cd}",
            d + 1
        )
    }
    let dev = sr.device();
    let storage = with_float!(sr.dtype(), "candle-ot kernel sums", " on CUDA", |T| {
        let kernel = Kernel::kernel_sums::<T>("kernel_sums_grad", kind.kernel_name())?;
        let ins = [contiguous::<T>(sr, lr)?, contiguous::<T>(sc, lc)?];
        let (dims, len) = ((b, n, m, d), b * n * (d + 1));
        let out = launch::<T>(dev, kernel, &ins, len, dims, None, sigma, Tiles::Rows)?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, Shape::from((b, n, d + 1))))
}
