// candle-ot CUDA kernels: shared core (streaming log-sum-exp and kernel sums over point clouds).
//
// This header is self-contained (no system headers), so it compiles under both nvcc and NVRTC.
// `softmin.cu` and `kernel_sums.cu` include it only when `CANDLE_OT_COMMON_CUH` is not yet defined:
// the Rust crate `candle-ot-kernels` ships each .cu with this header prepended, so runtime
// compilation needs no include path.
//
// ---------------------------------------------------------------------------------------------
// One algorithm for every entry point ("row reduction"):
//   * a ROW set (the points whose output row is computed) and an OTHER set (the points reduced
//     over): rows = x_i and others = y_j for softmin(x, y, h); the gradient / plan reductions
//     take the row and other sets packed with their scalars ([p, alpha] and [q, h, w | v]), so
//     the same kernel serves the x-side and the y-side reductions of the backward pass;
//   * per (row r, other q): squared distance sq = sum_d (p_r,d - p_q,d)^2 from DIRECT differences
//     (never |x|^2 + |y|^2 - 2 x.y), then either
//       - log domain (softmin family): z = a_q - C(sq)/eps, accumulated with a running (max, sum)
//         pair: (m, s) <- push z: if z > m { s = s*exp(m - z) + u; m = z } else s += exp(z - m) u,
//         which only ever exponentiates a non-positive, shifted value; or
//       - linear (kernel sums): acc += w_q k(sq) u.
//   * the OTHER set streams through shared memory in tiles of OT_TILE points (fewer when D > 8,
//     so that a tile holds at most OT_TILE_ELEMS coordinates);
//   * LANES = blockDim.x threads cooperate on one row (each takes every LANES-th point of a tile);
//     their partial states are merged at the end with the associative combine
//       (m, s) + (m', s') = (M, s e^(m-M) + s' e^(m'-M)),  M = max(m, m'),
//     where an operand with m = -inf contributes 0 (two -inf maxima give (-inf, 0), never NaN).
//   * vector outputs (gradients: D columns, lse_values: K columns) are accumulated OT_CH columns per
//     pass (a compile-time D <= 8 fits in one pass); extra passes recompute the distances.
//
// Launch configuration (every entry point):
//   block = (LANES, ROWS, 1): LANES in {1, 2, 4, 8, 16, 32} threads per output row, ROWS rows per
//           block, LANES * ROWS <= OT_MAX_BLOCK (256) and a multiple of 32 (warp shuffles use the
//           full mask). Recommended: LANES * ROWS = 256.
//   grid  = (ceil(R / ROWS), B, 1), R = number of output rows (the first point set's N).
//   shared memory: static only (launch with 0 bytes of dynamic shared memory).
//   Block-sparse entry points (block_*, template flag BS): grid = (ntasks, 1, 1); the task table
//   (OtArgs::tasks, 5 u32 per task: b, row_start, row_end, span_begin, span_end) gives each
//   block its batch item, its rows (row_start + threadIdx.y, active iff < row_end; at most ROWS
//   rows, all inside one row cluster) and its span list (OtArgs::spans, 2 u32 per span: OTHER
//   range [start, end) within the batch item); the tile loop streams each span in turn with one
//   running (max, sum) state. The dense instantiation (BS = false) has the single span [0, Q)
//   and rows / batch from the block index, as before.
//   D: 1 <= D <= OT_TILE_ELEMS (2048); specialised for D = 1, 2, 3, 4, 8, generic loop otherwise.
//      A larger D fills the output with NaN.
//
// Exponentials: f32 uses __expf (ex2.approx) for the shifted terms exp(t), t <= 0: its error
// (2 + 1.2|t|) ulp is relative to e^t, so a term's absolute error is at most ~2.5 ulp of the
// largest term of the sum; the final log / exp use the accurate logf / expf. f64 uses exp / log.
// ---------------------------------------------------------------------------------------------
#ifndef CANDLE_OT_COMMON_CUH
#define CANDLE_OT_COMMON_CUH

#ifndef OT_TILE
#define OT_TILE 256u         // max OTHER points per shared tile
#endif
#ifndef OT_TILE_ELEMS
#define OT_TILE_ELEMS 2048u  // max coordinates per shared tile (= OT_TILE * 8), also max D
#endif
#define OT_CH 8              // vector output columns per pass (generic D, plan_apply's K)
#define OT_MAX_BLOCK 256     // max threads per block (documented limit, twin of Metal's)

// Operations and costs (compile-time tags).
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

template <typename T> struct OtMath;

template <> struct OtMath<float> {
  static __device__ __forceinline__ float ninf() { return __int_as_float(0xff800000); }
  static __device__ __forceinline__ float pinf() { return __int_as_float(0x7f800000); }
  static __device__ __forceinline__ float nan() { return __int_as_float(0x7fffffff); }
  // exp of a shifted (non-positive) argument: fast path.
  static __device__ __forceinline__ float expn(float t) { return __expf(t); }
  static __device__ __forceinline__ float exact_exp(float t) { return expf(t); }
  static __device__ __forceinline__ float log(float t) { return logf(t); }
  static __device__ __forceinline__ float sqrt(float t) { return sqrtf(t); }
  static __device__ __forceinline__ float shfl_xor(float v, unsigned off) {
    return __shfl_xor_sync(0xffffffffu, v, off);
  }
};

template <> struct OtMath<double> {
  static __device__ __forceinline__ double ninf() {
    return __longlong_as_double(0xfff0000000000000ll);
  }
  static __device__ __forceinline__ double pinf() {
    return __longlong_as_double(0x7ff0000000000000ll);
  }
  static __device__ __forceinline__ double nan() {
    return __longlong_as_double(0x7ff8000000000000ll);
  }
  static __device__ __forceinline__ double expn(double t) { return ::exp(t); }
  static __device__ __forceinline__ double exact_exp(double t) { return ::exp(t); }
  static __device__ __forceinline__ double log(double t) { return ::log(t); }
  static __device__ __forceinline__ double sqrt(double t) { return ::sqrt(t); }
  static __device__ __forceinline__ double shfl_xor(double v, unsigned off) {
    return __shfl_xor_sync(0xffffffffu, v, off);
  }
};

__device__ __forceinline__ unsigned ot_minu(unsigned a, unsigned b) { return a < b ? a : b; }

// Arguments of the core, in ROW / OTHER terms. Point sets and their per-point scalars may be
// packed in one array (the layouts of the online ops' backward): then a row of `rp` is
// [p (D), alpha] (stride rps = D + 1) and a row of `qp` is [q (D), h, w or v (K)] (qps >= D + 2).
template <typename T> struct OtArgs {
  const T* rp;  // row points, row r at rp + r * rps (B, R, rps)
  const T* r1;  // row scalar alpha_r at r1[r * rps], or null
  const T* qp;  // other points, point q at qp + q * qps (B, Q, qps)
  const T* q1;  // other scalar at q1[q * q1s]: h_q (log domain) or the weight b_q (kernel sums)
  const T* q2;  // second other scalar / values at q2[q * q1s + c] (w_q or v_q,c), or null
  T* out;
  unsigned R, Q, D, K;
  unsigned rps, qps, q1s;
  T par;        // eps (softmin family) or sigma (kernel sums)
  // Block-sparse task table (null: dense). Task t (= blockIdx.x) is 5 u32 at tasks + 5 t:
  // batch b, rows [row_start, row_end) (at most blockDim.y rows), spans [span_begin, span_end);
  // span s is the OTHER range [spans[2 s], spans[2 s + 1]) of batch item b.
  const unsigned* tasks;
  const unsigned* spans;
};

template <int OP> struct OtTraits {
  static constexpr bool LOGD = OP <= OT_OP_LSE_VALUES;
  static constexpr bool GRAD = OP == OT_OP_LSE_GRAD || OP == OT_OP_KSUMS_GRAD;
  static constexpr bool EXTRA = OP != OT_OP_LSE_VALUES;  // a scalar accumulator (sum / mass)
  static constexpr bool HAS_Q2 = OP == OT_OP_LSE_GRAD;
  static constexpr bool HAS_V = OP == OT_OP_LSE_VALUES;
};

// Shared-memory tile, declared once per kernel (not per D specialisation).
template <typename T, int OP> struct __align__(16) OtShared {
  T pts[OT_TILE_ELEMS];
  T q1[OT_TILE];
  T q2[OtTraits<OP>::HAS_Q2 ? OT_TILE : 1];
  T v[OtTraits<OP>::HAS_V ? OT_TILE * OT_CH : 1];
};

template <typename T, int DS, int OP, int COST, bool BS>
__device__ __forceinline__ void ot_core(const OtArgs<T>& a, OtShared<T, OP>& sh) {
  typedef OtMath<T> MM;
  typedef OtTraits<OP> TR;
  constexpr int NCH = TR::HAS_V ? OT_CH : (TR::GRAD ? (DS > 0 ? DS : OT_CH) : 0);
  constexpr int NACC = NCH + (TR::EXTRA ? 1 : 0);
  constexpr int EX = NCH;  // index of the extra (scalar) accumulator
  constexpr int NA = NACC > 0 ? NACC : 1;

  const unsigned lanes = blockDim.x, lane = threadIdx.x;
  const unsigned nthr = blockDim.x * blockDim.y;
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  const unsigned R = a.R, Q = a.Q, K = a.K;
  // Dense: rows from the block index, batch blockIdx.y, one span [0, Q). Block-sparse (BS):
  // the task's batch, rows and span list.
  const unsigned* task = BS ? a.tasks + 5ull * blockIdx.x : 0;
  const unsigned b = BS ? task[0] : blockIdx.y;
  const unsigned r = BS ? task[1] + threadIdx.y : blockIdx.x * blockDim.y + threadIdx.y;
  const unsigned span0 = BS ? task[3] : 0u, span1 = BS ? task[4] : 1u;
  const unsigned D = DS > 0 ? (unsigned)DS : a.D;
  const bool active = BS ? (r < task[2] && r < R) : r < R;
  const unsigned long long row = (unsigned long long)b * R + (active ? r : 0u);
  const unsigned NV = TR::HAS_V ? K : (TR::GRAD ? D : 0u);  // vector output columns
  const unsigned outw = TR::HAS_V ? K : (TR::GRAD ? D + 1 : 1u);

  if (D > OT_TILE_ELEMS) {  // unsupported (uniform across the block: no barrier skipped)
    if (active && lane == 0)
      for (unsigned c = 0; c < outw; ++c) a.out[row * outw + c] = MM::nan();
    return;
  }
  const unsigned tp = D <= 8u ? OT_TILE : OT_TILE_ELEMS / D;  // points per tile
  const T par = a.par;
  const T inv = T(1) / par;
  const unsigned qps = a.qps, q1s = a.q1s;
  const T* qp = a.qp + (unsigned long long)b * Q * qps;
  const T* xg = a.rp + row * a.rps;  // this thread's row point (row 0 of the batch when inactive)
  T xr[DS > 0 ? DS : 1];
#pragma unroll
  for (int d = 0; d < DS; ++d) xr[d] = xg[d];

  const unsigned npass = (NCH == 0 || NV == 0) ? 1u : (NV + NCH - 1) / NCH;
  if (NCH > 0 && !TR::EXTRA && NV == 0) return;  // nothing to compute (e.g. K = 0)

  for (unsigned pass = 0; pass < npass; ++pass) {
    const unsigned c0 = pass * (unsigned)NCH;
    const unsigned nc = (TR::GRAD && DS > 0) ? (unsigned)DS : (NCH == 0 ? 0u : ot_minu(NCH, NV - c0));
    T m = TR::LOGD ? MM::ninf() : T(0);
    T acc[NA];
#pragma unroll
    for (int c = 0; c < NA; ++c) acc[c] = T(0);

    for (unsigned si = span0; si < span1; ++si) {
      const unsigned qb = BS ? a.spans[2 * si] : 0u;
      const unsigned qe = BS ? ot_minu(a.spans[2 * si + 1], Q) : Q;
      for (unsigned q0 = qb; q0 < qe; q0 += tp) {
        const unsigned nq = ot_minu(tp, qe - q0);
        __syncthreads();  // previous tile fully consumed
        const T* src = qp + (unsigned long long)q0 * qps;
        if (qps == D) {  // plain points: one coalesced copy
          for (unsigned e = tid; e < nq * D; e += nthr) sh.pts[e] = src[e];
        } else {         // packed rows: strided gather
          for (unsigned e = tid; e < nq * D; e += nthr) {
            const unsigned p = e / D, d = e - p * D;
            sh.pts[e] = src[(unsigned long long)p * qps + d];
          }
        }
        for (unsigned e = tid; e < nq; e += nthr) {
          const unsigned long long qi = ((unsigned long long)b * Q + q0 + e) * q1s;
          sh.q1[e] = a.q1[qi];
          if (TR::HAS_Q2) sh.q2[e] = a.q2[qi];
        }
        if (TR::HAS_V) {
          const unsigned ncd = nc > 0u ? nc : 1u;  // (nc = 0: loop below is empty)
          for (unsigned e = tid; e < nq * nc; e += nthr) {
            const unsigned p = e / ncd, c = e - p * ncd;
            sh.v[p * OT_CH + c] = a.q2[((unsigned long long)b * Q + q0 + p) * q1s + c0 + c];
          }
        }
        __syncthreads();
        if (!active) continue;

        for (unsigned p = lane; p < nq; p += lanes) {
          // Distance from direct differences.
          T df[DS > 0 ? DS : 1];
          T sq = T(0);
          if (DS > 0) {
#pragma unroll
            for (int d = 0; d < DS; ++d) {
              df[d] = xr[d] - sh.pts[p * DS + d];
              sq = fma(df[d], df[d], sq);
            }
          } else {
            const T* yq = sh.pts + p * D;
            for (unsigned d = 0; d < D; ++d) {
              const T t = xg[d] - yq[d];
              sq = fma(t, t, sq);
            }
          }
          // Weight (log or linear) and the gradient factor gf: grad = gf * (p_row - p_other).
          T z = T(0), wl = T(0), gf = T(0);
          if (COST == OT_COST_SQE) {
            z = sh.q1[p] - sq * (T(0.5) * inv);
            gf = T(1);
          } else if (COST == OT_COST_EUC) {
            const T dist = MM::sqrt(sq);
            z = sh.q1[p] - dist * inv;
            gf = dist > T(0) ? T(1) / dist : T(0);
          } else if (COST == OT_KER_GAUSS) {
            const T k = MM::expn(-sq * (T(0.5) * inv * inv));
            wl = k;
            gf = -k * (inv * inv);
          } else if (COST == OT_KER_LAP) {
            const T dist = MM::sqrt(sq);
            const T k = MM::expn(-dist * inv);
            wl = k;
            gf = dist > T(0) ? -k * inv / dist : T(0);
          } else {  // OT_KER_ENERGY
            const T dist = MM::sqrt(sq);
            wl = -dist;
            gf = dist > T(0) ? T(-1) / dist : T(0);
          }
          // Contributions u[c].
          T u[NA];
          const T wq = TR::LOGD ? (TR::HAS_Q2 ? sh.q2[p] : T(1)) : sh.q1[p];
          const T gw = wq * gf;
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            T v = T(0);
            if (c < (int)nc) {
              if (TR::HAS_V) {
                v = sh.v[p * OT_CH + c];
              } else {
                const int ci = (DS > 0 && c < DS) ? c : 0;  // compile-time index
                const T dc = DS > 0 ? df[ci] : xg[c0 + c] - sh.pts[p * D + c0 + c];
                v = gw * dc;
              }
            }
            u[c] = v;
          }
          if (TR::EXTRA) u[EX] = TR::LOGD ? wq : wq * wl;

          if (TR::LOGD) {
            if (z > m) {
              const T al = m == MM::ninf() ? T(0) : MM::expn(m - z);
              m = z;
#pragma unroll
              for (int c = 0; c < NACC; ++c) acc[c] = fma(acc[c], al, u[c]);
            } else if (z > MM::ninf()) {
              const T w = MM::expn(z - m);
#pragma unroll
              for (int c = 0; c < NACC; ++c) acc[c] = fma(w, u[c], acc[c]);
            }
          } else {
#pragma unroll
            for (int c = 0; c < NACC; ++c) acc[c] += u[c];
          }
        }
      }
    }  // spans

    // Merge the LANES partial states of a row (lanes of a row are adjacent within a warp).
    for (unsigned off = lanes >> 1; off > 0; off >>= 1) {
      if (TR::LOGD) {
        const T m2 = MM::shfl_xor(m, off);
        const T mx = m > m2 ? m : m2;
        const T a1 = m == MM::ninf() ? T(0) : MM::expn(m - mx);
        const T a2 = m2 == MM::ninf() ? T(0) : MM::expn(m2 - mx);
#pragma unroll
        for (int c = 0; c < NACC; ++c) {
          const T o = MM::shfl_xor(acc[c], off);
          acc[c] = acc[c] * a1 + o * a2;
        }
        m = mx;
      } else {
#pragma unroll
        for (int c = 0; c < NACC; ++c) acc[c] += MM::shfl_xor(acc[c], off);
      }
    }

    if (!active || lane != 0) continue;
    T* o = a.out + row * outw;
    if (OP == OT_OP_SOFTMIN) {
      o[0] = m == MM::ninf() ? MM::pinf() : -par * (m + MM::log(acc[EX]));
    } else if (OP == OT_OP_LSE_GRAD || OP == OT_OP_LSE_VALUES) {
      // pi_rq = exp(alpha_r + h_q - C_rq/eps) = exp(z - m) * exp(m + alpha_r)
      const T sc = m == MM::ninf() ? T(0) : MM::exact_exp(m + a.r1[row * a.rps]);
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        if (c < (int)nc) o[c0 + c] = sc * acc[c];
      if (OP == OT_OP_LSE_GRAD && pass == 0) o[D] = sc * acc[EX];
    } else if (OP == OT_OP_KPROD) {
      o[0] = acc[EX];
    } else {  // OT_OP_KSUMS_GRAD
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        if (c < (int)nc) o[c0 + c] = acc[c];
      if (pass == 0) o[D] = acc[EX];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fast path of the softmin for D <= 3 (point clouds, the multiscale fine level), dense or
// block-sparse. Same result as ot_core<OT_OP_SOFTMIN>, organised for throughput:
//   * each OTHER point is staged as ONE 4-vector (q_0, q_1, q_2, kappa h_q), zero-padded, so a
//     pair costs a single 16-byte shared load, shared by RB rows;
//   * register blocking: a thread keeps RB rows (RB = 4 when LANES <= 8), and the LANES * RB
//     threads of a row group split the points (a group is LANES * RB adjacent lanes of a warp);
//   * base 2: z = kappa h_q - kappa C(p_r, q) / eps (kappa = log2 e) and ex2 of the shifted
//     value (ex2.approx.ftz in f32: relative error ~2 ulp, no range reduction needed);
//   * the running (max, sum) is updated per chunk of OT_FU points: the chunk's max first (at most
//     one rescale of the sum), then one ex2 per pair; a chunk whose max is -inf adds nothing.
// f = -eps ln2 (m + log2 s), +inf when every term is masked. The lanes of a group merge with the
// associative combine (base 2), as in ot_core.
// ---------------------------------------------------------------------------------------------
#ifndef OT_FU
#define OT_FU 4      // points per chunk of the fast softmin
#endif
#ifndef OT_RB_MAX
#define OT_RB_MAX 4  // rows per thread of the fast softmin (register blocking), when LANES allows
#endif

template <typename T> struct __align__(16) OtP4 { T v[4]; };

template <typename T> struct OtFast;
template <> struct OtFast<float> {
  static __device__ __forceinline__ float ex2(float t) {  // t <= 0 (or -inf: +0)
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
    return r;
  }
  static __device__ __forceinline__ float log2(float t) { return log2f(t); }
};
template <> struct OtFast<double> {
  static __device__ __forceinline__ double ex2(double t) { return ::exp2(t); }
  static __device__ __forceinline__ double log2(double t) { return ::log2(t); }
};

// The pairs of one staged tile (nq points) for the RB rows of a thread: chunks of OT_FU points
// lane, lane + gl, ... (FULL: every point of every chunk exists, no bounds checks).
template <typename T, int DS, int COST, int RB, bool FULL>
__device__ __forceinline__ void ot_fast_chunks(const OtP4<T>* tile, unsigned nq, unsigned lane,
                                               unsigned gl, T sc, const T (&xr)[RB][3],
                                               T (&m)[RB], T (&s)[RB]) {
  typedef OtMath<T> MM;
  typedef OtFast<T> FF;
  for (unsigned p0 = lane; p0 < nq; p0 += gl * OT_FU) {
    T z[RB][OT_FU];
#pragma unroll
    for (int u = 0; u < OT_FU; ++u) {
      const unsigned p = p0 + (unsigned)u * gl;
      const bool in = FULL || p < nq;
      const OtP4<T> q = tile[in ? p : 0u];
#pragma unroll
      for (int k = 0; k < RB; ++k) {
        T sq = T(0);
#pragma unroll
        for (int d = 0; d < DS; ++d) {
          const T t = xr[k][d] - q.v[d];
          sq = fma(t, t, sq);
        }
        const T c = COST == OT_COST_SQE ? sq : MM::sqrt(sq);
        z[k][u] = in ? fma(-sc, c, q.v[3]) : MM::ninf();
      }
    }
#pragma unroll
    for (int k = 0; k < RB; ++k) {
      T mc = z[k][0];
#pragma unroll
      for (int u = 1; u < OT_FU; ++u) mc = z[k][u] > mc ? z[k][u] : mc;
      if (mc > m[k]) {
        s[k] = m[k] == MM::ninf() ? T(0) : s[k] * FF::ex2(m[k] - mc);
        m[k] = mc;
      }
      if (m[k] != MM::ninf()) {
        T add = T(0);
#pragma unroll
        for (int u = 0; u < OT_FU; ++u) add += FF::ex2(z[k][u] - m[k]);
        s[k] += add;
      }
    }
  }
}

template <typename T, int DS, int COST, bool BS, int RB>
__device__ __forceinline__ void ot_softmin_fast(const OtArgs<T>& a, OtP4<T>* tile) {
  typedef OtMath<T> MM;
  typedef OtFast<T> FF;
  const T kappa = T(1.4426950408889634074);  // log2 e
  const unsigned nthr = blockDim.x * blockDim.y;
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  const unsigned gl = blockDim.x * (unsigned)RB;  // lanes of a row group (power of two, <= 32)
  const unsigned lane = tid & (gl - 1u), grp = tid / gl;
  const unsigned R = a.R, Q = a.Q, qps = a.qps, q1s = a.q1s;
  const unsigned* task = BS ? a.tasks + 5ull * blockIdx.x : 0;
  const unsigned b = BS ? task[0] : blockIdx.y;
  const unsigned rbase = BS ? task[1] : blockIdx.x * blockDim.y;
  const unsigned rend = BS ? ot_minu(task[2], R) : R;
  const unsigned span0 = BS ? task[3] : 0u, span1 = BS ? task[4] : 1u;
  const T eps = a.par;
  const T sc = COST == OT_COST_SQE ? T(0.5) * kappa / eps : kappa / eps;

  T xr[RB][3];
  T m[RB], s[RB];
#pragma unroll
  for (int k = 0; k < RB; ++k) {
    const unsigned r = rbase + grp * (unsigned)RB + (unsigned)k;
    const T* xg = a.rp + ((unsigned long long)b * R + (r < rend ? r : 0u)) * a.rps;
#pragma unroll
    for (int d = 0; d < 3; ++d) xr[k][d] = d < DS ? xg[d] : T(0);
    m[k] = MM::ninf();
    s[k] = T(0);
  }
  const T* qp = a.qp + (unsigned long long)b * Q * qps;
  const T* q1 = a.q1 + (unsigned long long)b * Q * q1s;

  for (unsigned si = span0; si < span1; ++si) {
    const unsigned qb = BS ? a.spans[2 * si] : 0u;
    const unsigned qe = BS ? ot_minu(a.spans[2 * si + 1], Q) : Q;
    for (unsigned q0 = qb; q0 < qe; q0 += OT_TILE) {
      const unsigned nq = ot_minu(OT_TILE, qe - q0);
      __syncthreads();  // previous tile fully consumed
      for (unsigned e = tid; e < nq; e += nthr) {
        const T* src = qp + (unsigned long long)(q0 + e) * qps;
        OtP4<T> p;
#pragma unroll
        for (int d = 0; d < 3; ++d) p.v[d] = d < DS ? src[d] : T(0);
        p.v[3] = kappa * q1[(unsigned long long)(q0 + e) * q1s];
        tile[e] = p;
      }
      __syncthreads();
      // A full tile that the row group's chunks divide needs no bounds checks.
      if (nq == OT_TILE && OT_TILE % (gl * (unsigned)OT_FU) == 0u)
        ot_fast_chunks<T, DS, COST, RB, true>(tile, OT_TILE, lane, gl, sc, xr, m, s);
      else
        ot_fast_chunks<T, DS, COST, RB, false>(tile, nq, lane, gl, sc, xr, m, s);
    }
  }

  // Merge the gl partial states of each row (adjacent lanes of one warp).
  for (unsigned off = gl >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < RB; ++k) {
      const T m2 = MM::shfl_xor(m[k], off);
      const T s2 = MM::shfl_xor(s[k], off);
      const T mx = m[k] > m2 ? m[k] : m2;
      const T a1 = m[k] == MM::ninf() ? T(0) : FF::ex2(m[k] - mx);
      const T a2 = m2 == MM::ninf() ? T(0) : FF::ex2(m2 - mx);
      s[k] = s[k] * a1 + s2 * a2;
      m[k] = mx;
    }
  }
  if (lane != 0) return;
  const T ln2 = T(0.69314718055994530942);
#pragma unroll
  for (int k = 0; k < RB; ++k) {
    const unsigned r = rbase + grp * (unsigned)RB + (unsigned)k;
    if (r < rend)
      a.out[(unsigned long long)b * R + r] =
          m[k] == MM::ninf() ? MM::pinf() : -eps * ln2 * (m[k] + FF::log2(s[k]));
  }
}

// D in {1, 2, 3} and the register blocking RB from LANES (RB * LANES <= 32).
template <typename T, int COST, bool BS, int RB>
__device__ __forceinline__ void ot_softmin_fast_d(const OtArgs<T>& a, OtP4<T>* tile) {
  switch (a.D) {
    case 1: ot_softmin_fast<T, 1, COST, BS, RB>(a, tile); break;
    case 2: ot_softmin_fast<T, 2, COST, BS, RB>(a, tile); break;
    default: ot_softmin_fast<T, 3, COST, BS, RB>(a, tile); break;
  }
}

// Runtime D -> compile-time specialisation. The shared tile is declared here, once per kernel.
// BS: block-sparse (a.tasks non-null, grid (ntasks, 1, 1)); dense otherwise.
template <typename T, int OP, int COST, bool BS = false>
__device__ __forceinline__ void ot_dispatch(const OtArgs<T>& a) {
  __shared__ OtShared<T, OP> sh;
  // The fast path: f32 softmin with D <= 3 (measured slower than ot_core in f64, whose exp2 is
  // not a hardware instruction).
  if constexpr (OP == OT_OP_SOFTMIN && sizeof(T) == 4) {
    if (a.D <= 3u) {  // uniform across the grid
      static_assert(4u * OT_TILE <= OT_TILE_ELEMS, "the 4-vector tile must fit in sh.pts");
      OtP4<T>* tile = reinterpret_cast<OtP4<T>*>(sh.pts);
      if constexpr (OT_RB_MAX >= 8) {  // measured slower on an H100 (see softmin_bench.cu)
        if (blockDim.x <= 4u) {
          ot_softmin_fast_d<T, COST, BS, 8>(a, tile);
          return;
        }
      }
      // RB rows per thread, where the row group (LANES * RB threads) fits in a warp and RB
      // divides ROWS.
      if (blockDim.x <= 8u && blockDim.y % 4u == 0u)
        ot_softmin_fast_d<T, COST, BS, 4>(a, tile);
      else if (blockDim.x <= 16u && blockDim.y % 2u == 0u)
        ot_softmin_fast_d<T, COST, BS, 2>(a, tile);
      else
        ot_softmin_fast_d<T, COST, BS, 1>(a, tile);
      return;
    }
  }
  switch (a.D) {
    case 1: ot_core<T, 1, OP, COST, BS>(a, sh); break;
    case 2: ot_core<T, 2, OP, COST, BS>(a, sh); break;
    case 3: ot_core<T, 3, OP, COST, BS>(a, sh); break;
    case 4: ot_core<T, 4, OP, COST, BS>(a, sh); break;
    case 8: ot_core<T, 8, OP, COST, BS>(a, sh); break;
    default: ot_core<T, 0, OP, COST, BS>(a, sh); break;
  }
}

#endif  // CANDLE_OT_COMMON_CUH
