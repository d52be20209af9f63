// candle-ot CUDA kernels: kernel sums (MMD / energy-distance family).
//
// Entry points (T = float for *_f32, double for *_f64; kernel = gaussian | laplacian | energy):
//   kernel_product_{kernel}_{f32|f64}(x, y, b, out, B, N, M, D, sigma)
//       out[b,i] = sum_j k(x_i, y_j) b_j                                          out (B,N)
//   kernel_grad_x_{kernel}_{f32|f64}(x, y, b, g, out, B, N, M, D, sigma)
//       out[b,i,:] = g_i sum_j b_j grad_x k(x_i, y_j)                             out (B,N,D)
//   kernel_grad_y_{kernel}_{f32|f64}(x, y, b, g, out, B, N, M, D, sigma)
//       out[b,j,0..D] = b_j sum_i g_i grad_y k(x_i, y_j),
//       out[b,j,D]    = sum_i g_i k(x_i, y_j)                                     out (B,M,D+1)
// with k = exp(-|x-y|^2 / (2 sigma^2)) (gaussian), exp(-|x-y| / sigma) (laplacian),
// -|x-y| (energy; sigma unused); the gradient of |x-y| at x = y is taken as 0.
// x (B,N,D), y (B,M,D), b (B,M), g (B,N): contiguous row-major.
//
// Launch (see common.cuh): block (LANES, ROWS) with LANES*ROWS <= 256 and a multiple of 32;
// grid (ceil(N/ROWS), B) for kernel_product and kernel_grad_x; (ceil(M/ROWS), B) for
// kernel_grad_y. Static shared memory only.
#ifndef CANDLE_OT_COMMON_CUH
#include "common.cuh"
#endif

#define OT_KPROD_ENTRY(NAME, T, KER)                                                             \
  extern "C" __global__ void                               \
      NAME(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ b,            \
           T* __restrict__ out, unsigned int B, unsigned int N, unsigned int M, unsigned int D,  \
           T sigma) {                                                                            \
    (void)B;                                                                                     \
    OtArgs<T> a = {x, y, 0, 0, b, 0, 0, out, N, M, D, 0u, sigma};                                \
    ot_dispatch<T, OT_OP_KPROD, KER>(a);                                                         \
  }

#define OT_KGRAD_X_ENTRY(NAME, T, KER)                                                           \
  extern "C" __global__ void                               \
      NAME(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ b,            \
           const T* __restrict__ g, T* __restrict__ out, unsigned int B, unsigned int N,         \
           unsigned int M, unsigned int D, T sigma) {                                            \
    (void)B;                                                                                     \
    OtArgs<T> a = {x, y, 0, g, b, 0, 0, out, N, M, D, 0u, sigma};                                \
    ot_dispatch<T, OT_OP_KGRAD_X, KER>(a);                                                       \
  }

// Rows are the y_j (row scalar: b_j), the reduced set is x_i (scalar g_i).
#define OT_KGRAD_Y_ENTRY(NAME, T, KER)                                                           \
  extern "C" __global__ void                               \
      NAME(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ b,            \
           const T* __restrict__ g, T* __restrict__ out, unsigned int B, unsigned int N,         \
           unsigned int M, unsigned int D, T sigma) {                                            \
    (void)B;                                                                                     \
    OtArgs<T> a = {y, x, 0, b, g, 0, 0, out, M, N, D, 0u, sigma};                                \
    ot_dispatch<T, OT_OP_KGRAD_Y, KER>(a);                                                       \
  }

OT_KPROD_ENTRY(kernel_product_gaussian_f32, float, OT_KER_GAUSS)
OT_KPROD_ENTRY(kernel_product_laplacian_f32, float, OT_KER_LAP)
OT_KPROD_ENTRY(kernel_product_energy_f32, float, OT_KER_ENERGY)
OT_KPROD_ENTRY(kernel_product_gaussian_f64, double, OT_KER_GAUSS)
OT_KPROD_ENTRY(kernel_product_laplacian_f64, double, OT_KER_LAP)
OT_KPROD_ENTRY(kernel_product_energy_f64, double, OT_KER_ENERGY)

OT_KGRAD_X_ENTRY(kernel_grad_x_gaussian_f32, float, OT_KER_GAUSS)
OT_KGRAD_X_ENTRY(kernel_grad_x_laplacian_f32, float, OT_KER_LAP)
OT_KGRAD_X_ENTRY(kernel_grad_x_energy_f32, float, OT_KER_ENERGY)
OT_KGRAD_X_ENTRY(kernel_grad_x_gaussian_f64, double, OT_KER_GAUSS)
OT_KGRAD_X_ENTRY(kernel_grad_x_laplacian_f64, double, OT_KER_LAP)
OT_KGRAD_X_ENTRY(kernel_grad_x_energy_f64, double, OT_KER_ENERGY)

OT_KGRAD_Y_ENTRY(kernel_grad_y_gaussian_f32, float, OT_KER_GAUSS)
OT_KGRAD_Y_ENTRY(kernel_grad_y_laplacian_f32, float, OT_KER_LAP)
OT_KGRAD_Y_ENTRY(kernel_grad_y_energy_f32, float, OT_KER_ENERGY)
OT_KGRAD_Y_ENTRY(kernel_grad_y_gaussian_f64, double, OT_KER_GAUSS)
OT_KGRAD_Y_ENTRY(kernel_grad_y_laplacian_f64, double, OT_KER_LAP)
OT_KGRAD_Y_ENTRY(kernel_grad_y_energy_f64, double, OT_KER_ENERGY)
