// candle-ot CUDA kernels: softmin (streaming log-sum-exp) family.
//
// Entry points (T = float for *_f32, double for *_f64; cost = sqeuclidean | euclidean):
//   softmin_{cost}_{f32|f64}(x, y, h, out, B, N, M, D, eps)
//       out[b,i] = -eps * log sum_j exp(h[b,j] - C(x[b,i], y[b,j]) / eps)        out (B,N)
//   softmin_grad_x_{cost}_{f32|f64}(x, y, h, f, g, out, B, N, M, D, eps)
//       out[b,i,:] = g[b,i] * sum_j pi_ij grad_x C(x_i, y_j)                     out (B,N,D)
//   softmin_grad_y_{cost}_{f32|f64}(x, y, h, f, g, out, B, N, M, D, eps)
//       out[b,j,0..D] = sum_i g_i pi_ij grad_y C(x_i, y_j),
//       out[b,j,D]    = -eps * sum_i g_i pi_ij                                   out (B,M,D+1)
//   plan_apply_{cost}_{f32|f64}(x, y, h, f, v, out, B, N, M, D, K, eps)
//       out[b,i,:] = sum_j pi_ij v[b,j,:]                        v (B,M,K), out (B,N,K)
// with pi_ij = exp(h_j - C_ij/eps + f_i/eps), C = |x-y|^2/2 (sqeuclidean) or |x-y| (euclidean),
// grad_x C = x - y or (x - y)/|x - y| (0 at x = y), grad_y C = -grad_x C.
// x (B,N,D), y (B,M,D), h (B,M), f and g (B,N): contiguous row-major. h may hold -inf.
//
// Launch (see common.cuh): block (LANES, ROWS) with LANES*ROWS <= 256 and a multiple of 32;
// grid (ceil(N/ROWS), B) for softmin, softmin_grad_x and plan_apply; (ceil(M/ROWS), B) for
// softmin_grad_y. Static shared memory only.
#ifndef CANDLE_OT_COMMON_CUH
#include "common.cuh"
#endif

#define OT_SOFTMIN_ENTRY(NAME, T, COST)                                                          \
  extern "C" __global__ void                               \
      NAME(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ h,            \
           T* __restrict__ out, unsigned int B, unsigned int N, unsigned int M, unsigned int D,  \
           T eps) {                                                                              \
    (void)B;                                                                                     \
    OtArgs<T> a = {x, y, 0, 0, h, 0, 0, out, N, M, D, 0u, eps};                                  \
    ot_dispatch<T, OT_OP_SOFTMIN, COST>(a);                                                      \
  }

#define OT_GRAD_X_ENTRY(NAME, T, COST)                                                           \
  extern "C" __global__ void                               \
      NAME(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ h,            \
           const T* __restrict__ f, const T* __restrict__ g, T* __restrict__ out,                \
           unsigned int B, unsigned int N, unsigned int M, unsigned int D, T eps) {              \
    (void)B;                                                                                     \
    OtArgs<T> a = {x, y, f, g, h, 0, 0, out, N, M, D, 0u, eps};                                  \
    ot_dispatch<T, OT_OP_GRAD_X, COST>(a);                                                       \
  }

// Rows are the y_j (row scalar: h_j), the reduced set is x_i (scalars f_i, g_i).
#define OT_GRAD_Y_ENTRY(NAME, T, COST)                                                           \
  extern "C" __global__ void                               \
      NAME(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ h,            \
           const T* __restrict__ f, const T* __restrict__ g, T* __restrict__ out,                \
           unsigned int B, unsigned int N, unsigned int M, unsigned int D, T eps) {              \
    (void)B;                                                                                     \
    OtArgs<T> a = {y, x, h, 0, f, g, 0, out, M, N, D, 0u, eps};                                  \
    ot_dispatch<T, OT_OP_GRAD_Y, COST>(a);                                                       \
  }

#define OT_PLAN_ENTRY(NAME, T, COST)                                                             \
  extern "C" __global__ void                               \
      NAME(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ h,            \
           const T* __restrict__ f, const T* __restrict__ v, T* __restrict__ out,                \
           unsigned int B, unsigned int N, unsigned int M, unsigned int D, unsigned int K,       \
           T eps) {                                                                              \
    (void)B;                                                                                     \
    OtArgs<T> a = {x, y, f, 0, h, 0, v, out, N, M, D, K, eps};                                   \
    ot_dispatch<T, OT_OP_PLAN, COST>(a);                                                         \
  }

OT_SOFTMIN_ENTRY(softmin_sqeuclidean_f32, float, OT_COST_SQE)
OT_SOFTMIN_ENTRY(softmin_euclidean_f32, float, OT_COST_EUC)
OT_SOFTMIN_ENTRY(softmin_sqeuclidean_f64, double, OT_COST_SQE)
OT_SOFTMIN_ENTRY(softmin_euclidean_f64, double, OT_COST_EUC)

OT_GRAD_X_ENTRY(softmin_grad_x_sqeuclidean_f32, float, OT_COST_SQE)
OT_GRAD_X_ENTRY(softmin_grad_x_euclidean_f32, float, OT_COST_EUC)
OT_GRAD_X_ENTRY(softmin_grad_x_sqeuclidean_f64, double, OT_COST_SQE)
OT_GRAD_X_ENTRY(softmin_grad_x_euclidean_f64, double, OT_COST_EUC)

OT_GRAD_Y_ENTRY(softmin_grad_y_sqeuclidean_f32, float, OT_COST_SQE)
OT_GRAD_Y_ENTRY(softmin_grad_y_euclidean_f32, float, OT_COST_EUC)
OT_GRAD_Y_ENTRY(softmin_grad_y_sqeuclidean_f64, double, OT_COST_SQE)
OT_GRAD_Y_ENTRY(softmin_grad_y_euclidean_f64, double, OT_COST_EUC)

OT_PLAN_ENTRY(plan_apply_sqeuclidean_f32, float, OT_COST_SQE)
OT_PLAN_ENTRY(plan_apply_euclidean_f32, float, OT_COST_EUC)
OT_PLAN_ENTRY(plan_apply_sqeuclidean_f64, double, OT_COST_SQE)
OT_PLAN_ENTRY(plan_apply_euclidean_f64, double, OT_COST_EUC)
