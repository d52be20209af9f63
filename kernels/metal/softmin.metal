// candle-ot Metal kernels: softmin (streaming log-sum-exp) family, f32 only.
// Faithful twin of kernels/cuda/softmin.cu; entry-point names are the CUDA *_f32 names.
//
//   softmin_{cost}_f32(x, y, h, out, B, N, M, D, eps)
//       out[b,i] = -eps * log sum_j exp(h[b,j] - C(x[b,i], y[b,j]) / eps)        out (B,N)
//       x (B,N,D), y (B,M,D), h (B,M); +inf when every h_j is -inf.
//   lse_grad_{cost}_f32(rows, cols, out, B, N, M, D, eps)
//       rows (B,N,D+1) = [p_i, alpha_i], cols (B,M,D+2) = [q_j, h_j, w_j]:
//       out[b,i,0..D] = sum_j pi_ij w_j grad_p C(p_i, q_j),  out[b,i,D] = sum_j pi_ij w_j
//                                                                                out (B,N,D+1)
//   lse_values_{cost}_f32(rows, cols, out, B, N, M, D, K, eps)
//       rows (B,N,D+1) = [p_i, alpha_i], cols (B,M,D+1+K) = [q_j, h_j, v_j (K)]:
//       out[b,i,:] = sum_j pi_ij v_j                                              out (B,N,K)
// with pi_ij = exp(alpha_i + h_j - C(p_i, q_j)/eps), C = |p-q|^2/2 (sqeuclidean) or |p-q|
// (euclidean), grad_p C = p - q or (p - q)/|p - q| (0 at p = q). h may hold -inf (masked
// points); a row with every term masked gives 0. All arrays contiguous row-major.
//
// The online backend's backward runs lse_grad twice: x-side rows [x_i, f_i/eps] against
// [y_j, h_j, 1] (then divides by the mass column), y-side rows [y_j, h_j] against
// [x_i, f_i/eps, grad_f_i]. The plan operators run lse_values.
//
// Buffer indices: the arguments in the order listed, from [[buffer(0)]]: pointers are device
// buffers, sizes `constant uint&`, eps `constant float&` (setBytes). E.g. softmin: x 0, y 1, h 2,
// out 3, B 4, N 5, M 6, D 7, eps 8; lse_grad: rows 0, cols 1, out 2, B 3, N 4, M 5, D 6, eps 7;
// lse_values: rows 0, cols 1, out 2, B 3, N 4, M 5, D 6, K 7, eps 8.
//
// Block-sparse variants (the multiscale backend's fine level), the same arguments plus the task
// table, bound after them: block_softmin: x 0, y 1, h 2, out 3, B 4, N 5, M 6, D 7, eps 8,
// tasks 9, spans 10, ntasks 11; block_lse_grad: rows 0, cols 1, out 2, B 3, N 4, M 5, D 6,
// eps 7, tasks 8, spans 9, ntasks 10. tasks (ntasks x 5 uint): b, row_start, row_end
// (<= row_start + ROWS), span_begin, span_end; spans (2 uint each): [start, end) within batch
// item b. threadgroups (ntasks, 1, 1). Rows not covered by a task are not written.
// Dispatch (see common.metal): threadsPerThreadgroup (LANES, ROWS, 1), LANES*ROWS <= 256;
// threadgroups (ceil(N/ROWS), B, 1). Static threadgroup memory only.
#ifndef CANDLE_OT_COMMON_METAL
#include "common.metal"
#endif

#define OT_SOFTMIN_ENTRY(NAME, COST)                                                         \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]], \
                   device const float* h [[buffer(2)]], device float* out [[buffer(3)]],     \
                   constant uint& B [[buffer(4)]], constant uint& N [[buffer(5)]],           \
                   constant uint& M [[buffer(6)]], constant uint& D [[buffer(7)]],           \
                   constant float& eps [[buffer(8)]], OT_TG_PARAMS) {                        \
    (void)B;                                                                                 \
    threadgroup OtShared<OT_OP_SOFTMIN> sh;                                                  \
    const OtArgs a = {x, 0, y, h, 0, out, N, M, D, 0u, D, D, 1u, eps, 0, 0};                 \
    ot_dispatch<OT_OP_SOFTMIN, COST>(a, &sh, ltid, tgid, tptg);                              \
  }

#define OT_LSE_GRAD_ENTRY(NAME, COST)                                                              \
  kernel void NAME(device const float* rows [[buffer(0)]], device const float* cols [[buffer(1)]], \
                   device float* out [[buffer(2)]], constant uint& B [[buffer(3)]],                \
                   constant uint& N [[buffer(4)]], constant uint& M [[buffer(5)]],                 \
                   constant uint& D [[buffer(6)]], constant float& eps [[buffer(7)]],              \
                   OT_TG_PARAMS) {                                                                 \
    (void)B;                                                                                       \
    threadgroup OtShared<OT_OP_LSE_GRAD> sh;                                                       \
    const OtArgs a = {rows, rows + D, cols, cols + D, cols + D + 1, out, N, M, D, 0u,              \
                      D + 1, D + 2, D + 2, eps, 0, 0};                                             \
    ot_dispatch<OT_OP_LSE_GRAD, COST>(a, &sh, ltid, tgid, tptg);                                   \
  }

#define OT_LSE_VALUES_ENTRY(NAME, COST)                                                            \
  kernel void NAME(device const float* rows [[buffer(0)]], device const float* cols [[buffer(1)]], \
                   device float* out [[buffer(2)]], constant uint& B [[buffer(3)]],                \
                   constant uint& N [[buffer(4)]], constant uint& M [[buffer(5)]],                 \
                   constant uint& D [[buffer(6)]], constant uint& K [[buffer(7)]],                 \
                   constant float& eps [[buffer(8)]], OT_TG_PARAMS) {                              \
    (void)B;                                                                                       \
    threadgroup OtShared<OT_OP_LSE_VALUES> sh;                                                     \
    const OtArgs a = {rows, rows + D, cols, cols + D, cols + D + 1, out, N, M, D, K,               \
                      D + 1, D + 1 + K, D + 1 + K, eps, 0, 0};                                     \
    ot_dispatch<OT_OP_LSE_VALUES, COST>(a, &sh, ltid, tgid, tptg);                                 \
  }

OT_SOFTMIN_ENTRY(softmin_sqeuclidean_f32, OT_COST_SQE)
OT_SOFTMIN_ENTRY(softmin_euclidean_f32, OT_COST_EUC)

OT_LSE_GRAD_ENTRY(lse_grad_sqeuclidean_f32, OT_COST_SQE)
OT_LSE_GRAD_ENTRY(lse_grad_euclidean_f32, OT_COST_EUC)

OT_LSE_VALUES_ENTRY(lse_values_sqeuclidean_f32, OT_COST_SQE)
OT_LSE_VALUES_ENTRY(lse_values_euclidean_f32, OT_COST_EUC)

#define OT_BLOCK_SOFTMIN_ENTRY(NAME, COST)                                                    \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]],  \
                   device const float* h [[buffer(2)]], device float* out [[buffer(3)]],      \
                   constant uint& B [[buffer(4)]], constant uint& N [[buffer(5)]],            \
                   constant uint& M [[buffer(6)]], constant uint& D [[buffer(7)]],            \
                   constant float& eps [[buffer(8)]], device const uint* tasks [[buffer(9)]], \
                   device const uint* spans [[buffer(10)]],                                   \
                   constant uint& ntasks [[buffer(11)]], OT_TG_PARAMS) {                      \
    (void)B;                                                                                  \
    threadgroup OtShared<OT_OP_SOFTMIN> sh;                                                   \
    if (tgid.x >= ntasks) return;                                                             \
    const OtArgs a = {x, 0, y, h, 0, out, N, M, D, 0u, D, D, 1u, eps, tasks, spans};          \
    ot_dispatch<OT_OP_SOFTMIN, COST, true>(a, &sh, ltid, tgid, tptg);                         \
  }

#define OT_BLOCK_LSE_GRAD_ENTRY(NAME, COST)                                                        \
  kernel void NAME(device const float* rows [[buffer(0)]], device const float* cols [[buffer(1)]], \
                   device float* out [[buffer(2)]], constant uint& B [[buffer(3)]],                \
                   constant uint& N [[buffer(4)]], constant uint& M [[buffer(5)]],                 \
                   constant uint& D [[buffer(6)]], constant float& eps [[buffer(7)]],              \
                   device const uint* tasks [[buffer(8)]], device const uint* spans [[buffer(9)]], \
                   constant uint& ntasks [[buffer(10)]], OT_TG_PARAMS) {                           \
    (void)B;                                                                                       \
    threadgroup OtShared<OT_OP_LSE_GRAD> sh;                                                       \
    if (tgid.x >= ntasks) return;                                                                  \
    const OtArgs a = {rows, rows + D, cols, cols + D, cols + D + 1, out, N, M, D, 0u,              \
                      D + 1, D + 2, D + 2, eps, tasks, spans};                                     \
    ot_dispatch<OT_OP_LSE_GRAD, COST, true>(a, &sh, ltid, tgid, tptg);                             \
  }

OT_BLOCK_SOFTMIN_ENTRY(block_softmin_sqeuclidean_f32, OT_COST_SQE)
OT_BLOCK_SOFTMIN_ENTRY(block_softmin_euclidean_f32, OT_COST_EUC)

OT_BLOCK_LSE_GRAD_ENTRY(block_lse_grad_sqeuclidean_f32, OT_COST_SQE)
OT_BLOCK_LSE_GRAD_ENTRY(block_lse_grad_euclidean_f32, OT_COST_EUC)
