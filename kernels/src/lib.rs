//! CUDA and Metal kernel sources of [candle-ot](https://github.com/candle-ot/candle-ot),
//! embedded as strings: streaming log-sum-exp *softmin* reductions (and their gradients and the
//! transport-plan product) and kernel sums (Gaussian, Laplacian, energy) over point clouds, and
//! the separable log-sum-exp of the *grid* softmin (images, volumes).
//!
//! This crate holds no host code: it exports the sources, the entry-point names and the launch
//! rules that the `candle-ot` CUDA / Metal back ends bind. Each exported source is
//! self-contained (the shared core is prepended), so it can be handed to NVRTC or to Metal's
//! `newLibraryWithSource` without an include path.
//!
//! # Notation
//!
//! `x` is `(B, N, D)`, `y` is `(B, M, D)`, contiguous row-major, batch first. The cost is
//! `C(x, y) = |x - y|² / 2` (`sqeuclidean`) or `|x - y|` (`euclidean`), always computed from the
//! direct differences `x_i - y_j` (never `|x|² + |y|² - 2 x·y`). `h` (`(B, M)`) holds log-weights
//! plus potentials and may contain `-inf` (masked points). `eps > 0`. The gradient of `|x - y|`
//! at `x = y` is taken as 0. All sizes are `u32` (`unsigned int` / `uint`); `eps` and `sigma` have
//! the kernel's dtype. CUDA kernels exist for `f32` and `f64`, Metal kernels for `f32` only
//! (`f16` / `bf16` inputs are converted to `f32` by the host).
//!
//! # Kernels and argument order (the ABI)
//!
//! The gradient and plan reductions take *packed* point sets, the layouts of `candle-ot`'s
//! online backward: `rows` `(B, N, D+1)` holds `[p_i, α_i]` and `cols` holds
//! `[q_j, h_j, w_j]` or `[q_j, h_j, v_j]`, so one kernel serves both sides of the backward pass
//! (x-side: rows `[x_i, f_i/ε]`, cols `[y_j, h_j, 1]`; y-side: rows `[y_j, h_j]`, cols
//! `[x_i, f_i/ε, ∂L/∂f_i]`). With `π_ij = exp(α_i + h_j - C(p_i, q_j) / eps)`:
//!
//! | entry point (`{c}` = cost, `{t}` = `f32`/`f64`) | arguments, in order | output |
//! |---|---|---|
//! | `softmin_{c}_{t}` | `x, y, h, out, B, N, M, D, eps` | `out[b,i] = -eps log Σ_j exp(h_j - C(x_i,y_j)/eps)`, `(B,N)` |
//! | `lse_grad_{c}_{t}` | `rows, cols, out, B, N, M, D, eps` | cols `(B,M,D+2)`; `out[b,i,:D] = Σ_j π_ij w_j ∇_p C(p_i,q_j)`, `out[b,i,D] = Σ_j π_ij w_j`, `(B,N,D+1)` |
//! | `lse_values_{c}_{t}` | `rows, cols, out, B, N, M, D, K, eps` | cols `(B,M,D+1+K)`; `out[b,i,:] = Σ_j π_ij v_j`, `(B,N,K)` |
//! | `kernel_product_{k}_{t}` | `x, y, b, out, B, N, M, D, sigma` | `out[b,i] = Σ_j k(x_i,y_j) b_j`, `(B,N)` |
//! | `kernel_sums_grad_{k}_{t}` | `rows, cols, out, B, N, M, D, sigma` | rows `(B,N,D)`, cols `(B,M,D+1)` `= [q_j, w_j]`; `out[b,i,:D] = Σ_j w_j ∇_p k(p_i,q_j)`, `out[b,i,D] = Σ_j w_j k(p_i,q_j)`, `(B,N,D+1)` |
//!
//! `x` `(B,N,D)`, `y` `(B,M,D)`, `h` and the kernel-sum weights `b` `(B,M)`. Kernels `{k}`:
//! `gaussian` `k = exp(-|p-q|² / (2σ²))`, `laplacian` `k = exp(-|p-q| / σ)`,
//! `energy` `k = -|p-q|` (`sigma` unused). `∇_p C = p - q` (sqeuclidean) or
//! `(p - q) / |p - q|` (euclidean), and likewise for `k`.
//!
//! A row whose `h` is entirely `-inf` gives `softmin = +inf` and zero gradient / plan sums.
//!
//! **Grid softmin** (`candle-ot`'s `softmin::grid` backend, regular grids): one pass of 1-D
//! log-sum-exps along one axis of a contiguous `(outer, n, inner)` array,
//!
//! | entry point (`{t}` = `f32`/`f64`) | arguments, in order | output |
//! |---|---|---|
//! | `grid_lse_axis_{t}` | `src, kern, dst, outer, n, inner, scale` | `dst[o,i,l] = scale · log Σ_{j<n} exp(src[o,j,l] − kern[\|i−j\|])`, `(outer,n,inner)` |
//!
//! `src` and `dst` are `(outer, n, inner)` (distinct buffers), `kern` holds `n` values of the
//! dtype (the axis' 1-D cost table `c(d·h)/ε`), `outer, n, inner` are `u32`, `scale` has the
//! dtype ([`abi::GRID_LSE_AXIS_ARGS`]). `src` may hold `-inf`; a line `(o, ·, l)` that is
//! entirely `-inf` gives `-inf · scale` (`+inf` for the `scale = −ε` of a softmin's last pass),
//! never NaN. A `D`-dimensional grid softmin is `D` launches, last axis first, ping-ponging two
//! buffers, with `scale = 1` except for the last one (`scale = −ε`). Launch: see
//! [`grid_launch_config`] below.
//!
//! **Block-sparse variants** (the multiscale backend's fine level): `block_softmin_{c}_{t}` and
//! `block_lse_grad_{c}_{t}` take the arguments of `softmin` / `lse_grad` followed by
//! `tasks, spans, ntasks` ([`abi::BLOCK_SOFTMIN_ARGS`], [`abi::BLOCK_LSE_GRAD_ARGS`]) and reduce
//! each row only over its kept column ranges. `tasks` holds `ntasks` ×
//! [`TASK_WORDS`] `u32`: batch item `b`, rows `[row_start, row_end)` (at most `ROWS` rows, all
//! in one row cluster), spans `[span_begin, span_end)`; `spans` holds 2 `u32` per span, a column
//! range `[start, end)` within batch item `b`. One block per task: grid `(ntasks, 1, 1)`, block
//! `(LANES, ROWS, 1)` from [`block_sparse_block`]. Rows that no task covers are not written. A
//! row whose spans hold no unmasked column gives `+inf` / zeros, as above.
//!
//! **CUDA**: pointers are device pointers, scalars are passed by value, in the order above
//! ([`abi`] lists them).
//! **Metal**: the `i`-th argument above is bound at `[[buffer(i)]]`: device buffers for the
//! pointers, `constant uint&` / `constant float&` (e.g. `setBytes`) for the scalars. Metal entry
//! points carry the CUDA `*_f32` names.
//!
//! # Launch configuration (every kernel, CUDA and Metal)
//!
//! * Block / threadgroup `(LANES, ROWS, 1)`: `LANES` threads share one output row (power of two,
//!   at most [`MAX_LANES`]), `ROWS` rows per block, `LANES * ROWS <= ` [`MAX_BLOCK_THREADS`]
//!   (CUDA: also a multiple of 32, since the lanes are merged with full-warp shuffles).
//!   Recommended `LANES * ROWS = ` [`BLOCK_THREADS`]; [`launch_config`] picks `LANES`.
//! * Grid `(ceil(R / ROWS), B, 1)` blocks (Metal: `dispatchThreadgroups`), where `R` is the
//!   number of output rows, the `N` of the first point set (`x` or `rows`), for every kernel.
//! * Shared / threadgroup memory is static: launch with 0 dynamic bytes. Per block (CUDA f32 /
//!   f64): 9.0 / 18.0 KiB, `lse_grad` 10.0 / 20.0 KiB, `lse_values` 17.0 / 34.0 KiB;
//!   Metal (includes a lane-merge scratch): at most 27.7 KiB.
//! * **Grid kernel** (`grid_lse_axis_*`, [`grid_launch_config`]): one thread per output
//!   `(o, i, l)`. A *line* is an `(o, l)` pair, numbered `o·inner + l`; block / threadgroup
//!   `(LX, LY, 1)` holds `LX` consecutive lines (`threadIdx.x`, the fastest index, so that the
//!   reads of `src[o, j, l]` are coalesced along `l`) times `LY` outputs `i` (`threadIdx.y`);
//!   grid `(ceil(outer·inner / LX), ceil(n / LY), 1)`. `LX` is a power of two,
//!   `LX <= ` [`GRID_TILE`] and `LX·LY <= ` [`MAX_BLOCK_THREADS`] (no multiple-of-32 rule: no
//!   shuffles); another shape fills its outputs with NaN. [`grid_launch_config`] takes
//!   `LX0 = min(32, pow2ceil(inner))`, `LY = min(256 / LX0, pow2ceil(n))`, `LX = 256 / LY`: 32
//!   columns `l` per warp when `inner >= 32`, and for the last axis (`inner = 1`) or short axes
//!   several lines per block instead of idle threads. The reduced index `j` streams through
//!   static shared memory in tiles of `GRID_TILE / LX` rows of the block's lines (coalesced
//!   along `l`, or along `j` when `inner = 1`) together with the kernel values `kern[|i − j|]`
//!   the tile needs: 13.0 KiB per block in f32 (CUDA and Metal), 24.0 KiB in f64.
//! * `D` is a runtime argument, `1 <= D <= ` [`MAX_D`], specialised at compile time for
//!   `D ∈ {1, 2, 3, 4, 8}` and a generic loop otherwise; a larger `D` fills `out` with NaN.
//!   Gradient outputs with a generic `D` (and `lse_values` with `K > 8`) take
//!   `ceil(D / 8)` (`ceil(K / 8)`) passes over the reduced set.
//!
//! # Numerics
//!
//! The reduction keeps a running `(max, sum)` pair per thread and merges threads with
//! `(m, s) + (m', s') = (M, s e^(m-M) + s' e^(m'-M))`, `M = max(m, m')`, where an operand whose
//! max is `-inf` contributes 0 (two `-inf` maxima give `(-inf, 0)`, never NaN). Only shifted,
//! non-positive values are exponentiated inside the loops: CUDA f32 uses `__expf` there (its
//! error is relative to `e^t`, so each term's absolute error is a few ulp of the largest term),
//! f64 uses `exp`; Metal uses `metal::fast::exp`. Final logarithms and scale factors use accurate
//! functions (`logf` / `expf`, `metal::precise::log` / `exp`). Metal libraries must be compiled
//! with fast math disabled (`MTLCompileOptions.fastMathEnabled = NO` / `MTLMathModeSafe`) so that
//! the `-inf` masks survive. The grid kernel keeps the same `(max, sum)` pair per output, updated
//! per chunk of 4 columns (the chunk's maximum first, then one exponential per term).
//!
//! # Example
//!
//! ```
//! use candle_ot_kernels::{cuda, launch_config};
//!
//! assert!(cuda::SOFTMIN.contains("softmin_sqeuclidean_f32"));
//! // 1000 output rows in a batch of 2: several lanes per row to fill the GPU.
//! let cfg = launch_config(1000, 2);
//! assert_eq!(cfg.block.0 * cfg.block.1, 256);
//! assert_eq!(cfg.grid.1, 2);
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Threads per block (CUDA) / threadgroup (Metal) that [`launch_config`] uses.
pub const BLOCK_THREADS: u32 = 256;
/// Largest block / threadgroup the kernels accept (Metal's lane-merge scratch is sized for it).
pub const MAX_BLOCK_THREADS: u32 = 256;
/// Largest number of threads sharing one output row (`blockDim.x`, a power of two).
pub const MAX_LANES: u32 = 32;
/// Points of the reduced set staged per shared-memory tile when `D <= 8`.
pub const TILE_POINTS: u32 = 256;
/// Largest supported dimension `D` (coordinates per shared-memory tile).
pub const MAX_D: u32 = 2048;
/// Output columns accumulated per pass over the reduced set (generic `D`, `plan_apply`'s `K`).
pub const CHUNK_COLUMNS: u32 = 8;
/// Dimensions with a compile-time specialisation (others use the generic loop).
pub const SPECIALISED_D: [u32; 5] = [1, 2, 3, 4, 8];
/// `src` values staged per shared-memory tile of the grid kernel: `GRID_TILE / LX` rows `j` of
/// the block's `LX` lines (also the largest `LX`).
pub const GRID_TILE: u32 = 1024;

/// `u32` words per task of the block-sparse task table: `b, row_start, row_end, span_begin,
/// span_end`.
pub const TASK_WORDS: usize = 5;

/// Block `(LANES, ROWS, 1)` of a block-sparse launch over `rows` output rows per batch entry in
/// `batch` entries, whose row clusters hold `mean_cluster_rows` rows on average.
///
/// [`launch_config`]'s lanes, raised (up to [`MAX_LANES`]) while `ROWS` is more than twice the
/// mean cluster size, so that blocks of small clusters are not mostly idle. The host cuts each
/// row cluster into tasks of at most `ROWS` rows.
pub fn block_sparse_block(rows: u32, batch: u32, mean_cluster_rows: u32) -> (u32, u32, u32) {
    let mut lanes = launch_config(rows, batch).block.0;
    while lanes < MAX_LANES && BLOCK_THREADS / lanes > 2 * mean_cluster_rows.max(1) {
        lanes *= 2;
    }
    (lanes, BLOCK_THREADS / lanes, 1)
}

/// Block and grid of a launch, in CUDA terms (Metal: threads per threadgroup and threadgroups).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// `(LANES, ROWS, 1)`: lanes per output row and rows per block (grid kernel: `(LX, LY, 1)`,
    /// lines and outputs `i` per block).
    pub block: (u32, u32, u32),
    /// `(ceil(R / ROWS), B, 1)` (grid kernel: `(ceil(outer·inner / LX), ceil(n / LY), 1)`).
    pub grid: (u32, u32, u32),
}

/// Launch configuration of `grid_lse_axis_*` for an `(outer, n, inner)` pass (see the crate
/// docs): block `(LX, LY, 1)` with `LX0 = min(32, pow2ceil(inner))`,
/// `LY = min(BLOCK_THREADS / LX0, pow2ceil(n))`, `LX = BLOCK_THREADS / LY`, and grid
/// `(ceil(outer·inner / LX), ceil(n / LY), 1)`.
///
/// `None` when the grid exceeds CUDA's limits (`grid.x < 2³¹`, `grid.y < 2¹⁶`). A pass with
/// `n = 0` or `outer·inner = 0` has a zero grid dimension: nothing to launch.
pub fn grid_launch_config(outer: u32, n: u32, inner: u32) -> Option<LaunchConfig> {
    let pow2 = |v: u32| v.max(1).checked_next_power_of_two().unwrap_or(1 << 31);
    let lx0 = pow2(inner).min(MAX_LANES);
    let ly = (BLOCK_THREADS / lx0).min(pow2(n));
    let lx = BLOCK_THREADS / ly;
    let gx = (outer as u64 * inner as u64).div_ceil(lx as u64);
    let gy = n.div_ceil(ly);
    if gx > i32::MAX as u64 || gy > 65_535 {
        return None;
    }
    Some(LaunchConfig {
        block: (lx, ly, 1),
        grid: (gx as u32, gy, 1),
    })
}

/// Launch configuration for `rows` output rows per batch entry (`N` or `M`, see the crate docs)
/// and `batch` entries.
///
/// Uses [`BLOCK_THREADS`] threads per block and gives each row the fewest lanes (a power of two,
/// at most [`MAX_LANES`]) that still provide about 64 Ki threads in total, so that small problems
/// fill the GPU while large ones keep one thread per row.
pub fn launch_config(rows: u32, batch: u32) -> LaunchConfig {
    const TARGET_THREADS: u64 = 1 << 16;
    let work = (rows as u64).max(1) * (batch as u64).max(1);
    let mut lanes = 1u32;
    while lanes < MAX_LANES && work * (lanes as u64) < TARGET_THREADS {
        lanes *= 2;
    }
    let rows_per_block = BLOCK_THREADS / lanes;
    LaunchConfig {
        block: (lanes, rows_per_block, 1),
        grid: (rows.div_ceil(rows_per_block), batch, 1),
    }
}

/// Argument order of every kernel family (CUDA parameter order; Metal `[[buffer(i)]]` index =
/// position in the slice).
pub mod abi {
    /// `softmin_{cost}_{dtype}`.
    pub const SOFTMIN_ARGS: &[&str] = &["x", "y", "h", "out", "B", "N", "M", "D", "eps"];
    /// `lse_grad_{cost}_{dtype}`.
    pub const LSE_GRAD_ARGS: &[&str] = &["rows", "cols", "out", "B", "N", "M", "D", "eps"];
    /// `lse_values_{cost}_{dtype}`.
    pub const LSE_VALUES_ARGS: &[&str] = &["rows", "cols", "out", "B", "N", "M", "D", "K", "eps"];
    /// `kernel_product_{kernel}_{dtype}`.
    pub const KERNEL_PRODUCT_ARGS: &[&str] = &["x", "y", "b", "out", "B", "N", "M", "D", "sigma"];
    /// `kernel_sums_grad_{kernel}_{dtype}`.
    pub const KERNEL_SUMS_GRAD_ARGS: &[&str] =
        &["rows", "cols", "out", "B", "N", "M", "D", "sigma"];
    /// `block_softmin_{cost}_{dtype}`: [`SOFTMIN_ARGS`] and the task table.
    pub const BLOCK_SOFTMIN_ARGS: &[&str] = &[
        "x", "y", "h", "out", "B", "N", "M", "D", "eps", "tasks", "spans", "ntasks",
    ];
    /// `block_lse_grad_{cost}_{dtype}`: [`LSE_GRAD_ARGS`] and the task table.
    pub const BLOCK_LSE_GRAD_ARGS: &[&str] = &[
        "rows", "cols", "out", "B", "N", "M", "D", "eps", "tasks", "spans", "ntasks",
    ];
    /// `grid_lse_axis_{dtype}`: one axis pass of the grid softmin.
    pub const GRID_LSE_AXIS_ARGS: &[&str] = &["src", "kern", "dst", "outer", "n", "inner", "scale"];
}

/// The entry point `{family}_{variant}_{dtype}` (`{family}_{dtype}` when `variant` is empty)
/// of `list`, one of the `*_KERNELS` lists of [`cuda`] or [`metal`]: the one name builder of
/// the CUDA and Metal glue, which turns (reduction family, cost or kernel, float type) into a
/// kernel name, for instance `("softmin", "sqeuclidean", "f32")` into
/// `softmin_sqeuclidean_f32`. `None` when the list has no such kernel (f64 on Metal, a
/// family of another source).
pub fn entry_point(
    list: &'static [&'static str],
    family: &str,
    variant: &str,
    dtype: &str,
) -> Option<&'static str> {
    let matches = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(family).and_then(|r| r.strip_prefix('_')) else {
            return false;
        };
        let rest = if variant.is_empty() {
            Some(rest)
        } else {
            rest.strip_prefix(variant).and_then(|r| r.strip_prefix('_'))
        };
        rest == Some(dtype)
    };
    list.iter().copied().find(|n| matches(n))
}

macro_rules! entry_points {
    ($(#[$list_doc:meta])* $list:ident { $($name:ident = $value:literal),* $(,)? }) => {
        $(
            #[doc = concat!("Entry point `", $value, "`.")]
            pub const $name: &str = $value;
        )*
        $(#[$list_doc])*
        pub const $list: &[&str] = &[$($name),*];
    };
}

/// CUDA C++ sources (nvcc and NVRTC, C++17, no system headers) and their entry points.
pub mod cuda {
    /// The shared core (`cuda/common.cuh`), already prepended to [`SOFTMIN`], [`KERNEL_SUMS`]
    /// and [`GRID`].
    pub const COMMON: &str = include_str!("../cuda/common.cuh");
    /// Softmin family (`common.cuh` + `cuda/softmin.cu`): `softmin_*`, `lse_grad_*`,
    /// `lse_values_*` and the block-sparse `block_softmin_*`, `block_lse_grad_*`.
    pub const SOFTMIN: &str = concat!(
        include_str!("../cuda/common.cuh"),
        "\n",
        include_str!("../cuda/softmin.cu")
    );
    /// Kernel sums (`common.cuh` + `cuda/kernel_sums.cu`): `kernel_product_*`,
    /// `kernel_sums_grad_*`.
    pub const KERNEL_SUMS: &str = concat!(
        include_str!("../cuda/common.cuh"),
        "\n",
        include_str!("../cuda/kernel_sums.cu")
    );
    /// Grid softmin (`common.cuh` + `cuda/grid.cu`): `grid_lse_axis_*`.
    pub const GRID: &str = concat!(
        include_str!("../cuda/common.cuh"),
        "\n",
        include_str!("../cuda/grid.cu")
    );

    entry_points! {
        /// Every entry point of [`SOFTMIN`].
        SOFTMIN_KERNELS {
            SOFTMIN_SQEUCLIDEAN_F32 = "softmin_sqeuclidean_f32",
            SOFTMIN_EUCLIDEAN_F32 = "softmin_euclidean_f32",
            SOFTMIN_SQEUCLIDEAN_F64 = "softmin_sqeuclidean_f64",
            SOFTMIN_EUCLIDEAN_F64 = "softmin_euclidean_f64",
            LSE_GRAD_SQEUCLIDEAN_F32 = "lse_grad_sqeuclidean_f32",
            LSE_GRAD_EUCLIDEAN_F32 = "lse_grad_euclidean_f32",
            LSE_GRAD_SQEUCLIDEAN_F64 = "lse_grad_sqeuclidean_f64",
            LSE_GRAD_EUCLIDEAN_F64 = "lse_grad_euclidean_f64",
            LSE_VALUES_SQEUCLIDEAN_F32 = "lse_values_sqeuclidean_f32",
            LSE_VALUES_EUCLIDEAN_F32 = "lse_values_euclidean_f32",
            LSE_VALUES_SQEUCLIDEAN_F64 = "lse_values_sqeuclidean_f64",
            LSE_VALUES_EUCLIDEAN_F64 = "lse_values_euclidean_f64",
            BLOCK_SOFTMIN_SQEUCLIDEAN_F32 = "block_softmin_sqeuclidean_f32",
            BLOCK_SOFTMIN_EUCLIDEAN_F32 = "block_softmin_euclidean_f32",
            BLOCK_SOFTMIN_SQEUCLIDEAN_F64 = "block_softmin_sqeuclidean_f64",
            BLOCK_SOFTMIN_EUCLIDEAN_F64 = "block_softmin_euclidean_f64",
            BLOCK_LSE_GRAD_SQEUCLIDEAN_F32 = "block_lse_grad_sqeuclidean_f32",
            BLOCK_LSE_GRAD_EUCLIDEAN_F32 = "block_lse_grad_euclidean_f32",
            BLOCK_LSE_GRAD_SQEUCLIDEAN_F64 = "block_lse_grad_sqeuclidean_f64",
            BLOCK_LSE_GRAD_EUCLIDEAN_F64 = "block_lse_grad_euclidean_f64",
        }
    }

    entry_points! {
        /// Every entry point of [`KERNEL_SUMS`].
        KERNEL_SUM_KERNELS {
            KERNEL_PRODUCT_GAUSSIAN_F32 = "kernel_product_gaussian_f32",
            KERNEL_PRODUCT_LAPLACIAN_F32 = "kernel_product_laplacian_f32",
            KERNEL_PRODUCT_ENERGY_F32 = "kernel_product_energy_f32",
            KERNEL_PRODUCT_GAUSSIAN_F64 = "kernel_product_gaussian_f64",
            KERNEL_PRODUCT_LAPLACIAN_F64 = "kernel_product_laplacian_f64",
            KERNEL_PRODUCT_ENERGY_F64 = "kernel_product_energy_f64",
            KERNEL_SUMS_GRAD_GAUSSIAN_F32 = "kernel_sums_grad_gaussian_f32",
            KERNEL_SUMS_GRAD_LAPLACIAN_F32 = "kernel_sums_grad_laplacian_f32",
            KERNEL_SUMS_GRAD_ENERGY_F32 = "kernel_sums_grad_energy_f32",
            KERNEL_SUMS_GRAD_GAUSSIAN_F64 = "kernel_sums_grad_gaussian_f64",
            KERNEL_SUMS_GRAD_LAPLACIAN_F64 = "kernel_sums_grad_laplacian_f64",
            KERNEL_SUMS_GRAD_ENERGY_F64 = "kernel_sums_grad_energy_f64",
        }
    }

    entry_points! {
        /// Every entry point of [`GRID`].
        GRID_KERNELS {
            GRID_LSE_AXIS_F32 = "grid_lse_axis_f32",
            GRID_LSE_AXIS_F64 = "grid_lse_axis_f64",
        }
    }
}

/// Metal Shading Language sources (f32 only) and their entry points (the CUDA `*_f32` names).
pub mod metal {
    /// The shared core (`metal/common.metal`), already prepended to [`SOFTMIN`],
    /// [`KERNEL_SUMS`] and [`GRID`].
    pub const COMMON: &str = include_str!("../metal/common.metal");
    /// Softmin family (`common.metal` + `metal/softmin.metal`).
    pub const SOFTMIN: &str = concat!(
        include_str!("../metal/common.metal"),
        "\n",
        include_str!("../metal/softmin.metal")
    );
    /// Kernel sums (`common.metal` + `metal/kernel_sums.metal`).
    pub const KERNEL_SUMS: &str = concat!(
        include_str!("../metal/common.metal"),
        "\n",
        include_str!("../metal/kernel_sums.metal")
    );
    /// Grid softmin (`common.metal` + `metal/grid.metal`): `grid_lse_axis_f32`.
    pub const GRID: &str = concat!(
        include_str!("../metal/common.metal"),
        "\n",
        include_str!("../metal/grid.metal")
    );

    entry_points! {
        /// Every entry point of [`SOFTMIN`].
        SOFTMIN_KERNELS {
            SOFTMIN_SQEUCLIDEAN_F32 = "softmin_sqeuclidean_f32",
            SOFTMIN_EUCLIDEAN_F32 = "softmin_euclidean_f32",
            LSE_GRAD_SQEUCLIDEAN_F32 = "lse_grad_sqeuclidean_f32",
            LSE_GRAD_EUCLIDEAN_F32 = "lse_grad_euclidean_f32",
            LSE_VALUES_SQEUCLIDEAN_F32 = "lse_values_sqeuclidean_f32",
            LSE_VALUES_EUCLIDEAN_F32 = "lse_values_euclidean_f32",
            BLOCK_SOFTMIN_SQEUCLIDEAN_F32 = "block_softmin_sqeuclidean_f32",
            BLOCK_SOFTMIN_EUCLIDEAN_F32 = "block_softmin_euclidean_f32",
            BLOCK_LSE_GRAD_SQEUCLIDEAN_F32 = "block_lse_grad_sqeuclidean_f32",
            BLOCK_LSE_GRAD_EUCLIDEAN_F32 = "block_lse_grad_euclidean_f32",
        }
    }

    entry_points! {
        /// Every entry point of [`KERNEL_SUMS`].
        KERNEL_SUM_KERNELS {
            KERNEL_PRODUCT_GAUSSIAN_F32 = "kernel_product_gaussian_f32",
            KERNEL_PRODUCT_LAPLACIAN_F32 = "kernel_product_laplacian_f32",
            KERNEL_PRODUCT_ENERGY_F32 = "kernel_product_energy_f32",
            KERNEL_SUMS_GRAD_GAUSSIAN_F32 = "kernel_sums_grad_gaussian_f32",
            KERNEL_SUMS_GRAD_LAPLACIAN_F32 = "kernel_sums_grad_laplacian_f32",
            KERNEL_SUMS_GRAD_ENERGY_F32 = "kernel_sums_grad_energy_f32",
        }
    }

    entry_points! {
        /// Every entry point of [`GRID`].
        GRID_KERNELS {
            GRID_LSE_AXIS_F32 = "grid_lse_axis_f32",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names defined in a source: the first argument of every `OT_*_ENTRY(name, ...)` line.
    fn defined_entries(src: &str) -> Vec<&str> {
        src.lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("OT_") && l.contains("_ENTRY("))
            .filter_map(|l| {
                let start = l.find('(')? + 1;
                let end = start + l[start..].find(',')?;
                Some(l[start..end].trim())
            })
            .collect()
    }

    fn assert_listed_exactly(src: &str, names: &[&str]) {
        for name in names {
            assert!(
                src.contains(&format!("({name},")),
                "entry point {name} is not defined in the embedded source"
            );
        }
        let mut defined = defined_entries(src);
        let mut listed = names.to_vec();
        defined.sort_unstable();
        listed.sort_unstable();
        assert_eq!(defined, listed, "defined and listed entry points differ");
    }

    #[test]
    fn every_listed_entry_point_is_in_its_source() {
        assert_listed_exactly(cuda::SOFTMIN, cuda::SOFTMIN_KERNELS);
        assert_listed_exactly(cuda::KERNEL_SUMS, cuda::KERNEL_SUM_KERNELS);
        assert_listed_exactly(metal::SOFTMIN, metal::SOFTMIN_KERNELS);
        assert_listed_exactly(metal::KERNEL_SUMS, metal::KERNEL_SUM_KERNELS);
        assert_listed_exactly(cuda::GRID, cuda::GRID_KERNELS);
        assert_listed_exactly(metal::GRID, metal::GRID_KERNELS);
    }

    /// Every listed name is reachable through [`entry_point`] from its parts, and nothing else.
    #[test]
    fn the_name_builder_finds_every_entry_point() {
        let lists: [&'static [&'static str]; 6] = [
            cuda::SOFTMIN_KERNELS,
            cuda::KERNEL_SUM_KERNELS,
            cuda::GRID_KERNELS,
            metal::SOFTMIN_KERNELS,
            metal::KERNEL_SUM_KERNELS,
            metal::GRID_KERNELS,
        ];
        let families = [
            "block_softmin",
            "block_lse_grad",
            "softmin",
            "lse_grad",
            "lse_values",
            "kernel_product",
            "kernel_sums_grad",
        ];
        let variants = [
            "sqeuclidean",
            "euclidean",
            "gaussian",
            "laplacian",
            "energy",
        ];
        for list in lists {
            for &name in list {
                let dtype = &name[name.len() - 3..];
                let found = if let Some(rest) = name.strip_prefix("grid_lse_axis_") {
                    assert_eq!(rest, dtype);
                    entry_point(list, "grid_lse_axis", "", dtype)
                } else {
                    let family = families
                        .iter()
                        .find(|f| {
                            name.strip_prefix(**f).is_some_and(|r| {
                                variants.iter().any(|v| r == format!("_{v}_{dtype}"))
                            })
                        })
                        .unwrap_or_else(|| panic!("{name}: no family"));
                    let variant = &name[family.len() + 1..name.len() - 4];
                    entry_point(list, family, variant, dtype)
                };
                assert_eq!(found, Some(name));
            }
        }
        assert_eq!(
            entry_point(cuda::SOFTMIN_KERNELS, "softmin", "sqeuclidean", "f64"),
            Some("softmin_sqeuclidean_f64")
        );
        assert_eq!(
            entry_point(metal::SOFTMIN_KERNELS, "softmin", "sqeuclidean", "f64"),
            None
        );
        assert_eq!(
            entry_point(cuda::SOFTMIN_KERNELS, "softmin", "gaussian", "f32"),
            None
        );
        // "softmin" is not a prefix match of "block_softmin", nor "lse_grad" of "lse_values".
        assert_eq!(
            entry_point(cuda::SOFTMIN_KERNELS, "lse_grad", "euclidean", "f32"),
            Some("lse_grad_euclidean_f32")
        );
        assert_eq!(
            entry_point(cuda::SOFTMIN_KERNELS, "softmin", "", "f32"),
            None
        );
    }

    #[test]
    fn entry_point_counts_and_names() {
        // (op, cost, dtype): (3 + 2 block-sparse) x 2 x 2 and 2 x 3 x 2 on CUDA; f32 only on
        // Metal.
        assert_eq!(cuda::SOFTMIN_KERNELS.len(), 20);
        assert_eq!(cuda::KERNEL_SUM_KERNELS.len(), 12);
        let f32_names = |l: &[&'static str]| -> Vec<&'static str> {
            l.iter().copied().filter(|n| n.ends_with("_f32")).collect()
        };
        let mut a = f32_names(cuda::SOFTMIN_KERNELS);
        let mut b = metal::SOFTMIN_KERNELS.to_vec();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        let mut a = f32_names(cuda::KERNEL_SUM_KERNELS);
        let mut b = metal::KERNEL_SUM_KERNELS.to_vec();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert_eq!(
            cuda::GRID_KERNELS,
            ["grid_lse_axis_f32", "grid_lse_axis_f64"]
        );
        assert_eq!(metal::GRID_KERNELS, ["grid_lse_axis_f32"]);
        for n in cuda::SOFTMIN_KERNELS
            .iter()
            .chain(cuda::KERNEL_SUM_KERNELS)
            .chain(cuda::GRID_KERNELS)
        {
            assert!(n.ends_with("_f32") || n.ends_with("_f64"), "{n}");
        }
    }

    #[test]
    fn sources_are_self_contained() {
        for src in [cuda::SOFTMIN, cuda::KERNEL_SUMS, cuda::GRID] {
            assert!(src.starts_with(cuda::COMMON));
            assert!(
                !src.contains("#include <"),
                "CUDA sources must not need system headers"
            );
        }
        for src in [metal::SOFTMIN, metal::KERNEL_SUMS, metal::GRID] {
            assert!(src.starts_with(metal::COMMON));
        }
        // The ABI documented here matches the constants in the sources.
        assert!(cuda::COMMON.contains(&format!("#define OT_TILE {TILE_POINTS}u")));
        assert!(cuda::COMMON.contains(&format!("#define OT_TILE_ELEMS {MAX_D}u")));
        assert!(cuda::COMMON.contains(&format!("#define OT_CH {CHUNK_COLUMNS}")));
        assert!(cuda::COMMON.contains(&format!("#define OT_MAX_BLOCK {MAX_BLOCK_THREADS}")));
        assert!(metal::COMMON.contains(&format!("#define OT_TILE {TILE_POINTS}u")));
        assert!(metal::COMMON.contains(&format!("#define OT_TILE_ELEMS {MAX_D}u")));
        assert!(metal::COMMON.contains(&format!("#define OT_CH {CHUNK_COLUMNS}")));
        assert!(metal::COMMON.contains(&format!("#define OT_MAX_BLOCK {MAX_BLOCK_THREADS}")));
        assert!(cuda::GRID.contains(&format!("#define OT_GRID_TILE {GRID_TILE}u")));
        assert!(metal::GRID.contains(&format!("#define OT_GRID_TILE {GRID_TILE}u")));
        for d in SPECIALISED_D {
            assert!(cuda::COMMON.contains(&format!("case {d}: ot_core<T, {d}, OP, COST, BS>")));
            assert!(metal::COMMON.contains(&format!("case {d}: ot_core<{d}, OP, COST, BS>")));
        }
    }

    #[test]
    fn metal_buffer_indices_follow_the_abi_order() {
        fn check(src: &str, args: &[&str]) {
            for (i, a) in args.iter().enumerate() {
                let p = src.contains(&format!("* {a} [[buffer({i})]]"));
                let s = src.contains(&format!("& {a} [[buffer({i})]]"));
                assert!(p || s, "argument {a} is not bound at [[buffer({i})]]");
            }
        }
        check(metal::SOFTMIN, abi::SOFTMIN_ARGS);
        check(metal::SOFTMIN, abi::LSE_GRAD_ARGS);
        check(metal::SOFTMIN, abi::LSE_VALUES_ARGS);
        check(metal::SOFTMIN, abi::BLOCK_SOFTMIN_ARGS);
        check(metal::SOFTMIN, abi::BLOCK_LSE_GRAD_ARGS);
        check(metal::KERNEL_SUMS, abi::KERNEL_PRODUCT_ARGS);
        check(metal::KERNEL_SUMS, abi::KERNEL_SUMS_GRAD_ARGS);
        check(metal::GRID, abi::GRID_LSE_AXIS_ARGS);
    }

    #[test]
    fn launch_config_rules() {
        for (rows, batch) in [
            (1, 1),
            (17, 2),
            (1000, 2),
            (4096, 1),
            (100_000, 4),
            (u32::MAX, 1),
        ] {
            let c = launch_config(rows, batch);
            let (lanes, per_block, one) = c.block;
            assert_eq!(one, 1);
            assert!(lanes.is_power_of_two() && lanes <= MAX_LANES);
            assert_eq!(lanes * per_block, BLOCK_THREADS);
            assert_eq!(c.grid, (rows.div_ceil(per_block), batch, 1));
        }
        assert_eq!(launch_config(1, 1).block.0, MAX_LANES);
        assert_eq!(launch_config(1 << 20, 1).block.0, 1);
    }

    #[test]
    fn grid_launch_config_rules() {
        for (outer, n, inner) in [
            (1, 1, 1),
            (3, 17, 1),
            (2, 29, 5),
            (2, 17, 29),
            (1, 512, 512),
            (512, 512, 1),
            (4, 3, 100_000),
            (1 << 20, 1000, 1),
        ] {
            let c = grid_launch_config(outer, n, inner).expect("within the limits");
            let (lx, ly, one) = c.block;
            assert_eq!(one, 1);
            assert!(lx.is_power_of_two() && lx <= GRID_TILE && GRID_TILE.is_multiple_of(lx));
            assert_eq!(lx * ly, BLOCK_THREADS);
            assert!(lx * ly <= MAX_BLOCK_THREADS);
            let lines = outer as u64 * inner as u64;
            assert_eq!(
                c.grid,
                (lines.div_ceil(lx as u64) as u32, n.div_ceil(ly), 1)
            );
            // No block row of outputs i is entirely idle, and a warp spans 32 columns l when
            // the axis has that many.
            assert!(ly <= n.next_power_of_two());
            if inner >= 32 {
                assert!(lx >= 32);
            }
        }
        // The last axis of an image: one line per block, 256 outputs i; short axes: more lines.
        assert_eq!(grid_launch_config(512, 512, 1).unwrap().block, (1, 256, 1));
        assert_eq!(grid_launch_config(3, 17, 1).unwrap().block, (8, 32, 1));
        assert_eq!(grid_launch_config(2, 17, 29).unwrap().block, (32, 8, 1));
        assert_eq!(grid_launch_config(4, 1, 7).unwrap().block, (256, 1, 1));
        // Beyond the CUDA grid limits.
        assert_eq!(grid_launch_config(u32::MAX, 8, u32::MAX), None);
        assert_eq!(grid_launch_config(1, u32::MAX, 64), None);
        // Nothing to compute: a zero grid dimension.
        assert_eq!(grid_launch_config(0, 5, 3).unwrap().grid.0, 0);
    }

    #[test]
    fn block_sparse_block_rules() {
        for (rows, batch, mean) in [
            (1, 1, 1),
            (1 << 20, 1, 1000),
            (1 << 20, 1, 40),
            (1000, 2, 0),
        ] {
            let (lanes, per_block, one) = block_sparse_block(rows, batch, mean);
            assert_eq!(one, 1);
            assert!(lanes.is_power_of_two() && lanes <= MAX_LANES);
            assert_eq!(lanes * per_block, BLOCK_THREADS);
            assert!(lanes >= launch_config(rows, batch).block.0);
        }
        // Large clusters keep launch_config's one lane per row; clusters of 40 rows get blocks
        // of 64 rows.
        assert_eq!(block_sparse_block(1 << 20, 1, 1000), (1, 256, 1));
        assert_eq!(block_sparse_block(1 << 20, 1, 40), (4, 64, 1));
    }
}
