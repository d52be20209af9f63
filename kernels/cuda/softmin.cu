// candle-ot CUDA kernels: softmin (streaming log-sum-exp) family.
//
// Entry points (T = float for *_f32, double for *_f64; cost = sqeuclidean | euclidean):
//   softmin_{cost}_{f32|f64}(x, y, h, out, B, N, M, D, eps)
//       out[b,i] = -eps * log sum_j exp(h[b,j] - C(x[b,i], y[b,j]) / eps)        out (B,N)
//       x (B,N,D), y (B,M,D), h (B,M); +inf when every h_j is -inf.
//   lse_grad_{cost}_{f32|f64}(rows, cols, out, B, N, M, D, eps)
//       rows (B,N,D+1) = [p_i, alpha_i], cols (B,M,D+2) = [q_j, h_j, w_j]:
//       out[b,i,0..D] = sum_j pi_ij w_j grad_p C(p_i, q_j),  out[b,i,D] = sum_j pi_ij w_j
//                                                                                out (B,N,D+1)
//   lse_values_{cost}_{f32|f64}(rows, cols, out, B, N, M, D, K, eps)
//       rows (B,N,D+1) = [p_i, alpha_i], cols (B,M,D+1+K) = [q_j, h_j, v_j (K)]:
//       out[b,i,:] = sum_j pi_ij v_j                                              out (B,N,K)
// with pi_ij = exp(alpha_i + h_j - C(p_i, q_j)/eps), C = |p-q|^2/2 (sqeuclidean) or |p-q|
// (euclidean), grad_p C = p - q or (p - q)/|p - q| (0 at p = q). h may hold -inf (masked
// points); a row with every term masked gives 0. All arrays contiguous row-major.
//
// Block-sparse variants (the multiscale backend's fine level), same arguments plus the task table:
//   block_softmin_{cost}_{f32|f64}(x, y, h, out, B, N, M, D, eps, tasks, spans, ntasks)
//   block_lse_grad_{cost}_{f32|f64}(rows, cols, out, B, N, M, D, eps, tasks, spans, ntasks)
//       as softmin / lse_grad, each row i reduced only over the OTHER ranges of its task's spans;
//       tasks (ntasks x 5 u32): b, row_start, row_end (<= row_start + ROWS), span_begin,
//       span_end; spans (2 u32 each): [start, end) within batch item b. Grid (ntasks, 1, 1).
//       Rows not covered by a task are not written.
//
// The online backend's backward runs lse_grad twice: x-side rows [x_i, f_i/eps] against
// [y_j, h_j, 1] (then divides by the mass column), y-side rows [y_j, h_j] against
// [x_i, f_i/eps, grad_f_i]. The plan operators run lse_values.
//
// Launch (see common.cuh): block (LANES, ROWS) with LANES*ROWS <= 256 and a multiple of 32;
// grid (ceil(N/ROWS), B). Static shared memory only.
#ifndef CANDLE_OT_COMMON_CUH
#include "common.cuh"
#endif

#define OT_SOFTMIN_ENTRY(NAME, T, COST)                                                          \
  extern "C" __global__ void NAME(const T* __restrict__ x, const T* __restrict__ y,              \
                                  const T* __restrict__ h, T* __restrict__ out, unsigned int B,  \
                                  unsigned int N, unsigned int M, unsigned int D, T eps) {       \
    (void)B;                                                                                     \
    OtArgs<T> a = {x, 0, y, h, 0, out, N, M, D, 0u, D, D, 1u, eps, 0, 0};                        \
    ot_dispatch<T, OT_OP_SOFTMIN, COST>(a);                                                      \
  }

#define OT_LSE_GRAD_ENTRY(NAME, T, COST)                                                         \
  extern "C" __global__ void NAME(const T* __restrict__ rows, const T* __restrict__ cols,        \
                                  T* __restrict__ out, unsigned int B, unsigned int N,           \
                                  unsigned int M, unsigned int D, T eps) {                       \
    (void)B;                                                                                     \
    OtArgs<T> a = {rows, rows + D, cols, cols + D, cols + D + 1, out, N, M, D, 0u,               \
                   D + 1, D + 2, D + 2, eps, 0, 0};                                              \
    ot_dispatch<T, OT_OP_LSE_GRAD, COST>(a);                                                     \
  }

#define OT_LSE_VALUES_ENTRY(NAME, T, COST)                                                       \
  extern "C" __global__ void NAME(const T* __restrict__ rows, const T* __restrict__ cols,        \
                                  T* __restrict__ out, unsigned int B, unsigned int N,           \
                                  unsigned int M, unsigned int D, unsigned int K, T eps) {       \
    (void)B;                                                                                     \
    OtArgs<T> a = {rows, rows + D, cols, cols + D, cols + D + 1, out, N, M, D, K,                \
                   D + 1, D + 1 + K, D + 1 + K, eps, 0, 0};                                      \
    ot_dispatch<T, OT_OP_LSE_VALUES, COST>(a);                                                   \
  }

#define OT_BLOCK_SOFTMIN_ENTRY(NAME, T, COST)                                                    \
  extern "C" __global__ void NAME(const T* __restrict__ x, const T* __restrict__ y,              \
                                  const T* __restrict__ h, T* __restrict__ out, unsigned int B,  \
                                  unsigned int N, unsigned int M, unsigned int D, T eps,         \
                                  const unsigned int* __restrict__ tasks,                        \
                                  const unsigned int* __restrict__ spans, unsigned int ntasks) { \
    (void)B;                                                                                     \
    if (blockIdx.x >= ntasks) return;                                                            \
    OtArgs<T> a = {x, 0, y, h, 0, out, N, M, D, 0u, D, D, 1u, eps, tasks, spans};                \
    ot_dispatch<T, OT_OP_SOFTMIN, COST, true>(a);                                                \
  }

#define OT_BLOCK_LSE_GRAD_ENTRY(NAME, T, COST)                                                   \
  extern "C" __global__ void NAME(const T* __restrict__ rows, const T* __restrict__ cols,        \
                                  T* __restrict__ out, unsigned int B, unsigned int N,           \
                                  unsigned int M, unsigned int D, T eps,                         \
                                  const unsigned int* __restrict__ tasks,                        \
                                  const unsigned int* __restrict__ spans, unsigned int ntasks) { \
    (void)B;                                                                                     \
    if (blockIdx.x >= ntasks) return;                                                            \
    OtArgs<T> a = {rows, rows + D, cols, cols + D, cols + D + 1, out, N, M, D, 0u,               \
                   D + 1, D + 2, D + 2, eps, tasks, spans};                                      \
    ot_dispatch<T, OT_OP_LSE_GRAD, COST, true>(a);                                               \
  }

OT_SOFTMIN_ENTRY(softmin_sqeuclidean_f32, float, OT_COST_SQE)
OT_SOFTMIN_ENTRY(softmin_euclidean_f32, float, OT_COST_EUC)
OT_SOFTMIN_ENTRY(softmin_sqeuclidean_f64, double, OT_COST_SQE)
OT_SOFTMIN_ENTRY(softmin_euclidean_f64, double, OT_COST_EUC)

OT_LSE_GRAD_ENTRY(lse_grad_sqeuclidean_f32, float, OT_COST_SQE)
OT_LSE_GRAD_ENTRY(lse_grad_euclidean_f32, float, OT_COST_EUC)
OT_LSE_GRAD_ENTRY(lse_grad_sqeuclidean_f64, double, OT_COST_SQE)
OT_LSE_GRAD_ENTRY(lse_grad_euclidean_f64, double, OT_COST_EUC)

OT_LSE_VALUES_ENTRY(lse_values_sqeuclidean_f32, float, OT_COST_SQE)
OT_LSE_VALUES_ENTRY(lse_values_euclidean_f32, float, OT_COST_EUC)
OT_LSE_VALUES_ENTRY(lse_values_sqeuclidean_f64, double, OT_COST_SQE)
OT_LSE_VALUES_ENTRY(lse_values_euclidean_f64, double, OT_COST_EUC)

OT_BLOCK_SOFTMIN_ENTRY(block_softmin_sqeuclidean_f32, float, OT_COST_SQE)
OT_BLOCK_SOFTMIN_ENTRY(block_softmin_euclidean_f32, float, OT_COST_EUC)
OT_BLOCK_SOFTMIN_ENTRY(block_softmin_sqeuclidean_f64, double, OT_COST_SQE)
OT_BLOCK_SOFTMIN_ENTRY(block_softmin_euclidean_f64, double, OT_COST_EUC)

OT_BLOCK_LSE_GRAD_ENTRY(block_lse_grad_sqeuclidean_f32, float, OT_COST_SQE)
OT_BLOCK_LSE_GRAD_ENTRY(block_lse_grad_euclidean_f32, float, OT_COST_EUC)
OT_BLOCK_LSE_GRAD_ENTRY(block_lse_grad_sqeuclidean_f64, double, OT_COST_SQE)
OT_BLOCK_LSE_GRAD_ENTRY(block_lse_grad_euclidean_f64, double, OT_COST_EUC)
