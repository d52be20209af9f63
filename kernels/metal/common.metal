// candle-ot Metal kernels: shared core (streaming log-sum-exp and kernel sums over point clouds).
// Faithful twin of kernels/cuda/common.cuh, f32 only (Metal has no f64).
//
// `softmin.metal` and `kernel_sums.metal` include this file only when `CANDLE_OT_COMMON_METAL` is
// not yet defined; the Rust crate `candle-ot-kernels` ships each .metal with this file prepended,
// so `newLibraryWithSource` needs no include path.
//
// ---------------------------------------------------------------------------------------------
// Algorithm (identical to the CUDA core):
//   * a ROW set (points whose output row is computed) and an OTHER set (points reduced over):
//     rows = x_i and others = y_j for softmin(x, y, h); the gradient / plan reductions take the
//     row and other sets packed with their scalars ([p, alpha] and [q, h, w | v]), so the same
//     kernel serves the x-side and the y-side reductions of the backward pass;
//   * per (row r, other q): sq = sum_d (p_r,d - p_q,d)^2 from DIRECT differences; then
//       - log domain (softmin family): z = a_q - C(sq)/eps, accumulated with a running (max, sum)
//         pair: if z > m { s = s*exp(m - z) + u; m = z } else s += exp(z - m) u (exp arguments
//         are always <= 0: never an unshifted exponential);
//       - linear (kernel sums): acc += w_q k(sq) u;
//   * the OTHER set streams through threadgroup memory in tiles of OT_TILE points (fewer when
//     D > 8: a tile holds at most OT_TILE_ELEMS coordinates);
//   * LANES = threads_per_threadgroup.x threads cooperate on one row; their partial states are
//     merged through threadgroup memory (tree, lane + off -> lane, off = LANES/2, ..., 1) with
//       (m, s) + (m', s') = (M, s e^(m-M) + s' e^(m'-M)),  M = max(m, m'),
//     where an operand with m = -inf contributes 0 (two -inf maxima give (-inf, 0), never NaN).
//     (CUDA merges the same partials with warp shuffles in the same order.)
//   * vector outputs (gradients: D columns, lse_values: K columns) are accumulated OT_CH columns
//     per pass (a compile-time D <= 8 fits in one pass); extra passes recompute the distances.
//
// Launch configuration (every entry point):
//   threadsPerThreadgroup = (LANES, ROWS, 1): LANES in {1, 2, 4, 8, 16, 32} threads per output
//       row, ROWS rows per threadgroup, LANES * ROWS <= OT_MAX_BLOCK (256).
//   threadgroups = (ceil(R / ROWS), B, 1) (dispatchThreadgroups), R = number of output rows
//       (the first point set's N).
//   Block-sparse entry points (block_*, template flag BS): threadgroups = (ntasks, 1, 1); the
//   task table (OtArgs::tasks, 5 uint per task: b, row_start, row_end, span_begin, span_end)
//   gives each threadgroup its batch item, its rows (row_start + ltid.y, active iff < row_end)
//   and its span list (OtArgs::spans, 2 uint per span: OTHER range [start, end) within the batch
//   item), streamed in turn with one running (max, sum) state (the CUDA core's twin).
//   threadgroup memory: static only (no setThreadgroupMemoryLength), <= 27.0 KiB (lse_values).
//   D: 1 <= D <= OT_TILE_ELEMS (2048); specialised for D = 1, 2, 3, 4, 8, generic loop otherwise.
//      A larger D fills the output with NaN.
//
// Math: metal::fast::exp for the shifted terms exp(t), t <= 0 (error relative to e^t, so each
// term's absolute error is a few ulp of the largest term); metal::precise::exp / precise::log for
// the final scale factors and logarithm. -inf entries (masked points) must survive compilation:
// build the library with fast math disabled (MTLCompileOptions.fastMathEnabled = NO, or
// mathMode = MTLMathModeSafe), otherwise the compiler may assume no infinities.
//
// The helpers take the threadgroup tile through a deduced pointer type (`TGP` is
// `threadgroup OtShared<OP>*`), declared once in each kernel function.
// ---------------------------------------------------------------------------------------------
#ifndef CANDLE_OT_COMMON_METAL
#define CANDLE_OT_COMMON_METAL

#include <metal_stdlib>
using namespace metal;

#ifndef OT_TILE
#define OT_TILE 256u         // max OTHER points per threadgroup tile
#endif
#ifndef OT_TILE_ELEMS
#define OT_TILE_ELEMS 2048u  // max coordinates per tile (= OT_TILE * 8), also max D
#endif
#define OT_CH 8              // vector output columns per pass (generic D, lse_values' K)
#define OT_MAX_BLOCK 256     // max threads per threadgroup (merge scratch size)

// Operations (compile-time tags).
#define OT_OP_SOFTMIN 0     // out = -eps log sum_q exp(q1 - C/eps)
#define OT_OP_LSE_GRAD 1    // out = [sum_q pi w grad_p C, sum_q pi w], pi = exp(r1 + q1 - C/eps)
#define OT_OP_LSE_VALUES 2  // out = sum_q pi v
#define OT_OP_KPROD 3       // out = sum_q q1 k
#define OT_OP_KSUMS_GRAD 4  // out = [sum_q q1 grad_p k, sum_q q1 k]

#define OT_COST_SQE 0     // C = |x-y|^2 / 2
#define OT_COST_EUC 1     // C = |x-y|
#define OT_KER_GAUSS 2    // k = exp(-|x-y|^2 / (2 sigma^2))
#define OT_KER_LAP 3      // k = exp(-|x-y| / sigma)
#define OT_KER_ENERGY 4   // k = -|x-y|

#define OT_NINF (-INFINITY)

inline float ot_expn(float t) { return metal::fast::exp(t); }      // t <= 0
inline float ot_exact_exp(float t) { return metal::precise::exp(t); }
inline float ot_log(float t) { return metal::precise::log(t); }
inline uint ot_minu(uint a, uint b) { return a < b ? a : b; }

// Arguments of the core, in ROW / OTHER terms. Point sets and their per-point scalars may be
// packed in one array (the layouts of the online ops' backward): then a row of `rp` is
// [p (D), alpha] (stride rps = D + 1) and a row of `qp` is [q (D), h, w or v (K)] (qps >= D + 2).
struct OtArgs {
  device const float* rp;  // row points, row r at rp + r * rps (B, R, rps)
  device const float* r1;  // row scalar alpha_r at r1[r * rps], or null
  device const float* qp;  // other points, point q at qp + q * qps (B, Q, qps)
  device const float* q1;  // other scalar at q1[q * q1s]: h_q (log domain) or the weight b_q
  device const float* q2;  // second other scalar / values at q2[q * q1s + c] (w_q or v_q,c), or null
  device float* out;
  uint R, Q, D, K;
  uint rps, qps, q1s;
  float par;               // eps (softmin family) or sigma (kernel sums)
  // Block-sparse task table (null: dense). Task t (= tgid.x) is 5 uint at tasks + 5 t: batch b,
  // rows [row_start, row_end) (at most tptg.y rows), spans [span_begin, span_end); span s is
  // the OTHER range [spans[2 s], spans[2 s + 1]) of batch item b.
  device const uint* tasks;
  device const uint* spans;
};

template <int OP> struct OtTraits {
  static constexpr constant bool LOGD = OP <= OT_OP_LSE_VALUES;
  static constexpr constant bool GRAD = OP == OT_OP_LSE_GRAD || OP == OT_OP_KSUMS_GRAD;
  static constexpr constant bool EXTRA = OP != OT_OP_LSE_VALUES;  // a scalar accumulator (sum / mass)
  static constexpr constant bool HAS_Q2 = OP == OT_OP_LSE_GRAD;
  static constexpr constant bool HAS_V = OP == OT_OP_LSE_VALUES;
};

// Threadgroup tile, declared once per kernel function (not per D specialisation).
template <int OP> struct OtShared {
  float pts[OT_TILE_ELEMS];
  float q1[OT_TILE];
  float q2[OtTraits<OP>::HAS_Q2 ? OT_TILE : 1];
  float v[OtTraits<OP>::HAS_V ? OT_TILE * OT_CH : 1];
  float scr[OT_MAX_BLOCK * (OT_CH + 2)];  // lane merge: (m, acc[0..NACC)) per thread
  float4 tile4[OP == OT_OP_SOFTMIN ? OT_TILE : 1];  // the fast softmin's tile
};

template <int DS, int OP, int COST, bool BS, typename TGP>
inline void ot_core(thread const OtArgs& a, TGP sh, uint2 ltid, uint2 tgid, uint2 tptg) {
  typedef OtTraits<OP> TR;
  constexpr int NCH = TR::HAS_V ? OT_CH : (TR::GRAD ? (DS > 0 ? DS : OT_CH) : 0);
  constexpr int NACC = NCH + (TR::EXTRA ? 1 : 0);
  constexpr int EX = NCH;  // index of the extra (scalar) accumulator
  constexpr int NA = NACC > 0 ? NACC : 1;
  constexpr uint STRIDE = (uint)NACC + 1u;  // merge scratch per thread

  const uint lanes = tptg.x, lane = ltid.x;
  const uint nthr = tptg.x * tptg.y;
  const uint tid = ltid.y * tptg.x + ltid.x;
  const uint R = a.R, Q = a.Q, K = a.K;
  // Dense: rows from the threadgroup index, batch tgid.y, one span [0, Q). Block-sparse (BS):
  // the task's batch, rows and span list.
  device const uint* task = BS ? a.tasks + 5ul * tgid.x : a.tasks;
  const uint b = BS ? task[0] : tgid.y;
  const uint r = BS ? task[1] + ltid.y : tgid.x * tptg.y + ltid.y;
  const uint span0 = BS ? task[3] : 0u, span1 = BS ? task[4] : 1u;
  const uint D = DS > 0 ? (uint)DS : a.D;
  const bool active = BS ? (r < task[2] && r < R) : r < R;
  const ulong row = (ulong)b * R + (active ? r : 0u);
  const uint NV = TR::HAS_V ? K : (TR::GRAD ? D : 0u);  // vector output columns
  const uint outw = TR::HAS_V ? K : (TR::GRAD ? D + 1 : 1u);

  if (D > OT_TILE_ELEMS) {  // unsupported (uniform across the threadgroup: no barrier skipped)
    if (active && lane == 0)
      for (uint c = 0; c < outw; ++c) a.out[row * outw + c] = NAN;
    return;
  }
  const uint tp = D <= 8u ? OT_TILE : OT_TILE_ELEMS / D;  // points per tile
  const float par = a.par;
  const float inv = 1.0f / par;
  const uint qps = a.qps, q1s = a.q1s;
  device const float* qp = a.qp + (ulong)b * Q * qps;
  device const float* xg = a.rp + row * a.rps;  // this thread's row point (row 0 of the batch when inactive)
  float xr[DS > 0 ? DS : 1];
  for (int d = 0; d < DS; ++d) xr[d] = xg[d];

  const uint npass = (NCH == 0 || NV == 0) ? 1u : (NV + NCH - 1) / NCH;
  if (NCH > 0 && !TR::EXTRA && NV == 0) return;  // nothing to compute (e.g. K = 0)

  for (uint pass = 0; pass < npass; ++pass) {
    const uint c0 = pass * (uint)NCH;
    const uint nc = (TR::GRAD && DS > 0) ? (uint)DS : (NCH == 0 ? 0u : ot_minu(NCH, NV - c0));
    float m = TR::LOGD ? OT_NINF : 0.0f;
    float acc[NA];
    for (int c = 0; c < NA; ++c) acc[c] = 0.0f;

    for (uint si = span0; si < span1; ++si) {
      const uint qb = BS ? a.spans[2 * si] : 0u;
      const uint qe = BS ? ot_minu(a.spans[2 * si + 1], Q) : Q;
      for (uint q0 = qb; q0 < qe; q0 += tp) {
        const uint nq = ot_minu(tp, qe - q0);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // previous tile fully consumed
        device const float* src = qp + (ulong)q0 * qps;
        if (qps == D) {  // plain points: one contiguous copy
          for (uint e = tid; e < nq * D; e += nthr) sh->pts[e] = src[e];
        } else {         // packed rows: strided gather
          for (uint e = tid; e < nq * D; e += nthr) {
            const uint p = e / D, d = e - p * D;
            sh->pts[e] = src[(ulong)p * qps + d];
          }
        }
        for (uint e = tid; e < nq; e += nthr) {
          const ulong qi = ((ulong)b * Q + q0 + e) * q1s;
          sh->q1[e] = a.q1[qi];
          if (TR::HAS_Q2) sh->q2[e] = a.q2[qi];
        }
        if (TR::HAS_V) {
          const uint ncd = nc > 0u ? nc : 1u;  // (nc = 0: loop below is empty)
          for (uint e = tid; e < nq * nc; e += nthr) {
            const uint p = e / ncd, c = e - p * ncd;
            sh->v[p * OT_CH + c] = a.q2[((ulong)b * Q + q0 + p) * q1s + c0 + c];
          }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (!active) continue;

        for (uint p = lane; p < nq; p += lanes) {
          // Distance from direct differences.
          float df[DS > 0 ? DS : 1];
          float sq = 0.0f;
          if (DS > 0) {
            for (int d = 0; d < DS; ++d) {
              df[d] = xr[d] - sh->pts[p * DS + d];
              sq = fma(df[d], df[d], sq);
            }
          } else {
            for (uint d = 0; d < D; ++d) {
              const float t = xg[d] - sh->pts[p * D + d];
              sq = fma(t, t, sq);
            }
          }
          // Weight (log or linear) and the gradient factor gf: grad = gf * (p_row - p_other).
          float z = 0.0f, wl = 0.0f, gf = 0.0f;
          if (COST == OT_COST_SQE) {
            z = sh->q1[p] - sq * (0.5f * inv);
            gf = 1.0f;
          } else if (COST == OT_COST_EUC) {
            const float dist = sqrt(sq);
            z = sh->q1[p] - dist * inv;
            gf = dist > 0.0f ? 1.0f / dist : 0.0f;
          } else if (COST == OT_KER_GAUSS) {
            const float k = ot_expn(-sq * (0.5f * inv * inv));
            wl = k;
            gf = -k * (inv * inv);
          } else if (COST == OT_KER_LAP) {
            const float dist = sqrt(sq);
            const float k = ot_expn(-dist * inv);
            wl = k;
            gf = dist > 0.0f ? -k * inv / dist : 0.0f;
          } else {  // OT_KER_ENERGY
            const float dist = sqrt(sq);
            wl = -dist;
            gf = dist > 0.0f ? -1.0f / dist : 0.0f;
          }
          // Contributions u[c].
          float u[NA];
          const float wq = TR::LOGD ? (TR::HAS_Q2 ? sh->q2[p] : 1.0f) : sh->q1[p];
          const float gw = wq * gf;
          for (int c = 0; c < NCH; ++c) {
            float v = 0.0f;
            if (c < (int)nc) {
              if (TR::HAS_V) {
                v = sh->v[p * OT_CH + c];
              } else {
                const int ci = (DS > 0 && c < DS) ? c : 0;  // compile-time index
                const float dc = DS > 0 ? df[ci] : xg[c0 + c] - sh->pts[p * D + c0 + c];
                v = gw * dc;
              }
            }
            u[c] = v;
          }
          if (TR::EXTRA) u[EX] = TR::LOGD ? wq : wq * wl;

          if (TR::LOGD) {
            if (z > m) {
              const float al = m == OT_NINF ? 0.0f : ot_expn(m - z);
              m = z;
              for (int c = 0; c < NACC; ++c) acc[c] = fma(acc[c], al, u[c]);
            } else if (z > OT_NINF) {
              const float w = ot_expn(z - m);
              for (int c = 0; c < NACC; ++c) acc[c] = fma(w, u[c], acc[c]);
            }
          } else {
            for (int c = 0; c < NACC; ++c) acc[c] += u[c];
          }
        }
      }
    }  // spans

    // Merge the LANES partial states of a row through threadgroup memory (tree).
    for (uint off = lanes >> 1; off > 0; off >>= 1) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
      sh->scr[tid * STRIDE] = m;
      for (int c = 0; c < NACC; ++c) sh->scr[tid * STRIDE + 1 + c] = acc[c];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (lane < off) {
        const uint pt = (tid + off) * STRIDE;
        if (TR::LOGD) {
          const float m2 = sh->scr[pt];
          const float mx = m > m2 ? m : m2;
          const float a1 = m == OT_NINF ? 0.0f : ot_expn(m - mx);
          const float a2 = m2 == OT_NINF ? 0.0f : ot_expn(m2 - mx);
          for (int c = 0; c < NACC; ++c) acc[c] = acc[c] * a1 + sh->scr[pt + 1 + c] * a2;
          m = mx;
        } else {
          for (int c = 0; c < NACC; ++c) acc[c] += sh->scr[pt + 1 + c];
        }
      }
    }

    if (!active || lane != 0) continue;
    device float* o = a.out + row * outw;
    if (OP == OT_OP_SOFTMIN) {
      o[0] = m == OT_NINF ? INFINITY : -par * (m + ot_log(acc[EX]));
    } else if (OP == OT_OP_LSE_GRAD || OP == OT_OP_LSE_VALUES) {
      // pi_rq = exp(alpha_r + h_q - C_rq/eps) = exp(z - m) * exp(m + alpha_r)
      const float sc = m == OT_NINF ? 0.0f : ot_exact_exp(m + a.r1[row * a.rps]);
      for (int c = 0; c < NCH; ++c)
        if (c < (int)nc) o[c0 + c] = sc * acc[c];
      if (OP == OT_OP_LSE_GRAD && pass == 0) o[D] = sc * acc[EX];
    } else if (OP == OT_OP_KPROD) {
      o[0] = acc[EX];
    } else {  // OT_OP_KSUMS_GRAD
      for (int c = 0; c < NCH; ++c)
        if (c < (int)nc) o[c0 + c] = acc[c];
      if (pass == 0) o[D] = acc[EX];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fast path of the softmin for D <= 3, dense or block-sparse: twin of common.cuh's
// ot_softmin_fast (same tile of 4-vectors (q_0, q_1, q_2, kappa h_q), register blocking of RB
// rows per thread, base-2 exponent, per-chunk max of OT_FU points). The lanes of a row group
// merge through threadgroup memory, as in ot_core.
// ---------------------------------------------------------------------------------------------
#ifndef OT_FU
#define OT_FU 4  // points per chunk of the fast softmin
#endif

inline float ot_ex2(float t) { return metal::fast::exp2(t); }  // t <= 0 (or -inf: 0)

// The pairs of one staged tile (nq points) for the RB rows of a thread: chunks of OT_FU points
// lane, lane + gl, ... (FULL: every point of every chunk exists, no bounds checks).
template <int DS, int COST, int RB, bool FULL, typename TGP>
inline void ot_fast_chunks(TGP sh, uint nq, uint lane, uint gl, float sc, thread const float (*xr)[3],
                           thread float* m, thread float* s) {
  for (uint p0 = lane; p0 < nq; p0 += gl * OT_FU) {
    float z[RB][OT_FU];
    for (int u = 0; u < OT_FU; ++u) {
      const uint p = p0 + (uint)u * gl;
      const bool in = FULL || p < nq;
      const float4 q = sh->tile4[in ? p : 0u];
      for (int k = 0; k < RB; ++k) {
        float sq = 0.0f;
        for (int d = 0; d < DS; ++d) {
          const float t = xr[k][d] - q[d];
          sq = fma(t, t, sq);
        }
        const float c = COST == OT_COST_SQE ? sq : sqrt(sq);
        z[k][u] = in ? fma(-sc, c, q[3]) : OT_NINF;
      }
    }
    for (int k = 0; k < RB; ++k) {
      float mc = z[k][0];
      for (int u = 1; u < OT_FU; ++u) mc = z[k][u] > mc ? z[k][u] : mc;
      if (mc > m[k]) {
        s[k] = m[k] == OT_NINF ? 0.0f : s[k] * ot_ex2(m[k] - mc);
        m[k] = mc;
      }
      if (m[k] != OT_NINF) {
        float add = 0.0f;
        for (int u = 0; u < OT_FU; ++u) add += ot_ex2(z[k][u] - m[k]);
        s[k] += add;
      }
    }
  }
}

template <int DS, int COST, bool BS, int RB, typename TGP>
inline void ot_softmin_fast(thread const OtArgs& a, TGP sh, uint2 ltid, uint2 tgid, uint2 tptg) {
  const float kappa = 1.4426950408889634074f;  // log2 e
  const uint nthr = tptg.x * tptg.y;
  const uint tid = ltid.y * tptg.x + ltid.x;
  const uint gl = tptg.x * (uint)RB;  // lanes of a row group (power of two)
  const uint lane = tid & (gl - 1u), grp = tid / gl;
  const uint R = a.R, Q = a.Q, qps = a.qps, q1s = a.q1s;
  device const uint* task = BS ? a.tasks + 5ul * tgid.x : a.tasks;
  const uint b = BS ? task[0] : tgid.y;
  const uint rbase = BS ? task[1] : tgid.x * tptg.y;
  const uint rend = BS ? ot_minu(task[2], R) : R;
  const uint span0 = BS ? task[3] : 0u, span1 = BS ? task[4] : 1u;
  const float eps = a.par;
  const float sc = COST == OT_COST_SQE ? 0.5f * kappa / eps : kappa / eps;

  float xr[RB][3];
  float m[RB], s[RB];
  for (int k = 0; k < RB; ++k) {
    const uint r = rbase + grp * (uint)RB + (uint)k;
    device const float* xg = a.rp + ((ulong)b * R + (r < rend ? r : 0u)) * a.rps;
    for (int d = 0; d < 3; ++d) xr[k][d] = d < DS ? xg[d] : 0.0f;
    m[k] = OT_NINF;
    s[k] = 0.0f;
  }
  device const float* qp = a.qp + (ulong)b * Q * qps;
  device const float* q1 = a.q1 + (ulong)b * Q * q1s;

  for (uint si = span0; si < span1; ++si) {
    const uint qb = BS ? a.spans[2 * si] : 0u;
    const uint qe = BS ? ot_minu(a.spans[2 * si + 1], Q) : Q;
    for (uint q0 = qb; q0 < qe; q0 += OT_TILE) {
      const uint nq = ot_minu(OT_TILE, qe - q0);
      threadgroup_barrier(mem_flags::mem_threadgroup);  // previous tile fully consumed
      for (uint e = tid; e < nq; e += nthr) {
        device const float* src = qp + (ulong)(q0 + e) * qps;
        float4 p = float4(0.0f);
        for (int d = 0; d < DS; ++d) p[d] = src[d];
        p[3] = kappa * q1[(ulong)(q0 + e) * q1s];
        sh->tile4[e] = p;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      // A full tile that the row group's chunks divide needs no bounds checks.
      if (nq == OT_TILE && OT_TILE % (gl * (uint)OT_FU) == 0u)
        ot_fast_chunks<DS, COST, RB, true>(sh, OT_TILE, lane, gl, sc, xr, m, s);
      else
        ot_fast_chunks<DS, COST, RB, false>(sh, nq, lane, gl, sc, xr, m, s);
    }
  }

  // Merge the gl partial states of each row through threadgroup memory (tree; sh->scr holds
  // (m, s) per row for every thread: 2 RB <= OT_CH + 2 floats per thread).
  for (uint off = gl >> 1; off > 0; off >>= 1) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int k = 0; k < RB; ++k) {
      sh->scr[tid * (2u * RB) + 2u * k] = m[k];
      sh->scr[tid * (2u * RB) + 2u * k + 1u] = s[k];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane < off) {
      for (int k = 0; k < RB; ++k) {
        const uint pt = (tid + off) * (2u * RB) + 2u * k;
        const float m2 = sh->scr[pt], s2 = sh->scr[pt + 1u];
        const float mx = m[k] > m2 ? m[k] : m2;
        const float a1 = m[k] == OT_NINF ? 0.0f : ot_ex2(m[k] - mx);
        const float a2 = m2 == OT_NINF ? 0.0f : ot_ex2(m2 - mx);
        s[k] = s[k] * a1 + s2 * a2;
        m[k] = mx;
      }
    }
  }
  if (lane != 0) return;
  const float ln2 = 0.69314718055994530942f;
  for (int k = 0; k < RB; ++k) {
    const uint r = rbase + grp * (uint)RB + (uint)k;
    if (r < rend)
      a.out[(ulong)b * R + r] =
          m[k] == OT_NINF ? INFINITY : -eps * ln2 * (m[k] + metal::precise::log2(s[k]));
  }
}

// D in {1, 2, 3} for a register blocking RB.
template <int COST, bool BS, int RB, typename TGP>
inline void ot_softmin_fast_d(thread const OtArgs& a, TGP sh, uint2 ltid, uint2 tgid, uint2 tptg) {
  switch (a.D) {
    case 1: ot_softmin_fast<1, COST, BS, RB>(a, sh, ltid, tgid, tptg); break;
    case 2: ot_softmin_fast<2, COST, BS, RB>(a, sh, ltid, tgid, tptg); break;
    default: ot_softmin_fast<3, COST, BS, RB>(a, sh, ltid, tgid, tptg); break;
  }
}

// Runtime D -> compile-time specialisation.
// BS: block-sparse (a.tasks non-null, threadgroups (ntasks, 1, 1)); dense otherwise.
template <int OP, int COST, bool BS = false, typename TGP>
inline void ot_dispatch(thread const OtArgs& a, TGP sh, uint2 ltid, uint2 tgid, uint2 tptg) {
  // The fast path: softmin with D <= 3 (uniform across the grid). RB rows per thread, where
  // the row group (LANES * RB threads) fits in a SIMD group and RB divides ROWS.
  if (OP == OT_OP_SOFTMIN && a.D <= 3u) {
    const uint lanes = tptg.x, rows = tptg.y;
    if (lanes <= 8u && rows % 4u == 0u)
      ot_softmin_fast_d<COST, BS, 4>(a, sh, ltid, tgid, tptg);
    else if (lanes <= 16u && rows % 2u == 0u)
      ot_softmin_fast_d<COST, BS, 2>(a, sh, ltid, tgid, tptg);
    else
      ot_softmin_fast_d<COST, BS, 1>(a, sh, ltid, tgid, tptg);
    return;
  }
  switch (a.D) {
    case 1: ot_core<1, OP, COST, BS>(a, sh, ltid, tgid, tptg); break;
    case 2: ot_core<2, OP, COST, BS>(a, sh, ltid, tgid, tptg); break;
    case 3: ot_core<3, OP, COST, BS>(a, sh, ltid, tgid, tptg); break;
    case 4: ot_core<4, OP, COST, BS>(a, sh, ltid, tgid, tptg); break;
    case 8: ot_core<8, OP, COST, BS>(a, sh, ltid, tgid, tptg); break;
    default: ot_core<0, OP, COST, BS>(a, sh, ltid, tgid, tptg); break;
  }
}

// Thread-position parameters shared by every entry point.
#define OT_TG_PARAMS                                                                        \
  uint2 ltid [[thread_position_in_threadgroup]], uint2 tgid [[threadgroup_position_in_grid]], \
      uint2 tptg [[threads_per_threadgroup]]

#endif  // CANDLE_OT_COMMON_METAL
