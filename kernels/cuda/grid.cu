// candle-ot CUDA kernels: the grid softmin (separable log-sum-exp along one axis of a regular
// grid), the kernel of candle-ot's `softmin::grid` backend (images, volumes).
//
// Entry points (T = float for *_f32, double for *_f64):
//   grid_lse_axis_{f32|f64}(src, kern, dst, outer, n, inner, scale)
//       dst[o,i,l] = scale * log sum_{j<n} exp(src[o,j,l] - kern[|i-j|])
//       src, dst (outer, n, inner) contiguous row-major, kern (n): the 1-D cost table of the axis
//       (c(|i-j| h)/eps). src may hold -inf (masked pixels); a line (o, ., l) whose terms are all
//       -inf gives -inf * scale (-inf for scale > 0, +inf for scale < 0), never NaN.
// One grid softmin of a D-dimensional grid is D launches, one per axis (last axis first), with
// scale = 1 except for the last launch (scale = -eps); the host ping-pongs two buffers.
//
// Algorithm: one thread per output (o, i, l). A LINE is one (o, l) pair, lines are numbered
// lambda = o * inner + l (so consecutive lines are consecutive addresses of src for a fixed j).
// A block holds LX lines (threadIdx.x, fastest) x LY outputs i (threadIdx.y); it streams the
// reduced index j through shared memory in tiles of TJ = OT_GRID_TILE / LX rows: the LX x TJ
// values src[o, j, l] of its lines (coalesced: along l when inner > 1, along j when inner = 1)
// and the TJ + LY - 1 kernel values kern[|i - j|] that the tile's (i, j) pairs need. Each thread
// keeps a running (max, sum) pair, updated per chunk of OT_GRID_FU columns (the chunk's max
// first: at most one rescale, then one exp per term): only shifted, non-positive values are
// exponentiated; a chunk whose terms are all -inf adds nothing.
//
// Launch configuration (candle_ot_kernels::grid_launch_config):
//   block = (LX, LY, 1), LX a power of two, LX <= OT_GRID_TILE, LX * LY <= OT_MAX_BLOCK (256);
//           recommended LX0 = min(32, pow2ceil(inner)), LY = min(256 / LX0, pow2ceil(n)),
//           LX = 256 / LY (inner = 1: LX lines of consecutive o; small n: more lines per block).
//   grid  = (ceil(outer * inner / LX), ceil(n / LY), 1).
//   shared memory: static only (launch with 0 bytes of dynamic shared memory): 13.0 KiB (f32),
//           24.0 KiB (f64). A block shape outside the rules fills its outputs with NaN.
// Exponentials: f32 uses __expf for the shifted terms (as common.cuh), f64 exp; the final log is
// the accurate logf / log.
#ifndef CANDLE_OT_COMMON_CUH
#include "common.cuh"
#endif

#ifndef OT_GRID_TILE
#define OT_GRID_TILE 1024u  // src values per shared tile (TJ = OT_GRID_TILE / LX rows of LX lines)
#endif
#define OT_GRID_FU 4        // columns j per chunk of the running (max, sum) update

// Shared tile of one block. The rows of `tile` are padded to LX + 1 values when LX > 1, so that
// the column-wise stores of the inner = 1 layout hit distinct banks.
template <typename T> struct __align__(16) OtGridShared {
  unsigned long long base[OT_MAX_BLOCK];          // offset of src[o, 0, l] for each line of the block
  T tile[OT_GRID_TILE + OT_GRID_TILE / 2];        // src[o, j0 + jj, l] at jj * SX + line
  T ks[OT_GRID_TILE + OT_MAX_BLOCK - 1];          // kern[|i0 + t - (j0 + TJ - 1)|], t < TJ + LY - 1
};

template <typename T>
__device__ __forceinline__ void ot_grid_lse(const T* __restrict__ src, const T* __restrict__ kern,
                                            T* __restrict__ dst, unsigned outer, unsigned n,
                                            unsigned inner, T scale) {
  typedef OtMath<T> MM;
  __shared__ OtGridShared<T> sh;
  const unsigned LX = blockDim.x, LY = blockDim.y;
  const unsigned tx = threadIdx.x, ty = threadIdx.y;
  const unsigned nthr = LX * LY, tid = ty * LX + tx;
  const unsigned long long lines = (unsigned long long)outer * inner;
  const unsigned long long lam0 = (unsigned long long)blockIdx.x * LX;
  if (lam0 >= lines) return;  // (uniform across the block)
  const unsigned nl = (unsigned)(lines - lam0 < LX ? lines - lam0 : LX);  // valid lines
  const unsigned i0 = blockIdx.y * LY, i = i0 + ty;
  const bool active = tx < nl && i < n;
  const unsigned long long ni = (unsigned long long)n * inner;

  if (nthr > OT_MAX_BLOCK || LX > OT_GRID_TILE || OT_GRID_TILE % LX != 0u) {  // unsupported
    if (active) {
      const unsigned long long lam = lam0 + tx;
      dst[(lam / inner) * ni + lam % inner + (unsigned long long)i * inner] = MM::nan();
    }
    return;
  }
  if (ty == 0 && tx < nl) {
    const unsigned long long lam = lam0 + tx;
    sh.base[tx] = (lam / inner) * ni + lam % inner;
  }
  const unsigned TJ = OT_GRID_TILE / LX;     // rows j per tile
  const unsigned SX = LX > 1u ? LX + 1u : 1u;  // tile row stride
  const unsigned nks = TJ + LY - 1u;         // kernel values per tile

  T m = MM::ninf(), s = T(0);
  for (unsigned j0 = 0; j0 < n; j0 += TJ) {
    const unsigned nj = ot_minu(TJ, n - j0);
    __syncthreads();  // previous tile consumed (and, on the first tile, sh.base written)
    if (inner == 1u) {  // lines are consecutive o: each line's j-range is contiguous
      for (unsigned e = tid; e < nl * nj; e += nthr) {
        const unsigned line = e / nj, jj = e - line * nj;
        sh.tile[jj * SX + line] = src[sh.base[line] + j0 + jj];
      }
    } else {  // consecutive lines are consecutive l: coalesced along the lines
      for (unsigned e = tid; e < LX * nj; e += nthr) {
        const unsigned jj = e / LX, line = e - jj * LX;
        if (line < nl)
          sh.tile[jj * SX + line] =
              src[sh.base[line] + (unsigned long long)(j0 + jj) * inner];
      }
    }
    // ks[t] = kern[|(i0 + t) - (j0 + TJ - 1)|]: thread (i0 + ty) pairs with column j0 + jj at
    // t = ty + TJ - 1 - jj. Entries past the axis (only paired with idle i or j) are clamped.
    const unsigned jb = j0 + TJ - 1u;
    for (unsigned t = tid; t < nks; t += nthr) {
      const unsigned a = i0 + t, d = a >= jb ? a - jb : jb - a;
      sh.ks[t] = kern[ot_minu(d, n - 1u)];
    }
    __syncthreads();
    if (!active) continue;

    const T* col = sh.tile + tx;
    const unsigned kb = ty + TJ - 1u;  // ks index of column jj: kb - jj
    for (unsigned jj = 0; jj < nj; jj += OT_GRID_FU) {
      T z[OT_GRID_FU];
#pragma unroll
      for (int u = 0; u < OT_GRID_FU; ++u) {
        const unsigned q = jj + (unsigned)u;
        const bool in = q < nj;
        const unsigned qc = in ? q : jj;
        const T v = col[qc * SX] - sh.ks[kb - qc];
        z[u] = in ? v : MM::ninf();
      }
      T mc = z[0];
#pragma unroll
      for (int u = 1; u < OT_GRID_FU; ++u) mc = z[u] > mc ? z[u] : mc;
      if (mc > m) {  // new maximum: rescale the sum (0 while nothing was added)
        s = m == MM::ninf() ? T(0) : s * MM::expn(m - mc);
        m = mc;
      }
      if (m != MM::ninf()) {
        T add = T(0);
#pragma unroll
        for (int u = 0; u < OT_GRID_FU; ++u) add += z[u] > MM::ninf() ? MM::expn(z[u] - m) : T(0);
        s += add;
      }
    }
  }
  if (!active) return;
  dst[sh.base[tx] + (unsigned long long)i * inner] =
      m == MM::ninf() ? MM::ninf() * scale : scale * (m + MM::log(s));
}

#define OT_GRID_LSE_ENTRY(NAME, T)                                                               \
  extern "C" __global__ void NAME(const T* __restrict__ src, const T* __restrict__ kern,         \
                                  T* __restrict__ dst, unsigned int outer, unsigned int n,       \
                                  unsigned int inner, T scale) {                                 \
    ot_grid_lse<T>(src, kern, dst, outer, n, inner, scale);                                      \
  }

OT_GRID_LSE_ENTRY(grid_lse_axis_f32, float)
OT_GRID_LSE_ENTRY(grid_lse_axis_f64, double)
