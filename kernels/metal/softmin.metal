// candle-ot Metal kernels: softmin (streaming log-sum-exp) family, f32 only.
// Faithful twin of kernels/cuda/softmin.cu; entry-point names are the CUDA *_f32 names.
//
//   softmin_{cost}_f32(x, y, h, out, B, N, M, D, eps)
//       out[b,i] = -eps * log sum_j exp(h[b,j] - C(x[b,i], y[b,j]) / eps)        out (B,N)
//   softmin_grad_x_{cost}_f32(x, y, h, f, g, out, B, N, M, D, eps)
//       out[b,i,:] = g[b,i] * sum_j pi_ij grad_x C(x_i, y_j)                     out (B,N,D)
//   softmin_grad_y_{cost}_f32(x, y, h, f, g, out, B, N, M, D, eps)
//       out[b,j,0..D] = sum_i g_i pi_ij grad_y C(x_i, y_j),
//       out[b,j,D]    = -eps * sum_i g_i pi_ij                                   out (B,M,D+1)
//   plan_apply_{cost}_f32(x, y, h, f, v, out, B, N, M, D, K, eps)
//       out[b,i,:] = sum_j pi_ij v[b,j,:]                        v (B,M,K), out (B,N,K)
// pi_ij = exp(h_j - C_ij/eps + f_i/eps); cost = sqeuclidean (|x-y|^2/2) | euclidean (|x-y|).
//
// Buffer indices: the arguments in the order listed, from [[buffer(0)]]: pointers are device
// buffers, sizes `constant uint&`, eps `constant float&` (setBytes). E.g. softmin: x 0, y 1, h 2,
// out 3, B 4, N 5, M 6, D 7, eps 8; plan_apply: x 0, y 1, h 2, f 3, v 4, out 5, B 6, N 7, M 8,
// D 9, K 10, eps 11.
// Dispatch (see common.metal): threadsPerThreadgroup (LANES, ROWS, 1), LANES*ROWS <= 256;
// threadgroups (ceil(N/ROWS), B, 1), or (ceil(M/ROWS), B, 1) for softmin_grad_y.
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
    const OtArgs a = {x, y, 0, 0, h, 0, 0, out, N, M, D, 0u, eps};                           \
    ot_dispatch<OT_OP_SOFTMIN, COST>(a, &sh, ltid, tgid, tptg);                              \
  }

#define OT_GRAD_X_ENTRY(NAME, COST)                                                          \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]], \
                   device const float* h [[buffer(2)]], device const float* f [[buffer(3)]], \
                   device const float* g [[buffer(4)]], device float* out [[buffer(5)]],     \
                   constant uint& B [[buffer(6)]], constant uint& N [[buffer(7)]],           \
                   constant uint& M [[buffer(8)]], constant uint& D [[buffer(9)]],           \
                   constant float& eps [[buffer(10)]], OT_TG_PARAMS) {                       \
    (void)B;                                                                                 \
    threadgroup OtShared<OT_OP_GRAD_X> sh;                                                   \
    const OtArgs a = {x, y, f, g, h, 0, 0, out, N, M, D, 0u, eps};                           \
    ot_dispatch<OT_OP_GRAD_X, COST>(a, &sh, ltid, tgid, tptg);                               \
  }

// Rows are the y_j (row scalar: h_j), the reduced set is x_i (scalars f_i, g_i).
#define OT_GRAD_Y_ENTRY(NAME, COST)                                                          \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]], \
                   device const float* h [[buffer(2)]], device const float* f [[buffer(3)]], \
                   device const float* g [[buffer(4)]], device float* out [[buffer(5)]],     \
                   constant uint& B [[buffer(6)]], constant uint& N [[buffer(7)]],           \
                   constant uint& M [[buffer(8)]], constant uint& D [[buffer(9)]],           \
                   constant float& eps [[buffer(10)]], OT_TG_PARAMS) {                       \
    (void)B;                                                                                 \
    threadgroup OtShared<OT_OP_GRAD_Y> sh;                                                   \
    const OtArgs a = {y, x, h, 0, f, g, 0, out, M, N, D, 0u, eps};                           \
    ot_dispatch<OT_OP_GRAD_Y, COST>(a, &sh, ltid, tgid, tptg);                               \
  }

#define OT_PLAN_ENTRY(NAME, COST)                                                            \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]], \
                   device const float* h [[buffer(2)]], device const float* f [[buffer(3)]], \
                   device const float* v [[buffer(4)]], device float* out [[buffer(5)]],     \
                   constant uint& B [[buffer(6)]], constant uint& N [[buffer(7)]],           \
                   constant uint& M [[buffer(8)]], constant uint& D [[buffer(9)]],           \
                   constant uint& K [[buffer(10)]], constant float& eps [[buffer(11)]],      \
                   OT_TG_PARAMS) {                                                           \
    (void)B;                                                                                 \
    threadgroup OtShared<OT_OP_PLAN> sh;                                                     \
    const OtArgs a = {x, y, f, 0, h, 0, v, out, N, M, D, K, eps};                            \
    ot_dispatch<OT_OP_PLAN, COST>(a, &sh, ltid, tgid, tptg);                                 \
  }

OT_SOFTMIN_ENTRY(softmin_sqeuclidean_f32, OT_COST_SQE)
OT_SOFTMIN_ENTRY(softmin_euclidean_f32, OT_COST_EUC)

OT_GRAD_X_ENTRY(softmin_grad_x_sqeuclidean_f32, OT_COST_SQE)
OT_GRAD_X_ENTRY(softmin_grad_x_euclidean_f32, OT_COST_EUC)

OT_GRAD_Y_ENTRY(softmin_grad_y_sqeuclidean_f32, OT_COST_SQE)
OT_GRAD_Y_ENTRY(softmin_grad_y_euclidean_f32, OT_COST_EUC)

OT_PLAN_ENTRY(plan_apply_sqeuclidean_f32, OT_COST_SQE)
OT_PLAN_ENTRY(plan_apply_euclidean_f32, OT_COST_EUC)
