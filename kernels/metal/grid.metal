// candle-ot Metal kernels: the grid softmin (separable log-sum-exp along one axis of a regular
// grid), f32 only. Faithful twin of kernels/cuda/grid.cu; the entry-point name is the CUDA *_f32
// name.
//
//   grid_lse_axis_f32(src, kern, dst, outer, n, inner, scale)
//       dst[o,i,l] = scale * log sum_{j<n} exp(src[o,j,l] - kern[|i-j|])
//       src, dst (outer, n, inner) contiguous row-major, kern (n): the 1-D cost table of the axis.
//       src may hold -inf (masked pixels); a line whose terms are all -inf gives -inf * scale,
//       never NaN.
// One grid softmin of a D-dimensional grid is D dispatches, one per axis (last axis first), with
// scale = 1 except for the last one (scale = -eps).
//
// Buffer indices: src 0, kern 1, dst 2, outer 3, n 4, inner 5, scale 6 (sizes `constant uint&`,
// scale `constant float&`, setBytes).
//
// Algorithm (as grid.cu): one thread per output (o, i, l); a LINE is one (o, l) pair, numbered
// o * inner + l. A threadgroup holds LX lines (thread_position_in_threadgroup.x, fastest) x LY
// outputs i (.y) and streams j through threadgroup memory in tiles of TJ = OT_GRID_TILE / LX rows
// (the src values of its lines and the TJ + LY - 1 kernel values the tile needs), with a running
// (max, sum) pair per thread updated per chunk of OT_GRID_FU columns (only shifted, non-positive
// values are exponentiated, with metal::fast::exp; the final log is metal::precise::log).
//
// Dispatch (dispatchThreadgroups): threadsPerThreadgroup (LX, LY, 1), LX a power of two,
// LX <= OT_GRID_TILE, LX * LY <= OT_MAX_BLOCK (256); threadgroups (ceil(outer * inner / LX),
// ceil(n / LY), 1); see candle_ot_kernels::grid_launch_config. Static threadgroup memory only:
// 13.0 KiB. A threadgroup shape outside the rules fills its outputs with NaN.
#ifndef CANDLE_OT_COMMON_METAL
#include "common.metal"
#endif

#ifndef OT_GRID_TILE
#define OT_GRID_TILE 1024u  // src values per threadgroup tile (TJ = OT_GRID_TILE / LX rows)
#endif
#define OT_GRID_FU 4        // columns j per chunk of the running (max, sum) update

// Threadgroup tile (rows of `tile` padded to LX + 1 values when LX > 1, as on CUDA).
struct OtGridShared {
  ulong base[OT_MAX_BLOCK];                   // offset of src[o, 0, l] for each line
  float tile[OT_GRID_TILE + OT_GRID_TILE / 2];  // src[o, j0 + jj, l] at jj * SX + line
  float ks[OT_GRID_TILE + OT_MAX_BLOCK - 1];    // kern[|i0 + t - (j0 + TJ - 1)|]
};

template <typename TGP>
inline void ot_grid_lse(device const float* src, device const float* kern, device float* dst,
                        uint outer, uint n, uint inner, float scale, TGP sh, uint2 ltid,
                        uint2 tgid, uint2 tptg) {
  const uint LX = tptg.x, LY = tptg.y;
  const uint tx = ltid.x, ty = ltid.y;
  const uint nthr = LX * LY, tid = ty * LX + tx;
  const ulong lines = (ulong)outer * inner;
  const ulong lam0 = (ulong)tgid.x * LX;
  if (lam0 >= lines) return;  // (uniform across the threadgroup)
  const uint nl = (uint)(lines - lam0 < LX ? lines - lam0 : LX);  // valid lines
  const uint i0 = tgid.y * LY, i = i0 + ty;
  const bool active = tx < nl && i < n;
  const ulong ni = (ulong)n * inner;

  if (nthr > OT_MAX_BLOCK || LX > OT_GRID_TILE || OT_GRID_TILE % LX != 0u) {  // unsupported
    if (active) {
      const ulong lam = lam0 + tx;
      dst[(lam / inner) * ni + lam % inner + (ulong)i * inner] = NAN;
    }
    return;
  }
  if (ty == 0 && tx < nl) {
    const ulong lam = lam0 + tx;
    sh->base[tx] = (lam / inner) * ni + lam % inner;
  }
  const uint TJ = OT_GRID_TILE / LX;       // rows j per tile
  const uint SX = LX > 1u ? LX + 1u : 1u;  // tile row stride
  const uint nks = TJ + LY - 1u;           // kernel values per tile

  float m = OT_NINF, s = 0.0f;
  for (uint j0 = 0; j0 < n; j0 += TJ) {
    const uint nj = ot_minu(TJ, n - j0);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // previous tile consumed (and sh->base)
    if (inner == 1u) {  // lines are consecutive o: each line's j-range is contiguous
      for (uint e = tid; e < nl * nj; e += nthr) {
        const uint line = e / nj, jj = e - line * nj;
        sh->tile[jj * SX + line] = src[sh->base[line] + j0 + jj];
      }
    } else {  // consecutive lines are consecutive l
      for (uint e = tid; e < LX * nj; e += nthr) {
        const uint jj = e / LX, line = e - jj * LX;
        if (line < nl) sh->tile[jj * SX + line] = src[sh->base[line] + (ulong)(j0 + jj) * inner];
      }
    }
    // ks[t] = kern[|(i0 + t) - (j0 + TJ - 1)|]; entries past the axis are clamped (unused).
    const uint jb = j0 + TJ - 1u;
    for (uint t = tid; t < nks; t += nthr) {
      const uint a = i0 + t, d = a >= jb ? a - jb : jb - a;
      sh->ks[t] = kern[ot_minu(d, n - 1u)];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (!active) continue;

    const uint kb = ty + TJ - 1u;  // ks index of column jj: kb - jj
    for (uint jj = 0; jj < nj; jj += OT_GRID_FU) {
      float z[OT_GRID_FU];
      for (int u = 0; u < OT_GRID_FU; ++u) {
        const uint q = jj + (uint)u;
        const bool in = q < nj;
        const uint qc = in ? q : jj;
        const float v = sh->tile[qc * SX + tx] - sh->ks[kb - qc];
        z[u] = in ? v : OT_NINF;
      }
      float mc = z[0];
      for (int u = 1; u < OT_GRID_FU; ++u) mc = z[u] > mc ? z[u] : mc;
      if (mc > m) {  // new maximum: rescale the sum (0 while nothing was added)
        s = m == OT_NINF ? 0.0f : s * ot_expn(m - mc);
        m = mc;
      }
      if (m != OT_NINF) {
        float add = 0.0f;
        for (int u = 0; u < OT_GRID_FU; ++u) add += z[u] > OT_NINF ? ot_expn(z[u] - m) : 0.0f;
        s += add;
      }
    }
  }
  if (!active) return;
  dst[sh->base[tx] + (ulong)i * inner] = m == OT_NINF ? OT_NINF * scale : scale * (m + ot_log(s));
}

#define OT_GRID_LSE_ENTRY(NAME, T)                                                          \
  kernel void NAME(device const T* src [[buffer(0)]], device const T* kern [[buffer(1)]],   \
                   device T* dst [[buffer(2)]], constant uint& outer [[buffer(3)]],         \
                   constant uint& n [[buffer(4)]], constant uint& inner [[buffer(5)]],      \
                   constant T& scale [[buffer(6)]], OT_TG_PARAMS) {                         \
    threadgroup OtGridShared sh;                                                            \
    ot_grid_lse(src, kern, dst, outer, n, inner, scale, &sh, ltid, tgid, tptg);             \
  }

OT_GRID_LSE_ENTRY(grid_lse_axis_f32, float)  // (f32 only: T = float)
