// candle-ot CUDA kernels: kernel sums (Gaussian, Laplacian, energy kernels).
//
// Entry points (T = float for *_f32, double for *_f64; kernel = gaussian | laplacian | energy):
//   kernel_product_{kernel}_{f32|f64}(x, y, b, out, B, N, M, D, sigma)
//       out[b,i] = sum_j k(x_i, y_j) b_j              x (B,N,D), y (B,M,D), b (B,M), out (B,N)
//   kernel_sums_grad_{kernel}_{f32|f64}(rows, cols, out, B, N, M, D, sigma)
//       rows (B,N,D) = p_i, cols (B,M,D+1) = [q_j, w_j]:
//       out[b,i,0..D] = sum_j w_j grad_p k(p_i, q_j),  out[b,i,D] = sum_j w_j k(p_i, q_j)
//                                                                                out (B,N,D+1)
// k = exp(-|p-q|^2 / (2 sigma^2)) (gaussian), exp(-|p-q| / sigma) (laplacian), -|p-q| (energy,
// sigma unused); grad_p k is taken as 0 at p = q for the last two.
// The kernel product's backward runs kernel_sums_grad twice: rows x against [y_j, b_j] (x-side),
// rows y against [x_i, grad_u_i] (y-side).
//
// Launch (see common.cuh): block (LANES, ROWS), grid (ceil(N/ROWS), B). Static shared memory.
#ifndef CANDLE_OT_COMMON_CUH
#include "common.cuh"
#endif

#define OT_KPROD_ENTRY(NAME, T, KER)                                                             \
  extern "C" __global__ void NAME(const T* __restrict__ x, const T* __restrict__ y,              \
                                  const T* __restrict__ b, T* __restrict__ out, unsigned int B,  \
                                  unsigned int N, unsigned int M, unsigned int D, T sigma) {     \
    (void)B;                                                                                     \
    OtArgs<T> a = {x, 0, y, b, 0, out, N, M, D, 0u, D, D, 1u, sigma, 0, 0};                      \
    ot_dispatch<T, OT_OP_KPROD, KER>(a);                                                         \
  }

#define OT_KSUMS_GRAD_ENTRY(NAME, T, KER)                                                        \
  extern "C" __global__ void NAME(const T* __restrict__ rows, const T* __restrict__ cols,        \
                                  T* __restrict__ out, unsigned int B, unsigned int N,           \
                                  unsigned int M, unsigned int D, T sigma) {                     \
    (void)B;                                                                                     \
    OtArgs<T> a = {rows, 0, cols, cols + D, 0, out, N, M, D, 0u, D, D + 1, D + 1, sigma, 0, 0};  \
    ot_dispatch<T, OT_OP_KSUMS_GRAD, KER>(a);                                                    \
  }

OT_KPROD_ENTRY(kernel_product_gaussian_f32, float, OT_KER_GAUSS)
OT_KPROD_ENTRY(kernel_product_laplacian_f32, float, OT_KER_LAP)
OT_KPROD_ENTRY(kernel_product_energy_f32, float, OT_KER_ENERGY)
OT_KPROD_ENTRY(kernel_product_gaussian_f64, double, OT_KER_GAUSS)
OT_KPROD_ENTRY(kernel_product_laplacian_f64, double, OT_KER_LAP)
OT_KPROD_ENTRY(kernel_product_energy_f64, double, OT_KER_ENERGY)

OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_gaussian_f32, float, OT_KER_GAUSS)
OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_laplacian_f32, float, OT_KER_LAP)
OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_energy_f32, float, OT_KER_ENERGY)
OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_gaussian_f64, double, OT_KER_GAUSS)
OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_laplacian_f64, double, OT_KER_LAP)
OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_energy_f64, double, OT_KER_ENERGY)
